"""Planning a conversion: the folder's size before any work, the layers shared out between
processes, and each layer's top-k under an FFN budget (measured sensitivity or uniform)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from . import archs, devices, processes, surgery
from .console import progress
from .conversion import Dense
from .errors import UsageError
from .evaluation import quick as evaluate
from .ffn import DenseFFN
from .layer import split_layer
from .moe import blocks_of
from .recipe import Recipe
from .stages import budget, export, load
from .stages.calibrate import ActivationStats, layer_generator
from .stages.router import RouterSettings

OUTPUT_MARGIN = 1.1  # on the weights estimated by output_size: room for what it leaves out (biases, coverage, gates)
OUTPUT_FILES = 1_000_000  # config, recipe, card, figures and modeling_densetomoe.py: about 100 kB, with room to spare


def output_size(dense: Dense, recipe: Recipe, untie: bool = False) -> int | None:
    """About how many bytes the converted folder takes, from the checkpoint's headers and config: the
    dense parameters in ``recipe.dtype`` (the experts hold the FFN's neurons, pruning only removes
    some); per converted layer, an MLP router and the experts' mean outputs, the most a format adds
    (``hidden x (router_hidden + 2 x experts) + router_hidden x experts``); a tied head that the format
    writes as its own matrix (``untie``) (``vocab x hidden``); all of it :data:`OUTPUT_MARGIN` times; then the source's tokenizer and
    configs (the files a Hub download fetches besides weights) and :data:`OUTPUT_FILES`.
    all-MiniLM-L6-v2 at 8 experts: about 103 MB, for a folder of 93 MB. None for a GGUF source, whose
    tensors are counted only once it is loaded."""
    if dense.source.gguf_file:
        return None
    hidden, _ = archs.ffn_sizes(dense.config, dense.arch)
    layers = len(set(recipe.layers)) if recipe.layers else dense.num_layers
    parameters = load.parameter_count(dense.source.path)
    width, experts = recipe.router_hidden, recipe.experts
    parameters += layers * (hidden * (width + 2 * experts) + width * experts)
    if untie and getattr(dense.config, "tie_word_embeddings", False):
        parameters += getattr(dense.config, "vocab_size", 0) * hidden
    weights = parameters * load.DTYPES[recipe.dtype].itemsize * OUTPUT_MARGIN
    patterns = [p for p in load.HUB_FILES if not p.endswith(".safetensors")]
    others = {path for pattern in patterns for path in dense.source.path.glob(pattern) if path.is_file()}
    return int(weights) + sum(path.stat().st_size for path in others) + OUTPUT_FILES


def check_output_space(dense: Dense, recipe: Recipe, untie: bool, out: Path) -> int | None:
    """Refuse, before any work, an ``out`` whose filesystem cannot hold the folder; returns the bytes
    it will take (:func:`output_size`)."""
    needed = output_size(dense, recipe, untie)
    if needed is not None:
        export.check_space(out, needed)
    return needed


def split_layers(
    ffns: dict[int, DenseFFN],
    stats: ActivationStats,
    layers: list[int],
    recipe: Recipe,
    activation: str,
    show_progress: bool,
    log: Callable[[str], None] = lambda message: None,
    device: torch.device | str = "cpu",
) -> dict[int, surgery.LayerSplit]:
    """Every layer's :func:`split_layer`, computed on ``device``. Under ``accelerate launch`` the layers
    are shared out between the processes (layer ``i`` to process ``i mod n``), each computing on its
    own device, and the splits gathered back in every process (through the CPU); each layer has its
    own random stream, so the result does not depend on the number of processes."""
    state = processes.state()
    mine = layers[state.process_index :: state.num_processes]
    if state.num_processes > 1:
        log(f"partition and routing: layers shared out between {state.num_processes} processes")
    settings = RouterSettings(hidden=recipe.router_hidden, steps=recipe.router_steps)
    splits = {}
    with progress(show_progress and state.is_main_process) as bar, devices.computing_on(device):
        task = bar.add_task("experts", total=len(mine))
        for i in mine:
            splits[i] = split_layer(ffns[i], stats.layers[i], recipe, activation, settings, layer_generator(recipe.seed, i, "split"))
            bar.advance(task)
    if state.num_processes > 1:
        gathered = [None] * state.num_processes
        torch.distributed.all_gather_object(gathered, {i: split.to("cpu") for i, split in splits.items()})
        splits = {i: split.to(device) for part in gathered for i, split in part.items()}
    return {i: splits[i] for i in layers}


def plan_layers(
    recipe: Recipe,
    splits: dict[int, surgery.LayerSplit],
    model: nn.Module,
    arch: archs.Arch,
    probe: evaluate.Probe,
    ffn_size: int,
    num_layers: int,
    show_progress: bool,
) -> dict[int, int | None]:
    """Each converted layer's top-k (None: keep it dense): ``recipe.top_k`` everywhere, or the
    ``recipe.budget`` registry entry's choice under ``recipe.ffn_budget``."""
    if recipe.ffn_budget is None:
        return {i: recipe.top_k for i in splits}
    first = next(iter(splits.values()))
    options = budget.levels(recipe.experts, first.expert_size, first.shared_size, ffn_size)
    sensitivity = None
    if budget.BUDGETS.entry(recipe.budget).settings["sensitivity"]:
        sensitivity = measure_sensitivity(splits, options, model, arch, probe, show_progress)
    try:
        chosen = budget.BUDGETS[recipe.budget](list(splits), options, recipe.ffn_budget, num_layers, sensitivity)
    except ValueError as e:
        raise UsageError(f"--ffn-budget {recipe.ffn_budget}: {e}") from None
    return {i: level.top_k for i, level in chosen.items()}


def measure_sensitivity(splits, options, model, arch, probe, show_progress: bool, batches_used: int = 1) -> budget.Sensitivity:
    """Quality lost with one layer at each level and every other layer dense, on held-out text."""
    blocks = blocks_of(model, arch.layers)
    small = probe.head(batches_used)
    table = {}
    with progress(show_progress) as bar:
        task = bar.add_task("layer sensitivity", total=len(splits) * (len(options) - 1))
        for i, split in splits.items():
            table[i] = []
            for level in options:
                if level.dense:
                    table[i].append(0.0)
                    continue
                with surgery.swapped(blocks[i], arch, split.build(level.top_k)):
                    table[i].append(evaluate.damage(model, small))
                bar.advance(task)
    return table

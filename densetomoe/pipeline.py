"""``convert()``: one conversion, its stages in order.

    load -> calibrate -> partition -> route -> budget -> swap (or native) -> [distill] -> evaluate -> export
"""

from __future__ import annotations

import copy
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers.activations import ACT2FN

from . import archs, card, data, surgery
from .console import progress
from .errors import UsageError
from .moe import MoEFeedForward, moe_layers
from .recipe import Distill, Recipe, check_against_model
from .stages import budget, evaluate, export, load, native
from .stages.calibrate import ActivationStats, DenseFFN, LayerStats, batches, calibrate, dense_ffn
from .stages.partition import PARTITIONS
from .stages.router import ROUTERS, RouterSettings

HELD_OUT_TEXTS = 64


@dataclass
class Conversion:
    """What :func:`convert` made: the in-memory MoE model and what was measured on the way."""

    recipe: Recipe
    source: load.Source
    model: nn.Module
    tokenizer: object
    report: evaluate.QuickReport
    stats: ActivationStats
    seconds: dict[str, float] = field(default_factory=dict)
    history: object | None = None  # distill.History when distilled
    out: Path | None = None
    native: native.NativeReport | None = None  # format native: what the native export did

    @property
    def format(self) -> str:
        return "native" if self.native is not None else "remote-code"

    def figures(self) -> dict:
        return {
            "base_model": self.source.name,
            "base_path": str(self.source.path / self.source.gguf_file) if self.source.gguf_file else str(self.source.path),
            "calibration": {"tokens": self.stats.tokens, "sequences": self.stats.sequences},
            "quick_eval": self.report.as_dict(),
            "seconds": {k: round(v, 2) for k, v in self.seconds.items()},
            "format": self.format,
            **({"native": self.native.as_dict()} if self.native is not None else {}),
            **({"distillation": self.history.as_dict()} if self.history is not None else {}),
        }


def split_texts(texts: list[str], seed: int) -> tuple[list[str], list[str], bool]:
    """Shuffle documents (seeded) and keep up to :data:`HELD_OUT_TEXTS` of them out of calibration.

    Returns ``(calibration, held_out, held_out_is_separate)``; with fewer than 8 documents both sets
    are the same documents and the flag says so.
    """
    shuffled = list(texts)
    random.Random(seed).shuffle(shuffled)
    n = min(HELD_OUT_TEXTS, len(shuffled) // 4)
    if n < 2:
        return shuffled, shuffled, False
    return shuffled[n:], shuffled[:n], True


def convert(
    recipe: Recipe,
    out: str | Path | None = None,
    overwrite: bool = False,
    show_progress: bool = True,
    log: Callable[[str], None] = lambda message: None,
    resume: bool = False,
) -> Conversion:
    """Convert ``recipe.model`` to an MoE model; write it to ``out`` when given.

    With ``recipe.distill``, the MoE model is then distilled from the dense one; its checkpoints go
    to ``<out>.checkpoints`` and ``resume`` continues from the latest of them.
    """
    clock = _Clock()
    out = Path(out) if out is not None else None
    if out is not None:
        export.check_destination(out, overwrite)
    workdir = checkpoint_folder(out) if out is not None and recipe.distill is not None else None
    if resume and (workdir is None or not workdir.is_dir()):
        raise UsageError(f"--resume: no checkpoints to resume from{'' if workdir is None else ' in ' + str(workdir)}")

    # load: everything checkable from the config is checked before weights or text are read
    source = load.resolve(recipe.model, recipe.allow_pickle)
    config = load.load_config(source)
    arch = archs.arch_for(config)
    hidden, ffn_size = archs.ffn_sizes(config, arch)
    num_layers = archs.num_layers(config, arch)
    check_against_model(recipe, ffn_size, num_layers)
    target = native.check_source(config, recipe.shared_experts) if recipe.format == "native" else None
    if not source.gguf_file:
        load.check_weights(source.path, recipe.allow_pickle)
    calibration_texts, held_out_texts, separate = split_texts(data.load_texts(recipe.calib), recipe.seed)
    log(f"{source.name}: {arch.family}, {num_layers} layers, hidden {hidden}, FFN {ffn_size}")
    model, tokenizer = load.load_model(source, config, recipe.dtype, recipe.allow_pickle, causal_lm=arch.decoder)
    clock.lap("load")

    layers = sorted(set(recipe.layers)) if recipe.layers else list(range(num_layers))
    activation = archs.activation(config, arch)
    held_out = list(batches(tokenizer, held_out_texts, recipe.seq_len, recipe.batch_size))
    probe = evaluate.record(model, held_out, causal_lm=arch.decoder)

    # calibrate
    ffns, stats = calibrate_layers(model, tokenizer, calibration_texts, arch, layers, recipe, show_progress)
    clock.lap("calibrate")
    if stats.tokens < recipe.calib_tokens:
        log(f"warning: the calibration text ran out after {stats.tokens:,} of {recipe.calib_tokens:,} tokens")

    # partition and route, layer by layer: the split does not depend on top-k
    generator = torch.Generator().manual_seed(recipe.seed)
    settings = RouterSettings(hidden=recipe.router_hidden, steps=recipe.router_steps)
    splits = {}
    with progress(show_progress) as bar:
        task = bar.add_task("experts", total=len(layers))
        for i in layers:
            splits[i] = split_layer(ffns[i], stats.layers[i], recipe, activation, settings, generator)
            bar.advance(task)
    clock.lap("partition+route")

    # budget: each layer's top-k, or dense
    plan = plan_layers(recipe, splits, model, arch, probe, ffn_size, num_layers, show_progress)
    modules = {i: splits[i].build(k) for i, k in plan.items() if k is not None}
    if not modules:
        raise UsageError(f"an FFN budget of {recipe.ffn_budget:.0%} keeps every layer dense: nothing to convert")
    if recipe.ffn_budget is not None:
        clock.lap("budget")
        log("per-layer top-k: " + ", ".join(f"{i}:{'dense' if k is None else k}" for i, k in plan.items()))

    native_report = None
    if target is not None:  # a new native model; the dense one stays as it is (the teacher, if distilling)
        native.check_plan(plan, recipe.experts)
        samples = {i: stats.layers[i].inputs for i in modules}
        teacher = model
        model, native_report = native.to_native(
            model, target, arch.layers, modules, {i: ffns[i] for i in modules}, samples, ffn_size, show_progress
        )
        clock.lap("native")
        if not native_report.llama_cpp:
            log(f"note: layers {', '.join(map(str, native_report.mlp_only_layers))} stay dense (mlp_only_layers): "
                "transformers and vLLM run this folder, llama.cpp (every layer MoE) does not")  # fmt: skip
    else:  # swap in place; keep the dense model as the teacher when distilling
        teacher = copy.deepcopy(model) if recipe.distill is not None else None
        top_k = recipe.top_k if recipe.ffn_budget is None else Counter(m.top_k for m in modules.values()).most_common(1)[0][0]
        surgery.swap_in(model, arch, modules, top_k)

    history = None
    if recipe.distill is not None:
        from .distill import distill_model

        history = distill_model(
            model, teacher, tokenizer, recipe.distill, arch, calibration_texts, held_out_texts,
            workdir=workdir, resume=resume, show_progress=show_progress, log=log, seed=recipe.seed,
        )  # fmt: skip
        clock.lap("distill")

    # measure against the dense outputs recorded before
    del teacher
    report = evaluate.compare(model, probe, ffn_size, num_layers, converted=list(modules.values()))
    clock.lap("evaluate")

    result = Conversion(recipe, source, model, tokenizer, report, stats, clock.seconds, history=history, native=native_report)
    if out is not None and is_main_process():  # under `accelerate launch`, one process writes
        text = card.render(result, held_out_separate=separate, arch=arch)
        export.write(
            out,
            overwrite,
            model,
            recipe_yaml=recipe.to_yaml(),
            card=text,
            figures=result.figures(),
            source_folder=source.path,
            gguf_file=source.gguf_file,
            extras=_loss_figure(history),
            format=result.format,
        )
        clock.lap("export")
        result.out = out
    return result


def distill(
    folder: str | Path,
    settings: Distill,
    out: str | Path | None = None,
    overwrite: bool = False,
    base: str | None = None,
    resume: bool = False,
    show_progress: bool = True,
    log: Callable[[str], None] = lambda message: None,
    format: str | None = None,
) -> Conversion:
    """Distill an already converted ``folder`` from its dense base model and write the result to
    ``out`` (default: ``folder`` itself, replaced atomically once training has finished).

    The training text defaults to the calibration text recorded in the folder's recipe, and the
    held-out documents are the same ones conversion kept aside. ``format="native"`` on a remote-code
    folder first turns it into the native model (calibrating the teacher again for the refit) and
    then trains that native model.
    """
    from .distill import distill_model
    from .loading import load as load_moe

    clock = _Clock()
    folder = Path(folder)
    out = Path(out) if out is not None else folder
    if not (folder / "config.json").is_file():
        raise UsageError(f"{folder} is not a model folder (no config.json in it)")
    if out != folder:
        export.check_destination(out, overwrite)
    figures = export.recorded_figures(folder)
    if not (folder / export.RECIPE_FILE).is_file() or not figures:
        raise UsageError(f"{folder} was not written by densetomoe convert (no {export.RECIPE_FILE} or {export.FIGURES_FILE})")
    try:
        recorded = Recipe.from_yaml(folder / export.RECIPE_FILE)
    except UsageError as e:
        raise UsageError(f"{folder}: {e}") from None
    base = base or export.recorded_base(folder)
    was = figures.get("format", "remote-code")
    format = format or was
    if was == "native" and format != "native":
        raise UsageError(f"{folder} is a native folder and cannot become remote code again; convert the dense model with --format {format}")
    recipe = recorded.model_copy(update={"distill": settings, "format": format})
    workdir = checkpoint_folder(out)
    if resume and not workdir.is_dir():
        raise UsageError(f"--resume: no checkpoints to resume from in {workdir}")

    source = load.resolve(base, recipe.allow_pickle)
    config = load.load_config(source)
    arch = archs.arch_for(config)
    _, ffn_size = archs.ffn_sizes(config, arch)
    num_layers = archs.num_layers(config, arch)
    teacher, tokenizer = load.load_model(source, config, recipe.dtype, recipe.allow_pickle, causal_lm=arch.decoder)
    student = load_moe(folder)
    clock.lap("load")
    calibration_texts, held_out_texts, separate = split_texts(data.load_texts(recipe.calib), recipe.seed)
    held_out = list(batches(tokenizer, held_out_texts, recipe.seq_len, recipe.batch_size))
    probe = evaluate.record(teacher, held_out, causal_lm=arch.decoder)
    converted = [m for m in student.modules() if isinstance(m, MoEFeedForward)]  # their shapes give the costs
    native_report = native.NativeReport.from_dict(figures["native"]) if was == "native" else None
    if format == "native" and was != "native":
        student, native_report = _native_from_folder(student, teacher, tokenizer, recipe, arch, calibration_texts, show_progress)
        clock.lap("native")
    history = distill_model(
        student, teacher, tokenizer, settings, arch, calibration_texts, held_out_texts,
        workdir=workdir, resume=resume, show_progress=show_progress, log=log, seed=recipe.seed,
    )  # fmt: skip
    clock.lap("distill")
    del teacher
    report = evaluate.compare(student, probe, ffn_size, num_layers, converted=converted or None)
    if not converted:  # a native folder: distillation kept the structure, so its recorded costs hold
        costs = figures.get("quick_eval", {})
        report.ffn_flops_ratio = costs.get("ffn_flops_ratio", report.ffn_flops_ratio)
        report.active_ffn_share = costs.get("active_ffn_share", report.active_ffn_share)
    clock.lap("evaluate")
    stats = ActivationStats(tokens=figures.get("calibration", {}).get("tokens", 0), sequences=figures.get("calibration", {}).get("sequences", 0))
    result = Conversion(recipe, source, student, tokenizer, report, stats, clock.seconds, history=history, native=native_report)
    if not is_main_process():  # under `accelerate launch`, one process writes
        return result
    export.write(
        out,
        True if out == folder else overwrite,
        student,
        recipe_yaml=recipe.to_yaml(),
        card=card.render(result, held_out_separate=separate, arch=arch),
        figures={**result.figures(), "seconds": {**figures.get("seconds", {}), "distill": round(clock.seconds["distill"], 2)}},
        source_folder=source.path,  # the tokenizer comes from the dense model, as at conversion
        gguf_file=source.gguf_file,
        extras=_loss_figure(history),
        format=result.format,
    )
    result.out = out
    return result


def calibrate_layers(
    model: nn.Module, tokenizer, texts: list[str], arch: archs.Arch, layers: list[int], recipe: Recipe, show_progress: bool
) -> tuple[dict[int, DenseFFN], ActivationStats]:
    """The dense FFNs of ``layers`` and their calibration statistics, with the recipe's settings."""
    blocks = moe_layers(model, {"layers": arch.layers})
    activation = ACT2FN[archs.activation(model.config, arch)]
    ffns = {i: dense_ffn(blocks[i], arch, activation) for i in layers}
    stats = calibrate(
        model, tokenizer, texts, arch, ffns, tokens=recipe.calib_tokens, seq_len=recipe.seq_len,
        batch_size=recipe.batch_size, sample_tokens=recipe.sample_tokens, seed=recipe.seed, show_progress=show_progress,
    )  # fmt: skip
    return ffns, stats


def _native_from_folder(student, teacher, tokenizer, recipe: Recipe, arch, texts: list[str], show_progress: bool):
    """A remote-code ``student`` as the native model: the teacher is calibrated again for the refit."""
    target = native.check_source(teacher.config, recipe.shared_experts)
    structure = getattr(student.config, "densetomoe")
    blocks = moe_layers(student, structure)
    modules = {i: blocks[i].get_submodule(structure["moe_at"]) for i in structure["moe_layers"]}
    num_layers = archs.num_layers(teacher.config, arch)
    native.check_plan({i: modules[i].top_k if i in modules else None for i in range(num_layers)}, recipe.experts)
    ffns, stats = calibrate_layers(teacher, tokenizer, texts, arch, list(modules), recipe, show_progress)
    _, ffn_size = archs.ffn_sizes(teacher.config, arch)
    samples = {i: stats.layers[i].inputs for i in modules}
    return native.to_native(teacher, target, arch.layers, modules, ffns, samples, ffn_size, show_progress)


def _loss_figure(history) -> Callable[[Path], None] | None:
    if history is None:
        return None
    from .report import FIGURE_LOSS, loss_figure

    return lambda folder: loss_figure(history.as_dict(), folder / FIGURE_LOSS)


def is_main_process() -> bool:
    """False in the secondary processes of an ``accelerate launch`` run (True otherwise)."""
    from accelerate import PartialState

    return PartialState().is_main_process


def checkpoint_folder(out: Path) -> Path:
    """Where distillation keeps its checkpoints for an output folder ``out``."""
    return out.with_name(out.name + ".checkpoints")


def split_layer(
    ffn: DenseFFN, stats: LayerStats, recipe: Recipe, activation: str, settings: RouterSettings, generator: torch.Generator
) -> surgery.LayerSplit:
    """Shared expert out, the rest partitioned into experts (pruned if asked), and the router trained."""
    sample = stats.inputs
    shared = None
    if recipe.shared_experts:
        shared_idx, routed_idx = surgery.shared_neurons(ffn, sample, recipe.shared_experts * ffn.size // recipe.parts)
        shared, ffn, stats = ffn.subset(shared_idx, with_bias=False), ffn.subset(routed_idx), stats.subset(routed_idx)
    labels = PARTITIONS[recipe.partition](ffn, stats, recipe.experts, generator)
    if recipe.prune:
        keep = max(1, round(ffn.size // recipe.experts * (1 - recipe.prune)))
        labels = surgery.prune_experts(labels, ffn.importance(sample), recipe.experts, keep)
    router = ROUTERS[recipe.router](ffn, stats, labels, recipe.experts, settings, generator)
    return surgery.LayerSplit(ffn, labels, router, recipe.experts, activation, sample if recipe.compensate else None, shared)


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
    if recipe.budget in budget.NEEDS_SENSITIVITY:
        sensitivity = measure_sensitivity(splits, options, model, arch, probe, show_progress)
    try:
        chosen = budget.BUDGETS[recipe.budget](list(splits), options, recipe.ffn_budget, num_layers, sensitivity)
    except ValueError as e:
        raise UsageError(f"--ffn-budget {recipe.ffn_budget}: {e}") from None
    return {i: level.top_k for i, level in chosen.items()}


def measure_sensitivity(splits, options, model, arch, probe, show_progress: bool, batches_used: int = 1) -> budget.Sensitivity:
    """Quality lost with one layer at each level and every other layer dense, on held-out text."""
    blocks = moe_layers(model, {"layers": arch.layers})
    small = evaluate.Probe(*(field[:batches_used] for field in (probe.batches, probe.hidden, probe.predictions, probe.nll)))
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


class _Clock:
    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._last = self._start = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = now - self._last
        self.seconds["total"] = now - self._start
        self._last = now

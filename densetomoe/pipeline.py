"""``convert()``: one conversion, its stages in order.

    load -> calibrate -> partition -> route -> swap -> evaluate -> export
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers.activations import ACT2FN

from . import archs, card, data, surgery
from .console import progress
from .moe import moe_layers
from .recipe import Recipe, check_against_model
from .stages import evaluate, export, load
from .stages.calibrate import ActivationStats, batches, calibrate, dense_ffn
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
    out: Path | None = None

    def figures(self) -> dict:
        return {
            "base_model": self.source.name,
            "base_path": str(self.source.path / self.source.gguf_file) if self.source.gguf_file else str(self.source.path),
            "calibration": {"tokens": self.stats.tokens, "sequences": self.stats.sequences},
            "quick_eval": self.report.as_dict(),
            "seconds": {k: round(v, 2) for k, v in self.seconds.items()},
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
) -> Conversion:
    """Convert ``recipe.model`` to an MoE model; write it to ``out`` when given."""
    clock = _Clock()
    out = Path(out) if out is not None else None
    if out is not None:
        export.check_destination(out, overwrite)

    # load: everything checkable from the config is checked before weights or text are read
    source = load.resolve(recipe.model, recipe.allow_pickle)
    config = load.load_config(source)
    arch = archs.arch_for(config)
    hidden, ffn_size = archs.ffn_sizes(config, arch)
    num_layers = archs.num_layers(config, arch)
    check_against_model(recipe, ffn_size, num_layers)
    if not source.gguf_file:
        load.check_weights(source.path, recipe.allow_pickle)
    calibration_texts, held_out_texts, separate = split_texts(data.load_texts(recipe.calib), recipe.seed)
    log(f"{source.name}: {arch.family}, {num_layers} layers, hidden {hidden}, FFN {ffn_size}")
    model, tokenizer = load.load_model(source, config, recipe.dtype, recipe.allow_pickle, causal_lm=arch.decoder)
    clock.lap("load")

    layers = sorted(set(recipe.layers)) if recipe.layers else list(range(num_layers))
    blocks = moe_layers(model, {"layers": arch.layers})
    activation = archs.activation(config, arch)
    ffns = {i: dense_ffn(blocks[i], arch, ACT2FN[activation]) for i in layers}
    held_out = list(batches(tokenizer, held_out_texts, recipe.seq_len, recipe.batch_size))
    probe = evaluate.record(model, held_out, causal_lm=arch.decoder)

    # calibrate
    stats = calibrate(
        model,
        tokenizer,
        calibration_texts,
        arch,
        ffns,
        tokens=recipe.calib_tokens,
        seq_len=recipe.seq_len,
        batch_size=recipe.batch_size,
        sample_tokens=recipe.sample_tokens,
        seed=recipe.seed,
        show_progress=show_progress,
    )
    clock.lap("calibrate")
    if stats.tokens < recipe.calib_tokens:
        log(f"warning: the calibration text ran out after {stats.tokens:,} of {recipe.calib_tokens:,} tokens")

    # partition and route, layer by layer
    generator = torch.Generator().manual_seed(recipe.seed)
    settings = RouterSettings(hidden=recipe.router_hidden, steps=recipe.router_steps)
    modules = {}
    with progress(show_progress) as bar:
        task = bar.add_task("experts", total=len(layers))
        for i in layers:
            labels = PARTITIONS[recipe.partition](ffns[i], stats.layers[i], recipe.experts, generator)
            router = ROUTERS[recipe.router](ffns[i], stats.layers[i], labels, recipe.experts, settings, generator)
            sample = stats.layers[i].inputs if recipe.compensate else None
            modules[i] = surgery.moe_from_dense(
                ffns[i], labels, router, recipe.experts, recipe.top_k, activation, sample
            )
            bar.advance(task)
    clock.lap("partition+route")

    # swap in place, then measure against the dense outputs recorded before
    surgery.swap_in(model, arch, modules, recipe.top_k)
    report = evaluate.compare(model, probe, ffn_size, num_layers)
    clock.lap("evaluate")

    result = Conversion(recipe, source, model, tokenizer, report, stats, clock.seconds)
    if out is not None:
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
        )
        clock.lap("export")
        result.out = out
    return result


class _Clock:
    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._last = self._start = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = now - self._last
        self.seconds["total"] = now - self._start
        self._last = now

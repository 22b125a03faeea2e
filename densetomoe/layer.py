"""One layer's conversion, and the calibration that feeds it: in memory for every layer at once
(:func:`calibrate_layers`), or one block at a time (:func:`calibrate_block`).

    calibrate -> split_layer (shared expert, partition, prune, route, refit) -> LayerSplit.build(top_k)
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import ACT2FN

from . import archs, surgery
from .ffn import DenseFFN, dense_ffn, expert_size
from .formats import FORMATS
from .moe import blocks_of
from .recipe import Recipe
from .stages import blockwise
from .stages.calibrate import ActivationStats, LayerRecorder, LayerStats, calibrate, layer_generator
from .stages.partition import PARTITIONS
from .stages.router import ROUTERS, RouterSettings


def split_layer(
    ffn: DenseFFN, stats: LayerStats, recipe: Recipe, activation: str, settings: RouterSettings, generator: torch.Generator
) -> surgery.LayerSplit:
    """One layer's conversion: the shared expert out, the rest partitioned into experts (pruned if
    asked), and the router trained; the experts' down projections are refit to the whole ``ffn`` when
    the split is built, where the format refits that way (:attr:`~densetomoe.formats.Format.refits_split`).
    Both schedulers (:mod:`densetomoe.schedulers`) convert every layer with this function, then build
    the layer at its top-k (:meth:`~densetomoe.surgery.LayerSplit.build`) in the recipe's format."""
    sample, whole = stats.inputs, ffn
    shared = None
    if recipe.shared_experts:
        shared_idx, routed_idx = surgery.shared_neurons(ffn, sample, recipe.shared_experts * expert_size(ffn.size, recipe.experts, recipe.shared_experts))
        shared, ffn, stats = ffn.subset(shared_idx, with_bias=False), ffn.subset(routed_idx), stats.subset(routed_idx)
    labels = PARTITIONS[recipe.partition](ffn, stats, recipe.experts, generator)
    labels = surgery.group_massive(labels, ffn.peak_contributions(sample), recipe.experts)
    if recipe.prune:
        keep = expert_size(ffn.size, recipe.experts, prune=recipe.prune)
        labels = surgery.prune_experts(labels, ffn.importance(sample), recipe.experts, keep)
    router = ROUTERS[recipe.router](ffn, stats, labels, recipe.experts, settings, generator)
    refit_to = whole if recipe.refit and FORMATS[recipe.format].refits_split else None
    return surgery.LayerSplit(
        ffn, labels, router, recipe.experts, activation, sample, shared, recipe.compensate, refit_to, recipe.dynamic, recipe.boundary_ramp
    )  # fmt: skip


def calibrate_layers(
    model: nn.Module, tokenizer, texts: list[str], arch: archs.Arch, layers: list[int], recipe: Recipe, show_progress: bool
) -> tuple[dict[int, DenseFFN], ActivationStats]:
    """The dense FFNs of ``layers`` and their calibration statistics, with the recipe's settings."""
    blocks = blocks_of(model, arch.layers)
    activation = ACT2FN[archs.activation(model.config, arch)]
    ffns = {i: dense_ffn(blocks[i], arch, activation) for i in layers}
    stats = calibrate(
        model, tokenizer, texts, arch, ffns, tokens=recipe.calib_tokens, seq_len=recipe.seq_len,
        batch_size=recipe.batch_size, sample_tokens=recipe.sample_tokens, seed=recipe.seed, show_progress=show_progress,
    )  # fmt: skip
    return ffns, stats


def calibrate_block(block, arch, ffn: DenseFFN, stream, recipe: Recipe, index: int, tokens: int) -> LayerStats:
    """Run ``stream`` through a dense ``block`` with its FFN's inputs recorded: the layer's statistics."""
    recorder = LayerRecorder(ffn, recipe.sample_tokens, layer_generator(recipe.seed, index))
    mask: dict[str, torch.Tensor] = {}
    handle = block.get_submodule(arch.up).register_forward_pre_hook(recorder.hook(mask))
    try:
        blockwise.run_block(block, stream, before=lambda n: mask.update(tokens=stream.batches[n]["attention_mask"].bool()))
    finally:
        handle.remove()
    return recorder.stats(tokens)

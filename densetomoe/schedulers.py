"""The two ways to run the per-layer conversion (:func:`densetomoe.layer.split_layer`) over a model:

* :func:`in_memory`: the whole dense model loaded; every layer calibrated in one pass, split and
  routed (shared out between processes under ``accelerate launch``), a top-k planned for each (an
  FFN budget may weigh the layers against each other), built, and the model assembled in its format;
* :func:`block_by_block`: one block of the dense model in memory at a time, read from the
  checkpoint, calibrated on the dense hidden states that reach it, converted at the recipe's top-k,
  built in its format, written to the output's weight shards, and released. Held-out text travels
  two ways at once, through the dense blocks and the converted ones, for the quick evaluation.

Both take a :class:`Job` (what :func:`densetomoe.pipeline.prepare` checked) and return a
:class:`Built`; for the same recipe they write the same folder, tensor for tensor.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers.activations import ACT2FN

from . import archs, data, devices, memory
from .console import progress
from .conversion import Clock, Dense
from .errors import UsageError
from .evaluation import quick as evaluate
from .ffn import dense_ffn
from .formats import BlockContext, Builder
from .layer import calibrate_block, calibrate_layers, split_layer
from .moe import MoEFeedForward
from .planning import plan_layers, split_layers
from .recipe import Recipe
from .stages import blockwise, export, load
from .stages.calibrate import ActivationStats, calibration_batches, layer_generator
from .stages.distill import dense_teacher
from .stages.router import RouterSettings


@dataclass
class Job:
    """One conversion, checked before any weights are read (:func:`densetomoe.pipeline.prepare`)."""

    recipe: Recipe
    dense: Dense
    builder: Builder  # how the recipe's format assembles the model
    device: torch.device | str
    out: Path | None = None
    needed: int | None = None  # the bytes the folder takes, estimated before the work
    workdir: Path | None = None  # distillation's checkpoints


@dataclass
class Built:
    """What a scheduler made: the converted model and what the later stages need."""

    model: nn.Module
    modules: dict[int, MoEFeedForward]  # the converted layers' modules (on the meta device after block_by_block)
    stats: ActivationStats
    details: object = None  # what the format recorded (Format.details)
    teacher: nn.Module | None = None  # in memory, with distillation: the dense model, kept apart from the student
    report: evaluate.QuickReport | None = None  # block_by_block: measured as the blocks went by
    weights: Path | None = None  # block_by_block: the folder the weight shards were written to


def _layers(recipe: Recipe, num_layers: int) -> list[int]:
    return sorted(set(recipe.layers)) if recipe.layers else list(range(num_layers))


def _ran_out(stats: ActivationStats, recipe: Recipe, log: Callable[[str], None]) -> None:
    if stats.tokens < recipe.calib_tokens:
        log(f"warning: the calibration text ran out after {stats.tokens:,} of {recipe.calib_tokens:,} tokens")


def in_memory(job: Job, stack: ExitStack, clock: Clock, show_progress: bool, log: Callable[[str], None]) -> Built:
    """Convert with the whole dense model in memory (see the module's docstring)."""
    recipe, dense, device = job.recipe, job.dense, job.device
    dense.load(recipe, log, device)
    model, arch = dense.model, dense.arch
    clock.lap("load")

    layers = _layers(recipe, dense.num_layers)
    with devices.computing_on(device):
        ffns, stats = calibrate_layers(model, dense.tokenizer, dense.calibration_texts, arch, layers, recipe, show_progress)
    clock.lap("calibrate")
    _ran_out(stats, recipe, log)

    splits = split_layers(ffns, stats, layers, recipe, archs.activation(dense.config, arch), show_progress, log, device)
    clock.lap("partition+route")

    with devices.computing_on(device):
        plan = plan_layers(recipe, splits, model, arch, dense.probe, dense.ffn_size, dense.num_layers, show_progress)
        job.builder.check_plan(plan, recipe.experts)
        modules = {i: splits[i].build(k) for i, k in plan.items() if k is not None}
    if not modules:
        raise UsageError(f"an FFN budget of {recipe.ffn_budget:.0%} keeps every layer dense: nothing to convert")
    if recipe.ffn_budget is not None:
        clock.lap("budget")
        _log_plan(plan, recipe, log)

    # the teacher, made before the student changes the dense model (or is built on its parameters)
    teacher = dense_teacher(model, recipe.distill) if recipe.distill is not None else None
    samples = {i: stats.layers[i].inputs for i in modules}
    with devices.computing_on(device):
        model, details = job.builder.assemble(model, arch, modules, {i: ffns[i] for i in modules}, samples, dense.ffn_size, show_progress, log)
    clock.lap("build")
    dense.model = None  # the converted model (or the teacher) holds what is still needed
    # the layers' calibration samples are not needed again (SmolLM2: 2.2 GB at 32,768 tokens a layer)
    stats.layers.clear()
    del splits, ffns, samples
    memory.return_freed_memory()
    return Built(model, modules, stats, details, teacher=teacher)


def _log_plan(plan: dict[int, int | None], recipe: Recipe, log: Callable[[str], None]) -> None:
    mean = " on average (dynamic top-k)" if recipe.dynamic else ""
    if len(set(plan.values())) == 1:
        log(f"top-{next(iter(plan.values()))} in every layer{mean}")
    else:
        log(f"per-layer top-k{mean}: " + ", ".join(f"{i}:{'dense' if k is None else k}" for i, k in plan.items()))


@dataclass
class _Streams:
    """Block by block: the hidden states that reach the next block."""

    calibration: blockwise.Stream  # dense, for calibration
    held_out: blockwise.Stream  # dense, for the quick evaluation's reference
    converted: blockwise.Stream  # through the converted blocks


def block_by_block(job: Job, stack: ExitStack, clock: Clock, show_progress: bool, log: Callable[[str], None]) -> Built:
    """Convert one block at a time (see the module's docstring). The blocks and the hidden states
    compute on the job's device; the embeddings and the head (the frame) run once, where they are."""
    recipe, dense, device = job.recipe, job.dense, job.device
    arch, num_layers = dense.arch, dense.num_layers
    log(f"{dense.source.name}: {arch.family}, {num_layers} layers, FFN {dense.ffn_size}, one block at a time")
    dense.split(recipe)
    dtype = load.DTYPES[recipe.dtype]
    cls = load.model_class(dense.config, arch.decoder)
    streams, stats = _capture(job, cls, dtype)
    _ran_out(stats, recipe, log)
    clock.lap("load")

    shell = blockwise.skeleton(cls, dense.config).to(dtype)
    context = BlockContext(arch, dense.config, shell, dtype, device, dense.ffn_size, set(_layers(recipe, num_layers)))
    weights = stack.enter_context(export.scratch(job.out, job.needed, "weights"))  # the export moves its files in
    writer = blockwise.ShardWriter(weights)
    modules = _convert_blocks(job, context, blockwise.Checkpoint(dense.source.path), streams, stats.tokens, writer, show_progress)
    if not modules:
        raise UsageError("no layer was converted")
    model, details = job.builder.finish(shell, arch, modules)
    frame = blockwise.frame(cls, dense.source.path, dense.config, arch, dtype)  # read again, for the head and export
    # the frame is only read from now on: its tensors go out as they are, one at a time, so that a
    # head untied from the embeddings (the same storage) is neither copied nor in the same shard
    for name, tensor in blockwise.as_saved(model, _outside_blocks(frame, arch, untie=job.builder.untied_head)).items():
        writer.add({name: tensor}, copy=False)
    writer.close()
    clock.lap("partition+route")

    frame.to(device)  # written: now for the norm and head of the evaluation
    with devices.computing_on(device):
        with blockwise.replay(frame, arch, streams.held_out):
            dense.probe = evaluate.record(frame, streams.held_out.batches, causal_lm=arch.decoder)
        with blockwise.replay(frame, arch, streams.converted):
            report = evaluate.compare(frame, dense.probe, dense.ffn_size, num_layers, converted=list(modules.values()))
    clock.lap("evaluate")
    model.generation_config = frame.generation_config if model.can_generate() else None
    return Built(model, modules, stats, details, report=report, weights=weights)


def _capture(job: Job, cls: type, dtype: torch.dtype) -> tuple[_Streams, ActivationStats]:
    """The calibration and held-out batches as hidden states at the first block (the embeddings run
    here, then are released until the export)."""
    recipe, dense, device = job.recipe, job.dense, job.device
    # what surrounds the blocks computes where they do, as in memory: the same numbers from both paths
    frame = blockwise.frame(cls, dense.source.path, dense.config, dense.arch, dtype).to(device)
    dense.tokenizer = data.for_batches(load.load_tokenizer(dense.source))
    batches = calibration_batches(dense.tokenizer, dense.calibration_texts, recipe.seq_len, recipe.batch_size, recipe.calib_tokens)
    calibration = blockwise.capture(frame, dense.arch, devices.to_device(list(batches), device))
    held_out = blockwise.capture(frame, dense.arch, devices.to_device(dense.held_out_batches(recipe), device))
    blockwise.release(frame)  # its embeddings are not needed again until every block is written (1 GB at 1B)
    memory.return_freed_memory()
    masks = calibration.masks()
    stats = ActivationStats(tokens=sum(int(m.sum()) for m in masks), sequences=sum(len(m) for m in masks))
    return _Streams(calibration, held_out, held_out.copy()), stats


def _convert_blocks(
    job: Job, context: BlockContext, checkpoint, streams: _Streams, tokens: int, writer, show_progress: bool
) -> dict[int, MoEFeedForward]:
    """Every block in turn: read, calibrated and converted (the layers asked for), built in the format,
    run, written and released; ``tokens``: the calibration tokens in ``streams``. Returns the
    converted modules, on the meta device (their shapes describe the model)."""
    recipe, arch = job.recipe, context.arch
    activation_name = archs.activation(context.config, arch)
    activation = ACT2FN[activation_name]
    settings = RouterSettings(hidden=recipe.router_hidden, steps=recipe.router_steps)
    modules: dict[int, MoEFeedForward] = {}
    with progress(show_progress) as bar, devices.computing_on(context.device):
        task = bar.add_task("blocks", total=job.dense.num_layers)
        for i in range(job.dense.num_layers):
            block = blockwise.load_block(context.shell, arch, i, checkpoint, context.dtype, context.device)
            module = ffn = sample = None
            if i in context.converted:
                ffn = dense_ffn(block, arch, activation)
                layer_stats = calibrate_block(block, arch, ffn, streams.calibration, recipe, i, tokens)
                split = split_layer(ffn, layer_stats, recipe, activation_name, settings, layer_generator(recipe.seed, i, "split"))
                module, sample = split.build(recipe.top_k), layer_stats.inputs
                split = layer_stats = None
            else:
                blockwise.run_block(block, streams.calibration)
            blockwise.run_block(block, streams.held_out)
            state, prefix, names, block = job.builder.block(i, block, module, ffn, sample, context)
            blockwise.run_block(block, streams.converted)
            # the block is released next and its tensors never change: they are written as they are
            state = {f"{prefix}{i}.{name}": t.to("cpu", context.dtype) for name, t in state.items()}
            writer.add(blockwise.as_saved(names, state), copy=False)
            blockwise.release(block)
            if module is not None:
                modules[i] = module.to("meta")
            # nothing of block i may outlive it: these name its dense FFN, its sample and its tensors
            block = state = ffn = sample = module = None
            memory.return_freed_memory()
            bar.advance(task)
    return modules


def _outside_blocks(frame: nn.Module, arch: archs.Arch, untie: bool) -> dict[str, torch.Tensor]:
    """The frame's tensors outside the blocks, as the output names them: a tied head is written once
    (as ``save_pretrained`` does), or as its own matrix when the format needs it (``untie``)."""
    inside = blockwise.block_prefix(frame, arch)
    state = {name: t for name, t in frame.state_dict().items() if not name.startswith(inside)}
    tied = getattr(frame.config, "tie_word_embeddings", False) and frame.get_output_embeddings() is not None
    head = next((name for name in state if name.endswith("lm_head.weight")), None)
    if tied and head is not None and not untie:
        del state[head]
    return state

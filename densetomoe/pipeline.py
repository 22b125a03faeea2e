"""``convert()`` and ``distill()``: one conversion, its stages in order.

    prepare (every check) -> schedule: load -> calibrate -> split_layer per layer (partition, route,
    refit) -> [budget] -> build in the format -> [distill] -> evaluate -> export

The schedule is one of :mod:`densetomoe.schedulers`: the whole model in memory, or one block at a
time; both run the same per-layer conversion (:func:`densetomoe.layer.split_layer`) and build the
layers through the recipe's format (:mod:`densetomoe.formats`).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

from torch import nn

from . import archs, devices, folder, formats, processes
from .conversion import Clock, Conversion, Dense
from .defaults import with_model_defaults
from .errors import UsageError
from .evaluation import quick as evaluate
from .layer import calibrate_layers
from .moe import MoEFeedForward, moe_modules
from .planning import check_output_space
from .recipe import Distill, Recipe, check_against_model
from .schedulers import Built, Job, block_by_block, in_memory
from .stages import export, load
from .stages.calibrate import ActivationStats
from .stages.coverage import hold_the_budget
from .stages.distill import History, check_sources, distill_model, share_frozen


def convert(
    recipe: Recipe,
    out: str | Path | None = None,
    overwrite: bool = False,
    show_progress: bool = True,
    log: Callable[[str], None] = lambda message: None,
    resume: bool = False,
    device: str | None = None,
) -> Conversion:
    """Convert ``recipe.model`` to an MoE model; write it to ``out`` when given.

    With ``recipe.distill``, the MoE model is then distilled from the dense one; its checkpoints go
    to ``<out>.checkpoints`` and ``resume`` continues from the latest of them. With
    ``recipe.sequential``, one block is converted at a time and ``out`` is required.

    The stages compute on ``device`` (:func:`densetomoe.devices.resolve`; default: this process's
    accelerator if it has one, else the CPU); the model returned is on the CPU.
    """
    device = devices.resolve(device, processes.state().device)  # the process state before any Accelerator: see there
    recipe = with_model_defaults(recipe)
    clock = Clock()
    job = prepare(recipe, Path(out) if out is not None else None, overwrite, resume, device)
    schedule = block_by_block if recipe.sequential else in_memory
    with ExitStack() as stack:  # block by block, the weights are written to a scratch folder the export moves in
        built = schedule(job, stack, clock, show_progress, log)
        history = None
        if recipe.distill is not None:
            built.model, history = _distill(built, job, resume, show_progress, log)
            clock.lap("distill")
        report = built.report
        if report is None:  # measured against the dense outputs recorded at load
            with devices.computing_on(device):
                report = evaluate.compare(built.model, job.dense.probe, job.dense.ffn_size, job.dense.num_layers, converted=list(built.modules.values()))
            built.model.to("cpu")
            clock.lap("evaluate")
        result = Conversion(
            recipe, job.dense, built.model, report, built.stats, clock.seconds, history=history, format=recipe.format,
            details=built.details, weights=built.weights, device=devices.describe(device),
        )  # fmt: skip
        if job.out is not None:
            result.write(job.out, overwrite, job.needed)
            clock.lap("export")
    return result


def prepare(recipe: Recipe, out: Path | None, overwrite: bool, resume: bool, device) -> Job:
    """Every check that needs no weights, before any are read: the destination, the dense config
    against the recipe, the format against the dense config, memory and disk space."""
    if recipe.sequential and out is None:
        raise UsageError("sequential conversion writes each block as it goes: give an output folder (--out)")
    if out is not None:
        export.check_destination(out, overwrite)
    workdir = checkpoint_folder(out) if out is not None and recipe.distill is not None else None
    if resume and (workdir is None or not workdir.is_dir()):
        raise UsageError(f"--resume: no checkpoints to resume from{'' if workdir is None else ' in ' + str(workdir)}")
    dense = Dense.describe(recipe.model, recipe.allow_pickle)
    if recipe.sequential and dense.source.gguf_file:
        raise UsageError("--sequential reads safetensors tensor by tensor, and transformers reads a GGUF file whole: convert it without --sequential")
    check_against_model(recipe, dense.ffn_size, dense.num_layers)
    check_seq2seq(recipe, dense.arch)
    if recipe.distill is not None:
        check_sources(recipe.distill.data)
    builder = formats.FORMATS[recipe.format].builder(dense.config, recipe, recipe.top_k if recipe.ffn_budget is None else None)
    if not recipe.sequential:  # one block at a time holds one block
        load.check_memory(dense.source, recipe.dtype, copies=2 if recipe.distill is not None else 1)
    needed = check_output_space(dense, recipe, builder.untied_head, out) if out is not None else None
    return Job(recipe, dense, builder, device, out, needed, workdir)


def check_seq2seq(recipe: Recipe, arch: archs.Arch) -> None:
    """What an encoder-decoder cannot do yet: one block at a time, distillation, the native format."""
    if not arch.seq2seq:
        return
    refused = [name for name, asked in (("--sequential", recipe.sequential), ("distillation", recipe.distill is not None)) if asked]
    if refused:
        raise UsageError(f"{arch.family} is an encoder-decoder, and {' and '.join(refused)} works on decoder-only and encoder models only so far")


def _distill(built: Built, job: Job, resume: bool, show_progress: bool, log: Callable[[str], None]) -> tuple[nn.Module, History]:
    """The converted model distilled from the dense teacher that the schedule kept apart."""
    dense, recipe = job.dense, job.recipe
    model, history = distill_model(  # a new module where FSDP sharded the one it trained
        built.model, built.teacher, dense.tokenizer, recipe.distill, dense.arch, dense.calibration_texts, dense.held_out_texts,
        workdir=job.workdir, resume=resume, show_progress=show_progress, log=log, seed=recipe.seed,
    )  # fmt: skip
    built.teacher = None
    with devices.computing_on(job.device):
        hold_the_budget(model, dense.tokenizer, dense.calibration_texts, recipe.seq_len, recipe.batch_size, log)
    return model, history


def distill(
    moe_dir: str | Path,
    settings: Distill,
    out: str | Path | None = None,
    overwrite: bool = False,
    base: str | None = None,
    resume: bool = False,
    show_progress: bool = True,
    log: Callable[[str], None] = lambda message: None,
    format: str | None = None,
) -> Conversion:
    """Distill the converted folder ``moe_dir`` from its dense base model and write the result to
    ``out`` (default: ``moe_dir`` itself, replaced atomically once training has finished).

    The training text defaults to the calibration text recorded in the folder's recipe, and the
    held-out documents are the same ones conversion kept aside. A ``format`` other than the folder's
    (remote code into native) first builds the model in that format (calibrating the teacher again
    for its refit) and then trains it.
    """
    from .loading import load as load_moe

    processes.state()  # before the Accelerator: see there
    clock = Clock()
    source_folder = Path(moe_dir)
    out = Path(out) if out is not None else source_folder
    recipe, figures, was = _recorded(source_folder, settings, format)
    if out != source_folder:
        export.check_destination(out, overwrite)
    workdir = checkpoint_folder(out)
    if resume and not workdir.is_dir():
        raise UsageError(f"--resume: no checkpoints to resume from in {workdir}")
    check_sources(settings.data)

    dense = Dense.describe(base or folder.recorded_base(source_folder), recipe.allow_pickle).load(recipe, log)
    teacher, arch = dense.model, dense.arch
    check_seq2seq(recipe, arch)
    student = load_moe(source_folder)
    clock.lap("load")
    converted = [m for m in student.modules() if isinstance(m, MoEFeedForward)]  # their shapes give the costs
    details = was.details(figures)
    if recipe.format != was.name:
        student, details = _into_format(student, teacher, dense, recipe, show_progress)
        clock.lap("build")
    teacher = share_frozen(teacher, student, settings)  # no second copy of what the student does not train
    dense.model = None  # the teacher and the student hold what is still needed
    student, history = distill_model(  # a new module where FSDP sharded the one it trained
        student, teacher, dense.tokenizer, settings, arch, dense.calibration_texts, dense.held_out_texts,
        workdir=workdir, resume=resume, show_progress=show_progress, log=log, seed=recipe.seed,
    )  # fmt: skip
    hold_the_budget(student, dense.tokenizer, dense.calibration_texts, recipe.seq_len, recipe.batch_size, log)
    clock.lap("distill")
    dense.model = teacher = None
    report = evaluate.compare(student, dense.probe, dense.ffn_size, dense.num_layers, converted=converted or None)
    if not converted:  # not densetomoe's module: distillation kept the structure, so its recorded costs hold
        costs = figures.get("quick_eval", {})
        report.ffn_flops_ratio = costs.get("ffn_flops_ratio", report.ffn_flops_ratio)
        report.active_ffn_share = costs.get("active_ffn_share", report.active_ffn_share)
    clock.lap("evaluate")
    calibration = figures.get("calibration", {})
    stats = ActivationStats(tokens=calibration.get("tokens", 0), sequences=calibration.get("sequences", 0))
    seconds = {**figures.get("seconds", {}), "distill": clock.seconds["distill"]}
    result = Conversion(
        recipe, dense, student, report, stats, seconds, history=history, format=recipe.format, details=details, device=figures.get("device")
    )  # fmt: skip
    result.write(out, True if out == source_folder else overwrite)
    return result


def _recorded(source_folder: Path, settings: Distill, format: str | None) -> tuple[Recipe, dict, formats.Format]:
    """The folder's recipe with ``settings`` (and ``format``) in it, its figures, and its own format."""
    was = formats.of(source_folder)
    figures = folder.read_figures(source_folder)
    if not (source_folder / folder.RECIPE_FILE).is_file() or not figures:
        raise UsageError(f"{source_folder} was not written by densetomoe convert (no {folder.RECIPE_FILE} or {folder.FIGURES_FILE})")
    try:
        recorded = Recipe.from_yaml(source_folder / folder.RECIPE_FILE)
    except UsageError as e:
        raise UsageError(f"{source_folder}: {e}") from None
    format = format or was.name
    if refusal := was.can_become(formats.FORMATS[format]):
        raise UsageError(f"{source_folder} {refusal}")
    update = {"distill": settings, "format": format}
    local_calib = folder.read_local(source_folder).get("calib")
    if local_calib:  # the recipe names the calibration file only; its path on this machine is recorded apart
        update["calib"] = local_calib
    return recorded.model_copy(update=update), figures, was


def _into_format(student: nn.Module, teacher: nn.Module, dense: Dense, recipe: Recipe, show_progress: bool):
    """A converted ``student`` built in ``recipe.format`` on the teacher's parameters: the teacher is
    calibrated again for the format's refit."""
    builder = formats.FORMATS[recipe.format].builder(teacher.config, recipe, None)
    modules = moe_modules(student)
    builder.check_modules(modules)
    builder.check_plan({i: modules[i].top_k if i in modules else None for i in range(dense.num_layers)}, recipe.experts)
    ffns, stats = calibrate_layers(teacher, dense.tokenizer, dense.calibration_texts, dense.arch, list(modules), recipe, show_progress)
    samples = {i: stats.layers[i].inputs for i in modules}
    return builder.assemble(teacher, dense.arch, modules, ffns, samples, dense.ffn_size, show_progress, lambda message: None)


def checkpoint_folder(out: Path) -> Path:
    """Where distillation keeps its checkpoints for an output folder ``out``."""
    return out.with_name(out.name + ".checkpoints")

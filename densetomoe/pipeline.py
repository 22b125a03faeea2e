"""``convert()`` and ``distill()``: one conversion, its stages in order.

    load -> calibrate -> partition -> route -> budget -> swap (or native) -> [distill] -> evaluate -> export
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

from . import archs, card, data, devices, folder, memory, surgery
from ._version import __version__
from .console import progress
from .data import batches
from .errors import UsageError
from .ffn import DenseFFN, dense_ffn, expert_size
from .moe import MoEFeedForward, blocks_of, moe_modules, replace_ffn, structure_of
from .recipe import Distill, Recipe, check_against_model
from .stages import blockwise, budget, evaluate, export, load, native
from .stages.calibrate import ActivationStats, LayerRecorder, LayerStats, calibrate, calibration_batches, layer_generator
from .stages.distill import History, check_sources, dense_teacher, distill_model, reset_coverage, share_frozen
from .stages.partition import PARTITIONS
from .stages.router import ROUTERS, RouterSettings

HELD_OUT_TEXTS = 64
SEQUENTIAL_FROM = 1_000_000_000  # parameters from which a decoder converts one block at a time by default
DECODER_BUDGET_EXPERTS = (64, 32)  # a decoder's experts under --ffn-budget when none are asked for: the first that splits its FFN
CALIB_TOKENS = 32768  # calibration tokens at least, when the recipe names none (twice the sample where that is more)
SAMPLE_TOKENS = (8192, 32768)  # a layer's sampled calibration tokens: everywhere, and at most for a decoder LM
SAMPLE_BYTES = 256 * 1024**2  # a decoder's sample grows while its activations (tokens x FFN, float32) fit in this
LOGITS_BYTES = 64 * 1024**2  # the most logits one held-out batch may produce (float32; scoring copies them twice)


@dataclass
class Dense:
    """The dense model a conversion (or a distillation) starts from, and the text split both use."""

    source: load.Source
    config: object
    arch: archs.Arch
    ffn_size: int
    num_layers: int
    model: nn.Module | None = None  # None until :meth:`load`
    tokenizer: object = None
    calibration_texts: list[str] = field(default_factory=list)
    held_out_texts: list[str] = field(default_factory=list)
    held_out_separate: bool = False
    probe: evaluate.Probe | None = None  # the dense outputs on the held-out texts

    @classmethod
    def describe(cls, model: str, allow_pickle: bool) -> Dense:
        """What the config says, and whether the weights can be read (none read yet): every check that
        needs no weights runs before any heavy work."""
        source = load.resolve(model, allow_pickle)
        config = load.load_config(source)
        arch = archs.arch_for(config)
        _, ffn_size = archs.ffn_sizes(config, arch)
        if not source.gguf_file:
            load.check_weights(source.path, allow_pickle)
        return cls(source, config, arch, ffn_size, archs.num_layers(config, arch))

    def split(self, recipe: Recipe) -> Dense:
        """The recipe's text, split into calibration and held-out documents."""
        texts = data.load_texts(recipe.calib)
        self.calibration_texts, self.held_out_texts, self.held_out_separate = split_texts(texts, recipe.seed)
        return self

    def held_out_batches(self, recipe: Recipe) -> list[dict]:
        """The held-out texts in batches small enough that a batch's logits stay within
        :data:`LOGITS_BYTES` (a 128k vocabulary gives 1 GB of logits for 16 texts of 128 tokens)."""
        vocab = getattr(self.config, "vocab_size", 0) or 0
        size = max(1, min(recipe.batch_size, LOGITS_BYTES // max(4 * recipe.seq_len * vocab, 1)))
        held_out = list(batches(self.tokenizer, self.held_out_texts, recipe.seq_len, size))
        return [data.teacher_forced(b) for b in held_out] if self.arch.seq2seq else held_out

    def load(self, recipe: Recipe, log: Callable[[str], None] = lambda message: None, device: torch.device | str = "cpu") -> Dense:
        """The recipe's text split, the weights and the tokenizer, the model on ``device``, and the dense
        outputs on held-out text (kept there too)."""
        self.split(recipe)
        log(f"{self.source.name}: {self.arch.family}, {self.num_layers} layers, FFN {self.ffn_size}")
        self.model, self.tokenizer = load.load_model(
            self.source, self.config, recipe.dtype, recipe.allow_pickle, causal_lm=self.arch.decoder
        )
        self.model.to(device)
        held_out = devices.to_device(self.held_out_batches(recipe), device)
        self.probe = evaluate.record(self.model, held_out, causal_lm=self.arch.generates)
        return self


@dataclass
class Conversion:
    """What :func:`convert` (or :func:`distill`) made: the in-memory MoE model and what was measured."""

    recipe: Recipe
    dense: Dense  # the model itself is released once measured; its description stays
    model: nn.Module
    report: evaluate.QuickReport
    stats: ActivationStats
    seconds: dict[str, float] = field(default_factory=dict)
    history: History | None = None  # when distilled
    out: Path | None = None
    native: native.NativeReport | None = None  # format native: what the native export did
    weights: Path | None = None  # sequential: the folder the weights were written to as blocks converted
    device: str | None = None  # where the stages computed (devices.describe)

    @property
    def source(self) -> load.Source:
        return self.dense.source

    @property
    def tokenizer(self):
        return self.dense.tokenizer

    @property
    def format(self) -> str:
        return "native" if self.native is not None else "remote-code"

    @property
    def top_k(self) -> dict[int, int]:
        """Each converted layer's top-k (layers left dense are absent)."""
        if self.native is None:
            return structure_of(self.model.config).top_k
        dense = set(self.native.mlp_only_layers)
        return {i: self.model.config.num_experts_per_tok for i in range(self.dense.num_layers) if i not in dense}

    @property
    def published_recipe(self) -> Recipe:
        """The recipe as the folder shows it: no local path (:meth:`Recipe.published`)."""
        return self.recipe.published(folder.public_name(self.source.name, self.source.hub_id))

    def figures(self) -> dict:
        """What ``densetomoe_conversion.json`` records (:func:`densetomoe.folder.figures`)."""
        source = self.source
        return folder.figures(
            version=__version__,
            base_model=folder.public_name(source.name, source.hub_id),
            calibration={"tokens": self.stats.tokens, "sequences": self.stats.sequences},
            quick_eval=self.report.as_dict(),
            seconds=self.seconds,
            format=self.format,
            native=None if self.native is None else self.native.as_dict(),
            distillation=None if self.history is None else self.history.as_dict(),
            device=self.device,
        )

    def card(self) -> str:
        """The model card (``README.md``)."""
        return card.render(
            name=self.source.hub_id or Path(self.source.name).name,  # never publish a local path
            hub_id=self.source.hub_id,
            inherited=load.source_card(self.source),  # read only when a card is written
            family=self.dense.arch.family,
            decoder=self.dense.arch.decoder,
            head=self.model.__class__.__name__,
            recipe=self.published_recipe,
            report=self.report,
            top_k=self.top_k,
            num_layers=self.dense.num_layers,
            shared_size=self.native.shared_expert_size if self.native is not None else structure_of(self.model.config).shared_size,
            calibration_tokens=self.stats.tokens,
            seconds=self.seconds.get("total", 0.0),
            held_out_separate=self.dense.held_out_separate,
            history=self.history,
            native=self.native,
            seq2seq=self.dense.arch.seq2seq,
        )

    def write(self, out: Path, overwrite: bool, needed: int | None = None) -> None:
        """Export to ``out`` (in one process under ``accelerate launch``); ``needed``: the bytes estimated
        before the work (:func:`output_size`), which a failed write reports."""
        if not is_main_process():
            return
        export.write(
            out,
            overwrite,
            self.model,
            recipe_yaml=self.published_recipe.to_yaml(),
            card=self.card(),
            figures=self.figures(),
            source_folder=self.source.path,  # the tokenizer comes from the dense model
            gguf_file=self.source.gguf_file,
            extras=self._extras,
            format=self.format,
            weights=self.weights,
            needed=needed,
        )
        self.out = out

    def _extras(self, staging: Path) -> None:
        """The loss figure, when distilled, and the local paths (never published)."""
        source = self.source
        base = source.path / source.gguf_file if source.gguf_file else source.path
        calib = self.recipe.calib if self.recipe.calib and Path(self.recipe.calib).expanduser().exists() else None
        folder.write_local(staging, base=str(base), calib=None if calib is None else str(Path(calib).expanduser().resolve()))
        if self.history is not None:
            from .report import FIGURE_LOSS, loss_figure

            loss_figure(self.history.as_dict(), staging / FIGURE_LOSS)


def _fixed_top_k(recipe: Recipe) -> int | None:
    """The top-k of every converted layer when the recipe fixes it; None when an FFN budget plans it."""
    return recipe.top_k if recipe.ffn_budget is None else None


def check_seq2seq(recipe: Recipe, arch: archs.Arch) -> None:
    """What an encoder-decoder cannot do yet: one block at a time, distillation, the native format."""
    if not arch.seq2seq:
        return
    refused = [name for name, asked in (("--sequential", recipe.sequential), ("distillation", recipe.distill is not None)) if asked]
    if refused:
        raise UsageError(f"{arch.family} is an encoder-decoder, and {' and '.join(refused)} works on decoder-only and encoder models only so far")


OUTPUT_MARGIN = 1.1  # on the weights estimated by output_size: room for what it leaves out (biases, coverage, gates)
OUTPUT_FILES = 1_000_000  # config, recipe, card, figures and modeling_densetomoe.py: about 100 kB, with room to spare


def output_size(dense: Dense, recipe: Recipe, target: native.Target | None) -> int | None:
    """About how many bytes the converted folder takes, from the checkpoint's headers and config: the
    dense parameters in ``recipe.dtype`` (the experts hold the FFN's neurons, pruning only removes
    some); per converted layer, an MLP router and the experts' mean outputs, the most a format adds
    (``hidden x (router_hidden + 2 x experts) + router_hidden x experts``); a tied head that ``target``
    unties (``vocab x hidden``); all of it :data:`OUTPUT_MARGIN` times; then the source's tokenizer and
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
    if target is not None and target.untied_head and getattr(dense.config, "tie_word_embeddings", False):
        parameters += getattr(dense.config, "vocab_size", 0) * hidden
    weights = parameters * load.DTYPES[recipe.dtype].itemsize * OUTPUT_MARGIN
    patterns = [p for p in load.HUB_FILES if not p.endswith(".safetensors")]
    others = {path for pattern in patterns for path in dense.source.path.glob(pattern) if path.is_file()}
    return int(weights) + sum(path.stat().st_size for path in others) + OUTPUT_FILES


def check_output_space(dense: Dense, recipe: Recipe, target: native.Target | None, out: Path) -> int | None:
    """Refuse, before any work, an ``out`` whose filesystem cannot hold the folder; returns the bytes
    it will take (:func:`output_size`)."""
    needed = output_size(dense, recipe, target)
    if needed is not None:
        export.check_space(out, needed)
    return needed


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
    device: str | None = None,
) -> Conversion:
    """Convert ``recipe.model`` to an MoE model; write it to ``out`` when given.

    With ``recipe.distill``, the MoE model is then distilled from the dense one; its checkpoints go
    to ``<out>.checkpoints`` and ``resume`` continues from the latest of them.

    The stages compute on ``device`` (:func:`densetomoe.devices.resolve`; default: this process's
    accelerator if it has one, else the CPU); the model returned is on the CPU.
    """
    device = devices.resolve(device, processes().device)  # processes() before any Accelerator: see there
    recipe = with_model_defaults(recipe)
    if recipe.sequential:
        return convert_sequential(recipe, out, overwrite, show_progress, log, device)
    clock = _Clock()
    out = Path(out) if out is not None else None
    if out is not None:
        export.check_destination(out, overwrite)
    workdir = checkpoint_folder(out) if out is not None and recipe.distill is not None else None
    if resume and (workdir is None or not workdir.is_dir()):
        raise UsageError(f"--resume: no checkpoints to resume from{'' if workdir is None else ' in ' + str(workdir)}")

    # load: everything checkable from the config is checked before weights or text are read
    dense = Dense.describe(recipe.model, recipe.allow_pickle)
    arch, ffn_size, num_layers = dense.arch, dense.ffn_size, dense.num_layers
    check_against_model(recipe, ffn_size, num_layers)
    check_seq2seq(recipe, arch)
    if recipe.distill is not None:
        check_sources(recipe.distill.data)
    target = native.check_source(dense.config, recipe.shared_experts, _fixed_top_k(recipe)) if recipe.format == "native" else None
    load.check_memory(dense.source, recipe.dtype, copies=2 if recipe.distill is not None else 1)
    needed = check_output_space(dense, recipe, target, out) if out is not None else None
    dense.load(recipe, log, device)
    model = dense.model
    clock.lap("load")

    # calibrate
    layers = sorted(set(recipe.layers)) if recipe.layers else list(range(num_layers))
    with devices.computing_on(device):
        ffns, stats = calibrate_layers(model, dense.tokenizer, dense.calibration_texts, arch, layers, recipe, show_progress)
    clock.lap("calibrate")
    if stats.tokens < recipe.calib_tokens:
        log(f"warning: the calibration text ran out after {stats.tokens:,} of {recipe.calib_tokens:,} tokens")

    # partition and route, layer by layer: the split does not depend on top-k
    splits = split_layers(ffns, stats, layers, recipe, archs.activation(dense.config, arch), show_progress, log, device)
    clock.lap("partition+route")

    # budget: each layer's top-k, or dense
    with devices.computing_on(device):
        plan = plan_layers(recipe, splits, model, arch, dense.probe, ffn_size, num_layers, show_progress)
        modules = {i: splits[i].build(k) for i, k in plan.items() if k is not None}
    if not modules:
        raise UsageError(f"an FFN budget of {recipe.ffn_budget:.0%} keeps every layer dense: nothing to convert")
    if recipe.ffn_budget is not None:
        clock.lap("budget")
        mean = " on average (dynamic top-k)" if recipe.dynamic else ""
        if len(set(plan.values())) == 1:
            log(f"top-{next(iter(plan.values()))} in every layer{mean}")
        else:
            log(f"per-layer top-k{mean}: " + ", ".join(f"{i}:{'dense' if k is None else k}" for i, k in plan.items()))

    # the teacher, made before the student changes the dense model (or is built on its parameters)
    teacher = dense_teacher(model, recipe.distill) if recipe.distill is not None else None
    native_report = None
    if target is not None:  # a new native model, built on the dense one's parameters
        native.check_plan(plan, recipe.experts, target)
        samples = {i: stats.layers[i].inputs for i in modules}
        with devices.computing_on(device):
            model, native_report = native.to_native(
                model, target, arch.layers, modules, {i: ffns[i] for i in modules}, samples, ffn_size, show_progress
            )
        clock.lap("native")
        if not native_report.llama_cpp:
            log(f"note: layers {', '.join(map(str, native_report.mlp_only_layers))} stay dense (mlp_only_layers): "
                "transformers and vLLM run this folder, llama.cpp (every layer MoE) does not")  # fmt: skip
    else:  # swap in place (the teacher keeps the dense FFNs swapped out)
        surgery.swap_in(model, arch, modules)
    dense.model = None  # the converted model (or the teacher) holds what is still needed
    # the layers' calibration samples are not needed again (SmolLM2: 2.2 GB at 32,768 tokens a layer)
    stats.layers.clear()
    del splits, ffns
    memory.return_freed_memory()

    history = None
    if recipe.distill is not None:
        model, history = distill_model(  # a new module where FSDP sharded the one it trained
            model, teacher, dense.tokenizer, recipe.distill, arch, dense.calibration_texts, dense.held_out_texts,
            workdir=workdir, resume=resume, show_progress=show_progress, log=log, seed=recipe.seed,
        )  # fmt: skip
        with devices.computing_on(device):
            hold_the_budget(model, dense, recipe, log)
        clock.lap("distill")

    # measure against the dense outputs recorded before
    del teacher
    with devices.computing_on(device):
        report = evaluate.compare(model, dense.probe, ffn_size, num_layers, converted=list(modules.values()))
    model.to("cpu")
    clock.lap("evaluate")

    result = Conversion(
        recipe, dense, model, report, stats, clock.seconds, history=history, native=native_report, device=devices.describe(device)
    )  # fmt: skip
    if out is not None:
        result.write(out, overwrite, needed)
        clock.lap("export")
    return result


def with_model_defaults(recipe: Recipe) -> Recipe:
    """``recipe`` with the settings it leaves to the model (None) decided:

    * ``sequential``: one block at a time for decoders of :data:`SEQUENTIAL_FROM` parameters and more,
      from safetensors, when nothing asks for the whole model (distillation, a sensitivity budget).
      One block at a time gives the same folder in less memory, and was no slower on SmolLM2
      (README, Large models);
    * ``refit``: on for decoder LMs, where training-free conversion loses most (README, Measured);
    * ``routing``: dynamic top-k for decoder LMs in format remote-code (README, Measured), top-k
      otherwise;
    * ``sample_tokens`` (:func:`sample_tokens`: more for small decoder LMs) and ``calib_tokens``
      (twice the sample, at least :data:`CALIB_TOKENS`);
    * under ``ffn_budget``, for decoder LMs, unless the recipe names them: the first of
      :data:`DECODER_BUDGET_EXPERTS` that splits the FFN equally, and the ``uniform`` budget (SmolLM2
      at 50%: 64 experts lost less than 32, and the sensitivity budget more, with 8 experts and with
      32, than the same top-k everywhere; README, Measured).

    What is decided is recorded as set, so a second call (the CLI's, then :func:`convert`'s) reads
    nothing again.
    """
    given = recipe.model_fields_set
    budget_defaults = recipe.ffn_budget is not None and not {"experts", "budget"} <= given
    open_settings = (recipe.sequential, recipe.refit, recipe.routing, recipe.sample_tokens, recipe.calib_tokens)
    if None not in open_settings and not budget_defaults:
        return recipe
    dense = Dense.describe(recipe.model, recipe.allow_pickle)
    decided = {}
    if budget_defaults:
        splitting = [n for n in DECODER_BUDGET_EXPERTS if dense.ffn_size % (n + recipe.shared_experts) == 0]
        if "experts" not in given:
            decided["experts"] = splitting[0] if dense.arch.decoder and splitting else recipe.experts
        if "budget" not in given:
            decided["budget"] = "uniform" if dense.arch.decoder else recipe.budget
    if recipe.sequential is None:
        big = dense.arch.decoder and not dense.source.gguf_file and load.parameter_count(dense.source.path) >= SEQUENTIAL_FROM
        decided["sequential"] = big and recipe.distill is None and recipe.ffn_budget is None
    if recipe.refit is None:
        decided["refit"] = dense.arch.decoder
    if recipe.routing is None:
        decided["routing"] = "dynamic" if dense.arch.decoder and recipe.format != "native" else "top-k"
    if recipe.sample_tokens is None:
        decided["sample_tokens"] = sample_tokens(dense.arch.decoder, dense.ffn_size)
    if recipe.calib_tokens is None:
        decided["calib_tokens"] = max(CALIB_TOKENS, 2 * decided.get("sample_tokens", recipe.sample_tokens))
    return recipe.model_copy(update=decided)


def sample_tokens(decoder: bool, ffn_size: int) -> int:
    """A layer's sampled calibration tokens when the recipe names none: :data:`SAMPLE_TOKENS`'s first,
    and for a decoder LM the largest power of two up to its second whose activations (``tokens x
    ffn_size``, float32) fit in :data:`SAMPLE_BYTES`. SmolLM2 at half the FFN: 32,768 tokens of 65,536
    gave 1.93x dense perplexity, 8,192 of 32,768 gave 2.19x (README, Measured); at LLaMA-3.2-1B's FFN
    (8,192) and above the sample stays 8,192 (a larger one would slow each layer's refit in proportion)."""
    low, high = SAMPLE_TOKENS
    tokens = low
    while decoder and tokens * 2 <= high and tokens * 2 * ffn_size * 4 <= SAMPLE_BYTES:
        tokens *= 2
    return tokens


def convert_sequential(
    recipe: Recipe,
    out: str | Path | None,
    overwrite: bool = False,
    show_progress: bool = True,
    log: Callable[[str], None] = lambda message: None,
    device: torch.device | str = "cpu",
) -> Conversion:
    """:func:`convert` one block at a time (:mod:`.stages.blockwise`): the same stages, the same result,
    with one block of the dense model in memory instead of all of them.

    Each block is read from the checkpoint, calibrated on the dense hidden states that reach it, split
    and routed, written to the output's weight shards, and released. Held-out text travels two ways
    at once, through the dense blocks and through the converted ones, for the quick evaluation.
    The blocks and the hidden states compute on ``device``; the embeddings and the head (the frame)
    stay on the CPU, where they run once.
    """
    clock = _Clock()
    if out is None:
        raise UsageError("sequential conversion writes each block as it goes: give an output folder (--out)")
    out = Path(out)
    export.check_destination(out, overwrite)
    dense = Dense.describe(recipe.model, recipe.allow_pickle)
    if dense.source.gguf_file:
        raise UsageError("--sequential reads safetensors tensor by tensor, and transformers reads a GGUF file whole: convert it without --sequential")
    arch, ffn_size, num_layers = dense.arch, dense.ffn_size, dense.num_layers
    check_against_model(recipe, ffn_size, num_layers)
    check_seq2seq(recipe, arch)
    target = native.check_source(dense.config, recipe.shared_experts, _fixed_top_k(recipe)) if recipe.format == "native" else None
    needed = check_output_space(dense, recipe, target, out)
    dense.split(recipe)
    log(f"{dense.source.name}: {arch.family}, {num_layers} layers, FFN {ffn_size}, one block at a time")
    dtype = load.DTYPES[recipe.dtype]
    cls = load.model_class(dense.config, arch.decoder)
    checkpoint = blockwise.Checkpoint(dense.source.path)
    # what surrounds the blocks computes where they do, as in memory: the same numbers from both paths
    frame = blockwise.frame(cls, dense.source.path, dense.config, arch, dtype).to(device)
    shell = blockwise.skeleton(cls, dense.config).to(dtype)
    dense.tokenizer = data.for_batches(load.load_tokenizer(dense.source))
    batches = calibration_batches(dense.tokenizer, dense.calibration_texts, recipe.seq_len, recipe.batch_size, recipe.calib_tokens)
    calibration = blockwise.capture(frame, arch, devices.to_device(list(batches), device))
    held_out = blockwise.capture(frame, arch, devices.to_device(dense.held_out_batches(recipe), device))
    blockwise.release(frame)  # its embeddings are not needed again until every block is written (1 GB at 1B)
    memory.return_freed_memory()
    converted_stream = held_out.copy()
    masks = calibration.masks()
    stats = ActivationStats(tokens=sum(int(m.sum()) for m in masks), sequences=sum(len(m) for m in masks))
    if stats.tokens < recipe.calib_tokens:
        log(f"warning: the calibration text ran out after {stats.tokens:,} of {recipe.calib_tokens:,} tokens")
    clock.lap("load")

    layers = set(recipe.layers) if recipe.layers else set(range(num_layers))
    activation_name = archs.activation(dense.config, arch)
    activation = ACT2FN[activation_name]
    settings = RouterSettings(hidden=recipe.router_hidden, steps=recipe.router_steps)
    modules: dict[int, MoEFeedForward] = {}  # kept on the meta device: their shapes describe the model
    fits = []
    native_shell = None
    # each block is written as it converts, to a scratch folder whose files then move into the export
    with export.scratch(out, needed, "weights") as weights:
        writer = blockwise.ShardWriter(weights)
        with progress(show_progress) as bar, devices.computing_on(device):
            task = bar.add_task("blocks", total=num_layers)
            for i in range(num_layers):
                block = blockwise.load_block(shell, arch, i, checkpoint, dtype, device)
                module = ffn = sample = None
                if i in layers:
                    ffn = dense_ffn(block, arch, activation)
                    layer_stats = _calibrate_block(block, arch, ffn, calibration, recipe, i, stats.tokens)
                    split = split_layer(ffn, layer_stats, recipe, activation_name, settings, layer_generator(recipe.seed, i, "split"))
                    module, sample = split.build(recipe.top_k), layer_stats.inputs
                else:
                    blockwise.run_block(block, calibration)
                blockwise.run_block(block, held_out)
                if target is None:
                    if module is not None:
                        replace_ffn(block, arch.moe_at, list(arch.identity), module.to(dtype))
                    state, prefix = block.state_dict(), blockwise.block_prefix(shell, arch)
                else:  # the native block: a dense one computes what it did; a converted one is built anew
                    memory.return_freed_memory()  # the refit below allocates anew (its Gram matrix, 256 MB at 1B)
                    state, fit = native.native_block(block.state_dict(), target, module, ffn, sample)
                    prefix = f"model.{arch.layers}."
                    if module is not None:
                        fits.append(fit)
                        if native_shell is None:
                            mlp_only = [j for j in range(num_layers) if j not in layers]
                            native_shell = _native_shell(dense.config, target, ffn_size, module, mlp_only)
                        blockwise.release(block)
                        block = blockwise.materialise(native_shell, arch, i, state, dtype, device)
                blockwise.run_block(block, converted_stream)
                names = shell if target is None or module is None else native_shell  # whose checkpoint names to write
                # the block is released next and its tensors never change: they are written as they are
                state = {f"{prefix}{i}.{name}": t.to("cpu", dtype) for name, t in state.items()}
                writer.add(blockwise.as_saved(names, state), copy=False)
                blockwise.release(block)
                if module is not None:
                    modules[i] = module.to("meta")
                # nothing of block i may outlive it: these name its dense FFN, its sample and its tensors
                block = state = split = layer_stats = ffn = sample = module = None
                memory.return_freed_memory()
                bar.advance(task)
        if not modules:
            raise UsageError("no layer was converted")
        model = shell if target is None else native_shell
        frame = blockwise.frame(cls, dense.source.path, dense.config, arch, dtype)  # read again, for the head and export
        # the frame is only read from now on: its tensors go out as they are, one at a time, so that a
        # head untied from the embeddings (the same storage) is neither copied nor in the same shard
        outside = blockwise.as_saved(model, _outside_blocks(frame, arch, untie=target is not None and target.untied_head))
        for name, tensor in outside.items():
            writer.add({name: tensor}, copy=False)
        writer.close()
        clock.lap("partition+route")
        frame.to(device)  # written: now for the norm and head of the evaluation
        with devices.computing_on(device):
            with blockwise.replay(frame, arch, held_out):
                probe = evaluate.record(frame, held_out.batches, causal_lm=arch.decoder)
            with blockwise.replay(frame, arch, converted_stream):
                report = evaluate.compare(frame, probe, ffn_size, num_layers, converted=list(modules.values()))
        clock.lap("evaluate")

        native_report = None
        if target is not None:
            first = next(iter(modules.values()))
            native_report = native.NativeReport.from_fits(target.model_type, model.config.mlp_only_layers, first.shared_size, fits)
        else:
            surgery.swap_in(model, arch, modules)
        model.generation_config = frame.generation_config if model.can_generate() else None
        dense.probe = probe
        result = Conversion(
            recipe, dense, model, report, stats, clock.seconds, native=native_report, weights=weights, device=devices.describe(device)
        )  # fmt: skip
        result.write(out, overwrite, needed)
        clock.lap("export")
    return result


def _calibrate_block(block, arch, ffn: DenseFFN, stream, recipe: Recipe, index: int, tokens: int) -> LayerStats:
    """Run ``stream`` through a dense ``block`` with its FFN's inputs recorded: the layer's statistics."""
    recorder = LayerRecorder(ffn, recipe.sample_tokens, layer_generator(recipe.seed, index))
    mask: dict[str, torch.Tensor] = {}
    handle = block.get_submodule(arch.up).register_forward_pre_hook(recorder.hook(mask))
    try:
        blockwise.run_block(block, stream, before=lambda n: mask.update(tokens=stream.batches[n]["attention_mask"].bool()))
    finally:
        handle.remove()
    return recorder.stats(tokens)


def _outside_blocks(frame: nn.Module, arch: archs.Arch, untie: bool) -> dict[str, torch.Tensor]:
    """The frame's tensors outside the blocks, as the output names them: a tied head is written once
    (as ``save_pretrained`` does), or as its own matrix when the target needs it (``untie``)."""
    inside = blockwise.block_prefix(frame, arch)
    state = {name: t for name, t in frame.state_dict().items() if not name.startswith(inside)}
    tied = getattr(frame.config, "tie_word_embeddings", False) and frame.get_output_embeddings() is not None
    head = next((name for name in state if name.endswith("lm_head.weight")), None)
    if tied and head is not None and not untie:
        del state[head]
    return state


def _native_shell(config, target, ffn_size: int, module: MoEFeedForward, mlp_only: list[int]) -> nn.Module:
    """The native model on the meta device, its config made from the first converted ``module``."""
    from transformers import AutoModelForCausalLM

    native_config = native.native_config(config, target, ffn_size, module, module.top_k, mlp_only)
    if target.untied_head:
        native_config.tie_word_embeddings = False
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(native_config).to(module.w_up.dtype).eval()


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
    held-out documents are the same ones conversion kept aside. ``format="native"`` on a remote-code
    folder first turns it into the native model (calibrating the teacher again for the refit) and
    then trains that native model.
    """
    from .loading import load as load_moe

    processes()  # before the Accelerator: see processes()
    clock = _Clock()
    source_folder = Path(moe_dir)
    out = Path(out) if out is not None else source_folder
    was = folder.format_of(source_folder)
    if out != source_folder:
        export.check_destination(out, overwrite)
    figures = folder.read_figures(source_folder)
    if not (source_folder / folder.RECIPE_FILE).is_file() or not figures:
        raise UsageError(f"{source_folder} was not written by densetomoe convert (no {folder.RECIPE_FILE} or {folder.FIGURES_FILE})")
    try:
        recorded = Recipe.from_yaml(source_folder / folder.RECIPE_FILE)
    except UsageError as e:
        raise UsageError(f"{source_folder}: {e}") from None
    format = format or was
    if was == "native" and format != "native":
        raise UsageError(f"{source_folder} is a native folder and cannot become remote code again; convert the dense model with --format {format}")
    update = {"distill": settings, "format": format}
    local_calib = folder.read_local(source_folder).get("calib")
    if local_calib:  # the recipe names the calibration file only; its path on this machine is recorded apart
        update["calib"] = local_calib
    recipe = recorded.model_copy(update=update)
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
    native_report = native.NativeReport.from_dict(figures["native"]) if was == "native" else None
    if format == "native" and was != "native":
        student, native_report = _native_from_folder(student, teacher, dense.tokenizer, recipe, arch, dense.calibration_texts, show_progress)
        clock.lap("native")
    teacher = share_frozen(teacher, student, settings)  # no second copy of what the student does not train
    dense.model = None  # the teacher and the student hold what is still needed
    student, history = distill_model(  # a new module where FSDP sharded the one it trained
        student, teacher, dense.tokenizer, settings, arch, dense.calibration_texts, dense.held_out_texts,
        workdir=workdir, resume=resume, show_progress=show_progress, log=log, seed=recipe.seed,
    )  # fmt: skip
    hold_the_budget(student, dense, recipe, log)
    clock.lap("distill")
    dense.model = teacher = None
    report = evaluate.compare(student, dense.probe, dense.ffn_size, dense.num_layers, converted=converted or None)
    if not converted:  # a native folder: distillation kept the structure, so its recorded costs hold
        costs = figures.get("quick_eval", {})
        report.ffn_flops_ratio = costs.get("ffn_flops_ratio", report.ffn_flops_ratio)
        report.active_ffn_share = costs.get("active_ffn_share", report.active_ffn_share)
    clock.lap("evaluate")
    calibration = figures.get("calibration", {})
    stats = ActivationStats(tokens=calibration.get("tokens", 0), sequences=calibration.get("sequences", 0))
    seconds = {**figures.get("seconds", {}), "distill": clock.seconds["distill"]}
    result = Conversion(recipe, dense, student, report, stats, seconds, history=history, native=native_report, device=figures.get("device"))
    result.write(out, True if out == source_folder else overwrite)
    return result


def hold_the_budget(model: nn.Module, dense: Dense, recipe: Recipe, log: Callable[[str], None]) -> None:
    """After distillation, dynamic top-k's coverage set again on calibration text, so that tokens take
    each layer's top-k experts on average, as the FLOPs are counted (:func:`reset_coverage`)."""
    changed = reset_coverage(model, dense.tokenizer, dense.calibration_texts, recipe.seq_len, recipe.batch_size)
    if changed:
        before, after = (sum(pair[n] for pair in changed.values()) / len(changed) for n in (0, 1))
        log(f"dynamic top-k after training: {before:.1f} -> {after:.1f} experts per token on calibration text (coverage set again)")


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


def _native_from_folder(student, teacher, tokenizer, recipe: Recipe, arch, texts: list[str], show_progress: bool):
    """A remote-code ``student`` as the native model: the teacher is calibrated again for the refit."""
    target = native.check_source(teacher.config, recipe.shared_experts)
    modules = moe_modules(student)
    if any(m.coverage for m in modules.values()):
        raise UsageError("--format native: this model uses dynamic top-k, and a native MoE gives every token the same number of experts; convert with --routing top-k")
    num_layers = archs.num_layers(teacher.config, arch)
    native.check_plan({i: modules[i].top_k if i in modules else None for i in range(num_layers)}, recipe.experts, target)
    ffns, stats = calibrate_layers(teacher, tokenizer, texts, arch, list(modules), recipe, show_progress)
    _, ffn_size = archs.ffn_sizes(teacher.config, arch)
    samples = {i: stats.layers[i].inputs for i in modules}
    return native.to_native(teacher, target, arch.layers, modules, ffns, samples, ffn_size, show_progress)


def processes():
    """accelerate's state of this process (one process unless started by ``accelerate launch``).

    Made here first, so that on a machine without an accelerator the processes of
    ``accelerate launch --multi_gpu --num_processes N`` talk over gloo on CPU (accelerate's own
    ``--cpu`` starts a single process unless MPI is set up); distillation's ``Accelerator`` then
    shares this state.
    """
    from accelerate import PartialState

    return PartialState(cpu=not torch.accelerator.is_available())


def is_main_process() -> bool:
    """False in the secondary processes of an ``accelerate launch`` run (True otherwise)."""
    return processes().is_main_process


def checkpoint_folder(out: Path) -> Path:
    """Where distillation keeps its checkpoints for an output folder ``out``."""
    return out.with_name(out.name + ".checkpoints")


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
    state = processes()
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


def split_layer(
    ffn: DenseFFN, stats: LayerStats, recipe: Recipe, activation: str, settings: RouterSettings, generator: torch.Generator
) -> surgery.LayerSplit:
    """Shared expert out, the rest partitioned into experts (pruned if asked), and the router trained;
    the experts' down projections are refit to the whole ``ffn`` when the split is built (a native
    export refits its own way)."""
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
    refit_to = whole if recipe.refit and recipe.format != "native" else None
    return surgery.LayerSplit(
        ffn, labels, router, recipe.experts, activation, sample, shared, recipe.compensate, refit_to, recipe.dynamic, recipe.boundary_ramp
    )  # fmt: skip


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


class _Clock:
    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._last = self._start = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = now - self._last
        self.seconds["total"] = now - self._start
        self._last = now

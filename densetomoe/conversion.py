"""What a conversion starts from and what it makes: the dense model (:class:`Dense`) and the result
(:class:`Conversion`), which writes the folder."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import archs, card, data, devices, folder, processes
from ._version import __version__
from .data import batches
from .evaluation import quick as evaluate
from .formats import FORMATS
from .recipe import Recipe
from .stages import export, load
from .stages.calibrate import ActivationStats
from .stages.distill import History

HELD_OUT_TEXTS = 64
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
    """What :func:`~densetomoe.pipeline.convert` (or :func:`~densetomoe.pipeline.distill`) made: the in-memory MoE model and what was measured."""

    recipe: Recipe
    dense: Dense  # the model itself is released once measured; its description stays
    model: nn.Module
    report: evaluate.QuickReport
    stats: ActivationStats
    seconds: dict[str, float] = field(default_factory=dict)
    history: History | None = None  # when distilled
    out: Path | None = None
    format: str = "remote-code"  # a FORMATS entry
    details: object = None  # what the format recorded (Format.details), where it records something
    weights: Path | None = None  # sequential: the folder the weights were written to as blocks converted
    device: str | None = None  # where the stages computed (devices.describe)

    @property
    def source(self) -> load.Source:
        return self.dense.source

    @property
    def tokenizer(self):
        return self.dense.tokenizer

    @property
    def top_k(self) -> dict[int, int]:
        """Each converted layer's top-k (layers left dense are absent)."""
        return FORMATS[self.format].top_k(self.model, self.dense.num_layers)

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
            details=None if self.details is None else self.details.as_dict(),
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
            shared_size=FORMATS[self.format].shared_size(self.model, self.details),
            calibration_tokens=self.stats.tokens,
            seconds=self.seconds.get("total", 0.0),
            held_out_separate=self.dense.held_out_separate,
            history=self.history,
            format=FORMATS[self.format],
            details=self.details,
            seq2seq=self.dense.arch.seq2seq,
        )

    def write(self, out: Path, overwrite: bool, needed: int | None = None) -> None:
        """Export to ``out`` (in one process under ``accelerate launch``); ``needed``: the bytes estimated
        before the work (:func:`output_size`), which a failed write reports."""
        if not processes.is_main_process():
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
            from .evaluation.report import FIGURE_LOSS, loss_figure

            loss_figure(self.history.as_dict(), staging / FIGURE_LOSS)


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


class Clock:
    """Seconds per stage, and in total."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._last = self._start = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = now - self._last
        self.seconds["total"] = now - self._start
        self._last = now

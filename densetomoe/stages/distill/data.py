"""What distillation reads: its text sources (the calibration text among them), the batches of an
encoder (each document alone) and of a causal LM (windows of one token stream), and its checkpoints."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from ...data import encode, load_texts, missing_file
from ...errors import UsageError

STATE_FILE = "densetomoe_distill_state.json"
CALIBRATION_TEXT = "calibration"  # a source in Distill.data: the text the folder was calibrated on
KEEP_CHECKPOINTS = 2


def training_texts(data: str | list[str] | None, calibration_texts: list[str]) -> list[str]:
    """The documents ``Distill.data`` names: one source or several in turn, each a file or dataset as
    :func:`~densetomoe.data.load_texts` reads it, or :data:`CALIBRATION_TEXT` for ``calibration_texts``
    (None: those alone)."""
    texts: list[str] = []
    for source in _sources(data):
        texts += calibration_texts if source == CALIBRATION_TEXT else load_texts(source)
    return texts


def check_sources(data: str | list[str] | None) -> None:
    """Refuse a distillation text file that is not there before any heavy work (not after the conversion)."""
    for source in _sources(data):
        if source != CALIBRATION_TEXT and missing_file(source):
            raise UsageError(f"distillation text {source} does not exist")


def _sources(data: str | list[str] | None) -> list[str]:
    return [CALIBRATION_TEXT] if data is None else [data] if isinstance(data, str) else list(data)


def tokenize(tokenizer, seq_len: int):
    """A DataLoader collate function: the batches that calibration and evaluation use."""
    return lambda texts: dict(encode(tokenizer, texts, seq_len))


def windows(rows: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """A DataLoader collate function for windows of :func:`~densetomoe.data.packed` text."""
    ids = torch.stack(rows)  # (batch, seq_len)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _checkpoints(workdir: Path) -> list[Path]:
    """The checkpoints in ``workdir``, oldest first."""
    return sorted(workdir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))


def latest_checkpoint(workdir: Path) -> Path | None:
    found = _checkpoints(workdir)
    return found[-1] if found else None


def save(accelerator, workdir: Path, history) -> None:
    """An ``accelerate`` state (weights, optimizer, RNG) plus the history; the oldest are pruned."""
    folder = workdir / f"checkpoint-{history.step}"
    accelerator.save_state(str(folder))
    if accelerator.is_main_process:
        (folder / STATE_FILE).write_text(json.dumps(history.as_dict()))
        for path in _checkpoints(workdir)[:-KEEP_CHECKPOINTS]:
            shutil.rmtree(path, ignore_errors=True)

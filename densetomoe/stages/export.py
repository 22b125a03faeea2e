"""Write a converted model as a Hugging Face folder that explains itself.

The folder holds the model in one of :data:`~densetomoe.formats.FORMATS` (each format writes the
model its own way), the tokenizer, the recipe, a model card and the figures measured during
conversion (file names and schema: :mod:`densetomoe.folder`). It is written to a temporary sibling
folder and moved into place only when complete, so a failure or Ctrl-C never leaves a half-written
``--out``; a write the filesystem refuses (no space left, say) is one line naming ``--out``, with the
space needed and free (:func:`writing`).
"""

from __future__ import annotations

import itertools
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from safetensors import SafetensorError
from torch import nn
from transformers import AutoTokenizer

from .. import folder
from ..errors import UsageError
from ..formats import FORMATS

# sentence-transformers keeps its pooling and settings beside the transformers files.
SENTENCE_TRANSFORMERS_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")


def check_destination(out: Path, overwrite: bool) -> None:
    """Fail before any work if ``out`` cannot be written."""
    if out.exists() and not overwrite:
        raise UsageError(f"{out} already exists; pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} exists and is not a folder")
    ancestor = _existing_parent(out)  # the folders missing are created at write time
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK):
        raise UsageError(f"cannot write {out}: {ancestor} is not a writable folder")


def _existing_parent(out: Path) -> Path:
    ancestor = Path(out).resolve().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    return ancestor


def free_space(out: Path) -> int:
    """Bytes free on the filesystem that will hold ``out`` (its nearest existing parent's)."""
    return shutil.disk_usage(_existing_parent(out)).free


def check_space(out: Path, needed: int) -> None:
    """Refuse before any work an ``out`` whose filesystem has less than ``needed`` bytes free."""
    free = free_space(out)
    if needed > free:
        raise UsageError(f"--out {out}: {_space(needed, free)}; free some space or choose another --out")


@contextmanager
def writing(out: Path, needed: int | None) -> Iterator[None]:
    """Turn a write that fails (an ``OSError``, or safetensors' I/O error) into a :class:`UsageError`
    that names ``out`` and, once what was written is removed (the caller's ``except``, inside this
    block), says ``needed`` bytes (None: unknown) against those now free."""
    try:
        yield
    except (OSError, SafetensorError) as e:
        reason = _write_error(e)
        if reason is None:
            raise
        raise UsageError(f"cannot write --out {out}: {reason} ({_space(needed, free_space(out))})") from None


def _write_error(e: Exception) -> str | None:
    """What the OS said of a failed write, or None for a safetensors error that is not one."""
    if isinstance(e, OSError):
        return e.strerror or str(e)
    # safetensors: "Error while serializing: I/O error: No space left on device (os error 28)"
    _, found, reason = str(e).partition("I/O error: ")
    return reason.strip() if found else None


def _space(needed: int | None, free: int) -> str:
    needs = "" if needed is None else f"needs about {_bytes(needed)}, "
    return f"{needs}{_bytes(free)} free on its filesystem"


def _bytes(n: float) -> str:
    """``n`` bytes in kB, MB, GB or TB (powers of 1000, as ``df -H`` counts), to three figures."""
    for unit in ("kB", "MB", "GB", "TB"):
        n /= 1000
        if n < 999.5 or unit == "TB":
            return f"{n:.3g} {unit}" if n < 99.95 else f"{n:,.0f} {unit}"


def model_size(model: nn.Module) -> int:
    """Bytes of ``model``'s parameters and buffers, each once (tied weights are shared), as safetensors
    stores them; from the shapes alone, so that a skeleton on the meta device counts too."""
    return sum(t.numel() * t.element_size() for t in itertools.chain(model.parameters(), model.buffers()))


def write(
    out: Path,
    overwrite: bool,
    model: nn.Module,
    *,
    recipe_yaml: str,
    card: str,
    figures: dict,
    source_folder: Path,
    gguf_file: str | None = None,
    on_file: Callable[[str], None] = lambda name: None,
    extras: Callable[[Path], None] | None = None,
    format: str = "remote-code",
    weights: Path | None = None,
    needed: int | None = None,
) -> Path:
    """Write everything to a temporary sibling of ``out`` and move it into place when complete.

    ``format`` is a :data:`~densetomoe.formats.FORMATS` entry: how the model itself is written;
    ``figures`` is what :func:`densetomoe.folder.figures` makes. The tokenizer is read again from
    ``source_folder`` (from ``gguf_file`` in it, for a GGUF source); ``extras`` may add files (figures)
    to the staging folder before it is moved. ``weights``: a folder whose safetensors files and index
    were written already (sequential conversion); they move in, and ``model`` only gives the config.
    ``needed``: the bytes that a failed write says the folder needs (default: the model's own)."""
    out = Path(out)
    check_destination(out, overwrite)
    with staged(out, needed or model_size(model)) as staging:
        if weights is None:
            FORMATS[format].write(model, staging)
        else:
            staging.mkdir(parents=True)
            for path in sorted(weights.iterdir()):
                os.replace(path, staging / path.name)
            FORMATS[format].write_config(model, staging)
        on_file("weights")
        _save_tokenizer(source_folder, gguf_file, staging)
        if not gguf_file:
            _copy_sentence_transformers(source_folder, staging)
        (staging / folder.RECIPE_FILE).write_text(recipe_yaml)
        folder.write_figures(staging, figures)
        (staging / folder.CARD_FILE).write_text(card)
        if extras is not None:
            extras(staging)
        on_file("folder")
    return out


@contextmanager
def staged(out: Path, needed: int | None) -> Iterator[Path]:
    """A temporary sibling of ``out`` (not created yet) to write into: moved into place when the block
    completes, removed if it fails; a write that fails is one line naming ``out`` (:func:`writing`)."""
    with writing(out, needed):  # around the clean-up below: the space free is measured after it
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = _sibling(out, "partial")
        shutil.rmtree(staging, ignore_errors=True)
        try:
            yield staging
            _move_into_place(staging, out)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise


@contextmanager
def scratch(out: Path, needed: int | None, kind: str) -> Iterator[Path]:
    """A temporary sibling of ``out`` (not created yet) for files that move into the staging folder
    later, such as weights written block by block; removed at the end, whatever happens, and a write
    that fails is one line naming ``out`` (:func:`writing`)."""
    path = _sibling(out, kind)
    with writing(out, needed):
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)


def _sibling(out: Path, kind: str) -> Path:
    """``out``'s hidden temporary sibling of a ``kind``, this process's own."""
    return out.parent / f".{out.name}.{kind}-{os.getpid()}"


# what transformers 5 records about how this machine loaded the tokenizer: not the model's to publish
LOADING_KEYS = ("is_local", "local_files_only")


def _save_tokenizer(source: Path, gguf_file: str | None, staging: Path) -> None:
    # a fresh copy: calls with truncation settings change a tokenizer's saved state
    files = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(source, **files)
    for key in LOADING_KEYS:
        tokenizer.init_kwargs.pop(key, None)
    tokenizer.save_pretrained(staging)


def _copy_sentence_transformers(source: Path, staging: Path) -> None:
    for name in SENTENCE_TRANSFORMERS_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, staging / name)
    for module in source.iterdir():
        if module.is_dir() and module.name[:1].isdigit() and "_" in module.name:  # 1_Pooling, 2_Normalize
            shutil.copytree(module, staging / module.name, dirs_exist_ok=True)


def _move_into_place(staging: Path, out: Path) -> None:
    """Replace ``out`` by ``staging``; an old ``out`` is only removed once the new one is in place."""
    if not out.exists():
        os.replace(staging, out)
        return
    old = _sibling(out, "old")
    os.replace(out, old)
    try:
        os.replace(staging, out)
    except BaseException:
        os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)

"""One transformer block in memory at a time: the mechanics of sequential (layer-by-layer) conversion.

The in-memory path loads the whole dense model and runs calibration text through it with every
layer hooked at once. The sequential path (``--sequential``), as GPTQ-style tools do, never holds
more than one block:

* :func:`frame` loads what surrounds the blocks (embeddings, final norm, head) into a model of the
  same class with a single block (transformers' own loading, which reads only those tensors), whose
  forward is used twice: up to the first block, to
  :func:`capture` each batch's hidden states and the keyword arguments every block receives
  (attention mask, rotary embeddings), and after the last block, to :func:`replay` stored final
  hidden states through the norm and head;
* :func:`load_block` reads block ``i``'s tensors from the checkpoint (``Checkpoint``: safetensors,
  read tensor by tensor) into the block of a full-depth skeleton on the meta device;
* :func:`run_block` pushes the stored hidden states through it (the next block's inputs);
* :class:`ShardWriter` writes each converted block's tensors as soon as they exist, as sharded
  safetensors with the index ``save_pretrained`` writes for large models.

Peak memory is then one block and the stored hidden states, whatever the depth: the frame is
released once the inputs of the first block are captured, and read again after the last block.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..archs import Arch
from ..errors import UsageError
from ..moe import blocks_of

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
MAX_SHARD_BYTES = 512 * 1024**2  # the most a shard holds (whole groups, such as blocks; one larger group alone)
MAX_WAITING_BYTES = 64 * 1024**2  # what may wait in memory for more to share its shard (small blocks group up)


class Checkpoint:
    """The tensors of a folder of safetensors files, read one at a time by name."""

    def __init__(self, folder: Path):
        self.files: dict[str, Path] = {}
        for path in sorted(Path(folder).glob("*.safetensors")):
            with safe_open(path, "pt") as f:
                self.files.update(dict.fromkeys(f.keys(), path))
        if not self.files:
            raise UsageError(f"--sequential reads safetensors weights, and {folder} has none")

    def get(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        with safe_open(self.files[name], "pt") as f:
            return f.get_tensor(name).to(dtype)


def _in_checkpoint(name: str, model: nn.Module, checkpoint: Checkpoint) -> str | None:
    """The checkpoint's name for the model's tensor ``name``: the same, or with the base model's
    prefix added or removed (a checkpoint saved from the bare model, loaded with a head, or back)."""
    prefix = getattr(model, "base_model_prefix", "") + "."
    for candidate in (name, name.removeprefix(prefix), prefix + name):
        if candidate in checkpoint.files:
            return candidate
    return None


def one_block_config(config, arch: Arch):
    """``config`` with a single block (lists with one entry per layer, such as ``layer_types``, cut too)."""
    small = copy.deepcopy(config)
    depth = getattr(config, arch.num_layers_key)
    setattr(small, arch.num_layers_key, 1)
    for key, value in vars(config).items():
        if isinstance(value, list) and len(value) == depth and key != arch.num_layers_key:
            setattr(small, key, value[:1])
    return small


def block_prefix(model: nn.Module, arch: Arch) -> str:
    """Where the blocks' tensors are named in ``model``'s state dict: ``model.layers.`` for a LLaMA."""
    base = "" if model.base_model is model else model.base_model_prefix + "."
    return f"{base}{arch.layers}."


def frame(cls: type, folder: Path, config, arch: Arch, dtype: torch.dtype) -> nn.Module:
    """The model of class ``cls`` with one block, loaded by transformers from ``folder``: every tensor
    outside the blocks is the checkpoint's, the block is block 0 (only its class and arguments are
    used). transformers reads only the tensors this small model has, straight into place."""
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # the other blocks' tensors are left unread on purpose
    try:
        model = cls.from_pretrained(folder, config=one_block_config(config, arch), dtype=dtype)
    finally:
        logging.set_verbosity(verbosity)
    return model.eval()


def skeleton(cls: type, config) -> nn.Module:
    """The full-depth model on the meta device: shapes and names, no memory."""
    with torch.device("meta"):
        return cls(config).eval()


@torch.no_grad()
def load_block(
    model: nn.Module, arch: Arch, index: int, checkpoint: Checkpoint, dtype: torch.dtype, device: torch.device | str = "cpu"
) -> nn.Module:
    """Block ``index`` of the meta ``model``, materialised on ``device`` with its weights from ``checkpoint``."""
    prefix = f"{block_prefix(model, arch)}{index}."
    state = {}
    for name in blocks_of(model, arch.layers)[index].state_dict():
        stored = _in_checkpoint(prefix + name, model, checkpoint)
        if stored is None:
            raise UsageError(f"the checkpoint has no tensor {prefix + name!r}")
        state[name] = checkpoint.get(stored, dtype)
    return materialise(model, arch, index, state, dtype, device)


@torch.no_grad()
def materialise(
    model: nn.Module, arch: Arch, index: int, state: dict[str, torch.Tensor], dtype: torch.dtype, device: torch.device | str = "cpu"
) -> nn.Module:
    """Block ``index`` of the meta ``model`` on ``device``, with ``state`` (block-relative names) as its weights."""
    block = blocks_of(model, arch.layers)[index]
    block.to_empty(device=device)
    block.load_state_dict({name: t.to(dtype) for name, t in state.items()})
    return block.to(dtype)


def as_saved(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` (``model``'s state-dict names) as ``save_pretrained`` would write them: transformers'
    own reverse weight conversion, such as fused 3-D experts split into the per-expert checkpoint
    tensors that other tools (llama.cpp's converter) read. Made on the CPU, where the shards are
    written, also while the stages compute on an accelerator (:func:`densetomoe.devices.computing_on`)."""
    from transformers.core_model_loading import revert_weight_conversion

    with torch.device("cpu"):
        return revert_weight_conversion(model, tensors)


def release(module: nn.Module) -> None:
    """Give a materialised block's (or the frame's) memory back: it returns to the meta device."""
    module.to("meta")


@dataclass
class Stream:
    """Batches on their way through the blocks: each batch's hidden states, real-token mask, and the
    other arguments every block receives."""

    batches: list[dict]
    hidden: list[torch.Tensor]  # (batch, seq, hidden) per batch: the next block's inputs
    arguments: list[tuple[tuple, dict]]  # per batch: the blocks' positional (after the hidden states) and keyword arguments
    returns_tuple: bool = False  # whether a block returns a tuple (GPT-2, BERT) or the tensor (LLaMA)

    def masks(self) -> list[torch.Tensor]:
        return [b["attention_mask"].bool() for b in self.batches]

    def copy(self) -> Stream:
        return Stream(self.batches, list(self.hidden), self.arguments, self.returns_tuple)


class _Caught(Exception):
    pass


@torch.no_grad()
def capture(model: nn.Module, arch: Arch, batches: list[dict]) -> Stream:
    """Run ``model`` (a :func:`frame`) on ``batches`` up to its block: the block's inputs per batch."""
    block = blocks_of(model, arch.layers)[0]
    stream = Stream(batches, [], [])

    def catch(hidden, *args, **kwargs):
        stream.hidden.append(hidden)
        stream.arguments.append((args, kwargs))
        raise _Caught

    block.forward = catch
    try:
        for batch in batches:
            try:
                model(**batch, **_no_cache(model))
            except _Caught:
                pass
    finally:
        del block.forward  # the class's forward again
    return stream


def _no_cache(model: nn.Module) -> dict:
    return {"use_cache": False} if getattr(model.config, "use_cache", None) is not None and model.can_generate() else {}


@torch.no_grad()
def run_block(block: nn.Module, stream: Stream, before: Callable[[int], None] = lambda n: None) -> None:
    """Push every batch of ``stream`` through ``block``: its hidden states become the block's outputs
    (``before(n)`` runs before batch ``n``, for hooks that need its mask)."""
    for n, (hidden, (args, kwargs)) in enumerate(zip(stream.hidden, stream.arguments)):
        before(n)
        out = block(hidden, *args, **kwargs)
        stream.returns_tuple = isinstance(out, tuple)
        stream.hidden[n] = out[0] if isinstance(out, tuple) else out


class replay:
    """While active, the :func:`frame`'s block returns the stored final hidden states of ``stream``,
    batch after batch, so the frame's forward gives what the full model would (norm, head, logits)."""

    def __init__(self, model: nn.Module, arch: Arch, stream: Stream):
        self.block = blocks_of(model, arch.layers)[0]
        self.stream = stream

    def __enter__(self):
        outputs = iter(self.stream.hidden)
        returns_tuple = self.stream.returns_tuple

        def give(hidden, *args, **kwargs):
            out = next(outputs)
            return (out,) if returns_tuple else out

        self.block.forward = give
        return self

    def __exit__(self, *exc):
        del self.block.forward


def _storage(tensor: torch.Tensor) -> int | None:
    """Where ``tensor``'s storage lies (None for an empty one, which shares nothing)."""
    return tensor.untyped_storage().data_ptr() if tensor.numel() else None


class ShardWriter:
    """Write a model's tensors a few at a time as safetensors shards in ``folder``, and the index
    that ``from_pretrained`` reads (one ``model.safetensors`` when everything fits in one shard)."""

    def __init__(self, folder: Path, max_shard_bytes: int | None = None, max_waiting_bytes: int | None = None):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = max_shard_bytes or MAX_SHARD_BYTES
        self.max_waiting_bytes = max_waiting_bytes or MAX_WAITING_BYTES
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []
        self.total = 0

    def add(self, tensors: dict[str, torch.Tensor], copy: bool = True) -> None:
        """Queue ``tensors`` (a block's, say); what waits is written first if they would take it past
        the shard size, and they are written at once once what waits reaches ``max_waiting_bytes``, or
        if as many again would not fit, so that a group of that size (a block at 1B: 240 MB) never
        stays in memory while the next one is converted, and small groups share a shard.

        ``copy=False`` keeps the tensors themselves, for tensors that no longer change (a block about
        to be released, a model only read from now on): nothing is copied but what shares storage
        with a tensor waiting beside it, as safetensors refuses shared storage within one file; a
        tensor that shares storage with one already waiting (a tied head) starts a new shard instead."""
        incoming = sum(t.numel() * t.element_size() for t in tensors.values())
        storages = {_storage(t) for t in self.pending.values()} - {None}  # those of the tensors waiting
        shares = not copy and any(_storage(t) in storages for t in tensors.values())
        if self.pending_bytes + incoming > self.max_shard_bytes or shares:
            self._flush()
            storages = set()
        for name, tensor in tensors.items():
            tensor = tensor.detach().contiguous()
            if copy or _storage(tensor) in storages:
                tensor = tensor.clone()  # a copy shares no storage with the model, nor with another tensor here
            storages.add(_storage(tensor))
            self.pending[name] = tensor
        self.pending_bytes += incoming
        if self.pending_bytes >= self.max_waiting_bytes or self.pending_bytes + incoming > self.max_shard_bytes:
            self._flush()

    def _flush(self) -> None:
        if not self.pending:
            return
        save_file(self.pending, self.folder / f"part-{len(self.shards):05d}.safetensors", metadata={"format": "pt"})
        self.shards.append(list(self.pending))
        self.total += self.pending_bytes
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> list[Path]:
        """Name the shards as ``save_pretrained`` does and write the index; returns the files written."""
        self._flush()
        parts = [self.folder / f"part-{n:05d}.safetensors" for n in range(len(self.shards))]
        if len(parts) == 1:
            os.replace(parts[0], self.folder / SINGLE_FILE)
            return [self.folder / SINGLE_FILE]
        names = [f"model-{n + 1:05d}-of-{len(parts):05d}.safetensors" for n in range(len(parts))]
        weight_map = {}
        for part, name, keys in zip(parts, names, self.shards):
            os.replace(part, self.folder / name)
            weight_map.update(dict.fromkeys(keys, name))
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        return [self.folder / INDEX_FILE, *(self.folder / n for n in names)]

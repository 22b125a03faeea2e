"""Where a conversion computes: the device its stages run on, and moving what they share onto it.

Conversion runs its stages (calibration forwards, partition, routers, refit, evaluation) on one
device: an accelerator when the process has one (under ``accelerate launch``, each process's own),
else the CPU. Weights are read on the CPU and written from it; in between, the model, the
calibration samples and the held-out batches live on the device. Inside :func:`computing_on`, the
tensors the stages create without naming a device are made there too; what draws from a layer's
own seeded CPU ``torch.Generator`` draws on the CPU and moves the result, so a layer's random
choices are the same numbers on every device.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch

from .errors import UsageError

AUTO = "auto"


def resolve(asked: str | None, default: torch.device) -> torch.device:
    """The device ``asked`` for (``cpu``, ``cuda``, ``cuda:1``, ``mps``; None or ``auto``: ``default``,
    the process's own), checked to exist: a bad name or a missing accelerator is one line."""
    if asked is None or asked == AUTO:
        return torch.device(default)
    try:
        device = torch.device(asked)
    except RuntimeError:
        raise UsageError(f"--device {asked}: not a device name (cpu, cuda, cuda:N, mps or auto)") from None
    if device.type == "cpu":
        return device
    if not torch.accelerator.is_available() or torch.accelerator.current_accelerator().type != device.type:
        raise UsageError(f"--device {asked}: this machine has no {device.type} device; use --device cpu (or auto)")
    if device.index is not None and device.index >= torch.accelerator.device_count():
        raise UsageError(f"--device {asked}: there are {torch.accelerator.device_count()} {device.type} devices (0 to {torch.accelerator.device_count() - 1})")
    return device


def describe(device: torch.device) -> str:
    """``device`` as a report names it: ``cpu``, or ``cuda:0 (NVIDIA H200)``."""
    device = torch.device(device)
    if device.type != "cuda":
        return str(device)
    index = torch.cuda.current_device() if device.index is None else device.index
    return f"cuda:{index} ({torch.cuda.get_device_name(index)})"


@contextmanager
def computing_on(device: torch.device) -> Iterator[None]:
    """Inside the block, tensors made without a device are made on ``device`` (nothing changes on the
    CPU, where torch's default-device mode would only cost time)."""
    if torch.device(device).type == "cpu":
        yield
        return
    with torch.device(device):
        yield


def to_device(value, device: torch.device):
    """``value`` with every tensor in it (nested in dicts, lists and tuples) on ``device``; anything
    else is returned as it is."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, Mapping):  # a tokenizer's BatchEncoding too
        return {k: to_device(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return type(value)(to_device(v, device) for v in value)
    return value

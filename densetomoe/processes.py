"""The processes of one run: one, or several under ``accelerate launch``, and which one speaks."""

from __future__ import annotations

import torch


def state():
    """accelerate's state of this process (one process unless started by ``accelerate launch``).

    Made here first, so that on a machine without an accelerator the processes of
    ``accelerate launch --multi_gpu --num_processes N`` talk over gloo on CPU (accelerate's own
    ``--cpu`` starts a single process unless MPI is set up); distillation's ``Accelerator`` then
    shares this state.
    """
    from accelerate import PartialState

    return PartialState(cpu=not torch.accelerator.is_available())


def is_main_process() -> bool:
    """False in the other processes of an ``accelerate launch`` run: they work, and only the first one
    writes and speaks (True otherwise)."""
    return state().is_main_process

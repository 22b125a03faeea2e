"""Load a converted folder with densetomoe's own classes (no remote code)."""

from __future__ import annotations

import json
from pathlib import Path

import transformers

from . import folder as folders
from . import moe
from .errors import UsageError


def load(folder: str | Path, top_k: int | None = None, **kwargs):
    """The converted model in ``folder``, as the head class it was saved with.

    ``top_k`` changes the number of experts each token uses, in every layer; other keyword arguments go to
    ``from_pretrained`` (``dtype``, ``device_map``, ...).
    """
    folder = Path(folder)
    kind = folders.format_of(folder)
    config = json.loads((folder / "config.json").read_text())
    if top_k is not None:
        experts = config.get("num_experts") or config.get("num_local_experts")  # qwen3_moe saves the latter
        try:
            moe.check_top_k(top_k, experts)
        except ValueError as e:
            raise UsageError(str(e)) from None
    if kind == "native":  # a plain transformers MoE
        if top_k is not None:
            kwargs["num_experts_per_tok"] = top_k
        return transformers.AutoModelForCausalLM.from_pretrained(folder, **kwargs).eval()
    name = config["architectures"][0].removeprefix(moe.CLASS_PREFIX)
    dense = getattr(transformers, name, None)
    if dense is None:
        raise UsageError(f"{folder} needs transformers' {name}, which this transformers version lacks")
    model = moe.moe_model_class(dense).from_pretrained(folder, **kwargs)
    if top_k is not None:  # every layer, replacing any per-layer top-k a budget chose
        moe.set_top_k(model, top_k)
    return model.eval()

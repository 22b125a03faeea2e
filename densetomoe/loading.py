"""Load a converted folder with densetomoe's own classes (no remote code)."""

from __future__ import annotations

import json
from pathlib import Path

import transformers

from . import moe
from .errors import UsageError


def load(folder: str | Path, top_k: int | None = None, **kwargs):
    """The converted model in ``folder``, as the head class it was saved with.

    ``top_k`` changes the number of experts each token uses, in every layer; other keyword arguments go to
    ``from_pretrained`` (``dtype``, ``device_map``, ...).
    """
    folder = Path(folder)
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UsageError(f"{folder} is not a model folder: {e}") from None
    experts = config.get("num_experts") or config.get("num_local_experts")  # qwen3_moe saves the latter
    if top_k is not None and experts and not 1 <= top_k <= experts:
        raise UsageError(f"top_k must be between 1 and {experts}, got {top_k}")
    if moe.CONFIG_KEY not in config and experts and (folder / "densetomoe_conversion.json").is_file():
        return _load_native(folder, top_k, **kwargs)  # --format native: a plain transformers MoE
    if moe.CONFIG_KEY not in config:
        raise UsageError(f"{folder} was not written by densetomoe (its config has no {moe.CONFIG_KEY!r} entry)")
    name = config["architectures"][0].removeprefix(moe.CLASS_PREFIX)
    dense = getattr(transformers, name, None)
    if dense is None:
        raise UsageError(f"{folder} needs transformers' {name}, which this transformers version lacks")
    model = moe.moe_model_class(dense).from_pretrained(folder, **kwargs)
    if top_k is not None:  # every layer, replacing any per-layer top-k a budget chose
        moe.set_top_k(model, top_k)
    return model.eval()


def _load_native(folder: Path, top_k: int | None, **kwargs):
    if top_k is not None:
        kwargs["num_experts_per_tok"] = top_k
    return transformers.AutoModelForCausalLM.from_pretrained(folder, **kwargs).eval()

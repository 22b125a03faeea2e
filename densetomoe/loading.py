"""Load a converted folder with densetomoe's own classes (no remote code), and make transformers'
``AutoConfig`` know those classes in any process that imports densetomoe."""

from __future__ import annotations

import json
from pathlib import Path

import transformers

from . import archs, formats, moe
from .errors import UsageError


def load(folder: str | Path, top_k: int | None = None, **kwargs):
    """The converted model in ``folder``, as the head class it was saved with.

    ``top_k`` changes the number of experts each token uses, in every layer; other keyword arguments go to
    ``from_pretrained`` (``dtype``, ``device_map``, ...).
    """
    folder = Path(folder)
    format = formats.of(folder)
    config = json.loads((folder / "config.json").read_text())
    if top_k is not None:
        experts = config.get("num_experts") or config.get("num_local_experts")  # qwen3_moe saves the latter
        try:
            moe.check_top_k(top_k, experts)
        except ValueError as e:
            raise UsageError(str(e)) from None
    return format.load(folder, config, top_k, **kwargs)


def register_configs() -> None:
    """Register every family's ``MoE<Name>Config`` with ``AutoConfig`` under its ``densetomoe_*`` model type.

    A remote-code folder's config names its class through ``auto_map``, and transformers asks before
    running it, even for ``AutoTokenizer.from_pretrained(folder)``, which needs no model code but
    reads the config first (a prompt that waits 15 s). With the types registered, a process that has
    imported densetomoe resolves the config locally: the tokenizer loads silently, and
    ``AutoModel.from_pretrained`` still asks for ``trust_remote_code`` (only the config is registered).
    Without densetomoe, ``trust_remote_code=True`` on the tokenizer runs only the config class.
    """
    for arch in archs.ARCHS:
        for model_type in arch.model_types:
            config_class = moe.moe_config_class(transformers.CONFIG_MAPPING[model_type])
            transformers.AutoConfig.register(config_class.model_type, config_class, exist_ok=True)

"""Format ``remote-code``: densetomoe's own MoE module, copied into the folder and loaded with
``trust_remote_code`` (or :func:`densetomoe.load`). Every family, per-layer top-k, dynamic top-k.

The folder's config is the family's ``MoE<Config>`` class with an ``auto_map`` that names
``modeling_densetomoe.py``, a verbatim copy of :mod:`densetomoe.moe`, for the config and every head
class the family has.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import transformers
from torch import nn
from transformers.models.auto import modeling_auto
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

from .. import moe, surgery
from ..errors import UsageError
from ..evaluation.metrics import ExpertLoad
from ..evaluation.quick import active_ffn_share
from ..folder import MODELING_FILE
from ..moe import MoEFeedForward, moe_modules, set_top_k, structure_of
from ..stages import blockwise
from .base import FORMATS, Builder, Format, Layers

# Auto classes a converted folder can be loaded with, and transformers' table for each.
AUTO_CLASSES = {
    "AutoModel": modeling_auto.MODEL_MAPPING_NAMES,
    "AutoModelForPreTraining": modeling_auto.MODEL_FOR_PRETRAINING_MAPPING_NAMES,
    "AutoModelForMaskedLM": modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    "AutoModelForCausalLM": modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    "AutoModelForSeq2SeqLM": modeling_auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
    "AutoModelForSequenceClassification": modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
    "AutoModelForTokenClassification": modeling_auto.MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES,
    "AutoModelForQuestionAnswering": modeling_auto.MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES,
    "AutoModelForMultipleChoice": modeling_auto.MODEL_FOR_MULTIPLE_CHOICE_MAPPING_NAMES,
}


def auto_map(model_type: str, encoder_decoder: bool = False, saved: str | None = None) -> dict[str, str]:
    """``auto_map`` entries: the config and every head class the family has (so a bare encoder loads
    as a classifier for fine-tuning, and a fine-tuned folder reloads through its own head). An
    encoder-decoder's decoder-only ``...ForCausalLM`` is left out: it has no encoder to convert.

    A ``saved`` class that none of the family's auto classes names, such as ``T5EncoderModel`` (an
    encoder-decoder's encoder alone), is what ``AutoModel`` loads, and there are no heads: they would
    need the parts it does not have."""
    entries = {"AutoConfig": CONFIG_MAPPING_NAMES[model_type]}
    family = {auto: names.get(model_type) for auto, names in AUTO_CLASSES.items()}
    if saved is not None and saved not in family.values():
        entries["AutoModel"] = saved
        family = {}
    for auto, name in family.items():
        if encoder_decoder and auto == "AutoModelForCausalLM":
            continue
        if isinstance(name, str):
            entries[auto] = name
    return {auto: f"{Path(MODELING_FILE).stem}.{moe.CLASS_PREFIX}{name}" for auto, name in entries.items()}


def moe_config(model: nn.Module):
    """The model's config as the ``MoE<Config>`` class, with ``auto_map`` and ``architectures`` set
    (the model may have the dense class, straight from conversion, or the MoE class, when reloaded)."""
    dense_config = moe.dense_class(type(model.config))  # a distilled folder is already an MoE model
    dense_model = moe.dense_class(type(model)).__name__
    cls = moe.moe_config_class(dense_config)
    settings = model.config.to_dict()
    for key in ("model_type", "transformers_version", "auto_map"):
        settings.pop(key, None)
    config = cls(**settings)
    config.architectures = [moe.CLASS_PREFIX + dense_model]
    config.auto_map = auto_map(dense_config.model_type, getattr(config, "is_encoder_decoder", False), dense_model)
    return config


def _write_moe_files(model: nn.Module, staging: Path) -> None:
    """The ``MoE<Config>`` config and the modeling file its ``auto_map`` names."""
    moe_config(model).save_pretrained(staging)
    shutil.copyfile(Path(moe.__file__), staging / MODELING_FILE)


class RoutingRecorder(ExpertLoad):
    """:class:`~densetomoe.metrics.ExpertLoad` of densetomoe's MoE layers: each token's experts, from
    the layer's own selection (every expert, where tokens skip none)."""

    def __init__(self, layers: list[MoEFeedForward]):
        super().__init__(layers, [m.num_experts for m in layers], _selected)


def _selected(module: MoEFeedForward, args: tuple, output) -> torch.Tensor:
    x = args[0].reshape(-1, module.hidden_size)
    return module.selection(x) if module.sparse else torch.ones(len(x), module.num_experts)


class RemoteLayers(Layers):
    """The MoE layers of a remote-code model (densetomoe's own module)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.modules = moe_modules(model)  # block index -> module
        self.num_experts = model.config.num_experts
        self.top_k = model.config.num_experts_per_tok  # the folder's nominal top-k; per-layer values may differ
        self.saved = {i: m.routing for i, m in self.modules.items()}  # per layer, where a budget chose them (dynamic top-k too)

    def check_top_k(self, k: int) -> None:
        moe.check_top_k(k, self.num_experts)

    def set_top_k(self, k: int) -> None:
        set_top_k(self.model, self.saved if k == self.top_k else k)

    def restore(self) -> None:
        set_top_k(self.model, self.saved)

    def layer_top_k(self, index: int) -> int:
        return self.modules[index].top_k

    def active_ffn_share(self, dense_ffn_size: int, num_layers: int) -> float:
        return active_ffn_share(list(self.modules.values()), dense_ffn_size, num_layers)

    def ffn_linears(self) -> None:  # densetomoe's MoE modules are recognised by type
        return None

    def recorder(self) -> RoutingRecorder:
        return RoutingRecorder(list(self.modules.values()))


class InPlace(Builder):
    """The dense model with its FFNs swapped for densetomoe's MoE modules."""

    def assemble(self, model, arch, modules, ffns, samples, ffn_size, show_progress, log):
        surgery.swap_in(model, arch, modules)  # the teacher keeps the dense FFNs swapped out
        return model, None

    def block(self, index, block, module, ffn, sample, context):
        if module is not None:
            moe.replace_ffn(block, context.arch.moe_at, list(context.arch.identity), module.to(context.dtype))
        return block.state_dict(), blockwise.block_prefix(context.shell, context.arch), context.shell, block

    def finish(self, shell, arch, modules):
        surgery.swap_in(shell, arch, modules)  # on the meta device: the structure for the config
        return shell, None


class RemoteCode(Format):
    name = "remote-code"

    def routing(self, decoder: bool) -> str:
        return "dynamic" if decoder else "top-k"  # decoder LMs lose least with dynamic top-k (docs/results.md)

    def builder(self, config, recipe, top_k):
        return InPlace()

    def can_become(self, other):
        return None  # remote code can be trained into any format

    def top_k(self, model, num_layers):
        return structure_of(model.config).top_k

    def shared_size(self, model, details):
        return structure_of(model.config).shared_size

    def write(self, model, staging):
        model.save_pretrained(staging)  # with generation_config.json for a model that can generate
        _write_moe_files(model, staging)  # the MoE config replaces the dense one written above

    def write_config(self, model, staging):
        _write_moe_files(model, staging)
        if model.can_generate() and model.generation_config is not None:
            model.generation_config.save_pretrained(staging)

    def recognises(self, config, figures):
        return moe.CONFIG_KEY in config

    def load(self, folder, config, top_k, **kwargs):
        name = config["architectures"][0].removeprefix(moe.CLASS_PREFIX)
        dense = getattr(transformers, name, None)
        if dense is None:
            raise UsageError(f"{folder} needs transformers' {name}, which this transformers version lacks")
        model = moe.moe_model_class(dense).from_pretrained(folder, **kwargs)
        if top_k is not None:  # every layer, replacing any per-layer top-k a budget chose
            moe.set_top_k(model, top_k)
        return model.eval()

    def layers(self, model):
        return RemoteLayers(model)

    def card_use(self, details, auto):
        return f"""## Use

```python
from transformers import {auto}, AutoTokenizer
model = {auto}.from_pretrained("path/to/this/folder", trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder", trust_remote_code=True)  # runs the config class only
# use more or fewer experts per token without reconverting:
model = {auto}.from_pretrained("path/to/this/folder", trust_remote_code=True, num_experts_per_tok=4)
```

`trust_remote_code=True` runs `modeling_densetomoe.py` from this folder (torch and transformers only).
With densetomoe installed, `densetomoe.load("path/to/this/folder")` needs no remote code.
"""

    def gguf_refusal(self, config):
        return f"a {self.name} folder has no GGUF: llama.cpp runs native transformers models; convert with --format native"


REMOTE_CODE = RemoteCode()
FORMATS.register(REMOTE_CODE.name, "densetomoe's own MoE module, copied into the folder and loaded with trust_remote_code (every family, per-layer top-k)")(REMOTE_CODE)

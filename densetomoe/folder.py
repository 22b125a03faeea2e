"""What a converted folder holds and how to tell one: the single owner of the output format.

Every converted folder holds the model (in one of the :data:`FORMATS`), the tokenizer, and:

* ``densetomoe_recipe.yaml`` (:data:`RECIPE_FILE`): every setting of the conversion, re-runnable;
* ``densetomoe_conversion.json`` (:data:`FIGURES_FILE`): what was measured while converting, as
  :class:`Figures` describes;
* ``README.md`` (:data:`CARD_FILE`): the model card;
* after ``densetomoe eval``, ``eval/report.json`` (:func:`report_path`), which ``push`` reads;
* ``.densetomoe_local.json`` (:data:`LOCAL_FILE`): the local paths of the dense model and the
  calibration text, so that ``eval`` and ``distill`` find them again. It is the only file that
  names a local path, and ``push`` never uploads it: every other file names a source by its Hub id
  or its file name.

Export writes these names, loading and eval read them, and hub publishes them; none of them spells
a file name of its own. :func:`format_of` answers "is this a densetomoe folder, and which format".
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

from torch import nn
from transformers.models.auto import modeling_auto
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

from . import moe
from .errors import UsageError
from .registry import Registry

MODELING_FILE = "modeling_densetomoe.py"
RECIPE_FILE = "densetomoe_recipe.yaml"
FIGURES_FILE = "densetomoe_conversion.json"
CARD_FILE = "README.md"
REPORT_DIR = "eval"  # where `densetomoe eval` writes its report by default
REPORT_FILE = "report.json"
LOCAL_FILE = ".densetomoe_local.json"  # local paths; never published
TAGS = ["moe", "densetomoe", "mixture-of-experts"]

# head class suffix -> Hub task id (the card's pipeline_tag); anything else is a bare encoder
TASKS = {
    "ForMaskedLM": "fill-mask",
    "ForPreTraining": "fill-mask",
    "ForCausalLM": "text-generation",
    "ForConditionalGeneration": "text2text-generation",
    "MTModel": "translation",  # Marian
    "ForSequenceClassification": "text-classification",
    "ForTokenClassification": "token-classification",
    "ForQuestionAnswering": "question-answering",
    "ForMultipleChoice": "multiple-choice",
}
DEFAULT_TASK = "feature-extraction"


def task_of(head: str) -> str:
    """The Hub task of a model saved as class ``head`` (e.g. ``MoEBertForMaskedLM``: fill-mask)."""
    return next((task for suffix, task in TASKS.items() if head.endswith(suffix)), DEFAULT_TASK)


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


# -- the formats ---------------------------------------------------------------------------------------
# (model, staging folder) -> None: write the model itself (weights and config) into the folder.
WriteFn = Callable[[nn.Module, Path], None]
FORMATS: Registry[WriteFn] = Registry("format")


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


@FORMATS.register(
    "remote-code",
    "densetomoe's own MoE module, copied into the folder and loaded with trust_remote_code (every family, per-layer top-k)",
)
def write_remote_code(model: nn.Module, staging: Path) -> None:
    """Weights, the ``MoE<Config>`` config whose ``auto_map`` names ``modeling_densetomoe.py``, and that file."""
    model.save_pretrained(staging)  # with generation_config.json for a model that can generate
    moe_config(model).save_pretrained(staging)  # replaces the dense config written above
    shutil.copyfile(Path(moe.__file__), staging / MODELING_FILE)


def write_beside_weights(model: nn.Module, staging: Path, format: str) -> None:
    """What ``format`` writes besides the weights, for weights written elsewhere (sequential conversion,
    whose ``model`` is a skeleton on the meta device): the config, the generation config of a model
    that generates, and for remote code the modeling file."""
    if format == "remote-code":
        moe_config(model).save_pretrained(staging)
        shutil.copyfile(Path(moe.__file__), staging / MODELING_FILE)
    else:  # what save_pretrained records about the model
        model.config.architectures = [type(model).__name__]
        model.config.dtype = model.dtype
        model.config.save_pretrained(staging)
    if model.can_generate() and model.generation_config is not None:
        model.generation_config.save_pretrained(staging)


@FORMATS.register(
    "native",
    "a LLaMA/Mistral/Qwen2/Qwen3 decoder as a standard qwen2_moe/qwen3_moe checkpoint that transformers, vLLM and llama.cpp run without remote code",
)
def write_native(model: nn.Module, staging: Path) -> None:
    """A native transformers MoE model (qwen2_moe, ...): what ``save_pretrained`` writes, nothing else."""
    model.save_pretrained(staging)


def format_of(folder: str | Path) -> str:
    """The :data:`FORMATS` entry ``folder`` was written in, or a :class:`UsageError` saying why it is
    not a densetomoe folder. A remote-code folder's config holds densetomoe's structure; a native one
    is a plain transformers MoE whose conversion figures say ``"format": "native"``."""
    folder = Path(folder)
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UsageError(f"{folder} is not a model folder: {e}") from None
    if isinstance(config, dict) and moe.CONFIG_KEY in config:
        return "remote-code"
    if read_figures(folder).get("format") == "native":
        return "native"
    raise UsageError(f"{folder} was not written by densetomoe (no {moe.CONFIG_KEY!r} entry in its config, no native {FIGURES_FILE})")


# -- what a folder records -----------------------------------------------------------------------------
def public_name(name: str, hub_id: str | None = None) -> str:
    """What a published file may call a source: ``name`` when it is a Hub name, else only the last
    part of a local path (``/home/me/models/tiny`` -> ``tiny``)."""
    return name if hub_id else Path(name).name


def figures(
    *,
    version: str,
    base_model: str,
    calibration: dict,
    quick_eval: dict,
    seconds: dict,
    format: str,
    native: dict | None = None,
    distillation: dict | None = None,
    device: str | None = None,
) -> dict:
    """The content of :data:`FIGURES_FILE` (its schema, key by key):

    ``densetomoe_version``; ``base_model`` (:func:`public_name` of the source: a Hub id, else a file
    or folder name); ``calibration`` ``{tokens, sequences}``;
    ``quick_eval`` (the fidelity check at conversion, :class:`~densetomoe.stages.evaluate.QuickReport`);
    ``seconds`` per stage; ``device`` (where the stages computed, :func:`densetomoe.devices.describe`);
    ``format`` (a :data:`FORMATS` entry); ``native`` (format native: what the export did);
    ``distillation`` (when distilled: the loss history).
    """
    record = {
        "densetomoe_version": version,
        "base_model": base_model,
        "calibration": calibration,
        "quick_eval": quick_eval,
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
        "device": device,
        "format": format,
    }
    if native is not None:
        record["native"] = native
    if distillation is not None:
        record["distillation"] = distillation
    return record


def write_figures(folder: Path, record: dict) -> None:
    (folder / FIGURES_FILE).write_text(json.dumps(record, indent=2) + "\n")


def read_figures(folder: str | Path) -> dict:
    """What convert (and distill) recorded in ``folder``; empty if nothing readable."""
    try:
        record = json.loads((Path(folder) / FIGURES_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return record if isinstance(record, dict) else {}


def write_local(folder: Path, *, base: str, calib: str | None) -> None:
    """:data:`LOCAL_FILE`: where the dense model and the calibration text were read from."""
    (folder / LOCAL_FILE).write_text(json.dumps({"base": base, "calib": calib}, indent=2) + "\n")


def read_local(folder: str | Path) -> dict:
    """:data:`LOCAL_FILE`'s paths that still exist on this machine (none for a downloaded folder)."""
    try:
        record = json.loads((Path(folder) / LOCAL_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return {k: v for k, v in record.items() if isinstance(v, str) and Path(v).exists()} if isinstance(record, dict) else {}


def recorded_base(folder: str | Path) -> str:
    """The dense model ``folder`` was converted from: its local path if still there, else its name
    (a Hub id resolves anywhere)."""
    local = read_local(folder).get("base")
    if local:
        return local
    record = read_figures(folder)
    if "base_model" not in record:
        raise UsageError(f"{folder} does not record its base model; pass --base DENSE")
    return record["base_model"]


def report_path(folder: str | Path) -> Path:
    """Where ``densetomoe eval`` puts a folder's report by default, and where ``push`` looks for it."""
    return Path(folder) / REPORT_DIR / REPORT_FILE

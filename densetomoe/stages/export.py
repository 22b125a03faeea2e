"""Write a converted model as a Hugging Face folder that explains itself.

The folder holds safetensors weights, a config whose ``auto_map`` names ``modeling_densetomoe.py``
(a verbatim copy of :mod:`densetomoe.moe`), the tokenizer, the recipe, a model card and the figures
measured during conversion. It is written to a temporary sibling folder and moved into place only
when complete, so a failure or Ctrl-C never leaves a half-written ``--out``.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from torch import nn
from transformers import AutoTokenizer
from transformers.models.auto import modeling_auto
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

from .. import __version__, moe
from ..errors import UsageError

MODELING_FILE = "modeling_densetomoe.py"
RECIPE_FILE = "densetomoe_recipe.yaml"
FIGURES_FILE = "densetomoe_conversion.json"

# Auto classes a converted folder can be loaded with, and transformers' table for each.
AUTO_CLASSES = {
    "AutoModel": modeling_auto.MODEL_MAPPING_NAMES,
    "AutoModelForPreTraining": modeling_auto.MODEL_FOR_PRETRAINING_MAPPING_NAMES,
    "AutoModelForMaskedLM": modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    "AutoModelForCausalLM": modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    "AutoModelForSequenceClassification": modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
    "AutoModelForTokenClassification": modeling_auto.MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES,
    "AutoModelForQuestionAnswering": modeling_auto.MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES,
    "AutoModelForMultipleChoice": modeling_auto.MODEL_FOR_MULTIPLE_CHOICE_MAPPING_NAMES,
}

# sentence-transformers keeps its pooling and settings beside the transformers files.
SENTENCE_TRANSFORMERS_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")


def check_destination(out: Path, overwrite: bool) -> None:
    """Fail before any work if ``out`` cannot be written."""
    if out.exists() and not overwrite:
        raise UsageError(f"{out} already exists; pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} exists and is not a folder")
    ancestor = out.resolve().parent  # created at write time if missing
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK):
        raise UsageError(f"cannot write {out}: {ancestor} is not a writable folder")


def auto_map(model_type: str, model_class: str) -> dict[str, str]:
    """``auto_map`` entries: the config, the bare model, and the head class the model was saved as."""
    entries = {"AutoConfig": CONFIG_MAPPING_NAMES[model_type]}
    for auto, names in AUTO_CLASSES.items():
        name = names.get(model_type)
        if isinstance(name, str) and (auto == "AutoModel" or name == model_class):
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
    config.auto_map = auto_map(dense_config.model_type, dense_model)
    return config


def _write_remote_code(model: nn.Module, staging: Path) -> None:
    """Weights, the ``MoE<Config>`` config whose ``auto_map`` names ``modeling_densetomoe.py``, and that file."""
    model.save_pretrained(staging)  # with generation_config.json for a model that can generate
    moe_config(model).save_pretrained(staging)  # replaces the dense config written above
    shutil.copyfile(Path(moe.__file__), staging / MODELING_FILE)


def _write_native(model: nn.Module, staging: Path) -> None:
    """A native transformers MoE model (qwen2_moe, ...): what ``save_pretrained`` writes, nothing else."""
    model.save_pretrained(staging)


# How the model itself is written, by the recipe's ``format``.
FORMATS: dict[str, Callable[[nn.Module, Path], None]] = {"remote-code": _write_remote_code, "native": _write_native}


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
) -> Path:
    """Write everything to a temporary sibling of ``out`` and move it into place when complete.

    ``format`` is a :data:`FORMATS` entry: how the model itself is written. The tokenizer is read again from ``source_folder`` (from ``gguf_file`` in it, for a GGUF source);
    ``extras`` may add files (figures) to the staging folder before it is moved."""
    out = Path(out)
    check_destination(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        FORMATS[format](model, staging)
        on_file("weights")
        # a fresh copy: calls with truncation settings change a tokenizer's saved state
        files = {"gguf_file": gguf_file} if gguf_file else {}
        AutoTokenizer.from_pretrained(source_folder, **files).save_pretrained(staging)
        if not gguf_file:
            _copy_sentence_transformers(source_folder, staging)
        (staging / RECIPE_FILE).write_text(recipe_yaml)
        (staging / FIGURES_FILE).write_text(json.dumps({"densetomoe_version": __version__, **figures}, indent=2) + "\n")
        (staging / "README.md").write_text(card)
        if extras is not None:
            extras(staging)
        on_file("folder")
        _move_into_place(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def recorded_figures(folder: Path) -> dict:
    """What convert (and distill) recorded in ``folder``; empty if nothing readable."""
    try:
        return json.loads((Path(folder) / FIGURES_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def recorded_base(folder: Path) -> str:
    """The dense model ``folder`` was converted from: its local path if still there, else its name."""
    figures = recorded_figures(folder)
    if "base_model" not in figures:
        raise UsageError(f"{folder} does not record its base model; pass --base DENSE")
    path = figures.get("base_path")
    return path if path and Path(path).exists() else figures["base_model"]


def _copy_sentence_transformers(source: Path, staging: Path) -> None:
    for name in SENTENCE_TRANSFORMERS_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, staging / name)
    for folder in source.iterdir():
        if folder.is_dir() and folder.name[:1].isdigit() and "_" in folder.name:  # 1_Pooling, 2_Normalize
            shutil.copytree(folder, staging / folder.name, dirs_exist_ok=True)


def _move_into_place(staging: Path, out: Path) -> None:
    """Replace ``out`` by ``staging``; an old ``out`` is only removed once the new one is in place."""
    if not out.exists():
        os.replace(staging, out)
        return
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    os.replace(out, old)
    try:
        os.replace(staging, out)
    except BaseException:
        os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)

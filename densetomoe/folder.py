"""What a converted folder holds and how to tell one: the single owner of the output format.

Every converted folder holds the model (in one of the :data:`densetomoe.formats.FORMATS`), the tokenizer, and:

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
a file name of its own. :func:`densetomoe.formats.format_of` answers "is this a densetomoe folder, and
which format".
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import UsageError

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
    details: dict | None = None,
    distillation: dict | None = None,
    device: str | None = None,
) -> dict:
    """The content of :data:`FIGURES_FILE` (its schema, key by key):

    ``densetomoe_version``; ``base_model`` (:func:`public_name` of the source: a Hub id, else a file
    or folder name); ``calibration`` ``{tokens, sequences}``;
    ``quick_eval`` (the fidelity check at conversion, :class:`~densetomoe.stages.evaluate.QuickReport`);
    ``seconds`` per stage; ``device`` (where the stages computed, :func:`densetomoe.devices.describe`);
    ``format`` (a :data:`densetomoe.formats.FORMATS` entry), and under the format's own name what it
    recorded (:meth:`densetomoe.formats.Format.details`, where it records something);
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
    if details is not None:
        record[format] = details
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

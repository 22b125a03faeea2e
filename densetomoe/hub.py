"""Publish a converted folder on the Hugging Face Hub.

:func:`push` checks everything it can before touching the network (a densetomoe folder, a valid repo
id, a token, not offline), builds the model card's metadata, creates the repository, rewrites
``README.md`` and uploads the folder with ``huggingface_hub``.

The card is rewritten in place, atomically (a temporary file, then ``os.replace``), after the Hub has
accepted the repository and before the upload. ``README.md`` is therefore always either the old card
or the new one, and the folder on disk is byte for byte what lands on the Hub. Rewriting is
idempotent: pushing again regenerates the same metadata.

The card's metadata carries ``base_model``, ``library_name`` (``transformers``, or
``sentence-transformers`` for a sentence-transformers folder), ``pipeline_tag``, the tags in
:data:`TAGS`, what the conversion inherited from the source's card (licence, language) and a ``model-index`` (the Hub's format for evaluation results) built from

- ``densetomoe_conversion.json``: the fidelity figures measured at conversion time (``quick_eval``);
- ``eval/report.json``, if present (written by ``densetomoe eval``). Its reader is deliberately tolerant:
  it takes a top-level ``metrics`` list whose entries look like
  ``{"name": str, "type": str, "value": number, "dataset": str | {"type", "name", "config", "split"},
  "task": str | {"type", "name"}}`` (``task`` optional, ``name`` or ``type`` may stand in for the
  other) and skips anything else, so the report's format can grow without breaking ``push``.

Results already in the card for other (task, dataset, metric) combinations are kept.

The token is resolved once (argument, else ``HF_TOKEN``, else the ``hf auth login`` cache), passed to
``HfApi`` and never put into a message: every error raised here is built from scratch and scrubbed of
the token as a last guard.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

from . import folder as folders
from . import formats
from .errors import UsageError
from .folder import CARD_FILE, FIGURES_FILE, RECIPE_FILE, TAGS

# quick_eval key -> (model-index metric type, readable name); all compare the MoE with its dense model
QUICK_METRICS = {
    "embedding_cosine": ("cosine_similarity", "Cosine of mean-pooled hidden states vs dense"),
    "hidden_rel_error": ("relative_error", "Relative error of final hidden states vs dense"),
    "head_agreement": ("agreement", "Head predictions agreeing with dense"),
    "ffn_flops_ratio": ("flops_ratio", "FFN FLOPs per token, MoE / dense"),
    "perplexity": ("perplexity", "Next-token perplexity on held-out text"),
}

NO_TOKEN = "no Hugging Face token found: log in with `hf auth login` or set HF_TOKEN (or pass --token)"


def preflight(repo_id: str, token: str | None = None) -> str:
    """Check what a push needs before any work: a valid repo id, online mode, a token. Returns the token."""
    from huggingface_hub import constants, get_token
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise UsageError(
            f"invalid Hub repo id {repo_id!r}: use NAME or ORG/NAME "
            "(letters, digits, '-', '_', '.'; at most 96 characters)"
        ) from None
    if constants.is_offline_mode():
        raise UsageError("cannot push while HF_HUB_OFFLINE is set; unset it to reach the Hub")
    token = token or get_token()
    if not token:
        raise UsageError(NO_TOKEN)
    return token


def push(
    folder: str | Path,
    repo_id: str,
    private: bool = False,
    token: str | None = None,
    endpoint: str | None = None,
    base_model: str | None = None,
    gguf: list[str] | None = None,
) -> str:
    """Upload a converted ``folder`` to the Hub repository ``repo_id``; returns the repository's URL.

    ``repo_id`` is ``NAME`` (the token's own namespace) or ``ORG/NAME``; the repository is created if
    missing (private with ``private=True``, else the namespace's default) and reused if it exists.
    ``endpoint`` defaults to ``HF_ENDPOINT`` as ``huggingface_hub`` read it. ``base_model`` overrides
    the Hub id of the dense model, which is otherwise taken from the card or the conversion figures
    (a model converted from a local folder has none unless given here). ``gguf``: the types of the
    folder's GGUF files (``densetomoe gguf``) to upload beside the transformers weights, as GGUF
    repositories on the Hub hold them, listed in the card and tagged ``gguf``; None: every one there.
    """
    folder = Path(folder)
    check_folder(folder)
    skipped = gguf_left_out(folder, gguf)  # before the network: a type the folder lacks fails here
    token = preflight(repo_id, token)
    try:
        return _push(folder, repo_id, private, token, endpoint, base_model, skipped)
    except UsageError as e:
        raise UsageError(_scrub(str(e), token)) from None
    except Exception as e:  # unexpected: let it through, unless its message would show the token
        if token in str(e):
            raise RuntimeError(_scrub(_first_line(e), token)) from None
        raise


def _push(folder: Path, repo_id: str, private: bool, token: str, endpoint: str | None, base_model: str | None, skipped: list[str]) -> str:
    from huggingface_hub import HfApi, constants

    endpoint = (endpoint or constants.ENDPOINT).rstrip("/")
    api = HfApi(endpoint=endpoint, token=token)
    name = repo_id.split("/")[-1]
    card = model_card(folder, name, base_model, skipped)  # before the network: a bad report fails here

    with _hub_errors(endpoint, repo_id, "creating the repository"):
        url = api.create_repo(repo_id, private=True if private else None, exist_ok=True)
    _write_atomically(folder / CARD_FILE, card)
    with _hub_errors(endpoint, url.repo_id, "uploading"):
        api.upload_folder(
            repo_id=url.repo_id,
            folder_path=folder,
            commit_message=f"Upload {name} (densetomoe)",
            ignore_patterns=[folders.LOCAL_FILE, *skipped],  # local paths stay on this machine
        )
    return str(url)


def gguf_left_out(folder: Path, types: list[str] | None) -> list[str]:
    """The folder's GGUF files that a push of ``types`` (None: all) leaves out; one line if one of the
    types has no file there."""
    from .gguf import parse_types

    files = {f["type"]: f["file"] for f in folders.read_figures(folder).get("gguf", []) if (folder / f["file"]).is_file()}
    if types is None:
        return sorted(p.name for p in folder.glob("*.gguf") if p.name not in files.values())  # files nobody recorded
    chosen = parse_types(types)
    missing = [t for t in chosen if t not in files]
    if missing:
        raise UsageError(f"{folder} has no {', '.join(t.upper() for t in missing)} GGUF file: write it first with `densetomoe gguf {folder} --type {','.join(missing)}`")
    kept = {files[t] for t in chosen}
    return sorted(p.name for p in folder.glob("*.gguf") if p.name not in kept)


def check_folder(folder: Path) -> None:
    """Fail unless ``folder`` is a folder written by ``densetomoe convert`` (either format)."""
    if not folder.is_dir():
        raise UsageError(f"no such folder: {folder}")
    formats.format_of(folder)


# ---------------------------------------------------------------------------------- the model card


def model_card(folder: Path, model_name: str, base_model: str | None = None, skipped_gguf: list[str] = ()) -> str:
    """The folder's ``README.md`` with its metadata updated for the Hub (see the module docstring),
    and its GGUF section listing the GGUF files that are uploaded (none: no section)."""
    import yaml
    from huggingface_hub import ModelCard

    if base_model is not None and _hub_id(base_model) is None:
        raise UsageError(f"base model {base_model!r} is not a Hub model id (ORG/NAME)")
    from .gguf import card_section, with_card_section

    path = folder / CARD_FILE
    text = path.read_text() if path.is_file() else f"# {model_name}\n\nConverted with densetomoe.\n"
    figures = _read_json(folder / FIGURES_FILE, required=False)
    figures = figures if isinstance(figures, dict) else {}
    uploaded = [f for f in figures.get("gguf", []) if (folder / f["file"]).is_file() and f["file"] not in skipped_gguf]
    text = with_card_section(text, card_section(model_name, uploaded) if uploaded else "")
    try:
        card = ModelCard(text)
    except (ValueError, yaml.YAMLError) as e:
        raise UsageError(f"{path} has metadata that is not valid YAML ({_first_line(e)}); fix or remove it") from None
    data = card.data
    base = base_model or data.base_model or _hub_id(figures.get("base_model"))
    if base is not None:
        data.base_model = base
    if data.library_name != "sentence-transformers":  # a sentence-transformers folder stays one
        data.library_name = "transformers"
    data.pipeline_tag = data.pipeline_tag or _task(folder)
    data.tags = list(dict.fromkeys([*(data.tags or []), *TAGS, *(["gguf"] if uploaded else [])]))

    results = eval_results(folder, figures)
    key = lambda r: (r.task_type, r.dataset_type, r.dataset_config, r.dataset_split, r.metric_type)  # noqa: E731
    fresh = {key(r) for r in results}
    kept = [r for r in (data.eval_results or []) if key(r) not in fresh]
    if results or kept:
        data.eval_results = kept + results
        data.model_name = model_name
    return str(card)


def eval_results(folder: Path, figures: dict | None = None) -> list:
    """``EvalResult`` entries from the conversion figures and, if present, ``report.json``."""
    figures = _read_json(folder / FIGURES_FILE, required=False) if figures is None else figures
    task = _task(folder)
    results = _quick_results(figures if isinstance(figures, dict) else {}, task, _calibration_dataset(folder))
    report = _read_json(folders.report_path(folder), required=False)
    if isinstance(report, dict):
        results += _report_results(report, task)
    return results


def _quick_results(figures: dict, task: str, dataset: tuple[str, str]) -> list:
    from huggingface_hub import EvalResult

    quick = figures.get("quick_eval")
    if not isinstance(quick, dict):
        return []
    results = []
    for field, (metric_type, metric_name) in QUICK_METRICS.items():
        value = quick.get(field)
        if _is_number(value):
            results.append(
                EvalResult(
                    task_type=task, task_name="Fidelity to the dense model",
                    dataset_type=dataset[0], dataset_name=dataset[1],
                    metric_type=metric_type, metric_name=metric_name, metric_value=round(float(value), 6),
                )
            )  # fmt: skip
    return results


def _report_results(report: dict, default_task: str) -> list:
    """Tolerant reader of ``report.json``'s ``metrics`` list: malformed entries are skipped."""
    from huggingface_hub import EvalResult

    results = []
    for entry in report.get("metrics") or []:
        if not isinstance(entry, dict) or not _is_number(entry.get("value")):
            continue
        metric_type, metric_name = _name_pair(entry.get("type"), entry.get("name"))
        dataset = entry.get("dataset")
        dataset = dataset if isinstance(dataset, dict) else {"type": dataset}
        dataset_type, dataset_name = _name_pair(dataset.get("type"), dataset.get("name"))
        task = entry.get("task")
        task = task if isinstance(task, dict) else {"type": task}
        task_type, task_name = _name_pair(task.get("type"), task.get("name"))
        if metric_type is None or dataset_type is None:
            continue
        results.append(
            EvalResult(
                task_type=task_type or default_task, task_name=task_name,
                dataset_type=dataset_type, dataset_name=dataset_name,
                dataset_config=_str_or_none(dataset.get("config")), dataset_split=_str_or_none(dataset.get("split")),
                metric_type=metric_type, metric_name=metric_name, metric_value=entry["value"],
            )
        )  # fmt: skip
    return results


def _name_pair(kind: Any, name: Any) -> tuple[str | None, str | None]:
    """(identifier, readable name): each stands in for the other when one is missing."""
    kind, name = _str_or_none(kind), _str_or_none(name)
    return kind or name, name or kind


def _task(folder: Path) -> str:
    config = _read_json(folder / "config.json", required=True)
    architectures = config.get("architectures") or [""]
    return folders.task_of(str(architectures[0]))


def _calibration_dataset(folder: Path) -> tuple[str, str]:
    """(dataset type, name) of the text the conversion figures were measured on."""
    import yaml

    try:
        calib = (yaml.safe_load((folder / RECIPE_FILE).read_text()) or {}).get("calib")
    except (OSError, yaml.YAMLError, AttributeError):
        calib = None
    if not calib:
        return "wikipedia", "Held-out English Wikipedia paragraphs (densetomoe's embedded sample)"
    calib, path = str(calib), Path(str(calib))
    if path.suffix.lower() in {".txt", ".jsonl", ".csv", ".gz", ".json"} or path.exists():  # as data.load_texts
        return "text", f"Documents of {path.name}"  # a local file: its name, not the user's path
    return calib.split("@")[0].split(":")[0], f"Documents of {calib}"  # a datasets NAME[:CONFIG][@SPLIT]


def _hub_id(name: Any) -> str | None:
    """``name`` if it is a Hub model id (``org/name``), not a local path."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not isinstance(name, str) or name.count("/") != 1 or name.startswith((".", "/", "~")):
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


# ---------------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def _hub_errors(endpoint: str, repo_id: str, step: str):
    """Turn what ``huggingface_hub`` raises during ``step`` into a one-line :class:`UsageError`."""
    try:
        yield
    except UsageError:
        raise
    except Exception as error:
        message = _describe(error, endpoint, repo_id, step)
        if message is None:
            raise
        raise UsageError(message) from None


def _describe(error: Exception, endpoint: str, repo_id: str, step: str) -> str | None:
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if isinstance(error, OfflineModeIsEnabled):
        return "cannot push while HF_HUB_OFFLINE is set; unset it to reach the Hub"
    if isinstance(error, _transport_errors()):
        reason = _first_line(error) or type(error).__name__
        return (
            f"the Hugging Face Hub at {endpoint} could not be reached while {step} ({reason}); "
            "check the network connection and HF_ENDPOINT"
        )
    if isinstance(error, HfHubHTTPError):
        status = error.response.status_code if error.response is not None else None
        if status in (401, 403):
            return (
                f"the Hub refused the token (HTTP {status}) while {step} {repo_id}: it needs write access to that "
                "namespace; log in again with `hf auth login` or set HF_TOKEN"
            )
        if status == 404:
            return f"the Hub has no repository {repo_id} that this token can write to (HTTP 404 while {step})"
        server = _first_line(error.server_message) if getattr(error, "server_message", None) else ""
        return f"the Hub answered HTTP {status} while {step} {repo_id}" + (f": {server}" if server else "")
    if isinstance(error, ValueError) and "metadata" in str(error):  # the Hub rejected the card's YAML
        return f"the Hub rejected the model card: {' '.join(str(error).split())}"
    return None


def _transport_errors() -> tuple[type[Exception], ...]:
    """The HTTP client's network errors (``httpx2`` since huggingface_hub 2, ``httpx`` before)."""
    errors: list[type[Exception]] = [ConnectionError, TimeoutError]
    for name in ("httpx2", "httpx"):
        try:
            errors.append(__import__(name).TransportError)
        except ImportError:
            pass
    return tuple(errors)


def _read_json(path: Path, required: bool) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        if required:
            raise UsageError(f"{path} is missing") from None
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"cannot read {path} ({_first_line(e)}); fix or remove it") from None


def _write_atomically(path: Path, text: str) -> None:
    staging = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        staging.write_text(text)
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)


def _scrub(message: str, token: str | None) -> str:
    return message.replace(token, "***") if token else message


def _first_line(value: Any) -> str:
    text = str(value).strip()
    return text.splitlines()[0][:200] if text else ""


def _str_or_none(value: Any) -> str | None:
    return str(value) if isinstance(value, (str, int, float)) and not isinstance(value, bool) and str(value) else None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)

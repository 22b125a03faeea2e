"""Text in, tokens out: calibration text (files, ``datasets`` names, or the Wikipedia sample embedded
in the package) and the batching every stage tokenises it with."""

from __future__ import annotations

import csv
import gzip
import json
from importlib import resources
from pathlib import Path

from .errors import UsageError

TEXT_COLUMNS = ("text", "sentence", "content", "document", "review")
DEFAULT_CORPUS = "wiki_calib.txt.gz"
HELDOUT_CORPUS = "wiki_heldout.txt.gz"


def default_corpus() -> list[str]:
    """Paragraphs of English Wikipedia prose shipped with densetomoe (CC BY-SA; see corpus/NOTICE.md)."""
    return _embedded(DEFAULT_CORPUS)


def heldout_corpus() -> list[str]:
    """Wikipedia paragraphs from articles that :func:`default_corpus` does not hold: evaluation text
    (the suites wiki-prose and wiki-perplexity), never calibration."""
    return _embedded(HELDOUT_CORPUS)


def _embedded(name: str) -> list[str]:
    blob = resources.files("densetomoe").joinpath("corpus", name).read_bytes()
    return [line for line in gzip.decompress(blob).decode("utf-8").splitlines() if line.strip()]


def load_texts(source: str | None) -> list[str]:
    """Documents from ``source``: ``None`` (the embedded corpus), a ``.txt`` file (one document per
    line), a ``.jsonl`` or ``.csv`` file (a text column), a ``.gz`` of any of these, or a
    ``datasets`` name written ``NAME[:CONFIG][@SPLIT]``."""
    if source is None:
        return default_corpus()
    path = Path(source).expanduser()
    if path.exists():
        texts = _read_file(path)
    elif missing_file(source):
        raise UsageError(f"calibration file {source} does not exist")
    else:
        texts = _read_dataset(source)
    texts = [t.strip() for t in texts if isinstance(t, str) and t.strip()]
    if not texts:
        raise UsageError(f"calibration source {source} holds no text")
    return texts


def missing_file(source: str) -> bool:
    """Whether ``source`` names a local file (by its suffix or folder) that is not there, rather than
    a ``datasets`` name."""
    path = Path(source).expanduser()
    if path.exists():
        return False
    return path.suffix.lower() in {".txt", ".jsonl", ".csv", ".gz", ".json"} or "/" in source and path.parent.exists()


def _read_file(path: Path) -> list[str]:
    if path.is_dir():
        raise UsageError(f"calibration source {path} is a folder; give a .txt, .jsonl or .csv file")
    name = path.name.lower().removesuffix(".gz")
    try:
        raw = path.read_bytes()
        text = (gzip.decompress(raw) if path.name.lower().endswith(".gz") else raw).decode("utf-8")
    except (OSError, UnicodeDecodeError, gzip.BadGzipFile, EOFError) as e:
        raise UsageError(f"cannot read calibration file {path}: {e}") from None
    if name.endswith(".jsonl"):
        return _from_records(_jsonl(text, path), path)
    if name.endswith(".csv"):
        return _from_records(list(csv.DictReader(text.splitlines())), path)
    return text.splitlines()


def _jsonl(text: str, path: Path) -> list[dict]:
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(f"{path}:{number} is not JSON: {e.msg}") from None
        rows.append(row if isinstance(row, dict) else {"text": row})
    return rows


def _from_records(rows: list[dict], where) -> list[str]:
    if not rows:
        return []
    column = next((c for c in TEXT_COLUMNS if c in rows[0]), None)
    if column is None:
        strings = [k for k, v in rows[0].items() if isinstance(v, str)]
        if len(strings) != 1:
            raise UsageError(
                f"{where}: cannot tell which column holds the text (columns: {', '.join(rows[0])}); "
                f"name one of {', '.join(TEXT_COLUMNS)}"
            )
        column = strings[0]
    return [row.get(column) for row in rows]


def _read_dataset(spec: str) -> list[str]:
    """``NAME[:CONFIG][@SPLIT]`` through the ``datasets`` library (optional dependency)."""
    try:
        import datasets
    except ImportError:
        raise UsageError(
            f"calibration source {spec!r} is not a file, and reading Hub datasets needs `pip install datasets`"
        ) from None
    name, _, split = spec.partition("@")
    name, _, subset = name.partition(":")
    try:
        data = datasets.load_dataset(name, subset or None, split=split or "train")
    except Exception as e:  # datasets raises many kinds; all mean the same to the user
        raise UsageError(f"cannot load dataset {spec!r}: {str(e).splitlines()[0]}") from None
    return _from_records(list(data), spec)


# -- tokenising -----------------------------------------------------------------------------------------
def batches(tokenizer, texts: list[str], seq_len: int, batch_size: int):
    """Tokenized batches of whole documents (truncated to ``seq_len``), padded on the right.

    Hooks mask padding through ``attention_mask``; right padding also keeps every real token at the
    position a causal LM gives it without padding. Special tokens (a BOS where the family's
    tokenizer adds one) are the tokenizer's defaults.
    """
    for start in range(0, len(texts), batch_size):
        yield encode(tokenizer, texts[start : start + batch_size], seq_len)


def encode(tokenizer, texts: list[str], seq_len: int):
    """One batch as :func:`batches` makes it: cut to ``seq_len`` tokens, padded on the right."""
    return tokenizer(texts, truncation=True, max_length=seq_len, padding=True, padding_side="right", return_tensors="pt")


def packed(tokenizer, texts: list[str], seq_len: int, separator: str = "\n\n"):
    """The documents as one text (joined by ``separator``), cut into windows of ``seq_len`` tokens,
    ``(windows, seq_len)`` (``(1, tokens)`` when all of it is shorter); the tail shorter than a window
    is dropped. Each window starts with the BOS token where the tokenizer adds one.

    How causal LMs are pretrained, and how :func:`~densetomoe.metrics.perplexity` reads its text:
    no padding, no document cut short, every position a real token (a window may start mid-document).
    """
    import torch

    from .evaluation.metrics import adds_bos

    ids = torch.tensor(tokenizer(separator.join(texts), add_special_tokens=False, verbose=False)["input_ids"], dtype=torch.long)
    bos = [tokenizer.bos_token_id] if adds_bos(tokenizer) else []
    span = seq_len - len(bos)  # text tokens per window
    windows = ids[: len(ids) // span * span].reshape(-1, span) if len(ids) >= span else ids.reshape(1, -1)
    return torch.cat([torch.tensor(bos, dtype=torch.long).expand(len(windows), -1), windows], dim=1)


def teacher_forced(batch):
    """``batch`` with ``labels``: its own tokens, padding ignored (-100). An encoder-decoder LM given
    ``labels`` feeds its decoder those tokens shifted right (``decoder_start_token_id`` first), so the
    encoder reads the text and the decoder is teacher-forced on the same text; with right padding the
    decoder's real positions are the encoder's (``attention_mask``)."""
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return batch


def for_batches(tokenizer):
    """Give a tokenizer without a padding token (most decoders) its end-of-text token as padding."""
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer

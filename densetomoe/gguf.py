"""GGUF files of a converted decoder, for llama.cpp, Ollama and LM Studio.

llama.cpp's own converter writes the float types and ``q8_0`` (:func:`densetomoe.llamacpp.to_gguf`);
llama.cpp's quantizer, which llama-cpp-python carries, makes the other types from the ``f16`` file.
The files go into the folder itself, named ``<name>-<TYPE>.gguf`` as GGUF repositories on the Hub
name them (``smollm2-moe-Q4_K_M.gguf``); ``densetomoe_conversion.json`` (key ``gguf``) and the card
list each file's type, size and the perplexity llama.cpp serves with it on held-out text.

Quantization meets experts here: a quantized row is made of blocks (32 weights for ``q4_0``/``q8_0``,
256 for the K-quants), and an expert's down projection is only as wide as the expert's neuron
count (192 for SmolLM2 at 8 experts). llama.cpp then quantizes such a tensor with another type; each
file's record names those tensors and the type they got (:func:`fallbacks`).

All files are made in a scratch folder beside the target and moved in only when every one is
written and measured, so a failure leaves the folder as it was.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import folder as folder_files
from . import formats, llamacpp
from .errors import UsageError
from .stages.export import writing

# type -> llama.cpp's llama_ftype for its quantizer (None: the converter writes it directly)
TYPES: dict[str, int | None] = {"f32": None, "f16": None, "bf16": None, "q8_0": None, "q4_0": 2, "q4_k_m": 15, "q5_k_m": 17, "q6_k": 18}
BLOCK = {"q8_0": 32, "q4_0": 32, "q4_k_m": 256, "q5_k_m": 256, "q6_k": 256}  # weights per quantized block along a row
CARD_START, CARD_END = "<!-- densetomoe:gguf -->", "<!-- /densetomoe:gguf -->"
PERPLEXITY_TOKENS = 4096  # held-out tokens each file is scored on, in the wiki-perplexity suite's windows
SCORED_ON = "wiki-perplexity"  # the suite whose text and windows score each file (as evals/examples/frontier.py does)


@dataclass
class GgufFile:
    """One GGUF file of a folder, as the record lists it."""

    file: str
    type: str
    bytes: int
    perplexity: float | None = None  # served by llama.cpp on held-out Wikipedia (None: not measured)
    tokens: int = 0  # held-out tokens scored
    fallbacks: list[str] = field(default_factory=list)  # tensors that could not take the type, and what they got


def parse_types(text: str | list[str]) -> list[str]:
    """``"f16,q8_0,Q4_K_M"`` as ``["f16", "q8_0", "q4_k_m"]``, or one line naming the types there are."""
    parts = text.split(",") if isinstance(text, str) else [p for t in text for p in t.split(",")]
    types = list(dict.fromkeys(p.strip().lower() for p in parts if p.strip()))
    unknown = [t for t in types if t not in TYPES]
    if unknown or not types:
        raise UsageError(f"--gguf: unknown type {', '.join(map(repr, unknown)) or '(none)'}; choose from {', '.join(TYPES)}")
    return types


def check_ready(format: str, config: dict | None = None) -> None:
    """Refuse, before any work, what llama.cpp cannot take: no llama.cpp here, or a folder it cannot
    run (:meth:`densetomoe.formats.Format.gguf_refusal`: a format llama.cpp does not serve, or a model
    of ``config`` that it cannot hold)."""
    if reason := llamacpp.missing():
        raise UsageError(f"GGUF needs llama.cpp: {reason}")
    if refusal := formats.FORMATS[format].gguf_refusal(config or {}):
        raise UsageError(refusal)


def file_name(folder: Path, type: str) -> str:
    return f"{folder.name}-{type.upper()}.gguf"


def write(folder: str | Path, types: list[str], perplexity_tokens: int = PERPLEXITY_TOKENS, threads: int | None = None, log=lambda m: None) -> list[GgufFile]:
    """Write ``folder``'s GGUF files of ``types`` into it (replacing earlier ones of those types), score
    each on held-out text (``perplexity_tokens``; 0: not scored) and record them in the folder's
    figures and card."""
    folder = Path(folder)
    check_ready(formats.format_of(folder), json.loads((folder / "config.json").read_text()))
    scratch = folder.parent / f".{folder.name}.gguf-{os.getpid()}"
    shutil.rmtree(scratch, ignore_errors=True)
    with writing(folder, None):  # a full disk is one line, like any folder's write
        scratch.mkdir(parents=True)
        try:
            return _write(folder, types, scratch, perplexity_tokens, threads, log)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)


def _write(folder: Path, types: list[str], scratch: Path, perplexity_tokens: int, threads: int, log) -> list[GgufFile]:
    """The files made in ``scratch`` and measured, then recorded in the folder and moved into it."""
    made: dict[str, Path] = {}
    for type in types:
        path = scratch / file_name(folder, type)
        log(f"gguf: {path.name} (llama.cpp's {'converter' if TYPES[type] is None else 'quantizer'})")
        made[type] = make(folder, type, path, threads, base=made.get("f16"))
    files = [measure(folder, type, path, perplexity_tokens, threads) for type, path in made.items()]
    _record(folder, files, scratch)
    for path in made.values():
        os.replace(path, folder / path.name)
    return files


def make(folder: Path, type: str, out: Path, threads: int | None = None, base: Path | None = None) -> Path:
    """The GGUF file ``out`` of ``folder`` in ``type``: llama.cpp's converter writes the float types and
    ``q8_0``; the quantizer makes the others from an ``f16`` file (``base``, or one written beside ``out``
    and removed after)."""
    if TYPES[type] is None:
        return llamacpp.to_gguf(folder, out, type)
    made_base = base is None
    if made_base:
        base = llamacpp.to_gguf(folder, out.with_name(f".{out.stem}.base-f16.gguf"), "f16")
    try:
        return quantize(base, out, TYPES[type], threads)
    finally:
        if made_base:
            base.unlink(missing_ok=True)


def type_of(path: Path) -> str:
    """A GGUF file's type (a key of :data:`TYPES`), read from the file: ``general.file_type``."""
    names = {0: "f32", 1: "f16", 7: "q8_0", 32: "bf16", **{ftype: t for t, ftype in TYPES.items() if ftype is not None}}
    entry = _reader(path).get_field("general.file_type")
    ftype = int(entry.parts[entry.data[0]][0]) if entry is not None else None
    if ftype not in names:
        raise UsageError(f"{path.name}: llama.cpp file type {ftype} is not one densetomoe makes ({', '.join(TYPES)})")
    return names[ftype]


def quantize(source: Path, out: Path, ftype: int, threads: int | None = None) -> Path:
    """llama.cpp's quantizer (``llama_model_quantize``) from the GGUF ``source`` to the llama_ftype ``ftype``."""
    import llama_cpp
    from llama_cpp._logger import set_verbose
    from llama_cpp._utils import suppress_stdout_stderr

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = ftype, threads or llamacpp.THREADS
    set_verbose(False)  # llama.cpp says a line per tensor, through its log and through C's buffered stdio:
    with suppress_stdout_stderr(disable=False):  # what fell back is read from the file instead (fallbacks)
        failed = llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), params)
        ctypes.CDLL(None).fflush(None)  # C's buffers, while they still go nowhere
    if failed:
        raise UsageError(f"llama.cpp's quantizer failed on {source.name} (llama_ftype {ftype})")
    return out


def fallbacks(path: Path, type: str) -> list[str]:
    """Tensors of the GGUF file ``path`` whose rows are not a whole number of ``type``'s blocks, and the
    type llama.cpp gave them instead: one line per name, layers folded (``blk.*.ffn_down_exps``)."""
    if type not in BLOCK:
        return []
    reader = _reader(path)
    found: dict[str, str] = {}
    for tensor in reader.tensors:
        width = int(tensor.shape[0])  # GGUF lists the row (contiguous) dimension first
        if len(tensor.shape) < 2 or width % BLOCK[type] == 0 or tensor.tensor_type.name == "F32":
            continue  # F32: what llama.cpp never quantizes (the router, ffn_gate_inp), whatever its width
        name = re.sub(r"^blk\.\d+\.", "blk.*.", tensor.name)
        found.setdefault(name, f"{name} ({width} wide, not a multiple of {BLOCK[type]}): {tensor.tensor_type.name}")
    return list(found.values())


def _reader(path: Path):
    """gguf-py's reader: the converter's own copy of it when llama.cpp's tools are installed, else the package."""
    tools = str(llamacpp.converter_dir() / "gguf-py")
    if Path(tools).is_dir() and tools not in sys.path:
        sys.path.insert(0, tools)
    import gguf

    return gguf.GGUFReader(path)


def measure(folder: Path, type: str, path: Path, tokens: int, threads: int) -> GgufFile:
    """The record of one file: its size, the tensors that fell back, and its served perplexity."""
    record = GgufFile(path.name, type, path.stat().st_size, fallbacks=fallbacks(path, type))
    if tokens:
        from transformers import AutoTokenizer

        from .evaluation.suites import load_suite

        served = llamacpp.served_perplexity(path, AutoTokenizer.from_pretrained(folder), load_suite(SCORED_ON), threads, tokens)
        record.perplexity, record.tokens = round(served.value, 4), served.tokens
    return record


def _record(folder: Path, files: list[GgufFile], scratch: Path) -> None:
    """The files in the folder's figures and card (written in ``scratch``, then moved over the old ones)."""
    figures = folder_files.read_figures(folder)
    kept = [f for f in figures.get("gguf", []) if f.get("type") not in {g.type for g in files}]
    figures["gguf"] = sorted(kept + [asdict(f) for f in files], key=lambda f: list(TYPES).index(f["type"]))
    folder_files.write_figures(scratch, figures)
    card_file = folder / folder_files.CARD_FILE
    card = card_file.read_text() if card_file.is_file() else ""
    (scratch / folder_files.CARD_FILE).write_text(with_card_section(card, card_section(folder.name, figures["gguf"])))
    for name in (folder_files.FIGURES_FILE, folder_files.CARD_FILE):
        os.replace(scratch / name, folder / name)


def card_section(name: str, files: list[dict]) -> str:
    """The card's GGUF section: a table of the files, and how to run one in llama.cpp and Ollama."""
    rows = []
    for f in files:
        served = f"{f['perplexity']:.2f}" if f.get("perplexity") is not None else "not measured"
        rows.append(f"| `{f['file']}` | {f['type'].upper()} | {f['bytes'] / 1e6:,.1f} MB | {served} |")
        rows += [f"|   | fallback: {line} | | |" for line in f.get("fallbacks", [])]
    first = files[0]["file"]
    return "\n".join([
        CARD_START,
        "## GGUF files (llama.cpp, Ollama, LM Studio)",
        "",
        "| file | type | size | served perplexity (held-out Wikipedia, window 512) |",
        "|---|---|---|---|",
        *rows,
        "",
        "```python",
        "from llama_cpp import Llama",
        f'llm = Llama(model_path="{first}")',
        'reply = llm.create_chat_completion(messages=[{"role": "user", "content": "Hello!"}], max_tokens=64)',
        'print(reply["choices"][0]["message"]["content"])',
        "```",
        "",
        f"`llama-cli -m {first} -p 'Hello'`; Ollama: a `Modelfile` holding `FROM ./{first}`, then `ollama create {name} -f Modelfile`.",
        CARD_END,
    ])  # fmt: skip


def with_card_section(card: str, section: str) -> str:
    """``card`` with its GGUF section replaced by ``section`` (appended when it has none; an empty
    ``section`` removes it)."""
    start, end = card.find(CARD_START), card.find(CARD_END)
    if start >= 0 and end > start:
        if not section:
            return card[:start].rstrip("\n") + "\n" + card[end + len(CARD_END) :].lstrip("\n")
        return card[:start] + section + card[end + len(CARD_END) :]
    return card.rstrip("\n") + "\n\n" + section + "\n" if section else card

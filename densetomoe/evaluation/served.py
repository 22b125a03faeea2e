"""A converted folder as llama.cpp serves it, for ``densetomoe eval --engine llamacpp``.

:func:`engine_comparison` measures what a user of llama.cpp gets: the folder and its dense model as
GGUF files of the same type, served perplexity on the same held-out windows, and decode speed at
batch 1 with the models interleaved, in one run.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from torch import nn

from .. import folder as folders
from .. import formats, gguf, llamacpp
from ..errors import UsageError
from .suites import Suite

PROMPT = "Tell me about the history of the Roman Empire."  # the timed request, in the model's chat template when it has one


# -- the engine ------------------------------------------------------------------------------------
@dataclass
class Served:
    """One model as llama.cpp serves it."""

    gguf: str  # the file's name
    perplexity: float
    decode_tokens_per_s: float  # median, new tokens after the prompt
    prompt_and_decode_s: float  # median wall time of the prompt's pass and the new tokens


def engine_reason(folder: Path) -> str | None:
    """Why ``folder`` has no llama.cpp row, or None when it can have one."""
    format = formats.of(folder)
    if not format.llama_cpp:
        return f"a {format.name} folder runs only in transformers (llama.cpp cannot run densetomoe's MoE module); convert with --format native to serve it"
    return llamacpp.missing()


def folder_gguf(folder: Path) -> Path | None:
    """The GGUF file the folder holds for serving: its f16 file when it has one, else the first recorded."""
    files = [folder / f["file"] for f in folders.read_figures(folder).get("gguf", []) if (folder / f["file"]).is_file()]
    return next((f for f in files if f.name == gguf.file_name(folder, "f16")), files[0] if files else None)


def prompt_ids(tokenizer) -> list[int]:
    """The timed request as token ids: :data:`PROMPT` in the model's chat template, ready for the answer."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)  # a BatchEncoding in transformers 5, ids in 4
    return tokenizer(PROMPT)["input_ids"]


def engine_comparison(
    folder: Path,
    dense: nn.Module,
    tokenizer,
    suite: Suite,
    scratch: Path,
    gguf_file: Path | None = None,
    threads: int | None = None,
    new_tokens: int = 64,
    repeats: int = 5,
    log=lambda message: None,
) -> dict:
    """The native ``folder`` and its ``dense`` model served by llama.cpp, as GGUF files of the same type.

    The folder's file is ``gguf_file``, else the one it holds (:func:`folder_gguf`), else an f16 file
    written in ``scratch``; the dense model is written to ``scratch`` and converted to the same type.
    Both are scored on ``suite``'s text and windows, then timed at batch 1 on ``threads`` threads
    (:func:`densetomoe.llamacpp.time_interleaved`): the prompt in one pass and ``new_tokens`` greedy
    tokens, interleaved for ``repeats`` rounds (medians)."""
    scratch.mkdir(parents=True, exist_ok=True)
    moe_file = gguf_file or folder_gguf(folder)
    if moe_file is None:
        log("llama.cpp: the folder as an F16 GGUF file")
        moe_file = llamacpp.to_gguf(folder, scratch / gguf.file_name(folder, "f16"), "f16")
    type = gguf.type_of(moe_file)
    log(f"llama.cpp: the dense model as a GGUF file of type {type.upper()}")
    dense_dir = scratch / "dense"
    dense.save_pretrained(dense_dir)
    tokenizer.save_pretrained(dense_dir)
    dense_file = gguf.make(dense_dir, type, scratch / f"dense-{type.upper()}.gguf", threads)
    shutil.rmtree(dense_dir)

    files = {"dense": dense_file, "moe": moe_file}
    scores = {}
    for name, path in files.items():
        log(f"llama.cpp: perplexity of {path.name}")
        scores[name] = llamacpp.served_perplexity(path, tokenizer, suite, threads)
    log("llama.cpp: decode speed")
    prompt = prompt_ids(tokenizer)
    served = {}
    for name, runs in llamacpp.time_interleaved(files, prompt, new_tokens, repeats, threads).items():
        decode, end_to_end = llamacpp.medians(runs)
        served[name] = Served(files[name].name, scores[name].value, decode, end_to_end)
    dense_row, moe_row = served["dense"], served["moe"]
    return {
        "type": type,
        "suite": suite.name,
        "tokens": scores["moe"].tokens,
        "threads": threads,
        "prompt_tokens": len(prompt),
        "new_tokens": new_tokens,
        "repeats": repeats,
        "llama_cpp_python": llamacpp.version(),
        "dense": asdict(dense_row),
        "moe": asdict(moe_row),
        "perplexity_ratio": moe_row.perplexity / dense_row.perplexity,
        "decode_speedup": moe_row.decode_tokens_per_s / dense_row.decode_tokens_per_s,
        "end_to_end_speedup": dense_row.prompt_and_decode_s / moe_row.prompt_and_decode_s,
    }


def check_engine(engine: str | None, folder: Path, gguf_file: Path | None) -> str | None:
    """Whether ``densetomoe eval`` adds a llama.cpp row: ``"llamacpp"``, or None. Asked for with
    ``--engine llamacpp`` or ``--gguf``, or by default when the folder holds a GGUF file. A native
    folder asked for one where llama.cpp is missing, or a ``--gguf`` file that is not there, is
    refused in one line here, before any work; a remote-code folder just has none, and its report
    says why (:func:`engine_reason`)."""
    if gguf_file is not None and not gguf_file.is_file():
        raise UsageError(f"--gguf {gguf_file}: no such file")
    asked = engine == "llamacpp" or gguf_file is not None
    if engine == "transformers" and gguf_file is None:
        return None
    reason = engine_reason(folder)
    if reason is None:
        return "llamacpp" if asked or folder_gguf(folder) is not None else None
    if asked and formats.of(folder).llama_cpp:  # llama.cpp missing: what was asked cannot run
        raise UsageError(f"--engine llamacpp needs llama.cpp: {reason}")
    return None

"""Serve a checkpoint with llama.cpp: convert a Hugging Face folder to GGUF with llama.cpp's own
converter, load it with llama-cpp-python, generate greedily and time batch-1 decoding.

``make llamacpp`` installs llama-cpp-python and unpacks the converter of the same llama.cpp release
(``convert_hf_to_gguf.py``, ``conversion/``, ``gguf-py/``) into ``<venv>/llama.cpp``; elsewhere, point
``DENSETOMOE_LLAMACPP`` at a llama.cpp checkout of the version llama-cpp-python vendors.

llama.cpp's ``qwen2moe`` graph, which serves ``--format native`` folders (Qwen2MoeForCausalLM), differs
from transformers in ways an exporter must respect: it never renormalises the top-k router weights
(``norm_topk_prob`` must be false), every layer must have a shared expert, the shared expert's gate is
computed as silu(x) / x (a gate logit of exactly 0 gives NaN), and it needs an ``output.weight`` of its
own (no tied embeddings: :func:`to_gguf` writes an untied copy for the converter when needed).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import UsageError

CONVERTER_ENV = "DENSETOMOE_LLAMACPP"
THREADS = 2  # llama.cpp's CPU threads where a call names none (2 cores here; set it once for a machine)
OUTTYPES = ("f32", "f16", "bf16", "q8_0")


def converter_dir() -> Path:
    """The folder holding llama.cpp's ``convert_hf_to_gguf.py``: ``$DENSETOMOE_LLAMACPP``, else ``<venv>/llama.cpp``."""
    return Path(os.environ.get(CONVERTER_ENV) or Path(sys.prefix) / "llama.cpp")


def missing() -> str | None:
    """Why llama.cpp cannot be used here, or None when the engine and the converter are both installed."""
    if importlib.util.find_spec("llama_cpp") is None:
        return "llama-cpp-python is not installed (make llamacpp)"
    if not (converter_dir() / "convert_hf_to_gguf.py").is_file():
        return f"llama.cpp's convert_hf_to_gguf.py is not in {converter_dir()} (make llamacpp, or set {CONVERTER_ENV})"
    return None


def version() -> str:
    """llama-cpp-python's version (the llama.cpp it carries), for a report."""
    import llama_cpp

    return getattr(llama_cpp, "__version__", "?")


def to_gguf(folder: str | Path, out: str | Path, outtype: str = "f16") -> Path:
    """Convert the Hugging Face ``folder`` to the GGUF file ``out`` with llama.cpp's converter (a subprocess
    on this Python, with the converter's own ``gguf-py``); ``outtype`` is one of :data:`OUTTYPES`."""
    if outtype not in OUTTYPES:
        raise UsageError(f"outtype must be one of {', '.join(OUTTYPES)}, got {outtype!r}")
    if reason := missing():
        raise UsageError(reason)
    folder, out, tools = Path(folder), Path(out), converter_dir()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(tools / "gguf-py"), os.environ.get("PYTHONPATH")])))
    with tempfile.TemporaryDirectory(prefix="densetomoe-gguf-") as scratch:
        source = _untied(folder, Path(scratch)) if _needs_output_weight(folder) else folder
        command = [sys.executable, str(tools / "convert_hf_to_gguf.py"), str(source), "--outfile", str(out), "--outtype", outtype]
        run = subprocess.run(command, env=env, capture_output=True, text=True)
    if run.returncode != 0:
        said = [line.strip() for line in run.stderr.splitlines() if line.strip()]
        raise UsageError(f"llama.cpp's converter failed on {folder}: {said[-1] if said else f'exit {run.returncode}'}")
    return out


def _needs_output_weight(folder: Path) -> bool:
    """Whether ``folder`` is a qwen2_moe checkpoint with tied embeddings: llama.cpp's qwen2moe (unlike its
    llama and qwen2) has no fallback from ``output.weight`` to the token embeddings."""
    config = json.loads((folder / "config.json").read_text())
    return config.get("model_type") == "qwen2_moe" and config.get("tie_word_embeddings", False)


def _untied(folder: Path, scratch: Path) -> Path:
    """A view of ``folder`` in ``scratch`` with untied embeddings: links to its files, a config with
    ``tie_word_embeddings: false`` and one more safetensors file holding ``lm_head.weight``."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    index_file = folder / "model.safetensors.index.json"
    index = json.loads(index_file.read_text()) if index_file.is_file() else None
    parts = sorted(set(index["weight_map"].values())) if index else ["model.safetensors"]
    embedding = None
    for part in parts:
        with safe_open(folder / part, "pt") as f:
            if "model.embed_tokens.weight" in f.keys():
                embedding = f.get_tensor("model.embed_tokens.weight")  # (vocab, hidden)
    if embedding is None:
        raise UsageError(f"{folder}: no model.embed_tokens.weight to tie the output layer to")
    for item in folder.iterdir():
        if item.name not in ("config.json", index_file.name):
            (scratch / item.name).symlink_to(item.resolve())
    config = json.loads((folder / "config.json").read_text())
    (scratch / "config.json").write_text(json.dumps(dict(config, tie_word_embeddings=False), indent=2))
    head = "model-lm-head.safetensors"  # the converter reads every model*.safetensors (or the index's files)
    save_file({"lm_head.weight": embedding.contiguous()}, scratch / head)
    if index:
        index["weight_map"]["lm_head.weight"] = head
        (scratch / index_file.name).write_text(json.dumps(index))
    return scratch


def load(path: str | Path, threads: int | None = None, n_ctx: int = 512, f32_cache: bool = False, repack: bool = False, **settings):
    """A ``llama_cpp.Llama`` for the GGUF file ``path`` on ``threads`` CPU threads (settings: e.g. ``kv_overrides``).

    llama.cpp keeps its KV cache in float16 by default, which rounds attention's keys and values by
    ~1e-3; ``f32_cache`` keeps them in float32, to compare llama.cpp's function with transformers'.
    ``repack``: let llama.cpp use its extra buffer types (quantized weights repacked for AMX or for
    interleaved kernels). Off by default: with them llama-cpp-python 0.3.36 crashes (segmentation
    fault) at the first evaluation of any quantized file on this project's AMX CPUs, SmolLM2's own
    Q4_1 file included; float weights are never repacked, so f16 and f32 files run the same either way."""
    import llama_cpp
    from llama_cpp import llama_cpp as api

    if f32_cache:
        settings |= {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32}
    defaults = api.llama_model_default_params

    def model_params():  # llama_cpp.Llama takes no argument for it: its defaults, with use_extra_bufts set
        params = defaults()
        params.use_extra_bufts = repack
        return params

    threads = threads or THREADS
    api.llama_model_default_params = model_params
    try:
        return llama_cpp.Llama(model_path=str(path), n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx, verbose=False, **settings)
    finally:
        api.llama_model_default_params = defaults


def scorer(llm):
    """A function from token ids ``(len,)`` to llama.cpp's logits ``(len, vocab)`` for them, evaluated
    from an empty cache (``llm`` loaded with ``logits_all=True``): what
    :func:`densetomoe.metrics.perplexity` takes to measure the engine itself."""
    import torch

    if not llm._logits_all:  # llama-cpp-python keeps only the last row of logits otherwise
        raise ValueError("load the model with logits_all=True to score every position")

    def logits(ids):
        tokens = [int(t) for t in ids]
        llm.reset()
        llm.eval(tokens)
        return torch.from_numpy(np.array(llm.scores[: len(tokens)], dtype=np.float32))

    return logits


def _next_token(llm) -> int:
    """Argmax of the logits of the last token llama.cpp evaluated (greedy, no sampler)."""
    import llama_cpp

    logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))  # (vocab,)
    return int(logits.argmax())


def generate(llm, prompt: list[int], max_new_tokens: int, stop: set[int] | None = None) -> list[int]:
    """Greedy continuation of the token ids ``prompt`` (no BOS added), up to ``max_new_tokens`` or a ``stop`` id."""
    llm.reset()
    llm.eval(prompt)
    out: list[int] = []
    while len(out) < max_new_tokens:
        out.append(_next_token(llm))
        if stop and out[-1] in stop:
            break
        llm.eval(out[-1:])
    return out


@dataclass(frozen=True)
class Decode:
    """One timed greedy generation at batch 1: the prompt in one pass, then one token per step."""

    prompt_tokens: int
    prompt_s: float
    new_tokens: int
    decode_s: float  # wall clock of the new tokens' steps (evaluation and argmax)
    engine_decode_s: float  # llama.cpp's own count of the same steps' evaluation (llama_perf_context)

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.decode_s


def time_decode(llm, prompt: list[int], new_tokens: int = 64) -> Decode:
    """Time the prompt's evaluation and ``new_tokens`` greedy decoding steps, never stopping early."""
    import llama_cpp

    llm.reset()
    llama_cpp.llama_perf_context_reset(llm.ctx)
    start = time.perf_counter()
    llm.eval(prompt)
    prompt_s = time.perf_counter() - start
    start = time.perf_counter()
    token = _next_token(llm)
    for _ in range(new_tokens):  # the first step's input is the prompt's greedy continuation
        llm.eval([token])
        token = _next_token(llm)
    decode_s = time.perf_counter() - start
    perf = llama_cpp.llama_perf_context(llm.ctx)
    return Decode(len(prompt), prompt_s, new_tokens, decode_s, perf.t_eval_ms / 1e3)


def medians(runs: list[Decode]) -> tuple[float, float]:
    """``(decode tokens/s, prompt + decode seconds)``: the medians of timed runs."""
    import statistics

    return statistics.median(r.tokens_per_s for r in runs), statistics.median(r.prompt_s + r.decode_s for r in runs)


def time_interleaved(files: dict[str, Path], prompt: list[int], new_tokens: int, repeats: int, threads: int | None = None) -> dict[str, list[Decode]]:
    """Each GGUF file of ``files`` timed at batch 1 on ``threads`` threads (:func:`time_decode`): after
    one untimed run of each (the weights' pages mapped in), the files interleaved for ``repeats``
    rounds, while holding the benchmark lock; the runs per name."""
    from .evaluation.costs import bench_lock, median_rounds

    engines = {name: load(path, threads=threads, n_ctx=len(prompt) + new_tokens + 8) for name, path in files.items()}
    with bench_lock():
        for engine in engines.values():
            time_decode(engine, prompt, 4)
        return median_rounds(list(engines), lambda name: time_decode(engines[name], prompt, new_tokens), repeats)


def served_perplexity(path: str | Path, tokenizer, suite, threads: int | None = None, max_tokens: int | None = None):
    """The perplexity llama.cpp serves with the GGUF file ``path`` on ``suite``'s text and windows
    (:func:`densetomoe.metrics.perplexity` on :func:`scorer`), over ``max_tokens`` (default: the suite's)."""
    from .evaluation.metrics import perplexity

    texts, _ = suite.examples()
    engine = scorer(load(path, threads=threads, n_ctx=suite.window, logits_all=True))
    return perplexity(engine, tokenizer, texts, suite.window, suite.stride, max_tokens=max_tokens or suite.max_tokens)

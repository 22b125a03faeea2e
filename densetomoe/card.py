"""The model card (``README.md``) written into every converted folder."""

from __future__ import annotations

import yaml

from . import folder
from .moe import nominal_top_k
from .recipe import Recipe
from .stages.budget import BUDGETS
from .stages.distill import History
from .stages.evaluate import QuickReport
from .stages.native import TARGETS, NativeReport
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
    history: History | None = None,
    native: NativeReport | None = None,
    seq2seq: bool = False,
) -> str:
    """The card of a model converted from ``name`` (never a local path) of ``family``, saved as class
    ``head``: ``inherited`` is what the source's card says that this model inherits
    (:func:`~densetomoe.stages.load.source_card`), ``top_k`` each converted layer's top-k (the
    others stayed dense), ``report`` the quick check at conversion, ``seconds`` the conversion's wall
    time."""
    r, q = recipe, report
    meta = {
        "base_model": hub_id or inherited.get("base_model"),
        "license": inherited.get("license"),
        "language": inherited.get("language"),
        "library_name": inherited.get("library_name", "transformers"),
        "pipeline_tag": inherited.get("pipeline_tag") or folder.task_of(head),
        "tags": folder.TAGS,
    }
    meta = {k: v for k, v in meta.items() if v}
    agreement = "n/a (no head)" if q.head_agreement is None else f"{q.head_agreement:.3f}"
    perplexity = (
        f"| {'teacher-forced' if seq2seq else 'next-token'} perplexity, dense -> this model | {q.dense_perplexity:.2f} -> {q.perplexity:.2f} |\n"
        if q.perplexity is not None
        else ""
    )
    where = "held-out documents of the calibration source" if held_out_separate else "the calibration documents"
    auto = "AutoModelForCausalLM" if decoder else "AutoModelForSeq2SeqLM" if seq2seq else "AutoModel"
    layers = "all" if not r.layers else ", ".join(map(str, r.layers))
    nominal = nominal_top_k(top_k)
    per_layer = {i: k for i, k in top_k.items() if k != nominal}
    kept_dense = [i for i in range(num_layers) if i not in top_k]
    rows = []
    if r.ffn_budget is not None:
        listing = ", ".join(f"{i}: {k}" for i, k in per_layer.items()) or "none"
        rows.append(f"| per-layer budget | `{r.budget}` ({BUDGETS.entry(r.budget).summary}) for an average of {r.ffn_budget:.0%} of FFN neurons; top-{nominal} except layers {listing}; dense layers: {', '.join(map(str, kept_dense)) or 'none'} |")
    dynamic = r.dynamic
    if dynamic:
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
        combination = "unweighted sum of the selected experts' outputs, plus each unselected expert's mean output; experts and routers distilled"
    elif r.refit:
        combination = (
            "unweighted sum of the selected experts' outputs, plus each unselected expert's mean output; down projections "
            f"and means refit by least squares to the dense FFN output on calibration tokens under {'that' if dynamic else f'top-{nominal}'} routing (no training)"
        )
    else:
        combination = "unweighted sum of the selected experts' outputs, plus each unselected expert's mean output (no training of the experts)"
    if native is not None:
        n = native
        combination = (
            f"native `{n.target}`: router logits scaled so the selected experts' weights are uniform, down projections "
            f"scaled to match and refit by least squares to the dense FFN output on calibration tokens (relative error "
            f"{n.refit_error_before:.3f} -> {n.refit_error_after:.3f})" + ("; experts then distilled" if history else "")
        )
    extra = "\n".join(rows) + ("\n" if rows else "")
    return f"""---
{yaml.safe_dump(meta, sort_keys=False).strip()}
---

# {name} as a mixture of experts

Converted with [densetomoe](https://pypi.org/project/densetomoe/) from the dense **{name}**
({family}, `{head}`): every converted feed-forward layer's neurons were split into
**{r.experts} experts**, and a router sends each token to **{nominal}** of them{" on average (dynamic top-k, see below)" if dynamic else " (per layer, see below)" if per_layer else ""},
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
| agreement of the head's predictions | {agreement} |
{perplexity}| FFN FLOPs per token, MoE / dense (router included) | {q.ffn_flops_ratio:.3f} |
| conversion time | {seconds:.1f} s |

This is a quick fidelity check, not a task benchmark: how much quality a sparse model keeps depends
on the task. Measure on yours (`densetomoe eval`).

{_use(native, auto)}"""


def _use(native: NativeReport | None, auto: str) -> str:
    if native is not None:
        engines = next(t.engines for t in TARGETS if t.model_type == native.target)
        llama = "" if native.llama_cpp else (
            "\nllama.cpp cannot run this folder: its qwen2moe makes every layer MoE, and layers "
            f"{', '.join(map(str, native.mlp_only_layers))} stay dense here.\n"
        )
        return f"""## Use

A standard transformers `{native.target}` checkpoint: no remote code. Runs in {engines}.

```python
from transformers import {auto}
model = {auto}.from_pretrained("path/to/this/folder")
```
{llama}
For llama.cpp: `python convert_hf_to_gguf.py path/to/this/folder --outtype f16` (the script that ships with llama.cpp).
"""
    return f"""## Use

```python
from transformers import {auto}, AutoTokenizer
model = {auto}.from_pretrained("path/to/this/folder", trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder", trust_remote_code=True)  # runs the config class only
# use more or fewer experts per token without reconverting:
model = {auto}.from_pretrained("path/to/this/folder", trust_remote_code=True, num_experts_per_tok=4)
```

`trust_remote_code=True` runs `modeling_densetomoe.py` from this folder (torch and transformers only).
With densetomoe installed, `densetomoe.load("path/to/this/folder")` needs no remote code.
"""


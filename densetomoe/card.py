"""The model card (``README.md``) written into every converted folder."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from .archs import Arch

if TYPE_CHECKING:
    from .pipeline import Conversion

PARTITION_TEXT = {
    "coactivation": "neurons that activate on the same calibration tokens share an expert (balanced k-means)",
    "parameters": "neurons with similar input weights share an expert (balanced k-means on weight rows)",
    "random": "neurons assigned to experts at random (baseline)",
}
ROUTER_TEXT = {
    "mlp": "a small MLP per layer, trained on calibration tokens to predict each expert's share of the FFN output",
    "linear": "one linear map per layer (no bias), trained on calibration tokens to predict each expert's share of the FFN output",
    "centroid": "training-free: each expert scores a token by its neurons' mean pre-activation",
}


def render(result: Conversion, *, held_out_separate: bool, arch: Arch) -> str:
    r, q = result.recipe, result.report
    name = result.source.hub_id or Path(result.source.name).name  # never publish a local path
    meta = {
        "base_model": result.source.hub_id or None,
        "library_name": "transformers",
        "tags": ["moe", "densetomoe", "mixture-of-experts"],
    }
    meta = {k: v for k, v in meta.items() if v}
    agreement = "n/a (no head)" if q.head_agreement is None else f"{q.head_agreement:.3f}"
    perplexity = (
        f"| next-token perplexity, dense -> this model | {q.dense_perplexity:.2f} -> {q.perplexity:.2f} |\n"
        if q.perplexity is not None
        else ""
    )
    where = "held-out documents of the calibration source" if held_out_separate else "the calibration documents"
    auto = "AutoModelForCausalLM" if arch.decoder else "AutoModel"
    head = result.model.__class__.__name__
    layers = "all" if not r.layers else ", ".join(map(str, r.layers))
    structure = getattr(result.model.config, "densetomoe", {})
    per_layer = structure.get("layer_top_k") or {}
    top_k = result.model.config.num_experts_per_tok
    if result.native is not None:
        kept_dense = result.native.mlp_only_layers
    else:
        kept_dense = sorted(set(range(_num_layers(result.model))) - set(structure.get("moe_layers", [])))
    rows = []
    if r.ffn_budget is not None:
        listing = ", ".join(f"{i}: {k}" for i, k in per_layer.items()) or "none"
        rows.append(f"| per-layer budget | `{r.budget}` for an average of {r.ffn_budget:.0%} of FFN neurons; top-{top_k} except layers {listing}; dense layers: {', '.join(map(str, kept_dense)) or 'none'} |")
    shared = result.native.shared_size if result.native is not None else structure.get("shared_size")
    if shared:
        rows.append(f"| shared expert | {shared} neurons with the largest mean contribution, always on |")
    if r.prune:
        rows.append(f"| pruning | {r.prune:.0%} of each expert's neurons removed (activation x weight importance) |")
    if result.history is not None:
        h = result.history
        start, end = (h.held_out[0]["loss"], h.held_out[-1]["loss"]) if h.held_out else (None, None)
        change = f"; held-out distillation loss {start:.4f} -> {end:.4f}" if start is not None else ""
        rows.append(f"| recovery | distilled from the dense model: {h.step} steps, {h.tokens:,} tokens, {h.elapsed / 60:.1f} min{change} |")
        combination = "unweighted sum of the selected experts' outputs, plus each unselected expert's mean output; experts and routers distilled"
    else:
        combination = "unweighted sum of the selected experts' outputs, plus each unselected expert's mean output (no training of the experts)"
    if result.native is not None:
        n = result.native.as_dict()
        combination = (
            f"native `{n['target']}`: router logits scaled so the selected experts' weights are uniform, down projections "
            f"scaled to match and refit by least squares to the dense FFN output on calibration tokens (relative error "
            f"{n['refit_error_before']:.3f} -> {n['refit_error_after']:.3f})" + ("; experts then distilled" if result.history else "")
        )
    extra = "\n".join(rows) + ("\n" if rows else "")
    return f"""---
{yaml.safe_dump(meta, sort_keys=False).strip()}
---

# {name} as a mixture of experts

Converted with [densetomoe](https://pypi.org/project/densetomoe/) from the dense **{name}**
({arch.family}, `{head}`): every converted feed-forward layer's neurons were split into
**{r.experts} experts**, and a router sends each token to **{top_k}** of them{" (per layer, see below)" if per_layer else ""},
so a token computes {q.active_ffn_share:.0%} of the FFN neurons on average over all layers.
{"With `num_experts_per_tok=" + str(r.experts) + "` the model computes exactly what the dense model did." if result.history is None and not r.prune else ""}

## How

| step | setting |
|---|---|
| layers converted | {layers} |
| partition | `{r.partition}`: {PARTITION_TEXT[r.partition]} |
| router | `{r.router}`: {ROUTER_TEXT[r.router]} |
| calibration | {result.stats.tokens:,} tokens from {r.calib or "the embedded Wikipedia sample (CC BY-SA)"} |
| combination | {combination} |
{extra}| seed | {r.seed} |

The exact settings are in `densetomoe_recipe.yaml`; the figures below in `densetomoe_conversion.json`.

## Measured at conversion time

On {q.texts} {where} ({q.tokens:,} tokens), dense vs. this model:

| metric | value |
|---|---|
| cosine of mean-pooled final hidden states | {q.embedding_cosine:.4f} |
| relative error of final hidden states | {q.hidden_rel_error:.4f} |
| agreement of the head's predictions | {agreement} |
{perplexity}| FFN FLOPs per token, MoE / dense (router included) | {q.ffn_flops_ratio:.3f} |
| conversion time | {result.seconds.get("total", 0):.1f} s |

This is a quick fidelity check, not a task benchmark: how much quality a sparse model keeps depends
on the task. Measure on yours (`densetomoe eval`).

{_use(result, auto)}"""


def _use(result: Conversion, auto: str) -> str:
    if result.native is not None:
        from .stages.native import TARGETS

        engines = next(t.engines for t in TARGETS if t.model_type == result.native.target)
        llama = "" if result.native.llama_cpp else (
            "\nllama.cpp cannot run this folder: its qwen2moe makes every layer MoE, and layers "
            f"{', '.join(map(str, result.native.mlp_only_layers))} stay dense here.\n"
        )
        return f"""## Use

A standard transformers `{result.native.target}` checkpoint: no remote code. Runs in {engines}.

```python
from transformers import {auto}
model = {auto}.from_pretrained("path/to/this/folder")
```
{llama}
For llama.cpp: `python convert_hf_to_gguf.py path/to/this/folder --outtype f16` (the script that ships with llama.cpp).
"""
    return f"""## Use

```python
from transformers import {auto}
model = {auto}.from_pretrained("path/to/this/folder", trust_remote_code=True)
# use more or fewer experts per token without reconverting:
model = {auto}.from_pretrained("path/to/this/folder", trust_remote_code=True, num_experts_per_tok=4)
```

`trust_remote_code=True` runs `modeling_densetomoe.py` from this folder (torch and transformers only).
With densetomoe installed, `densetomoe.load("path/to/this/folder")` needs no remote code.
"""


def _num_layers(model) -> int:
    config = model.config
    return getattr(config, "num_hidden_layers", None) or getattr(config, "n_layers", None) or getattr(config, "n_layer", 0)

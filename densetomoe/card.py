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
    return f"""---
{yaml.safe_dump(meta, sort_keys=False).strip()}
---

# {name} as a mixture of experts

Converted with [densetomoe](https://pypi.org/project/densetomoe/) from the dense **{name}**
({arch.family}, `{head}`): every converted feed-forward layer's neurons were split into
**{r.experts} experts**, and a router sends each token to **{r.top_k}** of them, so a token computes
{q.active_ffn_share:.0%} of each converted FFN. With `num_experts_per_tok={r.experts}` the model computes
exactly what the dense model did.

## How

| step | setting |
|---|---|
| layers converted | {layers} |
| partition | `{r.partition}`: {PARTITION_TEXT[r.partition]} |
| router | `{r.router}`: {ROUTER_TEXT[r.router]} |
| calibration | {result.stats.tokens:,} tokens from {r.calib or "the embedded Wikipedia sample (CC BY-SA)"} |
| combination | unweighted sum of the selected experts' outputs (no training of the experts) |
| seed | {r.seed} |

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

This is a quick fidelity check, not a task benchmark: conversion without training loses quality,
and how much depends on the task. Measure on yours.

## Use

```python
from transformers import {auto}
model = {auto}.from_pretrained("path/to/this/folder", trust_remote_code=True)
# use more or fewer experts per token without reconverting:
model = {auto}.from_pretrained("path/to/this/folder", trust_remote_code=True, num_experts_per_tok=4)
```

`trust_remote_code=True` runs `modeling_densetomoe.py` from this folder (torch and transformers only).
With densetomoe installed, `densetomoe.load("path/to/this/folder")` needs no remote code.
"""

"""Build each layer's router: the module that picks a token's top-k experts.

Registry entries take one layer's weights, its calibration sample and the partition, and return a
:class:`~densetomoe.moe.Router` whose scores rank the experts for each token.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..ffn import CHUNK, DenseFFN
from ..moe import Router
from ..registry import Registry
from .calibrate import LayerStats


@dataclass(frozen=True)
class RouterSettings:
    hidden: int  # the recipe's router_hidden (MLP router)
    steps: int  # the recipe's router_steps (trained routers)
    batch: int = 512  # calibration tokens per optimisation step
    lr: float = 3e-3


# (layer's routed FFN, its calibration statistics, labels, experts, settings, generator) -> router
RouterFn = Callable[[DenseFFN, LayerStats, torch.Tensor, int, RouterSettings, torch.Generator], Router]
# Entry setting ``linear``: the router is one linear map, as a native MoE's gate is (format native needs it).
ROUTERS: Registry[RouterFn] = Registry("router")


def expert_shares(ffn: DenseFFN, inputs: torch.Tensor, labels: torch.Tensor, experts: int) -> torch.Tensor:
    """Each expert's share of a token's FFN output, ``(tokens, experts)``, rows summing to 1.

    An expert's weight is the norm of what it adds to the output, ``||W_down[:, e] a_e(x)||``: the
    quantity that dropping it loses.
    """
    norms = torch.cat([ffn.output_norms(part, labels, experts) for part in inputs.split(CHUNK)])  # (tokens, experts)
    return norms / norms.sum(-1, keepdim=True).clamp_min(1e-12)


@ROUTERS.register("centroid", "training-free: each expert scores a token by its neurons' mean pre-activation", linear=True)
def centroid_router(ffn, stats, labels, experts, settings, generator) -> Router:
    """Training-free: an expert scores a token by its neurons' mean pre-activation.

    The score is ``x . mean_{j in e} w_j + mean_{j in e} b_j`` (the centroid of the expert's input
    rows, the gate rows for a GLU), as in MoEfication's similarity-based expert selection.
    """
    w = ffn.w_gate if ffn.w_gate is not None else ffn.w_up  # (d_ff, hidden)
    b = ffn.b_gate if ffn.w_gate is not None else ffn.b_up
    router = Router(w.shape[1], experts, hidden=0)
    linear = router.layers[0]
    with torch.no_grad():
        linear.weight.copy_(torch.stack([w[labels == e].mean(0) for e in range(experts)]))
        if b is None:
            linear.bias.zero_()
        else:
            linear.bias.copy_(torch.stack([b[labels == e].mean() for e in range(experts)]))
    return router


@ROUTERS.register("mlp", "a small MLP per layer, trained on calibration tokens to predict each expert's share of the FFN output", linear=False)
def mlp_router(ffn, stats, labels, experts, settings, generator) -> Router:
    """A small MLP trained to predict each expert's share of the output (:func:`expert_shares`).

    Trained on the layer's calibration sample with soft-target cross-entropy; top-k of its logits
    ranks experts by predicted contribution (MoEBERT / LLaMA-MoE style learned gate, trained here
    without touching the experts).
    """
    x = stats.inputs  # (samples, hidden)
    target = expert_shares(ffn, x, labels, experts)  # (samples, experts)
    torch.manual_seed(int(torch.randint(2**31, (1,), generator=generator, device=generator.device)))
    router = Router(x.shape[1], experts, hidden=settings.hidden)
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    fit_router(router, router.parameters(), (x - mean) / std, target, settings, generator)
    _fold_normalisation(router, mean, std)
    return router


@ROUTERS.register("linear", "one linear map per layer (no bias), trained on calibration tokens to predict each expert's share of the FFN output", linear=True)
def linear_router(ffn, stats, labels, experts, settings, generator) -> Router:
    """One linear map without bias, trained like :func:`mlp_router` (soft-target cross-entropy to each
    expert's share of the output). It is the router a native MoE checkpoint has (``gate.weight``,
    ``(experts, hidden)``, no bias), so ``--format native`` uses it by default.
    """
    x = stats.inputs  # (samples, hidden)
    target = expert_shares(ffn, x, labels, experts)  # (samples, experts)
    torch.manual_seed(int(torch.randint(2**31, (1,), generator=generator, device=generator.device)))
    router = Router(x.shape[1], experts, hidden=0)
    linear = router.layers[0]
    scale = x.pow(2).mean(0).sqrt().clamp_min(1e-6)  # per-feature RMS: scaling folds in, a shift would need a bias
    with torch.no_grad():
        linear.bias.zero_()
    linear.bias.requires_grad_(False)
    fit_router(router, [linear.weight], x / scale, target, settings, generator)
    linear.bias.requires_grad_(True)
    with torch.no_grad():
        linear.weight.div_(scale)
    return router


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The trained routers' loss: cross-entropy of their softmax to each expert's share of the output."""
    return -(target * logits.log_softmax(-1)).sum(-1).mean()


def fit_router(
    router: Router,
    params,
    inputs: torch.Tensor,
    target: torch.Tensor,
    settings: RouterSettings,
    generator: torch.Generator,
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = soft_cross_entropy,
) -> None:
    """Train ``params`` of ``router`` on ``inputs`` (already scaled as the router sees them in training)
    and ``target`` rows: ``settings.steps`` AdamW steps under a cosine schedule, each on a batch of
    ``settings.batch`` rows drawn with ``generator``."""
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(settings.steps, 1))
    with torch.enable_grad():
        for _ in range(settings.steps):
            pick = torch.randint(len(inputs), (min(settings.batch, len(inputs)),), generator=generator, device=generator.device)
            pick = pick.to(inputs.device)
            value = loss(router(inputs[pick]), target[pick])
            optimizer.zero_grad()
            value.backward()
            optimizer.step()
            schedule.step()


def _fold_normalisation(router: Router, mean: torch.Tensor, std: torch.Tensor) -> None:
    """Absorb the input standardisation ``(x - mean) / std`` into the first linear layer."""
    first = router.layers[0]
    with torch.no_grad():
        w = first.weight / std  # (out, hidden)
        first.bias.sub_(w @ mean)
        first.weight.copy_(w)

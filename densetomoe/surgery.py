"""Turn dense FFN weights plus a partition and routers into MoE modules, and swap them in place."""

from __future__ import annotations

import torch
from torch import nn

from . import moe
from .archs import Arch
from .stages.calibrate import DenseFFN
from .stages.partition import expert_members


def skip_means(
    ffn: DenseFFN, labels: torch.Tensor, router: moe.Router, sample: torch.Tensor, experts: int, top_k: int
) -> torch.Tensor:
    """``(experts, hidden)``: each expert's mean output over the sampled tokens that do not select it.

    Adding these for the unselected experts is the least-squares constant correction for what
    top-k routing drops; it is zero at ``top_k == experts`` and keeps the dense equivalence exact.
    """
    with torch.no_grad():
        y = ffn.contributions(sample, labels, experts)  # (tokens, experts, hidden)
        chosen = router(sample).topk(top_k, dim=-1).indices  # (tokens, top_k)
        skipped = torch.ones(len(sample), experts).scatter_(1, chosen, 0.0)  # (tokens, experts)
        return (skipped.unsqueeze(-1) * y).sum(0) / skipped.sum(0).clamp_min(1).unsqueeze(-1)


def moe_from_dense(
    ffn: DenseFFN,
    labels: torch.Tensor,
    router: moe.Router,
    experts: int,
    top_k: int,
    activation: str,
    sample: torch.Tensor | None = None,
) -> moe.MoEFeedForward:
    """An MoE feed-forward holding exactly ``ffn``'s weights, its neurons grouped by ``labels``;
    with a calibration ``sample`` ``(tokens, hidden)``, unselected experts are compensated by their mean."""
    members = expert_members(labels, experts)  # (experts, expert_size)
    hidden = ffn.w_up.shape[1]
    module = moe.MoEFeedForward(
        hidden_size=hidden,
        num_experts=experts,
        expert_size=members.shape[1],
        top_k=top_k,
        activation=activation,
        gated=ffn.w_gate is not None,
        bias=ffn.b_up is not None,
        router_hidden=_router_hidden(router),
    )
    with torch.no_grad():
        module.w_up.copy_(ffn.w_up[members])  # (experts, expert_size, hidden)
        module.w_down.copy_(ffn.w_down.T[members])  # (experts, expert_size, hidden)
        if ffn.w_gate is not None:
            module.w_gate.copy_(ffn.w_gate[members])
        if module.b_up is not None:
            module.b_up.copy_(ffn.b_up[members])  # (experts, expert_size)
            module.b_down.copy_(ffn.b_down)
            if module.b_gate is not None:
                module.b_gate.copy_(ffn.b_gate[members])
    module.router.load_state_dict(router.state_dict())
    if sample is not None and top_k < experts:
        with torch.no_grad():
            module.skip_mean.copy_(skip_means(ffn, labels, router, sample, experts, top_k))
    return module


def _router_hidden(router: moe.Router) -> int:
    return router.layers[0].out_features if len(router.layers) > 1 else 0


def structure(arch: Arch, module: moe.MoEFeedForward, layers: list[int]) -> dict:
    """The ``config.densetomoe`` entry that lets ``moe.install_moe`` rebuild the converted model."""
    return {
        "layers": arch.layers,
        "moe_at": arch.moe_at,
        "identity": list(arch.identity),
        "moe_layers": sorted(layers),
        "hidden_size": module.hidden_size,
        "expert_size": module.expert_size,
        "activation": module.activation,
        "gated": module.gated,
        "bias": module.b_up is not None,
        "router_hidden": _router_hidden(module.router),
    }


def swap_in(model: nn.Module, arch: Arch, modules: dict[int, moe.MoEFeedForward], top_k: int) -> None:
    """Replace the FFNs of ``model`` by ``modules`` (block index -> module) and record the structure
    in ``model.config``, which keeps the dense class until export."""
    blocks = moe.moe_layers(model, {"layers": arch.layers})
    first = next(iter(modules.values()))
    layout = structure(arch, first, list(modules))
    param = next(model.parameters())
    for index, module in modules.items():
        moe.replace_ffn(blocks[index], layout, module.to(device=param.device, dtype=param.dtype))
    setattr(model.config, moe.CONFIG_KEY, layout)
    model.config.num_experts = first.num_experts
    model.config.num_experts_per_tok = top_k

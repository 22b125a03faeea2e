"""The MoE feed-forward's math, on small random tensors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from densetomoe import surgery
from densetomoe.moe import MoEFeedForward, Router, set_top_k
from densetomoe.stages.calibrate import DenseFFN
from densetomoe.stages.partition import at_random


def random_ffn(hidden=16, d_ff=48, gated=False, bias=True, seed=0) -> DenseFFN:
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.3  # noqa: E731
    return DenseFFN(
        w_up=r(d_ff, hidden),
        b_up=r(d_ff) if bias else None,
        w_down=r(hidden, d_ff),
        b_down=r(hidden) if bias else None,
        activation=nn.SiLU() if gated else nn.GELU(),
        w_gate=r(d_ff, hidden) if gated else None,
        b_gate=r(d_ff) if gated and bias else None,
    )


def dense_output(ffn: DenseFFN, x: torch.Tensor) -> torch.Tensor:
    out = ffn.neurons(x) @ ffn.w_down.T
    return out + ffn.b_down if ffn.b_down is not None else out


def build(ffn, experts=4, top_k=2, seed=0):
    labels = at_random(ffn, None, experts, torch.Generator().manual_seed(seed))
    router = Router(ffn.w_up.shape[1], experts, hidden=8)
    activation = "silu" if ffn.w_gate is not None else "gelu"
    return surgery.moe_from_dense(ffn, labels, router, experts, top_k, activation), labels


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_all_experts_equal_the_dense_ffn(gated, bias):
    ffn = random_ffn(gated=gated, bias=bias)
    moe, _ = build(ffn, top_k=4)
    x = torch.randn(3, 5, 16)
    torch.testing.assert_close(moe(x), dense_output(ffn, x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("gated", [False, True])
def test_top_k_is_the_sum_of_the_chosen_experts(gated):
    ffn = random_ffn(gated=gated)
    moe, labels = build(ffn, top_k=2)
    with torch.no_grad():
        moe.skip_mean.normal_()
    x = torch.randn(40, 16)
    chosen = moe.select(x)
    contributions = ffn.contributions(x, labels, 4)  # (tokens, experts, hidden)
    mask = torch.zeros(40, 4).scatter_(1, chosen, 1.0)
    expected = (contributions * mask.unsqueeze(-1)).sum(1) + ffn.b_down
    expected += ((1 - mask).unsqueeze(-1) * moe.skip_mean.detach()).sum(1)
    torch.testing.assert_close(moe(x), expected, rtol=1e-5, atol=1e-5)


def test_skip_means_are_the_mean_of_unselected_contributions():
    ffn = random_ffn()
    labels = at_random(ffn, None, 4, torch.Generator().manual_seed(0))
    router = Router(16, 4)
    x = torch.randn(200, 16)
    means = surgery.skip_means(ffn, labels, router, x, experts=4, top_k=1)
    chosen = router(x).argmax(-1)
    y = ffn.contributions(x, labels, 4)
    for e in range(4):
        torch.testing.assert_close(means[e], y[chosen != e, e].mean(0), rtol=1e-5, atol=1e-6)


def test_set_top_k_validates_and_updates_config():
    model = nn.Sequential(MoEFeedForward(8, 4, 2, top_k=2))
    set_top_k(model, 3)
    assert model[0].top_k == 3
    with pytest.raises(ValueError):
        set_top_k(model, 5)
    with pytest.raises(ValueError):
        set_top_k(nn.Linear(2, 2), 1)


def test_gradients_reach_selected_experts_and_router_inputs():
    ffn = random_ffn()
    moe, _ = build(ffn, top_k=1)
    x = torch.randn(30, 16, requires_grad=True)
    moe(x).sum().backward()
    assert x.grad is not None and moe.w_up.grad is not None
    assert moe.w_up.grad.abs().sum() > 0

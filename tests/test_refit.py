"""The least-squares refit of a converted layer, on small random FFNs."""

from __future__ import annotations

import pytest
import torch
from test_moe import random_ffn

from densetomoe import surgery
from densetomoe.ffn import DenseFFN
from densetomoe.moe import Router, moe_modules
from densetomoe.stages.coverage import coverage_for
from densetomoe.stages.partition import at_random
from densetomoe.stages.refit import refit_experts, relative_error


def layer(gated: bool, shared: bool, top_k: int):
    """A dense FFN (hidden 16, 64 neurons) and an MoE of it: 4 experts, 16 shared neurons if asked."""
    ffn = random_ffn(hidden=16, d_ff=64, gated=gated, bias=not gated)
    shared_ffn, routed = (ffn.subset(torch.arange(16), with_bias=False), ffn.subset(torch.arange(16, 64))) if shared else (None, ffn)
    labels = at_random(routed, None, 4, torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    moe = surgery.moe_from_dense(routed, labels, Router(16, 4, hidden=8), 4, top_k, "silu" if gated else "gelu", torch.randn(256, 16), shared_ffn)
    return ffn, moe.eval()


def without_bias(ffn: DenseFFN, out: torch.Tensor) -> torch.Tensor:
    return out if ffn.b_down is None else out - ffn.b_down


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("dynamic", [False, True, "soft"])
def test_the_refit_lowers_the_error_the_module_really_makes(gated, shared, dynamic):
    ffn, moe = layer(gated, shared, top_k=2)
    calibration, held_out = torch.randn(4096, 16), torch.randn(1024, 16)
    if dynamic:  # a varying number of experts per token, 2 on average (those near the boundary in part if soft)
        with torch.no_grad():
            moe.router.layers[-1].weight.mul_(20)
        moe.ramp = 0.1 if dynamic == "soft" else 0.0
        moe.coverage = coverage_for(moe.router, calibration, 2, moe.ramp)
    error = lambda x: relative_error(without_bias(ffn, moe(x).detach()), ffn.neurons(x) @ ffn.w_down.T)  # noqa: E731
    before, held_out_before = error(calibration), error(held_out)
    routing = moe.selection(held_out)
    fit = refit_experts(moe, ffn, calibration)
    # the fit's own figures are those of the module's real forward: its features are what inference computes
    assert fit.error_before == pytest.approx(before, rel=1e-4)
    assert fit.error_after == pytest.approx(error(calibration), rel=1e-4)
    assert fit.error_after < 0.95 * before
    assert error(held_out) < held_out_before  # not an overfit of the calibration tokens
    assert torch.equal(moe.selection(held_out), routing)  # the routing is left as it is


def test_the_refit_leaves_a_layer_with_every_expert_active_as_it_is():
    ffn, moe = layer(gated=True, shared=True, top_k=4)
    weights = {k: v.clone() for k, v in moe.state_dict().items()}
    fit = refit_experts(moe, ffn, torch.randn(512, 16))
    assert fit.error_before < 1e-3 and fit.error_after == fit.error_before
    assert all(torch.equal(weights[k], v) for k, v in moe.state_dict().items())


def test_decoders_are_refit_by_default_and_encoders_are_not(tiny_decoders, tiny_models, texts_file, tmp_path):
    import densetomoe
    from conftest import quick_recipe

    decoder = densetomoe.convert(quick_recipe(tiny_decoders["llama"], texts_file), tmp_path / "lm", show_progress=False)
    plain = densetomoe.convert(quick_recipe(tiny_decoders["llama"], texts_file, refit=False), show_progress=False)
    encoder = densetomoe.convert(quick_recipe(tiny_models["BertModel"], texts_file), show_progress=False)
    assert decoder.recipe.refit is True and encoder.recipe.refit is False
    assert "refit: true" in (tmp_path / "lm" / "densetomoe_recipe.yaml").read_text()  # the folder says what ran
    # the same split and routing, other down projections: the refit did something, and only there
    refit_layer, plain_layer = (next(iter(moe_modules(r.model).values())) for r in (decoder, plain))
    assert torch.equal(refit_layer.w_up, plain_layer.w_up)
    assert not torch.allclose(refit_layer.w_down, plain_layer.w_down)
    reloaded = next(iter(moe_modules(densetomoe.load(tmp_path / "lm")).values()))
    assert torch.equal(reloaded.w_down, refit_layer.w_down)  # what was fit is what the folder holds


def test_a_decoder_budget_defaults_to_64_experts_at_the_same_top_k_everywhere(tiny_decoders, tiny_models, texts_file, monkeypatch):
    from densetomoe import Recipe, defaults

    def decided(model, **settings):
        return defaults.with_model_defaults(Recipe.build(model=str(model), calib=str(texts_file), **settings))

    lm = tiny_decoders["llama"]  # FFN 64
    assert (lambda r: (r.experts, r.budget, r.refit))(decided(lm, ffn_budget=0.5)) == (64, "uniform", True)
    monkeypatch.setattr(defaults, "DECODER_BUDGET_EXPERTS", (128, 32))  # the first that splits the FFN equally
    assert decided(lm, ffn_budget=0.5).experts == 32
    monkeypatch.setattr(defaults, "DECODER_BUDGET_EXPERTS", (128, 48))  # none: the recipe's
    assert decided(lm, ffn_budget=0.5).experts == 8
    named = decided(lm, ffn_budget=0.5, experts=8, budget="sensitivity")  # what a recipe names is kept
    assert (named.experts, named.budget) == (8, "sensitivity")
    assert decided(lm).experts == 8  # without a budget: as before
    encoder = decided(tiny_models["BertModel"], ffn_budget=0.5)  # encoders: as before
    assert (encoder.experts, encoder.budget, encoder.refit) == (8, "sensitivity", False)


def test_small_decoders_sample_more_calibration_tokens_by_default(tiny_decoders, tiny_models, texts_file):
    from densetomoe import Recipe, defaults

    def decided(model, **settings):
        return defaults.with_model_defaults(Recipe.build(model=str(model), calib=str(texts_file), **settings))

    lm = decided(tiny_decoders["llama"])  # FFN 64
    assert (lm.sample_tokens, lm.calib_tokens) == (32768, 65536)
    encoder = decided(tiny_models["BertModel"])
    assert (encoder.sample_tokens, encoder.calib_tokens) == (8192, 32768)  # encoders: as before
    named = decided(tiny_decoders["llama"], sample_tokens=4096)  # what a recipe names is kept
    assert (named.sample_tokens, named.calib_tokens) == (4096, 32768)
    assert decided(tiny_decoders["llama"], calib_tokens=1000).calib_tokens == 1000
    # the sample grows while a layer's activations fit in 256 MB: SmolLM2's FFN 1536 takes 32,768 tokens,
    # SmolLM2-360M's 2560 16,384, LLaMA-3.2-1B's 8192 (and anything wider) today's 8,192
    assert [defaults.sample_tokens(True, f) for f in (1536, 2048, 2560, 8192, 14336)] == [32768, 32768, 16384, 8192, 8192]
    assert defaults.sample_tokens(False, 1536) == 8192

"""Routers learn which experts matter; calibration keeps bounded, correct statistics."""

from __future__ import annotations

import pytest
import torch
from test_moe import random_ffn

import densetomoe
from conftest import quick_recipe
from densetomoe import archs
from densetomoe.ffn import dense_ffn
from densetomoe.moe import Router, blocks_of
from densetomoe.stages import load
from densetomoe.stages.calibrate import Reservoir, calibrate
from densetomoe.stages.router import ROUTERS, RouterSettings, _fold_normalisation, expert_shares


def planted_layer():
    """Each token strongly activates one expert's neurons, chosen by its input."""
    ffn = random_ffn(hidden=8, d_ff=32)
    labels = torch.arange(32) // 8  # expert e owns neurons 8e..8e+7
    ffn.w_up.zero_()
    ffn.b_up.fill_(-1.0)
    for e in range(4):
        ffn.w_up[labels == e, e] = 3.0
    x = torch.zeros(2000, 8)
    x[torch.arange(2000), torch.arange(2000) % 4] = 1.0 + torch.rand(2000)
    x += 0.05 * torch.randn(2000, 8)
    from densetomoe.stages.calibrate import LayerStats

    return ffn, labels, LayerStats(x, 2000, torch.zeros(32), torch.zeros(32))


def test_mlp_router_ranks_the_expert_that_carries_the_output_first():
    ffn, labels, stats = planted_layer()
    router = ROUTERS["mlp"](ffn, stats, labels, 4, RouterSettings(hidden=16, steps=300), torch.Generator().manual_seed(0))
    best = expert_shares(ffn, stats.inputs, labels, 4).argmax(-1)
    with torch.no_grad():
        predicted = router(stats.inputs).argmax(-1)
    assert (predicted == best).float().mean() > 0.95


def test_centroid_router_needs_no_training_and_finds_planted_experts():
    ffn, labels, stats = planted_layer()
    router = ROUTERS["centroid"](ffn, stats, labels, 4, RouterSettings(hidden=0, steps=0), torch.Generator())
    with torch.no_grad():
        predicted = router(stats.inputs).argmax(-1)
    assert (predicted == torch.arange(2000) % 4).float().mean() > 0.95


def test_folding_the_input_standardisation_keeps_the_function():
    router = Router(6, 3, hidden=5)
    mean, std = torch.randn(6), torch.rand(6) + 0.5
    x = torch.randn(10, 6)
    with torch.no_grad():
        before = router((x - mean) / std)
        _fold_normalisation(router, mean, std)
        torch.testing.assert_close(router(x), before, rtol=1e-5, atol=1e-5)


def test_reservoir_is_bounded_and_uniform():
    reservoir = Reservoir(100, torch.Generator().manual_seed(0))
    for start in range(0, 10_000, 250):
        reservoir.add(torch.arange(start, start + 250, dtype=torch.float32).unsqueeze(1))
    sample = reservoir.sample()
    assert sample.shape == (100, 1) and reservoir.seen == 10_000
    assert 3000 < sample.mean() < 7000  # drawn from the whole stream, not its start


def test_reservoir_keeps_the_last_row_drawn_for_a_slot_on_any_number_of_threads():
    """Rows of one batch that draw the same slot: the last wins, as row by row (Vitter's algorithm R).
    An assignment with repeated indices left the winner to thread timing, so the sample (and every
    expert split and router trained on it) changed from one conversion to the next."""
    torch.set_num_threads(2)
    stream = torch.randn(40_000, 64, generator=torch.Generator().manual_seed(1))
    for seed in range(5):
        reservoir = Reservoir(256, torch.Generator().manual_seed(seed))
        reservoir.add(stream[:256])
        reservoir.add(stream[256:])  # about 1,100 rows replace one, most slots drawn several times
        draws = torch.Generator().manual_seed(seed)
        index = torch.arange(256, len(stream), dtype=torch.float64)
        slots = (torch.rand(len(index), generator=draws, dtype=torch.float64) * (index + 1)).long().tolist()
        expected = stream[:256].clone()
        for row, slot in enumerate(slots, 256):
            if slot < 256:
                expected[slot] = stream[row]
        assert torch.equal(reservoir.sample(), expected)


def test_calibration_counts_real_tokens_only_and_stops_at_budget(tiny_models, texts_file):
    folder = tiny_models["BertModel"]
    source = load.resolve(str(folder))
    config = load.load_config(source)
    arch = archs.arch_for(config)
    model, tokenizer = load.load_model(source, config)
    blocks = blocks_of(model, arch.layers)
    ffns = {i: dense_ffn(blocks[i], arch, torch.nn.GELU()) for i in range(2)}
    texts = texts_file.read_text().splitlines()
    stats = calibrate(model, tokenizer, texts, arch, ffns, tokens=200, seq_len=32, batch_size=4, sample_tokens=64, show_progress=False)
    assert 200 <= stats.tokens < 200 + 4 * 32
    real = sum(len(tokenizer(t, truncation=True, max_length=32)["input_ids"]) for t in texts[: stats.sequences])
    assert stats.tokens == real
    layer = stats.layers[0]
    assert layer.inputs.shape == (64, 32)
    assert layer.mean_abs.shape == (64,) and (layer.fire_rate >= 0).all() and (layer.fire_rate <= 1).all()


@pytest.mark.slow
def test_default_method_beats_the_random_baseline_on_a_real_model(minilm):
    """On real weights and text, co-activation experts with compensation keep far more than a random split."""
    recipe = quick_recipe(minilm, experts=8, top_k=2, calib_tokens=4096, sample_tokens=2048, router_steps=200, router_hidden=64)
    trained = densetomoe.convert(recipe, show_progress=False).report
    blind = densetomoe.convert(recipe.model_copy(update={"partition": "random", "compensate": False}), show_progress=False).report
    assert trained.embedding_cosine > blind.embedding_cosine + 0.1

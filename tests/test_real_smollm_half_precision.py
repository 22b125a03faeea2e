"""The real SmolLM2-135M-Instruct, all 30 layers at half the FFN, in half precision: with a soft
routing boundary it predicts its own float32 next tokens nearly as often as the dense model does.
Apart from test_real_smollm.py because it is the longest test of the suite (a whole conversion,
then six forward passes of 2,048 tokens): in a file of its own it runs beside the others under
``pytest -n 2 --dist loadfile``."""

from __future__ import annotations

import copy

import pytest
import torch

import densetomoe
from densetomoe import data
from densetomoe.moe import moe_modules
from densetomoe.stages import load

pytestmark = pytest.mark.slow


@torch.no_grad()
def test_with_a_soft_boundary_half_precision_agrees_with_float32_as_the_dense_model_does(smollm, tmp_path):
    """Issue 13, item 3, for the whole model routing for itself: all 30 layers at half the FFN (64
    experts, dynamic top-k) with ``--routing dynamic-soft``. In bfloat16 and float16 it predicts its
    own float32 next tokens nearly as often as the dense model does (the hard boundary: 0.82 against
    0.97 in bfloat16 on evals/research/precision.py's text, as two experts of equal probability trade places).

    The margin is the measure's own spread: on these 2,048 tokens, summing the unselected experts'
    means in another order (index_add_, or the product with the one-hot membership used now) gave
    0.943 and 0.930 in bfloat16, against 0.968 for the dense model."""
    (tmp_path / "calib.txt").write_text("\n".join(data.default_corpus()[:80]))
    recipe = densetomoe.Recipe.build(
        model=str(smollm), ffn_budget=0.5, routing="dynamic-soft", calib=str(tmp_path / "calib.txt"), calib_tokens=16384,
        sample_tokens=8192, router_steps=100,
    )  # fmt: skip (a quarter of the default sample: a weaker router flips more, 0.88 in bfloat16 with 2,048)
    moe32 = densetomoe.convert(recipe, show_progress=False).model.eval()
    assert all(m.ramp == 0.1 and m.coverage for m in moe_modules(moe32).values())
    source = load.resolve(str(smollm))
    tokenizer = load.load_tokenizer(source)
    ids = tokenizer("\n\n".join(data.heldout_corpus()), add_special_tokens=False, return_tensors="pt")["input_ids"][:, :2048]
    dense32, _ = load.load_model(source, load.load_config(source), causal_lm=True)
    dense32.eval()

    def agreement(model, dtype):
        reference = model(ids).logits[0].argmax(-1)
        low = copy.deepcopy(model).to(dtype)
        return float((low(ids).logits[0].argmax(-1) == reference).float().mean())

    for dtype in (torch.bfloat16, torch.float16):
        dense, converted = agreement(dense32, dtype), agreement(moe32, dtype)
        assert converted >= dense - 0.05, (dtype, converted, dense)

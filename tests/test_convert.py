"""Conversion of every supported family and head: exactness, export, reload without densetomoe."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

import densetomoe
from conftest import CASES, quick_recipe, run_without_densetomoe, sample_inputs, slow_except
from densetomoe.folder import FIGURES_FILE, MODELING_FILE, RECIPE_FILE

FAMILY_OF = {cls: family for family, cls in CASES}


def outputs(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def dense(folder):
    return getattr(transformers, folder.name).from_pretrained(folder).eval()


def test_the_same_recipe_gives_the_same_weights_twice_in_one_process(tiny_decoders):
    """The same recipe and seed make the same model, also on two threads (where calibration's
    reservoir sample once depended on thread timing) and after a first conversion has run."""
    torch.set_num_threads(2)
    recipe = quick_recipe(tiny_decoders["llama"])
    first, second = [densetomoe.convert(recipe, show_progress=False).model.state_dict() for _ in range(2)]
    assert list(first) == list(second)
    assert [k for k in first if not torch.equal(first[k], second[k])] == []


@pytest.mark.parametrize("family,class_name", CASES)
def test_all_experts_active_reproduces_dense(tiny_models, texts_file, family, class_name):
    folder = tiny_models[class_name]
    inputs = sample_inputs(folder)
    conversion = densetomoe.convert(quick_recipe(folder, texts_file, top_k=4), show_progress=False)
    expected = outputs(dense(folder), inputs)
    got = outputs(conversion.model, inputs)
    assert type(conversion.model).__name__ == class_name
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family,class_name", slow_except(("bert", "BertForSequenceClassification"), CASES))
def test_export_reloads_without_densetomoe(tiny_models, texts_file, tmp_path, family, class_name):
    folder, out = tiny_models[class_name], tmp_path / "moe"
    conversion = densetomoe.convert(quick_recipe(folder, texts_file, top_k=2), out=out, show_progress=False)
    inputs = sample_inputs(folder)
    expected = outputs(conversion.model, inputs)
    torch.save({"inputs": inputs, "expected": expected}, tmp_path / "case.pt")

    for name in ("config.json", "model.safetensors", MODELING_FILE, RECIPE_FILE, FIGURES_FILE, "README.md", "tokenizer.json"):
        assert (out / name).is_file(), name
    config = json.loads((out / "config.json").read_text())
    assert config["num_experts"] == 4 and config["num_experts_per_tok"] == 2
    assert config["model_type"] == "densetomoe_" + conversion.model.config.model_type
    head_auto = next(auto for auto, target in config["auto_map"].items() if target.endswith("." + "MoE" + class_name))

    stdout = run_without_densetomoe(f"""
import torch, transformers
case = torch.load({str(tmp_path / "case.pt")!r})
model = getattr(transformers, {head_auto!r}).from_pretrained({str(out)!r}, trust_remote_code=True).eval()
with torch.no_grad():
    out = model(**case["inputs"])
got = out.logits if hasattr(out, "logits") else out.last_hidden_state
torch.testing.assert_close(got, case["expected"], rtol=1e-4, atol=1e-5)
assert "densetomoe" not in type(model).__module__.split(".")[0]
print("reloaded", type(model).__name__)
""")
    assert f"reloaded MoE{class_name}" in stdout

    # densetomoe.load: no remote code, same outputs, and top-k can change at load time
    loaded = densetomoe.load(out)
    torch.testing.assert_close(outputs(loaded, inputs), expected, rtol=1e-4, atol=1e-5)
    all_experts = densetomoe.load(out, top_k=4)
    torch.testing.assert_close(outputs(all_experts, inputs), outputs(dense(folder), inputs), rtol=1e-4, atol=1e-5)


def test_plain_transformers_refuses_without_remote_code(tiny_models, texts_file, tmp_path):
    folder, out = tiny_models["BertModel"], tmp_path / "moe"
    densetomoe.convert(quick_recipe(folder, texts_file), out=out, show_progress=False)
    with pytest.raises(ValueError):
        transformers.AutoModel.from_pretrained(out, trust_remote_code=False)


def test_top_k_changes_at_load_time_through_transformers(tiny_models, texts_file, tmp_path):
    folder, out = tiny_models["BertModel"], tmp_path / "moe"
    densetomoe.convert(quick_recipe(folder, texts_file), out=out, show_progress=False)
    model = transformers.AutoModel.from_pretrained(out, trust_remote_code=True, num_experts_per_tok=4).eval()
    inputs = sample_inputs(folder)
    assert all(m.top_k == 4 for m in model.modules() if type(m).__name__ == "MoEFeedForward")
    torch.testing.assert_close(outputs(model, inputs), outputs(dense(folder), inputs), rtol=1e-4, atol=1e-5)


def test_only_selected_layers_are_converted(tiny_models, texts_file):
    folder = tiny_models["BertModel"]
    conversion = densetomoe.convert(quick_recipe(folder, texts_file, layers=[1]), show_progress=False)
    layers = conversion.model.encoder.layer
    assert type(layers[0].intermediate).__name__ == "BertIntermediate"
    assert isinstance(layers[1].intermediate, densetomoe.MoEFeedForward)
    assert list(conversion.top_k) == [1]


def test_sparse_forward_computes_only_selected_experts(tiny_models, texts_file):
    """Count the rows each expert actually multiplies: k per token, not all experts."""
    folder = tiny_models["BertModel"]
    conversion = densetomoe.convert(quick_recipe(folder, texts_file, top_k=1), show_progress=False)
    moe = conversion.model.encoder.layer[0].intermediate
    rows = []
    original = moe._neurons

    def counting(x, experts):
        rows.append(x.shape[0])
        return original(x, experts)

    moe._neurons = counting
    inputs = sample_inputs(folder)
    conversion.model(**inputs)
    tokens = inputs["input_ids"].numel()
    assert sum(rows) == tokens  # top-1: every token through exactly one expert
    assert len(rows) <= 4

"""Decoder LMs of every supported family: exactness at k = E, export, reload and generate without densetomoe."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

import densetomoe
from conftest import DECODERS, quick_recipe, run_without_densetomoe, slow_except
from densetomoe import archs

PROMPTS = ["The river floods every spring because", "Markets fell sharply on Monday after"]


def lm_inputs(folder) -> dict:
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    return dict(tokenizer(PROMPTS, padding=True, padding_side="left", return_tensors="pt"))


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def greedy(model, inputs, use_cache=True) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=5, do_sample=False, use_cache=use_cache, pad_token_id=2)


def test_every_decoder_family_has_a_table_entry():
    for family in DECODERS:
        arch = archs.arch_for(getattr(transformers, DECODERS[family][0])())
        assert arch.decoder, family


@pytest.mark.parametrize("family", list(DECODERS))
def test_all_experts_active_reproduces_dense(tiny_decoders, texts_file, family):
    folder = tiny_decoders[family]
    inputs = lm_inputs(folder)
    dense = getattr(transformers, DECODERS[family][2]).from_pretrained(folder).eval()
    expected = logits(dense, inputs)

    conversion = densetomoe.convert(quick_recipe(folder, texts_file, top_k=4), show_progress=False)
    assert type(conversion.model).__name__ == DECODERS[family][2]
    assert sum(isinstance(m, densetomoe.MoEFeedForward) for m in conversion.model.modules()) == 2
    torch.testing.assert_close(logits(conversion.model, inputs), expected, rtol=1e-4, atol=1e-5)

    # the test can fail: with one expert of four the same model computes something else
    densetomoe.set_top_k(conversion.model, 1)
    assert not torch.allclose(logits(conversion.model, inputs), expected, rtol=1e-3, atol=1e-3)
    q = conversion.report
    assert q.dense_perplexity is not None and q.perplexity is not None and q.head_agreement is not None


@pytest.mark.parametrize("family", slow_except("llama", list(DECODERS)))
def test_export_reloads_and_generates_without_densetomoe(tiny_decoders, texts_file, tmp_path, family):
    folder, out = tiny_decoders[family], tmp_path / "moe"
    conversion = densetomoe.convert(quick_recipe(folder, texts_file, top_k=2), out=out, show_progress=False)
    model, inputs = conversion.model, lm_inputs(folder)
    expected, tokens = logits(model, inputs), greedy(model, inputs)
    assert torch.equal(greedy(model, inputs, use_cache=False), tokens)  # the KV cache changes nothing
    torch.save({"inputs": inputs, "logits": expected, "tokens": tokens}, tmp_path / "case.pt")

    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == f"modeling_densetomoe.MoE{DECODERS[family][2]}"
    assert (out / "generation_config.json").is_file()
    assert config["densetomoe"]["coverage"].keys() == config["densetomoe"]["top_k"].keys()  # dynamic top-k, the default
    tied = bool(getattr(model.config, "tie_word_embeddings", False))

    stdout = run_without_densetomoe(f"""
import torch, transformers
case = torch.load({str(tmp_path / "case.pt")!r})
model = transformers.AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True).eval()
with torch.no_grad():
    torch.testing.assert_close(model(**case["inputs"]).logits, case["logits"], rtol=1e-4, atol=1e-5)
    tokens = model.generate(**case["inputs"], max_new_tokens=5, do_sample=False, use_cache=True, pad_token_id=2)
assert torch.equal(tokens, case["tokens"])
if {tied}:
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
print("reloaded", type(model).__name__)
""")
    assert f"reloaded MoE{DECODERS[family][2]}" in stdout


def test_gguf_without_the_gguf_package_says_how_to_install(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from densetomoe.cli import app
    from densetomoe.stages import load

    monkeypatch.chdir(tmp_path)  # where the default output folder, ./model.Q4_1-moe-8x2, would go
    path = tmp_path / "model.Q4_1.gguf"
    path.write_bytes(b"GGUF")
    real = load.importlib.util.find_spec
    monkeypatch.setattr(load.importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    result = CliRunner().invoke(app, ["convert", str(path), "--no-progress"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "pip install 'densetomoe[gguf]'" in " ".join(result.output.split())
    assert list(tmp_path.iterdir()) == [path]  # no output folder, default or partial


def test_missing_gguf_file_is_a_usage_error(tmp_path):
    with pytest.raises(densetomoe.UsageError, match="no such file"):
        densetomoe.convert(densetomoe.Recipe.build(model=str(tmp_path / "absent.gguf")), show_progress=False)


def test_conversion_keeps_the_requested_dtype(tiny_decoders, texts_file):
    folder = tiny_decoders["qwen3"]
    conversion = densetomoe.convert(quick_recipe(folder, texts_file, top_k=4, dtype="bfloat16"), show_progress=False)
    assert {p.dtype for p in conversion.model.parameters()} == {torch.bfloat16}
    dense = transformers.Qwen3ForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    inputs = lm_inputs(folder)
    # bfloat16 sums the regrouped neurons in another order: equal up to bfloat16 rounding
    torch.testing.assert_close(logits(conversion.model, inputs), logits(dense, inputs), rtol=0.05, atol=0.05)

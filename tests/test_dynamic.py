"""Dynamic top-k through the pipeline: the default for decoders, refused where engines need a fixed top-k,
recorded in the folder, and measured by ``eval`` (the module's math is in test_moe)."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from typer.testing import CliRunner

import densetomoe
from conftest import quick_recipe
from densetomoe import defaults, moe
from densetomoe.cli import app
from densetomoe.evaluation import report as reports
from densetomoe.evaluation.command import Settings, evaluate


def decided(model, texts_file, **settings):
    return defaults.with_model_defaults(densetomoe.Recipe.build(model=str(model), calib=str(texts_file), **settings))


def test_decoders_route_dynamically_by_default_except_for_native_and_encoders(tiny_decoders, tiny_models, texts_file):
    lm = tiny_decoders["llama"]
    assert decided(lm, texts_file).routing == "dynamic"
    assert decided(lm, texts_file, ffn_budget=0.5).routing == "dynamic"
    assert decided(lm, texts_file, routing="top-k").routing == "top-k"  # what a recipe names is kept
    assert decided(lm, texts_file, format="native").routing == "top-k"
    assert decided(tiny_models["BertModel"], texts_file).routing == "top-k"
    with pytest.raises(densetomoe.UsageError, match="format native takes routing top-k"):
        densetomoe.Recipe.build(model=str(lm), format="native", routing="dynamic")


def test_a_dynamic_folder_records_its_coverage_and_reloads_it(tiny_decoders, texts_file, tmp_path):
    out = tmp_path / "lm"
    conversion = densetomoe.convert(quick_recipe(tiny_decoders["llama"], texts_file, refit=False), out=out, show_progress=False)
    layers = moe.moe_modules(conversion.model)
    assert all(0 < m.coverage < 1 and m.top_k == 2 for m in layers.values())
    config = json.loads((out / "config.json").read_text())
    assert config[moe.CONFIG_KEY]["coverage"] == {str(i): m.coverage for i, m in layers.items()}
    assert config["num_experts_per_tok"] == 2  # the mean the coverage was set for
    assert "dynamic top-k" in (out / "README.md").read_text()
    assert "routing: dynamic" in (out / "densetomoe_recipe.yaml").read_text()

    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert [m.coverage for m in moe.moe_modules(reloaded).values()] == [m.coverage for m in layers.values()]
    ids = torch.randint(200, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, conversion.model(ids).logits, rtol=1e-4, atol=1e-5)

    # a top-k given at load time is a fixed top-k in every layer
    fixed = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, num_experts_per_tok=3)
    assert all(m.coverage == 0 and m.top_k == 3 for m in moe.moe_modules(fixed).values())


def test_a_ramp_without_a_soft_boundary_is_refused_in_one_line(tiny_decoders, tmp_path):
    (tmp_path / "recipe.yaml").write_text("ramp: 0.2\n")
    result = CliRunner().invoke(app, ["convert", str(tiny_decoders["llama"]), "--recipe", str(tmp_path / "recipe.yaml"), "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "give routing dynamic-soft" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "x").exists()


def test_a_soft_boundary_is_recorded_in_the_folder_and_reloaded(tiny_decoders, texts_file, tmp_path):
    out = tmp_path / "lm"
    conversion = densetomoe.convert(quick_recipe(tiny_decoders["llama"], texts_file, routing="dynamic-soft", ramp=0.2), out=out, show_progress=False)
    layers = moe.moe_modules(conversion.model)
    assert all(m.ramp == 0.2 and 0 < m.coverage < 1 for m in layers.values())
    assert json.loads((out / "config.json").read_text())[moe.CONFIG_KEY]["ramp"] == 0.2
    assert "soft boundary, ramp 0.2" in (out / "README.md").read_text()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert all(m.ramp == 0.2 for m in moe.moe_modules(reloaded).values())
    ids = torch.randint(200, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, conversion.model(ids).logits, rtol=1e-4, atol=1e-5)
        weights = moe.moe_modules(reloaded)[0].selection(torch.randn(64, reloaded.config.hidden_size))
    assert ((weights > 0) & (weights < 1)).any()  # some tokens took experts in part


def test_eval_measures_the_experts_per_token_and_restores_the_dynamic_routing(tiny_decoders, texts_file, tmp_path):
    out = tmp_path / "lm"
    densetomoe.convert(quick_recipe(tiny_decoders["llama"], texts_file), out=out, show_progress=False)
    suite = tmp_path / "ppl.yaml"
    suite.write_text(f"name: ppl\ntask: perplexity\ndata: {{file: {texts_file}}}\nwindow: 32\nstride: 16\nmax_tokens: 200\n")
    # top-1 runs first, as a fixed top-1 everywhere; the folder's own top-k (2) then gets its dynamic routing back
    report = evaluate(out, Settings(top_ks=[1, 2], suites=[str(suite)], speed=False, seq_len=32), show_progress=False)
    assert [e["top_k"] for e in report["sweep"]] == [1, 2] and report["converted_top_k"] == 2
    measured = [layer["experts_per_token"] for layer in report["routing"]["layers"]]  # recorded at the folder's own
    assert all(1 <= m <= 4 for m in measured) and any(m != int(m) for m in measured)  # a varying count, around 2
    md = reports.write(report, tmp_path / "eval") / "report.md"
    assert "Experts per token, measured (dynamic top-k)" in md.read_text()


def test_native_export_of_a_dynamic_folder_is_refused_in_one_line(tiny_decoders, texts_file, tmp_path):
    from typer.testing import CliRunner

    from densetomoe.cli import app

    result = CliRunner().invoke(app, ["convert", str(tiny_decoders["llama"]), "--calib", str(texts_file), "--format", "native",
                                      "--routing", "dynamic", "--out", str(tmp_path / "n"), "--no-progress"])  # fmt: skip
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "routing top-k" in " ".join(result.output.split())
    assert not (tmp_path / "n").exists()


def test_a_decoder_budget_converts_at_a_mean_top_k_in_every_layer(tiny_decoders, texts_file):
    lines = []
    settings = dict(calib=str(texts_file), calib_tokens=1024, sample_tokens=512, router_steps=30, router_hidden=16)
    recipe = densetomoe.Recipe.build(model=str(tiny_decoders["llama"]), ffn_budget=0.5, **settings)  # FFN 64: 64 experts
    conversion = densetomoe.convert(recipe, show_progress=False, log=lines.append)
    assert "top-32 in every layer on average (dynamic top-k)" in lines
    assert all(m.num_experts == 64 and m.top_k == 32 and m.coverage > 0 for m in moe.moe_modules(conversion.model).values())

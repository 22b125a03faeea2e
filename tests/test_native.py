"""--format native: decoders written as standard transformers MoE checkpoints (qwen2_moe, qwen3_moe)
that load without remote code, equal the dense model with every expert active, and refuse what the
target cannot hold with one line."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from typer.testing import CliRunner

import densetomoe
from conftest import DECODERS, quick_recipe, run_without_densetomoe, slow_except
from densetomoe.cli import app
from densetomoe.formats import qwen_moe as native
from densetomoe.stages.refit import NormalEquations, relative_error

NATIVE = {"llama": "qwen2_moe", "mistral": "qwen2_moe", "qwen2": "qwen2_moe", "qwen3": "qwen3_moe"}
PROMPTS = ["The river floods every spring because", "Markets fell sharply on Monday after"]


def lm_inputs(folder) -> dict:
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    return dict(tokenizer(PROMPTS, padding=True, padding_side="left", return_tensors="pt"))


def dense_logits(folder, family, inputs) -> torch.Tensor:
    dense = getattr(transformers, DECODERS[family][2]).from_pretrained(folder).eval()
    with torch.no_grad():
        return dense(**inputs).logits


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("family", slow_except("llama", list(NATIVE)))
def test_native_folder_equals_dense_with_every_expert_active(tiny_decoders, texts_file, tmp_path, family):
    folder, out = tiny_decoders[family], tmp_path / "native"
    inputs = lm_inputs(folder)
    torch.save({"inputs": inputs, "logits": dense_logits(folder, family, inputs)}, tmp_path / "case.pt")
    densetomoe.convert(quick_recipe(folder, texts_file, top_k=4, format="native"), out=out, show_progress=False)

    assert "auto_map" not in json.loads((out / "config.json").read_text())
    config = transformers.AutoConfig.from_pretrained(out)
    assert config.model_type == NATIVE[family]
    assert config.num_experts == 4 and config.num_experts_per_tok == 4 and config.mlp_only_layers == []
    assert not list(out.glob("*.py"))
    figures = json.loads((out / "densetomoe_conversion.json").read_text())
    assert figures["format"] == "native" and figures["native"]["target"] == NATIVE[family]

    stdout = run_without_densetomoe(f"""
import torch, transformers
case = torch.load({str(tmp_path / "case.pt")!r})
model = transformers.AutoModelForCausalLM.from_pretrained({str(out)!r}).eval()  # no trust_remote_code
with torch.no_grad():
    got = model(**case["inputs"]).logits
    tokens = model.generate(**case["inputs"], max_new_tokens=4, do_sample=False, pad_token_id=2)
print(type(model).__name__, float((got - case["logits"]).norm() / case["logits"].norm()))
""")
    name, error = stdout.split()
    assert name == {"qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}[NATIVE[family]]
    assert float(error) < 1e-3


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_native_top_2_differs_from_dense_and_refit_lowers_the_error(tiny_decoders, texts_file, tmp_path, family):
    folder = tiny_decoders[family]
    conversion = densetomoe.convert(quick_recipe(folder, texts_file, top_k=2, format="native"), out=tmp_path / "o", show_progress=False)
    inputs = lm_inputs(folder)
    with torch.no_grad():
        got = conversion.model(**inputs).logits
    assert rel(got, dense_logits(folder, family, inputs)) > 1e-2  # the equality above can fail
    assert conversion.details.refit_error_after < conversion.details.refit_error_before
    assert conversion.model.config.num_experts_per_tok == 2
    assert densetomoe.load(tmp_path / "o", top_k=3).config.num_experts_per_tok == 3


def test_native_keeps_dense_layers_as_mlp_only_and_shared_experts(tiny_decoders, texts_file, tmp_path):
    folder, out = tiny_decoders["llama"], tmp_path / "native"
    recipe = quick_recipe(folder, texts_file, experts=3, shared_experts=1, top_k=3, layers=[1], format="native")
    conversion = densetomoe.convert(recipe, out=out, show_progress=False)
    config = json.loads((out / "config.json").read_text())
    assert config["mlp_only_layers"] == [0] and config["shared_expert_intermediate_size"] == 16
    assert not conversion.details.llama_cpp  # llama.cpp's qwen2moe makes every layer MoE
    assert "llama.cpp cannot run this folder" in (out / "README.md").read_text()
    inputs = lm_inputs(folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert rel(model(**inputs).logits, dense_logits(folder, "llama", inputs)) < 1e-3


@pytest.mark.parametrize("family", ["gpt2", "gemma", "phi3"])
def test_native_refuses_families_without_a_native_target(tiny_decoders, tmp_path, family):
    result = CliRunner().invoke(
        app, ["convert", str(tiny_decoders[family]), "--format", "native", "--out", str(tmp_path / "o"), "--no-progress"]
    )
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "no native MoE model type" in " ".join(result.output.split())
    assert not (tmp_path / "o").exists()


def test_native_refuses_an_encoder(tiny_models, tmp_path):
    result = CliRunner().invoke(
        app, ["convert", str(tiny_models["BertModel"]), "--format", "native", "--out", str(tmp_path / "o"), "--no-progress"]
    )
    assert result.exit_code == 2 and "no native MoE model type" in " ".join(result.output.split())


def test_native_refuses_an_mlp_router_and_mixed_top_k():
    with pytest.raises(densetomoe.UsageError, match="linear router"):
        densetomoe.Recipe.build(model="m", format="native", router="mlp")
    assert densetomoe.Recipe.build(model="m", format="native").router == "linear"
    assert densetomoe.Recipe.build(model="m").router == "mlp"
    with pytest.raises(densetomoe.UsageError, match="float16"):
        densetomoe.Recipe.build(model="m", format="native", dtype="float16")
    qwen2_moe = native.TARGETS[0]
    assert native.check_plan({0: None, 1: 2, 2: 2}, 8, qwen2_moe) == 2
    with pytest.raises(densetomoe.UsageError, match="one top-k"):
        native.check_plan({0: 2, 1: 4}, 8, qwen2_moe)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_native_refuses_more_experts_per_token_than_llama_cpp_loads(tiny_decoders, tmp_path, family, monkeypatch):
    """Past the engine's limit llama.cpp aborts at load (tests/test_llamacpp.py pins the limit): the
    export refuses first, in one line, before any weights or text are read."""
    target = native.target_for(transformers.AutoConfig.from_pretrained(tiny_decoders[family]))
    limit = target.llama_cpp_top_k
    monkeypatch.setattr(densetomoe.pipeline.Dense, "load", lambda *a, **k: pytest.fail("the weights were loaded"))
    args = ["convert", str(tiny_decoders[family]), "--format", "native", "--experts", "64", "--out", str(tmp_path / "o"), "--no-progress"]
    result = CliRunner().invoke(app, [*args, "--top-k", str(limit + 1)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    message = " ".join(result.output.split())
    assert f"llama.cpp aborts at load on a {target.model_type} with more than {limit} experts per token" in message
    assert f"use --top-k {limit} or less" in message and not (tmp_path / "o").exists()
    # a plan that an FFN budget makes is checked too, once it is known
    with pytest.raises(densetomoe.UsageError, match=f"more than {limit} experts per token"):
        native.check_plan({0: limit + 1, 1: None}, 64, target)
    assert native.check_plan({0: limit, 1: None}, 64, target) == limit


def test_a_one_expert_folder_is_the_dense_family_pruned_to_the_expert_width(tiny_decoders, texts_file, tmp_path):
    """``--experts 1 --top-k 1 --prune P``: the FFN width-pruned and refit; as the LLaMA it came from
    (qwen2_moe's q/k/v biases are zeros) it computes the same."""
    folder = tiny_decoders["llama"]
    recipe = quick_recipe(folder, texts_file, experts=1, top_k=1, prune=0.5, format="native")
    densetomoe.convert(recipe, out=tmp_path / "pruned", show_progress=False)
    moe = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    dense = native.dense_equivalent(moe)
    assert dense.config.model_type == "llama" and dense.config.intermediate_size == moe.config.moe_intermediate_size == 32
    dense.save_pretrained(tmp_path / "dense")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dense").eval()
    assert type(reloaded).__name__ == "LlamaForCausalLM"
    inputs = lm_inputs(folder)
    with torch.no_grad():
        want = moe(**inputs).logits
        assert rel(reloaded(**inputs).logits, want) < 1e-6
        assert rel(want, dense_logits(folder, "llama", inputs)) > 1e-2  # half the neurons are gone
    two = transformers.Qwen2MoeConfig(
        num_experts=2, num_hidden_layers=1, hidden_size=16, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=32, moe_intermediate_size=8, shared_expert_intermediate_size=8, vocab_size=64,
    )  # fmt: skip
    with pytest.raises(densetomoe.UsageError, match="only a native MoE of one expert"):
        native.dense_equivalent(transformers.AutoModelForCausalLM.from_config(two))


def ridge_fit(z: torch.Tensor, y: torch.Tensor, initial: torch.Tensor, ridge: float) -> torch.Tensor:
    equations = NormalEquations(z.shape[1], y.shape[1])
    equations.add(z, y)
    return equations.solve(initial, ridge)


def test_the_refit_solves_an_exact_system_and_pulls_towards_the_initial_weights():
    torch.manual_seed(0)
    z, w = torch.randn(512, 24), torch.randn(6, 24)
    y = z @ w.T
    assert relative_error(z @ ridge_fit(z, y, torch.zeros_like(w), ridge=1e-9).T, y) < 1e-6
    # with a huge ridge the answer is the initial weights
    initial = torch.randn(6, 24)
    assert torch.allclose(ridge_fit(z, y, initial, ridge=1e9), initial, atol=1e-4)


def test_the_float32_normal_equations_solve_as_float64_would():
    # correlated, unevenly scaled features, as gated activations are; a float64 solve is the reference
    torch.manual_seed(0)
    x = torch.randn(2048, 32) * torch.rand(32) * 3
    z = torch.nn.functional.silu(x @ torch.randn(32, 256)) * (x @ torch.randn(32, 256))
    y, initial = torch.randn(2048, 8), torch.randn(8, 256) * 0.1
    gram = z.double().T @ z.double()
    lam = 0.1 * float(gram.diagonal().mean())
    reference = torch.linalg.solve(gram + lam * torch.eye(256, dtype=torch.float64), z.double().T @ y.double() + lam * initial.double().T).T
    fitted = ridge_fit(z, y, initial, ridge=0.1)
    assert float((fitted.double() - reference).norm() / reference.norm()) < 1e-5


def test_normal_equations_give_the_errors_of_the_fit_from_their_sums_alone():
    torch.manual_seed(0)
    z, y = torch.randn(700, 40), torch.randn(700, 6)
    initial = torch.randn(6, 40)
    equations = NormalEquations(40, 6)
    for part_z, part_y in zip(z.split(128), y.split(128)):  # chunks, as a layer's tokens come
        equations.add(part_z, part_y)
    assert equations.error(initial) == pytest.approx(relative_error(z @ initial.T, y), rel=1e-6)
    fitted = equations.solve(initial, ridge=0.1)  # the Gram matrix now holds its Cholesky factor
    assert equations.error(fitted) == pytest.approx(relative_error(z @ fitted.T, y), rel=1e-6)
    assert equations.error(initial) == pytest.approx(relative_error(z @ initial.T, y), rel=1e-6)
    assert equations.error(fitted) < equations.error(initial)
    with pytest.raises(RuntimeError, match="solved"):
        equations.add(z, y)


def test_router_scale_keeps_the_ranking_and_flattens_the_softmax():
    logits = torch.randn(64, 8) * 5
    for spread, rtol in ((native.ROUTER_SPREAD, 0.02), (native.ALL_EXPERTS_SPREAD, 1e-4)):
        alpha = native.router_scale(logits, spread)
        assert alpha > 0 and torch.equal((alpha * logits).topk(2).indices, logits.topk(2).indices)
        weights = native.routing_weights(alpha * logits, 8, renormalise=False)
        assert torch.allclose(weights, torch.full_like(weights, 1 / 8), rtol=rtol)


def test_the_float32_softmax_still_ranks_close_experts_at_the_router_spread():
    """Engines rank experts by the float32 softmax of the scaled logits. Two experts 0.01% of the
    spread apart stay apart at ROUTER_SPREAD; at 2^-14 they become a tie, which engines break each
    their own way (issue 9's llama.cpp/transformers mismatch)."""
    logits = torch.tensor([[0.0, 1.0, 0.9999, 0.5, 0.2, 0.1, 0.05, 0.3]])  # experts 1 and 2: 0.01% apart
    def softmax_ranking(spread):
        probs = (native.router_scale(logits, spread) * logits).float().softmax(-1)
        return probs[0, 1] > probs[0, 2]
    assert softmax_ranking(native.ROUTER_SPREAD)
    assert not softmax_ranking(2.0**-14)


def test_distilling_a_native_folder_trains_its_experts_and_keeps_it_native(tiny_decoders, texts_file, tmp_path):
    folder, out = tiny_decoders["llama"], tmp_path / "native"
    densetomoe.convert(quick_recipe(folder, texts_file, top_k=2, format="native"), out=out, show_progress=False)
    before = transformers.AutoModelForCausalLM.from_pretrained(out)
    result = CliRunner().invoke(app, ["distill", str(out), "--steps", "3", "--batch-size", "4", "--no-progress"])
    assert result.exit_code == 0, result.output
    after = transformers.AutoModelForCausalLM.from_pretrained(out)  # still a plain qwen2_moe folder
    assert type(after).__name__ == "Qwen2MoeForCausalLM" and not list(out.glob("*.py"))
    block, trained = before.model.layers[0].mlp, after.model.layers[0].mlp
    assert not torch.equal(block.experts.down_proj, trained.experts.down_proj)  # the experts learned
    assert torch.equal(block.gate.weight, trained.gate.weight)  # the scaled router stays as it was
    figures = json.loads((out / "densetomoe_conversion.json").read_text())
    assert figures["format"] == "native" and figures["distillation"]["step"] == 3
    assert figures["quick_eval"]["active_ffn_share"] == pytest.approx(0.5)


def test_learning_gates_train_each_router_at_its_own_scale_and_keep_the_shared_gate(tiny_decoders, texts_file, tmp_path):
    """``gates: learn``: the routers learn, each moved about ``lr x rms(router) / rms(experts)`` a step
    (AdamW's first step moves every weight by its rate), so the conversion's ranking survives the
    first steps; the shared expert's constant gate stays as it was."""
    folder, out = tiny_decoders["llama"], tmp_path / "native"
    densetomoe.convert(quick_recipe(folder, texts_file, experts=3, top_k=2, format="native", shared_experts=1), out=out, show_progress=False)
    before = transformers.AutoModelForCausalLM.from_pretrained(out)
    args = ["distill", str(out), "--steps", "1", "--batch-size", "4", "--lr", "1e-3", "--gates", "learn", "--no-progress"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    after = transformers.AutoModelForCausalLM.from_pretrained(out)
    for old, new in zip(before.model.layers, after.model.layers):
        gate, moved = old.mlp.gate.weight.detach(), (new.mlp.gate.weight - old.mlp.gate.weight).detach().abs()
        rate = 1e-3 * float(gate.pow(2).mean().sqrt() / old.mlp.experts.gate_up_proj.detach().pow(2).mean().sqrt())
        first = rate / 21  # the first step is 1/21 of the way into the default 20-step warm-up
        assert float(moved.max()) == pytest.approx(first, rel=0.01)  # it learned, at its own rate
        assert rate < 1e-3 * 1e-2  # a scaled router: an ordinary step would have moved it 100x more
        assert torch.equal(old.mlp.shared_expert_gate.weight, new.mlp.shared_expert_gate.weight)


def test_routers_train_in_float32_under_bfloat16_autocast(tiny_decoders, texts_file):
    """Distillation routes as the engines do, in float32, also under bfloat16 autocast: a bfloat16 router
    picks other experts for some tokens of a converted model's near-uniform logits (about 0.2% here, on
random inputs)."""
    from densetomoe.stages.distill.gates import engine_routing

    model = densetomoe.convert(quick_recipe(tiny_decoders["llama"], texts_file, top_k=2, format="native"), show_progress=False).model
    gate = model.model.layers[0].mlp.gate
    x = torch.randn(4096, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    exact = native.routing_weights(x @ gate.weight.T, 2, False).topk(2).indices.sort(-1).values
    def chosen():
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            return gate(x)[2].sort(-1).values
    assert (chosen() != exact).any(-1).sum() > 0  # transformers' own router under autocast
    with engine_routing(model):
        assert torch.equal(chosen(), exact)
    assert (chosen() != exact).any(-1).sum() > 0  # and the router is itself again afterwards


@pytest.mark.slow  # a conversion, then eval's sweep and timings: about 4 s
def test_eval_measures_a_native_folder(tiny_decoders, texts_file, tmp_path):
    out = tmp_path / "native"
    densetomoe.convert(quick_recipe(tiny_decoders["qwen2"], texts_file, top_k=2, format="native"), out=out, show_progress=False)
    result = CliRunner().invoke(app, ["eval", str(out), "--top-k", "2,4", "--no-speed", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "top-2/4" in result.output and "top-4/4" in result.output
    report = json.loads((out / "eval" / "report.json").read_text())
    assert report["format"] == "native" and "llama_cpp" not in report
    full = report["sweep"][1]["fidelity"]
    assert full["pooled_cosine"] > report["sweep"][0]["fidelity"]["pooled_cosine"]  # every expert: closer to dense


def test_distill_with_format_native_turns_a_remote_code_folder_native(tiny_decoders, texts_file, tmp_path):
    folder, remote, out = tiny_decoders["qwen2"], tmp_path / "remote", tmp_path / "native"
    densetomoe.convert(quick_recipe(folder, texts_file, top_k=2, router="linear"), out=remote, show_progress=False)
    args = ["distill", str(remote), "--format", "native", "--steps", "2", "--batch-size", "4", "--out", str(out), "--no-progress"]
    dynamic = CliRunner().invoke(app, args)  # a decoder's default: a varying number of experts per token
    assert dynamic.exit_code == 2 and "convert with --routing top-k" in " ".join(dynamic.output.split())
    assert not out.exists()
    recipe = quick_recipe(folder, texts_file, top_k=2, router="linear", routing="top-k")
    densetomoe.convert(recipe, out=remote, overwrite=True, show_progress=False)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert transformers.AutoConfig.from_pretrained(out).model_type == "qwen2_moe" and not list(out.glob("*.py"))
    assert json.loads((out / "densetomoe_conversion.json").read_text())["native"]["target"] == "qwen2_moe"
    # and back is refused with one line
    back = CliRunner().invoke(app, ["distill", str(out), "--format", "remote-code", "--steps", "1", "--no-progress"])
    assert back.exit_code == 2 and "cannot become remote code" in " ".join(back.output.split())


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_transformers_native_block_computes_the_weighting_the_refit_assumed(tiny_decoders, texts_file, tmp_path, family):
    """The refit is solved for native.routing_weights (renormalised or not, per target); the block
    transformers builds from the folder must weight its experts the same way."""
    folder = tiny_decoders[family]
    model = densetomoe.convert(quick_recipe(folder, texts_file, top_k=2, format="native"), show_progress=False).model
    target = native.target_for(transformers.AutoConfig.from_pretrained(folder))
    block = model.model.layers[0].mlp
    x = torch.randn(16, model.config.hidden_size)
    with torch.no_grad():
        coef = native.routing_weights(x @ block.gate.weight.T, 2, target.renormalises)  # (tokens, experts)
        expected = torch.zeros_like(x)
        for e in range(model.config.num_experts):
            gate, up = (x @ block.experts.gate_up_proj[e].T).chunk(2, dim=-1)
            expected += coef[:, e : e + 1] * ((torch.nn.functional.silu(gate) * up) @ block.experts.down_proj[e].T)
        if target.shared_expert:
            expected += torch.sigmoid(block.shared_expert_gate(x)) * block.shared_expert(x)
        torch.testing.assert_close(block(x.unsqueeze(0)).squeeze(0), expected, rtol=1e-4, atol=1e-5)

"""llama.cpp serves what densetomoe writes: a dense LLaMA-family folder (the real SmolLM2-135M-Instruct)
and a ``--format native`` qwen2_moe folder, converted to GGUF by llama.cpp's own converter and run by
llama-cpp-python, agree with transformers on the same folder.

Needs ``make llamacpp`` (``make test`` runs it first); skipped with the reason otherwise.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers

import densetomoe
from conftest import quick_recipe, save_tiny_decoder
from densetomoe import data, llamacpp
from densetomoe.evaluation import metrics
from densetomoe.formats import qwen_moe as native
from densetomoe.stages import load

pytestmark = [pytest.mark.slow, pytest.mark.skipif(llamacpp.missing() is not None, reason=f"llama.cpp: {llamacpp.missing()}")]

CHAT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
TEXT = "The history of the Roman Empire"
AGREE = 16  # greedy tokens that llama.cpp and transformers must agree on


def greedy(model, ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), max_new_tokens=n, do_sample=False)
    return out[0, len(ids) :].tolist()


@pytest.fixture(scope="module")
def smollm_folder(smollm, tmp_path_factory):
    """SmolLM2-135M-Instruct as a plain float32 Hugging Face folder (the Q4_1 GGUF, dequantized)."""
    folder = tmp_path_factory.mktemp("smollm_dense")
    source = load.resolve(str(smollm))
    model, tokenizer = load.load_model(source, load.load_config(source), causal_lm=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_llama(lm_tokenizer, tmp_path_factory):
    """The tiny LLaMA of the decoder tests with SmolLM2's tokenizer instead of the one trained in code:
    llama.cpp's converter accepts only the BPE pre-tokenizers it knows (by a hash of what they output)."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(lm_tokenizer)
    return save_tiny_decoder("llama", tmp_path_factory.mktemp("tiny_llama"), tokenizer)


def test_dense_smollm_answers_and_agrees_with_transformers(smollm_folder, tmp_path):
    gguf = llamacpp.to_gguf(smollm_folder, tmp_path / "dense.gguf", "f32")
    llm = llamacpp.load(gguf)
    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm_folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm_folder).eval()

    chat = tokenizer(CHAT)["input_ids"]
    # the converter recognised the tokenizer's pre-tokenizer (SmolLM's): both tokenize the same way
    assert llm.tokenize(CHAT.encode(), add_bos=False, special=True) == chat
    answer = llamacpp.generate(llm, chat, 16, stop={tokenizer.eos_token_id})
    assert "Paris" in tokenizer.decode(answer)
    assert answer == greedy(model, chat, 16)[: len(answer)]

    text = tokenizer(TEXT)["input_ids"]
    assert llamacpp.generate(llm, text, AGREE) == greedy(model, text, AGREE)

    timing = llamacpp.time_decode(llm, chat, new_tokens=8)
    assert timing.new_tokens == 8 and timing.tokens_per_s > 0 and 0 < timing.engine_decode_s <= timing.decode_s


@pytest.mark.parametrize("top_k", [2, 4])
def test_native_moe_agrees_with_transformers(tiny_llama, texts_file, tmp_path, top_k):
    """A tiny LLaMA (tied embeddings: llama.cpp's qwen2moe needs an output.weight of its own) converted
    with ``--format native`` to 4 experts; at top-4 of 4 it is still the dense model."""
    recipe = quick_recipe(tiny_llama, texts_file, top_k=top_k, format="native")
    densetomoe.convert(recipe, out=tmp_path / "moe", show_progress=False)
    moe = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "moe").eval()
    assert type(moe).__name__ == "Qwen2MoeForCausalLM"
    llm = llamacpp.load(llamacpp.to_gguf(tmp_path / "moe", tmp_path / "moe.gguf", "f32"), n_ctx=256, logits_all=True)

    ids = transformers.AutoTokenizer.from_pretrained(tmp_path / "moe")(TEXT)["input_ids"]
    assert llamacpp.generate(llm, ids, AGREE) == greedy(moe, ids, AGREE)
    llm.reset()
    llm.eval(ids)
    with torch.no_grad():
        expected = moe(torch.tensor([ids])).logits[0].numpy()  # (tokens, vocab)
    np.testing.assert_allclose(llm.scores[: len(ids)], expected, atol=0.02 * np.abs(expected).max())
    if top_k == recipe.experts:
        dense = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
        with torch.no_grad():
            np.testing.assert_allclose(expected, dense(torch.tensor([ids])).logits[0].numpy(), atol=1e-3)


def test_a_recovered_native_folder_serves_in_llama_cpp_the_perplexity_transformers_measures(tiny_llama, texts_file, tmp_path):
    """Native recovery trains under the engines' own routing math (softmax-weighted top-k, nothing from
    the unselected experts): at top-k == experts it starts from the dense model exactly, and a folder
    recovered at top-2 of 4 loads in plain transformers and in llama.cpp with the same perplexity."""
    losses_only = dict(steps=3, batch_size=2, seq_len=32, eval_texts=4, eval_every=1, router_loss=0.0, balance_loss=0.0)
    every = quick_recipe(tiny_llama, texts_file, top_k=4, format="native", distill=losses_only)
    exact = densetomoe.convert(every, out=tmp_path / "every", show_progress=False)
    assert exact.history.held_out[0]["step"] == 0 and exact.history.held_out[0]["loss"] < 1e-6

    recipe = quick_recipe(tiny_llama, texts_file, top_k=2, format="native", distill=dict(losses_only, steps=8, lr=1e-3))
    recovered = densetomoe.convert(recipe, out=tmp_path / "moe", show_progress=False)
    assert recovered.history.held_out[-1]["loss"] < recovered.history.held_out[0]["loss"]  # it did train
    moe = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "moe").eval()  # no remote code
    assert type(moe).__name__ == "Qwen2MoeForCausalLM"
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "moe")
    texts = data.heldout_corpus()
    gguf = llamacpp.to_gguf(tmp_path / "moe", tmp_path / "moe.f16.gguf", "f16")
    served = metrics.perplexity(llamacpp.scorer(llamacpp.load(gguf, n_ctx=128, logits_all=True)), tokenizer, texts, 128, 64, max_tokens=1024)
    measured = metrics.perplexity(moe, tokenizer, texts, 128, 64, max_tokens=1024)
    assert served.tokens == measured.tokens
    assert abs(np.log(served.value) - np.log(measured.value)) < 0.03 * np.log(measured.value)


def test_to_gguf_names_what_is_missing(monkeypatch, tmp_path):
    monkeypatch.setenv(llamacpp.CONVERTER_ENV, str(tmp_path))
    with pytest.raises(densetomoe.UsageError, match="convert_hf_to_gguf.py is not in"):
        llamacpp.to_gguf(tmp_path, tmp_path / "x.gguf")
    with pytest.raises(densetomoe.UsageError, match="outtype"):
        llamacpp.to_gguf(tmp_path, tmp_path / "x.gguf", "q4_k")


@pytest.fixture(scope="module")
def smollm_native(smollm, tmp_path_factory):
    """The real SmolLM2-135M-Instruct as a native 8-expert, top-2 qwen2_moe folder, converted quickly
    (4,096 calibration tokens from 48 documents, 12 more held out for the quick check, 20 router
    steps), once for this module."""
    root = tmp_path_factory.mktemp("smollm_native")
    (root / "calib.txt").write_text("\n".join(data.default_corpus()[:48]))
    recipe = densetomoe.Recipe.build(
        model=str(smollm), experts=8, top_k=2, format="native", calib=str(root / "calib.txt"), calib_tokens=4096,
        sample_tokens=2048, router_steps=20,
    )  # fmt: skip
    out = root / "moe"
    densetomoe.convert(recipe, out=out, show_progress=False)
    return out


def test_real_smollm_native_moe_computes_in_llama_cpp_what_transformers_computes(smollm_native, tmp_path):
    """The real SmolLM2-135M-Instruct as a native 8-expert, top-2 qwen2_moe folder, teacher-forced on
    held-out text.

    With llama.cpp's cache in float32 the two engines compute the same function: the logits agree to
    ~5e-6 (median, relative). At the earlier router scaling (2^-14) they differed by 35%: about 1% of
    the routing decisions were float32 ties, which each engine broke its own way. A few tokens still
    differ in argmax: this training-free model (a quick conversion, 20 router steps) routes many
    tokens on a thin margin, so float rounding that any two engines differ by flips some routes
    (1% to 15% of the argmaxes over repeated conversions).

    With the default float16 cache the same thinness makes ~half of the argmaxes differ (within
    transformers, a 1e-4 relative nudge to the embeddings does as much), so what holds there is the
    distribution: the perplexity llama.cpp serves is the one transformers measures."""
    moe = transformers.AutoModelForCausalLM.from_pretrained(smollm_native).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm_native)
    gguf = llamacpp.to_gguf(smollm_native, tmp_path / "moe.gguf", "f32")
    exact = llamacpp.scorer(llamacpp.load(gguf, n_ctx=256, logits_all=True, f32_cache=True))

    errors, agree = [], []
    for text in data.heldout_corpus()[:8]:
        ids = tokenizer(text, return_tensors="pt")["input_ids"][0, :256]
        with torch.no_grad():
            want = moe(ids[None]).logits[0]  # (tokens, vocab)
        got = exact(ids)
        errors += ((got - want).norm(dim=-1) / want.norm(dim=-1)).tolist()
        agree += (got.argmax(-1) == want.argmax(-1)).tolist()
    texts = data.heldout_corpus()
    served = metrics.perplexity(llamacpp.scorer(llamacpp.load(gguf, n_ctx=256, logits_all=True)), tokenizer, texts, 256, 128, max_tokens=2048)
    measured = metrics.perplexity(moe, tokenizer, texts, 256, 128, max_tokens=2048)
    summary = f"median error {np.median(errors):.1e}, argmax agreement {np.mean(agree):.3f}, perplexity {served.value:.0f} vs {measured.value:.0f}"
    assert float(np.median(errors)) < 1e-4, summary
    assert np.mean(agree) > 0.7, summary  # 0.85 to 0.99 over repeated conversions; 0.31 at 2^-14
    assert served.nll == pytest.approx(measured.nll, rel=0.03), summary  # perplexity within ~30% at ~8.5 nats a token


def test_eval_of_the_real_smollm_native_folder_in_llama_cpp(smollm_native, tmp_path):
    """``densetomoe eval NATIVE_DIR --engine llamacpp`` on the real SmolLM2: the report holds the
    perplexity llama.cpp serves for the folder and for the dense model, and the decode speed-up, in
    the same run."""
    from typer.testing import CliRunner

    from densetomoe.cli import app

    (tmp_path / "heldout.txt").write_text("\n".join(data.heldout_corpus()[:32]))  # 32 paragraphs, 4,000 tokens: fidelity reads each
    suite = tmp_path / "heldout.yaml"
    suite.write_text("name: heldout\ntask: perplexity\ndata: {file: heldout.txt}\nwindow: 256\nstride: 128\nmax_tokens: 2048\n")
    args = ["eval", str(smollm_native), "--engine", "llamacpp", "--suite", str(suite), "--no-speed", "--repeats", "2", "--new-tokens", "16"]
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "report"), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "served by llama.cpp" in result.output
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    served = report["llama_cpp"]
    assert report["format"] == "native" and len(report["routing"]["layers"]) == 30
    assert 10 < served["dense"]["perplexity"] < 40  # SmolLM2-135M on Wikipedia
    assert served["perplexity_ratio"] > 1 and served["decode_speedup"] > 0 and served["end_to_end_speedup"] > 0
    transformers_ratio = report["sweep"][0]["quality"]["heldout"]["perplexity"] / report["dense"]["quality"]["heldout"]["perplexity"]
    assert np.log(served["perplexity_ratio"]) == pytest.approx(np.log(transformers_ratio), abs=0.1)


def loads_in_llama_cpp(gguf) -> bool:
    """Whether llama.cpp loads ``gguf`` and evaluates three tokens; in a child process, since a graph
    that does not fit aborts the whole process."""
    code = f"from densetomoe import llamacpp; llamacpp.load({str(gguf)!r}, n_ctx=512).eval([1, 2, 3]); print('evaluated')"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    return run.returncode == 0 and "evaluated" in run.stdout


@pytest.mark.parametrize("model_type", ["qwen2_moe", "qwen3_moe"])
def test_llama_cpp_loads_the_most_experts_per_token_the_native_export_allows_and_no_more(lm_tokenizer, tmp_path, model_type):
    """The engine's limit that the export checks (``Target.llama_cpp_top_k``) is the installed llama.cpp's:
    a 16-layer model at the limit loads, one more expert per token aborts it (it does not depend on depth
    beyond 8 layers: the graph's room and its MoE nodes both grow with the layer count)."""
    target = next(t for t in native.TARGETS if t.model_type == model_type)
    tokenizer = transformers.AutoTokenizer.from_pretrained(lm_tokenizer)
    shape = dict(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=16, num_attention_heads=4,
        num_key_value_heads=2, num_experts=64, moe_intermediate_size=8, tie_word_embeddings=False, max_position_embeddings=512,
    )  # fmt: skip
    if model_type == "qwen2_moe":
        shape.update(shared_expert_intermediate_size=8, norm_topk_prob=False, qkv_bias=True)
    else:
        shape.update(head_dim=8)
    loaded = {}
    for top_k in (target.llama_cpp_top_k, target.llama_cpp_top_k + 1):
        folder = tmp_path / f"top{top_k}"
        config = transformers.AutoConfig.for_model(model_type, num_experts_per_tok=top_k, **shape)
        torch.manual_seed(0)
        transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        loaded[top_k] = loads_in_llama_cpp(llamacpp.to_gguf(folder, tmp_path / f"top{top_k}.gguf", "f16"))
    assert loaded == {target.llama_cpp_top_k: True, target.llama_cpp_top_k + 1: False}

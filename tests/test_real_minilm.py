"""End to end on the real all-MiniLM-L6-v2 and the embedded Wikipedia sample."""

from __future__ import annotations

import pytest
import torch

import densetomoe
from conftest import quick_recipe, run_without_densetomoe, sample_inputs

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def converted(minilm, tmp_path_factory):
    out = tmp_path_factory.mktemp("real") / "minilm-moe"
    recipe = quick_recipe(minilm, experts=8, top_k=2, calib_tokens=8192, sample_tokens=4096, router_steps=200, router_hidden=128)
    return densetomoe.convert(recipe, out=out, show_progress=False)


def test_all_experts_reproduce_the_dense_model_on_real_weights(minilm):
    report = densetomoe.convert(quick_recipe(minilm, experts=8, top_k=8, calib_tokens=2048), show_progress=False).report
    assert report.hidden_rel_error < 1e-4
    assert report.embedding_cosine > 0.99999


def test_top2_of_8_keeps_a_usable_encoder(converted):
    report = converted.report
    assert report.active_ffn_share == 0.25
    assert report.ffn_flops_ratio < 0.32  # 25% of the FFN plus the routers
    assert report.embedding_cosine > 0.65  # measured about 0.75 on held-out Wikipedia paragraphs


def test_real_folder_reloads_in_a_fresh_process(converted, minilm, tmp_path):
    out = converted.out
    for name in ("modules.json", "1_Pooling/config.json", "sentence_bert_config.json"):
        assert (out / name).is_file(), name  # still a sentence-transformers folder
    inputs = sample_inputs(minilm)
    with torch.no_grad():
        expected = converted.model(**inputs).last_hidden_state
    torch.save({"inputs": inputs, "expected": expected}, tmp_path / "case.pt")
    stdout = run_without_densetomoe(f"""
import torch
from transformers import AutoModel
case = torch.load({str(tmp_path / "case.pt")!r})
model = AutoModel.from_pretrained({str(out)!r}, trust_remote_code=True).eval()
with torch.no_grad():
    got = model(**case["inputs"]).last_hidden_state
torch.testing.assert_close(got, case["expected"], rtol=1e-4, atol=1e-5)
print("ok")
""")
    assert stdout.strip() == "ok"


def test_the_card_inherits_the_sources_licence_language_and_library(converted):
    """all-MiniLM-L6-v2's card: apache-2.0, English, sentence-transformers, sentence-similarity."""
    from huggingface_hub import ModelCard

    data = ModelCard((converted.out / "README.md").read_text()).data
    assert (data.license, data.language, data.library_name, data.pipeline_tag) == (
        "apache-2.0", "en", "sentence-transformers", "sentence-similarity"
    )
    assert data.base_model is None  # converted from a folder: no Hub id to name


def test_sentence_transformers_loads_the_converted_folder(converted, minilm):
    """What library_name: sentence-transformers promises: the library loads it, with its pooling and
    normalisation, and embeds as the converted model does."""
    sentence_transformers = pytest.importorskip("sentence_transformers", reason="needs sentence-transformers (make test installs it)")
    texts = ["The river floods every spring.", "Markets fell sharply on Monday."]
    model = sentence_transformers.SentenceTransformer(str(converted.out), trust_remote_code=True, device="cpu")
    got = torch.from_numpy(model.encode(texts))
    inputs = converted.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = converted.model(**inputs).last_hidden_state
    mask = inputs["attention_mask"].unsqueeze(-1).float()
    expected = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)  # mean pooling, then Normalize
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)

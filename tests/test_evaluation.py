"""densetomoe eval: metrics, suites, the report and its figures, on tiny converted models."""

from __future__ import annotations

import errno
import json
import re
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import densetomoe
from conftest import quick_recipe
from densetomoe import UsageError
from densetomoe.evaluation import report as reports
from densetomoe.evaluation import suites
from densetomoe.evaluation.command import Settings, accuracy_f1, evaluate, routing_summary
from densetomoe.evaluation.costs import cost
from densetomoe.evaluation.suites import load_suite


def test_accuracy_and_macro_f1_by_hand():
    predicted, labels = torch.tensor([0, 0, 1, 1, 1]), torch.tensor([0, 1, 1, 1, 0])
    result = accuracy_f1(predicted, labels, 2)
    assert result["accuracy"] == pytest.approx(0.6)
    # class 0: tp 1 fp 1 fn 1 -> F1 0.5; class 1: tp 2 fp 1 fn 1 -> F1 2/3
    assert result["macro_f1"] == pytest.approx((0.5 + 2 / 3) / 2)


def test_routing_summary_even_and_skewed():
    even = routing_summary(torch.tensor([5.0, 5.0, 5.0, 5.0]))
    assert even["imbalance"] == pytest.approx(1.0) and even["entropy"] == pytest.approx(1.0)
    skewed = routing_summary(torch.tensor([20.0, 0.0, 0.0, 0.0]))
    assert skewed["imbalance"] == pytest.approx(4.0) and skewed["entropy"] == pytest.approx(0.0, abs=1e-6)


def test_moe_cost_counts_only_active_experts(tiny_models, texts_file):
    conversion = densetomoe.convert(quick_recipe(tiny_models["BertModel"], texts_file, experts=4, top_k=1), show_progress=False)
    moe = conversion.model
    c1 = cost(moe, 16)
    densetomoe.set_top_k(moe, 4)
    c4 = cost(moe, 16)
    per_layer_ffn = 2 * 32 * 64 * 2  # up and down, hidden 32, FFN 64
    router = 2 * 32 * 16 + 2 * 16 * 4
    unselected_means = 2 * 4 * 32  # (tokens, experts) x (experts, hidden)
    assert c4.ffn_flops == pytest.approx(2 * per_layer_ffn)  # all experts: no router, exactly dense
    assert c1.ffn_flops == pytest.approx(2 * (per_layer_ffn / 4 + router + unselected_means))
    assert c1.params_total == c4.params_total and c1.params_active < c4.params_active


@pytest.fixture
def sentiment_suite(tmp_path):
    rows = ["text,label"] + [f"review {i} was {'great fun' if i % 2 else 'a dull mess'},{'pos' if i % 2 else 'neg'}" for i in range(60)]
    (tmp_path / "data.csv").write_text("\n".join(rows) + "\n")
    path = tmp_path / "toy.yaml"
    path.write_text("name: toy\ntask: classification\ndata: {file: data.csv}\nlabel: label\nlabels: [neg, pos]\nsplit: {modulo: 2, keep: [0, 1]}\n")
    return path


def test_suite_files_are_validated(tmp_path, sentiment_suite):
    suite = load_suite(str(sentiment_suite))
    texts, labels = suite.examples()
    assert len(texts) == 60 and set(labels) == {0, 1}
    (tmp_path / "bad.yaml").write_text("name: x\ntask: translation\ndata: {file: a.txt}\n")
    with pytest.raises(UsageError, match="task"):
        load_suite(str(tmp_path / "bad.yaml"))
    with pytest.raises(UsageError, match="known suites"):
        load_suite("no-such-suite")


def test_suite_names_are_looked_up_in_evals_suites_then_among_the_shipped_ones(tmp_path, monkeypatch):
    own = tmp_path / "evals" / "suites"
    own.mkdir(parents=True)
    (own / "notes.txt").write_text("first note\nsecond note\n")
    for name in ("mine", "wiki-prose"):
        (own / f"{name}.yaml").write_text(f"name: {name}\ntask: embedding\ndata: {{file: notes.txt}}\n")
    monkeypatch.chdir(tmp_path)
    assert load_suite("mine").examples()[0] == ["first note", "second note"]
    assert load_suite("wiki-prose").source == (own / "wiki-prose.yaml").resolve()  # the user's own wins
    assert load_suite("wiki-perplexity").source.parent == Path(suites.__file__).resolve().parent
    with pytest.raises(UsageError) as caught:
        load_suite("no-such-suite")
    message = str(caught.value)
    assert "\n" not in message and all(name in message for name in ("mine", "wiki-perplexity", "rotten-tomatoes-sentiment"))


def test_shipped_suites_read_real_data():
    wiki = load_suite("wiki-prose")
    texts, labels = wiki.examples()
    assert len(texts) == 500 and labels is None
    sentiment = load_suite("rotten-tomatoes-sentiment")
    texts, labels = sentiment.examples()
    assert len(texts) == 2000 and 0.3 < sum(labels) / len(labels) < 0.8


def test_evaluate_sweeps_top_k_and_writes_the_report(tiny_models, texts_file, tmp_path, sentiment_suite):
    out = tmp_path / "moe"
    densetomoe.convert(quick_recipe(tiny_models["BertForSequenceClassification"], texts_file), out=out, show_progress=False)
    settings = Settings(top_ks=[1, 2, 4], suites=[str(sentiment_suite)], repeats=1, batch=2, seq_len=16)
    report = evaluate(out, settings, show_progress=False)

    assert [e["top_k"] for e in report["sweep"]] == [1, 2, 4]
    full = report["sweep"][2]
    assert full["fidelity"]["pooled_cosine"] > 0.9999 and max(full["fidelity"]["layer_rel_error"]) < 1e-4
    assert full["fidelity"]["head_agreement"] == 1.0
    assert full["quality"]["toy"] == pytest.approx(report["dense"]["quality"]["toy"])
    flops = [e["cost"]["flops"] for e in report["sweep"]]
    assert flops[0] < flops[1] < flops[2]
    assert all(e["speed"]["throughput"]["speedup"] > 0 for e in report["sweep"])
    layers = report["routing"]["layers"]
    assert len(layers) == 2 and all(abs(sum(layer["load"]) - 1) < 1e-3 for layer in layers)
    assert any(m["type"] == "accuracy" for m in report["metrics"])

    folder = reports.write(report, tmp_path / "eval")
    assert json.loads((folder / "report.json").read_text())["schema"] == "densetomoe.report/1"
    md = (folder / "report.md").read_text()
    assert "top-2/4" in md and "expert_load.png" in md
    for name in (reports.FIGURE_ROUTING, reports.FIGURE_TRADEOFF):
        assert (folder / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_report_that_cannot_be_written_names_out_and_leaves_nothing(tmp_path, monkeypatch):
    def full(report, staging):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(reports, "_figures", full)
    out = tmp_path / "eval"
    message = f"cannot write --out {re.escape(str(out))}: No space left on device \\(.* free on its filesystem\\)$"
    with pytest.raises(UsageError, match=message):
        reports.write({}, out)
    assert list(tmp_path.iterdir()) == []


def test_eval_command_end_to_end(tiny_models, texts_file, tmp_path, sentiment_suite):
    from densetomoe.cli import app

    out = tmp_path / "moe"
    densetomoe.convert(quick_recipe(tiny_models["BertForSequenceClassification"], texts_file), out=out, show_progress=False)
    result = CliRunner().invoke(app, ["eval", str(out), "--suite", str(sentiment_suite), "--top-k", "1,2", "--repeats", "1", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "top-1/4" in result.output and (out / "eval" / "report.md").is_file()
    bad = CliRunner().invoke(app, ["eval", str(out), "--top-k", "9", "--no-speed"])
    assert bad.exit_code == 2 and "outside 1..4" in bad.output


def test_perplexity_suite_on_a_decoder(tiny_decoders, texts_file, tmp_path):
    out = tmp_path / "lm"
    # without the refit (tuned for top-2), every expert active is exactly the dense model
    densetomoe.convert(quick_recipe(tiny_decoders["llama"], texts_file, refit=False), out=out, show_progress=False)
    suite = tmp_path / "ppl.yaml"
    suite.write_text(f"name: ppl\ntask: perplexity\ndata: {{file: {texts_file}}}\nwindow: 32\nstride: 16\nmax_tokens: 200\n")
    report = evaluate(out, Settings(top_ks=[2, 4], suites=[str(suite)], speed=False, seq_len=32), show_progress=False)
    dense_ppl = report["dense"]["quality"]["ppl"]["perplexity"]
    top2, top4 = (e["quality"]["ppl"]["perplexity"] for e in report["sweep"])
    assert top4 == pytest.approx(dense_ppl, rel=1e-4)  # every expert active: the dense model
    assert top2 > 1 and top2 != pytest.approx(dense_ppl, rel=1e-4)


def test_perplexity_suite_refuses_an_encoder(tiny_models, texts_file, tmp_path):
    out = tmp_path / "enc"
    densetomoe.convert(quick_recipe(tiny_models["BertModel"], texts_file), out=out, show_progress=False)
    suite = tmp_path / "ppl.yaml"
    suite.write_text(f"name: ppl\ntask: perplexity\ndata: {{file: {texts_file}}}\n")
    with pytest.raises(UsageError, match="causal language model"):
        evaluate(out, Settings(suites=[str(suite)], speed=False), show_progress=False)


def test_evaluate_reads_a_native_folder(tiny_decoders, texts_file, tmp_path):
    """A native qwen2_moe folder gets the remote-code folder's report, read from transformers' own
    modules: the top-k sweep through the routers, routing counted from their choices, FLOPs of the
    selected experts, and greedy decoding timed against the dense model."""
    out = tmp_path / "lm"
    densetomoe.convert(quick_recipe(tiny_decoders["llama"], texts_file, format="native"), out=out, show_progress=False)
    suite = tmp_path / "ppl.yaml"
    suite.write_text(f"name: ppl\ntask: perplexity\ndata: {{file: {texts_file}}}\nwindow: 32\nstride: 16\nmax_tokens: 200\n")
    settings = Settings(top_ks=[1, 2, 4], suites=[str(suite)], repeats=1, batch=2, seq_len=32, new_tokens=4)
    report = evaluate(out, settings, show_progress=False)

    assert report["format"] == "native" and report["num_experts"] == 4 and report["converted_top_k"] == 2
    assert [e["top_k"] for e in report["sweep"]] == [1, 2, 4]
    shares = [e["active_ffn_share"] for e in report["sweep"]]
    flops = [e["cost"]["ffn_flops"] for e in report["sweep"]]
    assert shares[0] < shares[1] < shares[2] and flops[0] < flops[1] < flops[2]
    assert flops[2] / flops[1] == pytest.approx(shares[2] / shares[1], rel=0.05)  # FLOPs follow the neurons used (router aside)
    assert flops[2] > report["dense"]["cost"]["ffn_flops"]  # every expert: the dense FFN's neurons, plus the router and the (zero) shared expert
    layers = report["routing"]["layers"]
    assert len(layers) == 2 and all(layer["experts_per_token"] == 2 and abs(sum(layer["load"]) - 1) < 1e-3 for layer in layers)
    perplexities = [e["quality"]["ppl"]["perplexity"] for e in report["sweep"]]
    assert all(p > 1 for p in perplexities)
    assert all(e["speed"]["decode"]["moe_tokens_per_s"] > 0 and e["speed"]["decode"]["speedup"] > 0 for e in report["sweep"])
    assert "llama_cpp" not in report  # not asked for, and the folder holds no GGUF file

    md = (reports.write(report, tmp_path / "eval") / "report.md").read_text()
    assert "top-2/4" in md and "decode b1" in md


def test_a_remote_code_folder_says_why_it_has_no_llama_cpp_row(tiny_decoders, texts_file, tmp_path):
    from densetomoe.cli import app

    out = tmp_path / "lm"
    densetomoe.convert(quick_recipe(tiny_decoders["llama"], texts_file), out=out, show_progress=False)
    result = CliRunner().invoke(app, ["eval", str(out), "--engine", "llamacpp", "--no-speed", "--no-progress"])
    assert result.exit_code == 0, result.output
    line = next(line for line in result.output.splitlines() if line.startswith("no llama.cpp row:"))
    assert "remote-code folder runs only in transformers" in line and "--format native" in line
    report = json.loads((out / "eval" / "report.json").read_text())
    assert report["format"] == "remote-code" and "remote-code" in report["llama_cpp"]["none"]
    assert "No llama.cpp row: a remote-code folder" in (out / "eval" / "report.md").read_text()

    missing = CliRunner().invoke(app, ["eval", str(out), "--gguf", str(tmp_path / "nothing.gguf"), "--no-speed"])
    assert missing.exit_code == 2 and missing.output.strip().splitlines()[-1] == f"error: --gguf {tmp_path / 'nothing.gguf'}: no such file"

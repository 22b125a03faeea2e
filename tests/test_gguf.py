"""GGUF files of a native folder (`densetomoe gguf`, `convert --gguf`): llama.cpp's converter and
quantizer, each file loaded and scored in llama.cpp, recorded in the folder's figures and card; bad
input refused in one line with nothing written."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import transformers
from typer.testing import CliRunner

import densetomoe
from conftest import quick_recipe, save_tiny_decoder
from densetomoe import gguf, llamacpp
from densetomoe.cli import app
from densetomoe.folder import CARD_FILE, FIGURES_FILE

needs_llama_cpp = pytest.mark.skipif(llamacpp.missing() is not None, reason=f"llama.cpp: {llamacpp.missing()}")


@pytest.fixture
def native_folder(lm_tokenizer, texts_file, tmp_path):
    """A tiny LLaMA with SmolLM2's tokenizer (llama.cpp's converter knows its pre-tokenizer), converted
    to a native qwen2_moe of 4 experts, top-2, in ``tmp_path/moe``."""
    dense = save_tiny_decoder("llama", tmp_path / "dense", transformers.AutoTokenizer.from_pretrained(lm_tokenizer))
    densetomoe.convert(quick_recipe(dense, texts_file, top_k=2, format="native"), out=tmp_path / "moe", show_progress=False)
    return tmp_path / "moe"


def one_line_error(result) -> str:
    """The one error line of a refused command (progress lines may come before it)."""
    assert result.exit_code == 2 and "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: ") and sum(line.startswith("error") for line in lines) == 1, result.output
    return lines[-1]


def test_types_are_parsed_and_a_bad_one_is_refused_in_one_line(tmp_path):
    assert gguf.parse_types("F16, q8_0,Q4_K_M,f16") == ["f16", "q8_0", "q4_k_m"]
    (tmp_path / "config.json").write_text("{}")
    line = one_line_error(CliRunner().invoke(app, ["gguf", str(tmp_path), "--type", "f16,q3_x"]))
    assert "unknown type 'q3_x'" in line and "q4_k_m" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]


def test_convert_refuses_a_bad_gguf_type_or_a_missing_llama_cpp_before_converting(tiny_decoders, tmp_path, monkeypatch):
    monkeypatch.setattr(densetomoe.pipeline.Dense, "load", lambda *a, **k: pytest.fail("the weights were loaded"))
    args = ["convert", str(tiny_decoders["llama"]), "--format", "native", "--out", str(tmp_path / "o"), "--no-progress"]
    assert "unknown type 'q9'" in one_line_error(CliRunner().invoke(app, [*args, "--gguf", "q9"]))
    monkeypatch.setattr(llamacpp, "missing", lambda: "llama-cpp-python is not installed (make llamacpp)")
    assert "GGUF needs llama.cpp: llama-cpp-python is not installed" in one_line_error(CliRunner().invoke(app, [*args, "--gguf", "f16"]))
    monkeypatch.setattr(llamacpp, "missing", lambda: None)
    line = one_line_error(CliRunner().invoke(app, [*args[:2], "--out", str(tmp_path / "o"), "--gguf", "f16"]))
    assert "a remote-code folder has no GGUF" in line
    assert not (tmp_path / "o").exists()


def test_the_card_section_is_replaced_not_repeated():
    first = gguf.with_card_section("# card\n", gguf.card_section("m", [{"file": "m-F16.gguf", "type": "f16", "bytes": 2e6}]))
    again = gguf.with_card_section(first, gguf.card_section("m", [{"file": "m-Q8_0.gguf", "type": "q8_0", "bytes": 1e6, "perplexity": 9.5}]))
    assert again.startswith("# card\n") and again.count(gguf.CARD_START) == 1
    assert "m-Q8_0.gguf" in again and "m-F16.gguf" not in again and "9.50" in again


@pytest.mark.slow
@needs_llama_cpp
def test_gguf_files_load_generate_and_are_listed_with_size_and_served_perplexity(native_folder, tmp_path):
    folder = native_folder
    result = CliRunner().invoke(app, ["gguf", str(folder), "--type", "f16,q8_0,q4_k_m", "--perplexity-tokens", "256"])
    assert result.exit_code == 0, result.output
    record = json.loads((folder / FIGURES_FILE).read_text())["gguf"]
    assert [f["type"] for f in record] == ["f16", "q8_0", "q4_k_m"]
    card = (folder / CARD_FILE).read_text()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    ids = tokenizer("The river floods every spring")["input_ids"]
    for f in record:
        path = folder / f["file"]
        assert f["file"] == f"moe-{f['type'].upper()}.gguf" and f["bytes"] == path.stat().st_size
        assert 250 < f["tokens"] <= 256 and f["perplexity"] > 1 and f"`{f['file']}`" in card
        assert len(llamacpp.generate(llamacpp.load(path, n_ctx=64), ids, 4)) == 4
    # each expert's down projection is 16 neurons wide: no block of 32 (q8_0) or 256 (K-quants) fits its rows
    assert record[0]["fallbacks"] == []
    assert record[1]["fallbacks"] == ["blk.*.ffn_down_exps.weight (16 wide, not a multiple of 32): F16"]
    assert any(line.startswith("blk.*.ffn_down_exps.weight (16 wide, not a multiple of 256)") for line in record[2]["fallbacks"])
    assert "does not fit blk.*.ffn_down_exps.weight" in " ".join(result.output.split())
    assert not list(tmp_path.glob(".moe.gguf-*"))  # the scratch folder is gone

    # the card's llama-cpp-python snippet runs as it is, from the folder
    snippet = re.search(r"```python\n(.*?)```", card[card.index(gguf.CARD_START) :], re.S).group(1)
    run = subprocess.run([sys.executable, "-c", snippet], cwd=folder, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]


@pytest.mark.slow
@needs_llama_cpp
def test_a_converter_failure_is_one_line_and_leaves_the_folder_as_it_was(native_folder, tmp_path):
    folder = native_folder
    (folder / "tokenizer.json").unlink()  # the converter cannot build the vocabulary
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    line = one_line_error(CliRunner().invoke(app, ["gguf", str(folder), "--type", "f16,q4_k_m"]))
    assert "llama.cpp's converter failed on" in line
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert not list(tmp_path.glob(".moe.gguf-*"))


@pytest.mark.slow
@needs_llama_cpp
def test_convert_writes_the_gguf_files_into_the_folder(lm_tokenizer, texts_file, tmp_path):
    dense = save_tiny_decoder("llama", tmp_path / "dense", transformers.AutoTokenizer.from_pretrained(lm_tokenizer))
    out = tmp_path / "served"
    args = ["convert", str(dense), "--format", "native", "--experts", "4", "--top-k", "2", "--calib", str(texts_file), "--calib-tokens", "1024"]
    result = CliRunner().invoke(app, [*args, "--gguf", "q8_0", "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert (out / "served-Q8_0.gguf").is_file() and (out / "config.json").is_file()
    assert json.loads((out / FIGURES_FILE).read_text())["gguf"][0]["type"] == "q8_0"


@pytest.mark.slow
@needs_llama_cpp
def test_eval_serves_a_native_folder_and_its_dense_model_in_llama_cpp(native_folder, lm_tokenizer, tmp_path):
    """``densetomoe eval --engine llamacpp``: the folder and its dense model as GGUF files of one type,
    served perplexity on the suite's windows (what transformers measures, within 3% in nats) and
    decode speed, in the report and on screen; by default when the folder holds a GGUF file, its type."""
    folder = native_folder
    suite = tmp_path / "ppl.yaml"
    suite.write_text("name: ppl\ntask: perplexity\ndata: {package: densetomoe, path: corpus/wiki_heldout.txt.gz}\nwindow: 128\nstride: 64\nmax_tokens: 512\n")
    args = ["eval", str(folder), "--suite", str(suite), "--repeats", "1", "--new-tokens", "8", "--no-progress"]
    result = CliRunner().invoke(app, [*args, "--engine", "llamacpp"])
    assert result.exit_code == 0, result.output
    assert "served by llama.cpp (F16 GGUF files" in result.output
    report = json.loads((folder / "eval" / "report.json").read_text())
    served = report["llama_cpp"]
    assert served["type"] == "f16" and served["suite"] == "ppl" and 500 < served["tokens"] <= 512
    assert served["moe"]["gguf"] == "moe-F16.gguf" and served["dense"]["gguf"] == "dense-F16.gguf"
    measured = report["sweep"][0]["quality"]["ppl"]["perplexity"]  # transformers, the same windows
    assert np.log(served["moe"]["perplexity"]) == pytest.approx(np.log(measured), rel=0.03)
    assert np.log(served["dense"]["perplexity"]) == pytest.approx(np.log(report["dense"]["quality"]["ppl"]["perplexity"]), rel=0.03)
    assert served["decode_speedup"] > 0 and served["perplexity_ratio"] == pytest.approx(served["moe"]["perplexity"] / served["dense"]["perplexity"])
    assert "## Served by llama.cpp" in (folder / "eval" / "report.md").read_text()
    assert any(m["name"] == "llama.cpp decode speed-up vs dense" for m in report["metrics"])
    assert not list(tmp_path.glob(".moe.engine-*")) and not (folder / "moe-F16.gguf").exists()  # made for the run, then gone

    gguf.write(folder, ["q8_0"], perplexity_tokens=0)  # a GGUF file in the folder: served by default, at its type
    again = CliRunner().invoke(app, [*args, "--no-speed"])
    assert again.exit_code == 0, again.output
    assert json.loads((folder / "eval" / "report.json").read_text())["llama_cpp"]["type"] == "q8_0"

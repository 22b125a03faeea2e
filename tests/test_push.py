"""``densetomoe push``: the real ``huggingface_hub`` client against a small Hub on 127.0.0.1
(:class:`fake_hub.FakeHub`), which keeps what was committed, so a test can compare it byte for byte.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from huggingface_hub import constants
from huggingface_hub._upload_pipeline import pipelined_upload as real_pipelined
from typer.testing import CliRunner

import densetomoe
from conftest import quick_recipe
from densetomoe import hub
from densetomoe.cli import app
from densetomoe.errors import UsageError
from fake_hub import NAMESPACE, TOKEN, FakeHub, metadata

runner = CliRunner()


@pytest.fixture(scope="module")
def converted_once(tiny_models, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("push") / "tiny-moe"
    densetomoe.convert(quick_recipe(tiny_models["BertForSequenceClassification"]), out, show_progress=False)
    return out


@pytest.fixture
def converted(converted_once, tmp_path) -> Path:
    """A fresh copy of a real converted folder (push rewrites its README.md)."""
    return Path(shutil.copytree(converted_once, tmp_path / "tiny-moe"))


@pytest.fixture
def logs():
    """Every log record at DEBUG, from every logger."""
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(self.format(record))

    handler = Keep(level=logging.DEBUG)
    loggers = [logging.getLogger(), logging.getLogger("huggingface_hub"), logging.getLogger("densetomoe")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.DEBUG)
    yield records
    for lg, level in zip(loggers, levels):
        lg.removeHandler(handler)
        lg.setLevel(level)


def folder_files(folder: Path) -> dict[str, bytes]:
    """What a push should upload: every file but the local-paths file, which stays on this machine."""
    from densetomoe.folder import LOCAL_FILE

    files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
    assert LOCAL_FILE in files
    return {name: data for name, data in files.items() if name != LOCAL_FILE}


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_one_clean_line(result, message):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    text = " ".join(result.output.split())
    assert text.startswith("error:") and message in text, text
    assert TOKEN not in result.output


# ------------------------------------------------------------------------------------------ uploads


@pytest.mark.parametrize("xet", [True, False], ids=["pipelined-upload", "single-commit"])
def test_push_uploads_the_folder_byte_for_byte(converted, fake_hub, logs, capfd, monkeypatch, xet):
    """Both upload paths of huggingface_hub: the pipelined one (hf_xet installed) and create_commit."""
    import huggingface_hub._upload_pipeline as pipeline

    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", not xet)
    monkeypatch.setattr(constants, "HF_DEBUG", True)  # even curl-style request logging must not show it
    pipelined = []
    monkeypatch.setattr(pipeline, "pipelined_upload", lambda *a, **k: pipelined.append(1) or real_pipelined(*a, **k))
    url = hub.push(converted, "tester/tiny-moe", token=TOKEN, endpoint=fake_hub.url, base_model="google-bert/bert-base-uncased")

    assert url == f"{fake_hub.url}/tester/tiny-moe"
    uploaded = fake_hub.repos["tester/tiny-moe"]
    assert uploaded == folder_files(converted)  # README.md as rewritten, everything else untouched
    assert {"config.json", "model.safetensors", "modeling_densetomoe.py", "README.md", "densetomoe_conversion.json"} <= set(uploaded)

    meta = metadata(uploaded["README.md"])
    assert meta["base_model"] == "google-bert/bert-base-uncased"
    assert meta["library_name"] == "transformers"
    assert {"moe", "densetomoe", "mixture-of-experts"} <= set(meta["tags"])
    [entry] = meta["model-index"]
    assert entry["name"] == "tiny-moe"
    [result] = entry["results"]
    assert result["task"]["type"] == "text-classification"  # BertForSequenceClassification
    figures = json.loads(uploaded["densetomoe_conversion.json"])["quick_eval"]
    values = {m["type"]: m["value"] for m in result["metrics"]}
    assert values == pytest.approx(
        {
            "cosine_similarity": figures["embedding_cosine"],
            "relative_error": figures["hidden_rel_error"],
            "agreement": figures["head_agreement"],
            "flops_ratio": figures["ffn_flops_ratio"],
        },
        abs=1e-6,
    )
    assert "# " in uploaded["README.md"].decode().split("---", 2)[2]  # the card's text is kept

    assert fake_hub.requests and all(auth == f"Bearer {TOKEN}" for _, _, auth in fake_hub.requests)
    assert bool(pipelined) == xet
    assert any(path == "/api/validate-yaml" for _, path, _ in fake_hub.requests)  # the client checks the card first
    out, err = capfd.readouterr()
    assert logs, "debug logging was not captured"
    for text in (out, err, *logs):
        assert TOKEN not in text
    assert not any(TOKEN.encode() in data for data in uploaded.values())


def test_push_again_updates_and_keeps_other_results(converted, fake_hub):
    """An existing repo is reused; results already in the card for other metrics survive a second push."""
    hub.push(converted, "tester/again", token=TOKEN, endpoint=fake_hub.url)
    card = (converted / "README.md").read_text()
    (converted / "README.md").write_text(_add_result(card))
    hub.push(converted, "tester/again", token=TOKEN, endpoint=fake_hub.url)
    meta = metadata(fake_hub.repos["tester/again"]["README.md"])
    results = meta["model-index"][0]["results"]
    assert {r["dataset"]["type"] for r in results} == {"sst2", "wikipedia"}
    assert len(fake_hub.created) == 2  # created, then found to exist (409 -> exist_ok)
    assert meta["tags"].count("moe") == 1


def _add_result(card: str) -> str:
    """``card`` with one hand-written SST-2 accuracy in its model-index."""
    from huggingface_hub import EvalResult, ModelCard

    parsed = ModelCard(card)
    parsed.data.eval_results = [
        EvalResult(task_type="text-classification", dataset_type="sst2", dataset_name="SST-2", metric_type="accuracy", metric_value=0.9),
        *parsed.data.eval_results,
    ]
    return str(parsed)


def test_report_json_metrics_are_included_and_odd_entries_skipped(converted, fake_hub):
    report = {
        "metrics": [
            {"name": "Accuracy (top-2)", "type": "accuracy", "value": 0.81, "dataset": {"type": "rotten_tomatoes", "name": "Rotten Tomatoes", "split": "test"}},
            {"name": "Perplexity", "type": "perplexity", "value": 27.5, "dataset": "wikipedia", "task": "text-generation"},
            {"name": "no value", "type": "accuracy", "dataset": "x"},
            {"type": "accuracy", "value": "high", "dataset": "x"},
            {"name": "no dataset", "type": "accuracy", "value": 0.5},
            "not a dict",
        ],
        "something_else": {"ignored": True},
    }
    (converted / "eval").mkdir()
    (converted / "eval" / "report.json").write_text(json.dumps(report))  # where `densetomoe eval` writes it
    hub.push(converted, "tester/with-report", token=TOKEN, endpoint=fake_hub.url)
    uploaded = fake_hub.repos["tester/with-report"]
    assert uploaded["eval/report.json"] == (converted / "eval" / "report.json").read_bytes()
    results = metadata(uploaded["README.md"])["model-index"][0]["results"]
    by_dataset = {r["dataset"]["type"]: r for r in results}
    assert by_dataset["rotten_tomatoes"]["dataset"]["split"] == "test"
    assert by_dataset["rotten_tomatoes"]["task"]["type"] == "text-classification"
    assert by_dataset["rotten_tomatoes"]["metrics"] == [{"type": "accuracy", "value": 0.81, "name": "Accuracy (top-2)"}]
    perplexity = [r for r in results if r["task"]["type"] == "text-generation"]
    assert perplexity[0]["metrics"][0]["value"] == 27.5
    assert "x" not in by_dataset and len(results) == 3  # quick figures + the two good entries


def test_bad_report_json_fails_before_the_network(converted, fake_hub):
    (converted / "eval").mkdir()
    (converted / "eval" / "report.json").write_text("{not json")
    with pytest.raises(UsageError, match="report.json"):
        hub.push(converted, "tester/bad", token=TOKEN, endpoint=fake_hub.url)
    assert fake_hub.requests == []


def test_bare_repo_name_lands_in_the_token_namespace_and_private_is_sent(converted, fake_hub):
    url = hub.push(converted, "tiny-moe", private=True, token=TOKEN, endpoint=fake_hub.url)
    assert url == f"{fake_hub.url}/{NAMESPACE}/tiny-moe"
    assert fake_hub.created[0]["visibility"] == "private"
    assert "README.md" in fake_hub.repos[f"{NAMESPACE}/tiny-moe"]


def test_base_model_from_the_conversion_figures(converted):
    """A Hub id recorded at conversion becomes base_model; a local folder's name does not."""
    figures = json.loads((converted / "densetomoe_conversion.json").read_text())
    assert figures["base_model"] == "BertForSequenceClassification"  # converted from a local folder: its name only
    assert "base_model" not in metadata(hub.model_card(converted, "m").encode())
    figures["base_model"] = "google-bert/bert-base-uncased"
    (converted / "densetomoe_conversion.json").write_text(json.dumps(figures))
    assert metadata(hub.model_card(converted, "m").encode())["base_model"] == "google-bert/bert-base-uncased"


def test_card_problems_fail_before_the_network(converted):
    with pytest.raises(UsageError, match="not a Hub model id"):
        hub.model_card(converted, "m", base_model="/home/me/models/bert")
    (converted / "README.md").write_text("---\n: : not yaml\n---\n# card\n")
    with pytest.raises(UsageError, match="README.md has metadata that is not valid YAML"):
        hub.model_card(converted, "m")
    (converted / "README.md").unlink()  # no card at all: a minimal one is written
    meta = metadata(hub.model_card(converted, "m").encode())
    assert "densetomoe" in meta["tags"] and meta["model-index"][0]["name"] == "m"


# ------------------------------------------------------------------------------------------ the CLI


@pytest.mark.slow
def test_cli_push_in_a_real_process(converted, fake_hub, tmp_path):
    """The console script with HF_ENDPOINT and HF_TOKEN in its environment, as a user runs it."""
    env = {
        **os.environ, "HF_ENDPOINT": fake_hub.url, "HF_TOKEN": TOKEN, "HF_HOME": str(tmp_path / "hf"),
        "HF_HUB_OFFLINE": "0", "PYTHONPATH": str(Path(__file__).parents[1]),
    }  # fmt: skip
    run = subprocess.run(
        [sys.executable, "-m", "densetomoe.cli", "push", str(converted), "--repo-id", "tester/cli"],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == f"{fake_hub.url}/tester/cli"
    assert TOKEN not in run.stdout + run.stderr
    assert fake_hub.repos["tester/cli"] == folder_files(converted)


def test_cli_push_with_token_flag(converted, fake_hub, monkeypatch, capfd):
    monkeypatch.setattr(constants, "ENDPOINT", fake_hub.url)  # what HF_ENDPOINT sets at import
    result = runner.invoke(app, ["push", str(converted), "--repo-id", "tester/flag", "--token", TOKEN, "--private"])
    assert result.exit_code == 0, result.output
    assert result.output.strip().splitlines()[-1] == f"{fake_hub.url}/tester/flag"
    assert TOKEN not in result.output + "".join(capfd.readouterr())
    assert fake_hub.created[0]["visibility"] == "private"


def test_convert_with_push_to_hub(tiny_models, texts_file, fake_hub, monkeypatch, tmp_path):
    monkeypatch.setattr(constants, "ENDPOINT", fake_hub.url)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    out = tmp_path / "out"
    args = ["convert", tiny_models["BertModel"], "--experts", "4", "--calib", texts_file, "--calib-tokens", "512", "--no-progress"]
    result = runner.invoke(app, [str(a) for a in [*args, "--out", out, "--push-to-hub", "tester/converted"]])
    assert result.exit_code == 0, result.output
    assert f"{fake_hub.url}/tester/converted" in result.output
    assert fake_hub.repos["tester/converted"] == folder_files(out)
    meta = metadata(fake_hub.repos["tester/converted"]["README.md"])
    assert meta["model-index"][0]["results"][0]["task"]["type"] == "feature-extraction"
    assert meta["model-index"][0]["results"][0]["dataset"] == {"name": "Documents of calib.txt", "type": "text"}


def test_convert_with_push_to_hub_checks_the_token_first(tiny_models, online, tmp_path):
    out = tmp_path / "out"
    result = runner.invoke(app, ["convert", str(tiny_models["BertModel"]), "--out", str(out), "--push-to-hub", "tester/x"])
    assert_one_clean_line(result, "hf auth login")
    assert not out.exists()


# ------------------------------------------------------------------------------------------ failures


def test_unreachable_hub_is_one_line_and_quick(converted, online, monkeypatch):
    endpoint = f"http://127.0.0.1:{closed_port()}"
    card = (converted / "README.md").read_bytes()
    start = time.monotonic()
    with pytest.raises(UsageError, match="could not be reached") as caught:
        hub.push(converted, "tester/x", token=TOKEN, endpoint=endpoint)
    assert time.monotonic() - start < 30
    assert endpoint in str(caught.value) and "\n" not in str(caught.value) and TOKEN not in str(caught.value)
    assert (converted / "README.md").read_bytes() == card  # nothing rewritten when the Hub never answered

    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert_one_clean_line(runner.invoke(app, ["push", str(converted), "--repo-id", "tester/x"]), "could not be reached")


def test_refused_token(converted, online, logs, capfd):
    with FakeHub(token="hf_the_right_one") as server:
        with pytest.raises(UsageError, match="refused the token") as caught:
            hub.push(converted, "tester/x", token=TOKEN, endpoint=server.url)
    assert "HTTP 401" in str(caught.value)
    for text in (str(caught.value), *capfd.readouterr(), *logs):
        assert TOKEN not in text


def test_card_rejected_by_the_hub(converted, online):
    with FakeHub(reject_card=True) as server:
        with pytest.raises(UsageError, match="rejected the model card") as caught:
            hub.push(converted, "tester/x", token=TOKEN, endpoint=server.url)
    assert "model-index" in str(caught.value) and "\n" not in str(caught.value)
    assert server.repos["tester/x"] == {}


def test_missing_token(converted, online, monkeypatch):
    with pytest.raises(UsageError, match=r"log in with `hf auth login` or set HF_TOKEN"):
        hub.push(converted, "tester/x")
    assert_one_clean_line(runner.invoke(app, ["push", str(converted), "--repo-id", "tester/x"]), "hf auth login")


def test_token_from_the_login_cache(converted, fake_hub):
    Path(constants.HF_TOKEN_PATH).parent.mkdir(parents=True, exist_ok=True)
    Path(constants.HF_TOKEN_PATH).write_text(TOKEN)
    hub.push(converted, "tester/cached", endpoint=fake_hub.url)
    assert "tester/cached" in fake_hub.repos


def test_offline_mode_is_named(converted, online, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UsageError, match="HF_HUB_OFFLINE"):
        hub.push(converted, "tester/x", token=TOKEN)


@pytest.mark.parametrize("repo_id", ["two words", "a/b/c", "-leading-dash", "x" * 97])
def test_invalid_repo_id(converted, online, repo_id):
    with pytest.raises(UsageError, match="invalid Hub repo id"):
        hub.push(converted, repo_id, token=TOKEN)
    assert_one_clean_line(runner.invoke(app, ["push", str(converted), "--repo-id", repo_id, "--token", TOKEN]), "invalid Hub repo id")


def test_not_a_densetomoe_folder(tiny_models, online, tmp_path):
    (tmp_path / "empty").mkdir()
    cases = [
        (tmp_path / "nowhere", "no such folder"),
        (tmp_path / "empty", "not a model folder"),
        (tiny_models["BertModel"], "was not written by densetomoe"),
    ]
    for folder, message in cases:
        with pytest.raises(UsageError, match=message):
            hub.push(folder, "tester/x", token=TOKEN)
        assert_one_clean_line(runner.invoke(app, ["push", str(folder), "--repo-id", "tester/x", "--token", TOKEN]), message)


def test_push_uploads_the_chosen_gguf_files_and_a_card_that_lists_only_them(converted, fake_hub):
    """The GGUF files `densetomoe gguf` wrote into a folder go up beside the weights, as GGUF repositories
    hold them; --gguf chooses which, and the card lists those and is tagged gguf."""
    from densetomoe import gguf
    from densetomoe.folder import read_figures, write_figures

    figures = read_figures(converted)
    figures["gguf"] = [
        {"file": f"tiny-moe-{t.upper()}.gguf", "type": t, "bytes": 4, "perplexity": p, "tokens": 4096, "fallbacks": []}
        for t, p in (("f16", 11.0), ("q4_k_m", 12.5))
    ]
    write_figures(converted, figures)
    for f in figures["gguf"]:
        (converted / f["file"]).write_bytes(b"GGUF")
    card = (converted / "README.md").read_text()
    (converted / "README.md").write_text(gguf.with_card_section(card, gguf.card_section("tiny-moe", figures["gguf"])))

    with pytest.raises(densetomoe.UsageError, match="has no Q8_0 GGUF file"):
        hub.push(converted, "tester/served", token=TOKEN, endpoint=fake_hub.url, gguf=["q8_0"])
    assert "tester/served" not in fake_hub.repos  # refused before the network
    hub.push(converted, "tester/served", token=TOKEN, endpoint=fake_hub.url, gguf=["q4_k_m"])
    repo = fake_hub.repos["tester/served"]
    assert repo["tiny-moe-Q4_K_M.gguf"] == b"GGUF" and "tiny-moe-F16.gguf" not in repo
    pushed = repo["README.md"].decode()
    assert "gguf" in metadata(repo["README.md"])["tags"]
    assert "`tiny-moe-Q4_K_M.gguf`" in pushed and "12.50" in pushed and "tiny-moe-F16.gguf" not in pushed

    hub.push(converted, "tester/all", token=TOKEN, endpoint=fake_hub.url)  # default: every GGUF file
    assert {"tiny-moe-F16.gguf", "tiny-moe-Q4_K_M.gguf"} <= set(fake_hub.repos["tester/all"])

"""The command line: one clear line and exit code 2 on bad input, never a traceback or a partial folder."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch
import transformers
from typer.testing import CliRunner

from densetomoe.cli import app

runner = CliRunner()
FAST = ["--calib-tokens", "512", "--no-progress"]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_clean_failure(result, message, out=None):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    text = " ".join(result.output.split())
    assert message in text, text
    assert text.startswith("error:")
    if out is not None:
        assert not out.exists()
        assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


@pytest.fixture
def unsupported_model(tmp_path):
    folder = tmp_path / "gpt_neox"  # (T5, the example until issue 12, is supported now)
    transformers.GPTNeoXConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2).save_pretrained(folder)
    return folder


@pytest.fixture
def pickle_only_model(tmp_path, tiny_models):
    folder = tmp_path / "pickled"
    source = tiny_models["BertModel"]
    folder.mkdir()
    for f in source.iterdir():
        if f.suffix != ".safetensors":
            (folder / f.name).write_bytes(f.read_bytes())
    model = transformers.BertModel.from_pretrained(source)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    return folder


def test_help_explains_each_choice():
    result = invoke("convert", "--help")
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    for phrase in ("coactivation", "parameters", "random", "centroid", "mlp", "--calib-tokens", "--overwrite"):
        assert phrase in text


def test_missing_path(tmp_path):
    out = tmp_path / "out"
    assert_clean_failure(invoke("convert", tmp_path / "nowhere", "--out", out), "no such folder", out)


def test_folder_that_is_not_a_model(tmp_path):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "out"
    assert_clean_failure(invoke("convert", tmp_path / "empty", "--out", out), "not a model folder", out)


def test_unsupported_architecture_lists_the_supported_ones(unsupported_model, tmp_path):
    out = tmp_path / "out"
    result = invoke("convert", unsupported_model, "--out", out)
    assert_clean_failure(result, "model type 'gpt_neox' is not supported", out)
    assert "BERT" in result.output and "DistilBERT" in result.output


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--experts", "0"], "experts"),
        (["--experts", "128"], "exceeds the FFN's 64 neurons"),
        (["--experts", "5", "--top-k", "1"], "do not split into 5 equal experts"),
        (["--experts", "4", "--top-k", "8"], "top_k (8) cannot exceed experts (4)"),
    ],
)
def test_impossible_sizes(tiny_models, tmp_path, flags, message):
    out = tmp_path / "out"
    assert_clean_failure(invoke("convert", tiny_models["BertModel"], *flags, "--out", out), message, out)


def test_empty_and_unreadable_calibration(tiny_models, tmp_path):
    out = tmp_path / "out"
    (tmp_path / "empty.txt").write_text("\n\n")
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00\xff")
    assert_clean_failure(invoke("convert", tiny_models["BertModel"], "--calib", tmp_path / "empty.txt", "--out", out), "holds no text", out)
    assert_clean_failure(invoke("convert", tiny_models["BertModel"], "--calib", tmp_path / "binary.txt", "--out", out), "cannot read", out)


def test_existing_output_needs_overwrite(tiny_models, texts_file, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = ["convert", tiny_models["BertModel"], "--experts", "4", "--calib", texts_file, "--out", out, *FAST]
    assert_clean_failure(invoke(*args), "already exists; pass --overwrite")
    assert (out / "keep.txt").read_text() == "mine"
    result = invoke(*args, "--overwrite")
    assert result.exit_code == 0, result.output
    assert (out / "config.json").is_file() and not (out / "keep.txt").exists()


def test_pickle_only_checkpoint_is_refused_unless_allowed(pickle_only_model, texts_file, tmp_path):
    out = tmp_path / "out"
    args = ["convert", pickle_only_model, "--experts", "4", "--calib", texts_file, "--out", out, *FAST]
    assert_clean_failure(invoke(*args), "pickle", out)
    result = invoke(*args, "--allow-pickle")
    assert result.exit_code == 0, result.output
    assert (out / "model.safetensors").is_file()


def test_hub_id_offline_says_how_to_use_a_local_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    out = tmp_path / "out"
    assert_clean_failure(invoke("convert", "bert-base", "--out", out), "pass the folder: densetomoe convert ./path/to/model", out)


@pytest.mark.slow  # a real process importing densetomoe and the Hub client: about 4 s
def test_unreachable_hub_in_a_real_process(tmp_path):
    """The real console script, a real (refused) connection, a cold cache."""
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "0"}
    run = subprocess.run(
        [sys.executable, "-m", "densetomoe.cli", "convert", "some-org/some-model", "--out", str(tmp_path / "out")],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert run.returncode == 2
    assert "Traceback" not in run.stderr
    assert "could not be reached" in run.stderr and len(run.stderr.strip().splitlines()) <= 3
    assert not (tmp_path / "out").exists()


def test_bad_recipe_key(tmp_path, tiny_models):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("experts: 4\nrouterr: mlp\n")
    assert_clean_failure(invoke("convert", tiny_models["BertModel"], "--recipe", recipe), "routerr")


def test_recipe_with_flag_overrides(tiny_models, texts_file, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"experts: 4\ntop_k: 1\nrouter: centroid\ncalib: {texts_file}\ncalib_tokens: 512\n")
    out = tmp_path / "out"
    result = invoke("convert", tiny_models["BertModel"], "--recipe", recipe, "--top-k", "2", "--out", out, "--no-progress")
    assert result.exit_code == 0, result.output
    saved = (out / "densetomoe_recipe.yaml").read_text()
    assert "top_k: 2" in saved and "router: centroid" in saved and "experts: 4" in saved


# -- a damaged checkpoint and a full disk: refused in one line before any work, or when the write fails
def assert_one_line(result):
    assert len(result.output.strip().splitlines()) == 1, result.output


@pytest.fixture
def no_calibration(monkeypatch):
    """Fail the test if any calibration text is read: the refusals below come before any work."""
    from densetomoe import data

    monkeypatch.setattr(data, "load_texts", lambda *a, **k: pytest.fail("the calibration text was read"))


def copy_of(folder, tmp_path):
    return shutil.copytree(folder, tmp_path / f"copy-{folder.name}")


def test_a_truncated_checkpoint_is_refused_in_one_line_naming_the_file(tiny_models, tmp_path, no_calibration):
    model = copy_of(tiny_models["BertModel"], tmp_path)
    weights = model / "model.safetensors"
    os.truncate(weights, weights.stat().st_size - 100)
    out = tmp_path / "out"
    result = invoke("convert", model, "--experts", "4", "--out", out)
    assert_clean_failure(result, f"{weights} is truncated or corrupt", out)
    assert_one_line(result)


def sharded(folder, tmp_path):
    """``folder``'s model saved again in shards of at most 100 kB, with their index."""
    model = transformers.AutoModel.from_pretrained(folder)
    copy = copy_of(folder, tmp_path)
    (copy / "model.safetensors").unlink()
    model.save_pretrained(copy, max_shard_size="100KB")
    assert (copy / "model.safetensors.index.json").is_file() and len(list(copy.glob("*.safetensors"))) > 1
    return copy


@pytest.mark.parametrize(
    "damage,message", [("truncate", "is truncated or corrupt"), ("delete", "is missing (the checkpoint's index names it)")]
)
def test_every_shard_is_checked(tiny_models, tmp_path, no_calibration, damage, message):
    model = sharded(tiny_models["BertModel"], tmp_path)
    shard = max(model.glob("*.safetensors"))
    os.truncate(shard, shard.stat().st_size // 2) if damage == "truncate" else shard.unlink()
    out = tmp_path / "out"
    result = invoke("convert", model, "--experts", "4", "--out", out)
    assert_clean_failure(result, f"{shard} {message}", out)
    assert_one_line(result)


def estimated(model) -> str:
    """What the refusals say the output of ``convert model --experts 4`` needs, in words."""
    from densetomoe.conversion import Dense
    from densetomoe.planning import output_size
    from densetomoe.recipe import Recipe
    from densetomoe.stages import export

    needed = output_size(Dense.describe(str(model), False), Recipe.build(model=str(model), experts=4), None)
    return export._bytes(needed)


def fake_free_space(monkeypatch, free):
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=free))


@pytest.mark.parametrize("driver", ["in memory", "sequential"])
def test_too_little_free_space_is_refused_before_any_work(tiny_models, tiny_decoders, tmp_path, monkeypatch, no_calibration, driver):
    model = tiny_models["BertModel"] if driver == "in memory" else tiny_decoders["llama"]
    flags = ["--in-memory"] if driver == "in memory" else ["--sequential"]
    fake_free_space(monkeypatch, 1000)
    out = tmp_path / "out"
    result = invoke("convert", model, "--experts", "4", *flags, "--out", out)
    space = f"needs about {estimated(model)}, 1 kB free on its filesystem"
    assert_clean_failure(result, f"--out {out}: {space}; free some space or choose another --out", out)
    assert_one_line(result)


NO_SPACE = "Error while serializing: I/O error: No space left on device (os error 28)"  # what safetensors raises


@pytest.mark.parametrize("driver", ["in memory", "sequential"])
def test_a_disk_that_fills_during_the_write_is_one_line_and_leaves_nothing(tiny_decoders, texts_file, tmp_path, monkeypatch, driver):
    from safetensors import SafetensorError

    from densetomoe.stages import blockwise

    def full(*args, **kwargs):
        raise SafetensorError(NO_SPACE)

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full)  # save_pretrained's
    monkeypatch.setattr(blockwise, "save_file", full)  # one block at a time
    fake_free_space(monkeypatch, 10**9)  # the check before the work passes, whatever this disk holds
    out = tmp_path / "out"
    flags = ["--in-memory"] if driver == "in memory" else ["--sequential"]
    result = invoke("convert", tiny_decoders["llama"], "--experts", "4", "--calib", texts_file, *flags, "--out", out, *FAST)
    assert result.exit_code == 2, result.output
    *work, last = result.output.strip().splitlines()  # what the conversion logged, then the one line
    space = f"needs about {estimated(tiny_decoders['llama'])}, 1 GB free on its filesystem"  # as the check before the work
    assert last == f"error: cannot write --out {out}: No space left on device (os error 28) ({space})"
    assert "error" not in " ".join(work) and "Traceback" not in result.output
    assert not out.exists() and not [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")]

"""Export writes a complete, self-describing folder or nothing at all."""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess

import pytest
import yaml

import densetomoe
from conftest import quick_recipe
from densetomoe import devices
from densetomoe.conversion import Dense
from densetomoe.planning import OUTPUT_FILES, output_size
from densetomoe.processes import state as processes
from densetomoe.stages import export


@pytest.fixture(scope="module")
def converted(tiny_models, tmp_path_factory):
    texts = tmp_path_factory.mktemp("t") / "calib.txt"
    texts.write_text("\n".join(f"document {i} about rivers and markets and music" for i in range(40)))
    return densetomoe.convert(quick_recipe(tiny_models["BertForSequenceClassification"], texts), show_progress=False)


def write(conversion, out, overwrite=False):
    return export.write(
        out,
        overwrite,
        conversion.model,
        recipe_yaml=conversion.recipe.to_yaml(),
        card="card",
        figures=conversion.figures(),
        source_folder=conversion.source.path,
    )


def leftovers(out):
    return [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


@pytest.mark.parametrize(
    "interruption,raised",
    [(KeyboardInterrupt(), KeyboardInterrupt), (OSError(errno.ENOSPC, "No space left on device"), densetomoe.UsageError)],
)
def test_failure_midway_leaves_nothing(converted, tmp_path, monkeypatch, interruption, raised):
    """Ctrl-C goes on as it is; a write the OS refuses becomes the one line that names --out."""
    out = tmp_path / "out"

    def broken(*args, **kwargs):
        raise interruption

    monkeypatch.setattr(export.shutil, "copyfile", broken)
    with pytest.raises(raised) as caught:
        write(converted, out)
    assert not out.exists() and leftovers(out) == []
    if raised is densetomoe.UsageError:
        assert str(caught.value).startswith(f"cannot write --out {out}: No space left on device (needs about ")


@pytest.fixture
def small_filesystem(tmp_path):
    """A 200 kB tmpfs (mounting needs root; skipped elsewhere, where test_cli fakes the failure)."""
    folder = tmp_path / "small"
    folder.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(folder)]
    if os.geteuid() != 0 or subprocess.run(mount, capture_output=True, check=False).returncode:
        pytest.skip("mounting a tmpfs needs root")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


def test_a_real_full_filesystem_is_one_line_and_leaves_nothing(converted, small_filesystem):
    out = small_filesystem / "out"
    message = f"cannot write --out {re.escape(str(out))}: No space left on device .*free on its filesystem"
    with pytest.raises(densetomoe.UsageError, match=message):
        write(converted, out)
    assert list(small_filesystem.iterdir()) == []


def test_the_output_estimate_covers_the_folder(converted, tmp_path):
    """What convert checks before the work is at least what export writes, and not far more."""
    out = write(converted, tmp_path / "out")
    written = sum(path.stat().st_size for path in out.rglob("*") if path.is_file())
    dense = Dense.describe(converted.recipe.model, False)
    estimate = output_size(dense, converted.recipe, None)
    assert written < estimate < 1.25 * written + OUTPUT_FILES


def test_failed_overwrite_keeps_the_old_folder(converted, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    monkeypatch.setattr(export, "_copy_sentence_transformers", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        write(converted, out, overwrite=True)
    assert (out / "old.txt").read_text() == "old" and leftovers(out) == []


def test_folder_explains_itself(converted, tmp_path):
    out = write(converted, tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["MoEBertForSequenceClassification"]
    heads = ("Model", "ForPreTraining", "ForMaskedLM", "LMHeadModel", "ForSequenceClassification",
             "ForTokenClassification", "ForQuestionAnswering", "ForMultipleChoice")  # fmt: skip
    assert config["auto_map"]["AutoConfig"] == "modeling_densetomoe.MoEBertConfig"
    assert sorted(config["auto_map"].values())[1:] == sorted(f"modeling_densetomoe.MoEBert{h}" for h in heads)  # every head
    assert (out / "modeling_densetomoe.py").read_text() == (densetomoe.moe.__file__ and open(densetomoe.moe.__file__).read())
    recipe = yaml.safe_load((out / "densetomoe_recipe.yaml").read_text())
    assert recipe["experts"] == 4 and recipe["top_k"] == 2
    figures = json.loads((out / "densetomoe_conversion.json").read_text())
    assert 0 < figures["quick_eval"]["ffn_flops_ratio"] < 1
    assert figures["calibration"]["tokens"] == converted.stats.tokens > 0
    # where the stages computed: this process's device (accelerate's state, which a Trainer run with
    # use_cpu earlier in the process may have put on the CPU)
    assert figures["device"] == devices.describe(processes().device)
    source_tokenizer = json.loads((converted.source.path / "tokenizer_config.json").read_text())
    # the source's settings, without how this machine loaded them (transformers 5 saves is_local)
    assert json.loads((out / "tokenizer_config.json").read_text()) == source_tokenizer


def test_model_card_from_a_real_conversion(tiny_models, texts_file, tmp_path):
    out = tmp_path / "card"
    densetomoe.convert(quick_recipe(tiny_models["BertModel"], texts_file), out=out, show_progress=False)
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert "moe" in front["tags"] and "densetomoe" in front["tags"]
    for phrase in ("4 experts", "cosine of mean-pooled", "coactivation", "trust_remote_code=True", "num_experts_per_tok"):
        assert phrase in card
    assert str(tiny_models["BertModel"].parent) not in card  # a local path is never published


def test_missing_parent_folders_are_created(converted, tmp_path):
    out = write(converted, tmp_path / "runs" / "nested" / "out")
    assert (out / "config.json").is_file()


def test_unwritable_destination_is_refused(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(densetomoe.UsageError, match="not a writable folder"):
        export.check_destination(blocker / "out", overwrite=False)

"""The two schedulers: one block at a time (``--sequential``) gives the folder the whole model in memory
gives, and bad uses of it are answered with one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file
from typer.testing import CliRunner

import densetomoe
from conftest import quick_recipe, sample_inputs
from densetomoe.cli import app
from densetomoe.errors import UsageError
from densetomoe.stages import blockwise


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        out.update(load_file(path))
    return out


def same_folders(a: Path, b: Path) -> None:
    """The same tensors under the same names, and the same config."""
    ta, tb = tensors(a), tensors(b)
    assert sorted(ta) == sorted(tb)
    for name in ta:
        assert torch.equal(ta[name], tb[name]), name
    ca, cb = (json.loads((f / "config.json").read_text()) for f in (a, b))
    assert ca == cb


CASES = [
    ("BertForSequenceClassification", "remote-code", {}),
    ("DistilBertModel", "remote-code", {}),
    ("llama", "remote-code", {"experts": 3, "shared_experts": 1, "layers": [1]}),
    ("gpt2", "remote-code", {}),
    ("llama", "native", {}),
    ("qwen3", "native", {}),
]


@pytest.mark.parametrize("name,format,settings", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_one_block_at_a_time_writes_what_the_whole_model_in_memory_writes(tiny_models, tiny_decoders, texts_file, tmp_path, name, format, settings):
    source = tiny_models.get(name) or tiny_decoders[name]
    outs = {}
    reports = {}
    for sequential in (False, True):
        recipe = quick_recipe(source, texts_file, format=format, sequential=sequential, **settings)
        outs[sequential] = tmp_path / f"seq-{sequential}"
        reports[sequential] = densetomoe.convert(recipe, outs[sequential], show_progress=False).report
    same_folders(outs[False], outs[True])
    assert reports[False] == reports[True]  # the quick evaluation too, from the two held-out streams
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left behind
    model = densetomoe.load(outs[True])
    inputs = sample_inputs(outs[True])
    assert torch.isfinite(model(**inputs)[0]).all()


def test_a_sharded_source_is_read_and_a_large_output_is_written_in_shards(tiny_decoders, texts_file, tmp_path, monkeypatch):
    source = tmp_path / "sharded"
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_decoders["llama"])
    model.save_pretrained(source, max_shard_size="20KB")
    transformers.AutoTokenizer.from_pretrained(tiny_decoders["llama"]).save_pretrained(source)
    assert (source / blockwise.INDEX_FILE).is_file()
    monkeypatch.setattr(blockwise, "MAX_SHARD_BYTES", 20_000)
    out = tmp_path / "moe"
    densetomoe.convert(quick_recipe(source, texts_file, format="native", sequential=True), out, show_progress=False)
    index = json.loads((out / blockwise.INDEX_FILE).read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and all((out / f).is_file() for f in files)
    assert sorted(index["weight_map"]) == sorted(tensors(out))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    ids = torch.tensor([[1, 5, 9, 2, 7]])
    assert torch.isfinite(reloaded(ids).logits).all()


def test_the_shard_writer_holds_less_than_a_shard_and_copies_only_what_shares_storage(tmp_path):
    writer = blockwise.ShardWriter(tmp_path, max_shard_bytes=1000)
    blocks = [{f"b{n}.w": torch.full((75,), float(n)), f"b{n}.b": torch.zeros(0)} for n in range(4)]  # 300 bytes each
    writer.add(blocks[0], copy=False)
    writer.add(blocks[1], copy=False)
    assert writer.pending_bytes == 600 and writer.pending["b0.w"].data_ptr() == blocks[0]["b0.w"].data_ptr()  # waiting, not copied
    writer.add(blocks[2], copy=False)  # 900 bytes: a fourth block would not fit, so they are written now
    assert writer.pending_bytes == 0 and writer.shards == [["b0.w", "b0.b", "b1.w", "b1.b", "b2.w", "b2.b"]]
    fused = torch.arange(8.0)
    writer.add({"q": fused[:4], "k": fused[4:]}, copy=False)  # two views of one storage: one is copied
    writer.add({"copied": blocks[3]["b3.w"]})
    assert writer.pending["copied"].data_ptr() != blocks[3]["b3.w"].data_ptr()
    files = writer.close()
    saved = {name: t for f in files if f.suffix == ".safetensors" for name, t in load_file(f).items()}
    assert torch.equal(saved["k"], fused[4:]) and torch.equal(saved["b2.w"], blocks[2]["b2.w"])


def test_what_waits_for_a_shard_stays_small(tmp_path):
    """Blocks larger than what may wait are written as they come (a 1B block would otherwise stay in
    memory while the next converts); smaller ones share a shard."""
    writer = blockwise.ShardWriter(tmp_path, max_shard_bytes=10_000, max_waiting_bytes=500)
    writer.add({"a": torch.zeros(50)}, copy=False)  # 200 bytes: waits
    assert writer.pending_bytes == 200 and not writer.shards
    writer.add({"b": torch.zeros(75)}, copy=False)  # 500 bytes waiting: written, both in one shard
    assert writer.pending_bytes == 0 and writer.shards == [["a", "b"]]
    writer.add({"c": torch.zeros(1000)}, copy=False)  # one large block: alone, at once
    assert writer.pending_bytes == 0 and writer.shards[-1] == ["c"]


def test_sequential_refuses_what_it_cannot_do_in_one_line(tiny_decoders, texts_file, tmp_path):
    with pytest.raises(UsageError, match="--out"):
        densetomoe.convert(quick_recipe(tiny_decoders["llama"], texts_file, sequential=True), None, show_progress=False)
    with pytest.raises(UsageError, match="densetomoe distill"):
        quick_recipe(tiny_decoders["llama"], texts_file, sequential=True, distill={"steps": 2})
    result = CliRunner().invoke(app, ["convert", str(tiny_decoders["llama"]), "--sequential", "--ffn-budget", "0.5", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "top_k instead" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_the_cli_converts_sequentially(tiny_decoders, texts_file, tmp_path):
    out = tmp_path / "moe"
    result = CliRunner().invoke(
        app, ["convert", str(tiny_decoders["llama"]), "--sequential", "--experts", "4", "--top-k", "2", "--calib", str(texts_file),
              "--calib-tokens", "512", "--out", str(out), "--no-progress"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert densetomoe.Recipe.from_yaml(out / "densetomoe_recipe.yaml", model="x").sequential is True


def test_no_more_than_one_block_is_materialised_at_a_time(tiny_decoders, texts_file, tmp_path, monkeypatch):
    from densetomoe.moe import blocks_of

    in_memory, frames = [], []
    load_block, frame = blockwise.load_block, blockwise.frame

    def counting(model, arch, index, checkpoint, dtype, device):
        block = load_block(model, arch, index, checkpoint, dtype, device)
        in_memory.append(sum(any(not p.is_meta for p in b.parameters()) for b in blocks_of(model, arch.layers)))
        assert all(p.is_meta for f in frames for p in f.parameters())  # nor the embeddings and head meanwhile
        return block

    monkeypatch.setattr(blockwise, "load_block", counting)
    monkeypatch.setattr(blockwise, "frame", lambda *args: frames.append(frame(*args)) or frames[-1])
    densetomoe.convert(quick_recipe(tiny_decoders["llama"], texts_file, sequential=True), tmp_path / "moe", show_progress=False)
    assert in_memory == [1, 1]  # two blocks, each alone when loaded
    assert len(frames) == 2  # the frame: read for the first block's inputs, released, read again for the head


def test_a_model_too_large_for_memory_is_refused_in_one_line_that_names_the_sequential_path(tiny_decoders, tmp_path, monkeypatch):
    from densetomoe.stages import load

    needed = load.parameter_count(tiny_decoders["llama"]) * 4
    assert needed == sum(p.numel() for p in transformers.AutoModelForCausalLM.from_pretrained(tiny_decoders["llama"]).parameters()) * 4
    monkeypatch.setattr(load, "available_memory", lambda: needed - 1)
    out = tmp_path / "moe"
    result = CliRunner().invoke(app, ["convert", str(tiny_decoders["llama"]), "--experts", "4", "--out", str(out)])
    assert result.exit_code == 2 and "--sequential" in result.output and "Traceback" not in result.output
    assert not out.exists()


def test_large_decoders_convert_one_block_at_a_time_by_default(tiny_models, tiny_decoders, texts_file, tmp_path, monkeypatch):
    from densetomoe import defaults

    monkeypatch.setattr(defaults, "SEQUENTIAL_FROM", 1)  # every tiny model counts as large
    cases = {
        "decoder": (quick_recipe(tiny_decoders["llama"], texts_file), True),
        "encoder": (quick_recipe(tiny_models["BertModel"], texts_file), False),
        "distilled": (quick_recipe(tiny_decoders["llama"], texts_file, distill={"steps": 1, "eval_texts": 0}), False),
        "asked in memory": (quick_recipe(tiny_decoders["llama"], texts_file, sequential=False), False),
    }
    for name, (recipe, expected) in cases.items():
        result = densetomoe.convert(recipe, tmp_path / name.replace(" ", "-"), show_progress=False)
        assert result.recipe.sequential is expected, name  # the recipe written to the folder says which ran
    monkeypatch.setattr(defaults, "SEQUENTIAL_FROM", 10**12)
    assert defaults.with_model_defaults(quick_recipe(tiny_decoders["llama"], texts_file)).sequential is False

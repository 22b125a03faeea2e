"""Under ``accelerate launch`` the layers are shared out between processes and the result is the one
process's result: run for real, two CPU processes talking over gloo."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_schedulers import tensors

import densetomoe
from conftest import quick_recipe
from densetomoe import folder

pytestmark = pytest.mark.slow


def launch(args: list[str], processes: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # two processes on two cores: one thread each
    if processes == 1:
        return subprocess.run([sys.executable, "-m", "densetomoe.cli", *args], capture_output=True, text=True, timeout=600, env=env)
    accelerate = Path(sys.executable).with_name("accelerate")
    if not accelerate.is_file():
        pytest.skip("accelerate's launcher is not installed beside this Python")
    # --multi_gpu: torchrun's launcher, which starts the processes (they talk over gloo on a machine without GPUs)
    command = [str(accelerate), "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "densetomoe.cli", *args]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)


def convert_args(source: Path, texts: Path, out: Path, *extra: str) -> list[str]:
    return ["convert", str(source), "--experts", "4", "--top-k", "2", "--calib", str(texts), "--calib-tokens", "1024",
            "--out", str(out), "--no-progress", *extra]  # fmt: skip


def test_two_processes_convert_what_one_process_converts(tiny_decoders, texts_file, tmp_path):
    one = tmp_path / "one"
    densetomoe.convert(quick_recipe(tiny_decoders["llama"], texts_file, sample_tokens=8192, router_steps=400, router_hidden=128), one, show_progress=False)
    two = tmp_path / "two"
    run = launch(convert_args(tiny_decoders["llama"], texts_file, two))
    assert run.returncode == 0, run.stderr[-3000:]
    assert "layers shared out between 2 processes" in run.stdout + run.stderr
    a, b = tensors(one), tensors(two)
    assert sorted(a) == sorted(b)
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_two_processes_distill_and_write_one_folder(tiny_decoders, texts_file, tmp_path):
    out = tmp_path / "moe"
    run = launch(convert_args(tiny_decoders["llama"], texts_file, out, "--distill-steps", "4"))
    assert run.returncode == 0, run.stderr[-3000:]
    assert (run.stdout + run.stderr).count("layers shared out between 2 processes") == 1  # only the first process speaks
    assert run.stdout.count("measured on held-out text") == 1
    figures = folder.read_figures(out)
    assert figures["distillation"]["steps"][-1] == 4
    assert torch.isfinite(densetomoe.load(out)(torch.tensor([[1, 2, 3, 4]])).logits).all()
    shutil.rmtree(out)


def test_two_processes_distill_as_one_process_does(tiny_decoders, texts_file, tmp_path):
    """One global batch per step, split in two: the same training as one process, up to how each
    process normalises its share of the loss."""
    recipe = tmp_path / "recipe.yaml"
    # Windows of 32 tokens, 8 a step: the tiny text holds more than one batch of them (with fewer, one
    # process would take a short batch and two would fill theirs up by repeating windows).
    recipe.write_text("distill:\n  steps: 4\n  lr: 0.01\n  warmup: 0\n  eval_texts: 0\n  batch_size: 8\n  seq_len: 32\n")
    outs = {}
    for name, processes, extra in (("untrained", 1, ["--no-distill"]), ("one", 1, []), ("two", 2, [])):
        outs[name] = tmp_path / name
        run = launch(convert_args(tiny_decoders["llama"], texts_file, outs[name], "--recipe", str(recipe), *extra), processes)
        assert run.returncode == 0, run.stderr[-3000:]
    trained = {n: folder.read_figures(outs[n])["distillation"] for n in ("one", "two")}
    assert trained["one"]["tokens"] == trained["two"]["tokens"]  # one global batch per step: the same texts
    untrained, one, two = (tensors(outs[n]) for n in ("untrained", "one", "two"))
    moved = {n: float((one[n] - untrained[n]).norm()) for n in one}
    assert max(moved.values()) > 0.1  # training moved the experts and routers
    # Each process computes the loss on its half (the load-balancing term sees half the tokens), and
    # Adam's first steps follow the gradient's sign: close, not bit-identical.
    apart = {n: float((one[n] - two[n]).norm()) / moved[n] for n in one if moved[n] > 0}
    assert max(apart.values()) < 0.35, sorted(apart.items(), key=lambda kv: -kv[1])[:3]


FSDP_SCRIPT = """
import sys
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

import densetomoe
from densetomoe.stages.distill import skeleton, unsharded

dist.init_process_group("gloo")
model = densetomoe.load(sys.argv[1])
ids = torch.tensor([[5, 9, 2, 7, 3, 8, 1, 4]])
expected = model(ids).logits
weights = {name: t.clone() for name, t in model.state_dict().items()}
like = skeleton(model)  # before sharding, as distill_model takes it
mesh = init_device_mesh("cpu", (dist.get_world_size(),))
for block in model.model.layers:  # as accelerate's TRANSFORMER_BASED_WRAP does, then the root
    fully_shard(block, mesh=mesh)
fully_shard(model, mesh=mesh)
assert any(isinstance(p, DTensor) for p in model.parameters())
torch.testing.assert_close(model(ids).logits, expected)  # sharded, it computes the same
plain = unsharded(model, "cpu", like)
assert type(plain).__name__ == sys.argv[2], type(plain)
state = plain.state_dict()
assert sorted(state) == sorted(weights) and not any(isinstance(t, DTensor) for t in state.values())
assert [name for name, t in weights.items() if not torch.equal(state[name], t)] == []
torch.testing.assert_close(plain(ids).logits, expected)  # (a layout may change the last bits)
tied = plain.config.tie_word_embeddings
assert (plain.lm_head.weight is plain.get_input_embeddings().weight) == tied
print("plain again", dist.get_rank())
dist.destroy_process_group()
"""


@pytest.mark.parametrize("format", ["remote-code", "native"])
def test_a_model_fsdp_sharded_for_distillation_comes_back_whole(tiny_decoders, texts_file, tmp_path, format):
    """accelerate enables FSDP on GPUs only, so FSDP2 itself shards the model here, over gloo on two CPU
    processes, as accelerate's FSDP config would: :func:`unsharded` must give back, in every process,
    the ordinary model that evaluation and export need (with dynamic top-k's coverage and the tied head)."""
    out = tmp_path / "moe"
    settings = {"routing": "top-k"} if format == "native" else {}
    densetomoe.convert(quick_recipe(tiny_decoders["llama"], texts_file, format=format, **settings), out, show_progress=False)
    name = densetomoe.load(out).__class__.__name__
    script = tmp_path / "fsdp.py"
    script.write_text(FSDP_SCRIPT)
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([str(torchrun), "--nproc_per_node", "2", str(script), str(out), name], capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("plain again") == 2

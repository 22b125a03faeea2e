"""Where the stages compute: the device asked for is checked in one line, and what moves there moves whole.

The CUDA path itself runs on a GPU machine (``evals/tools/gpu_check.sh``; figures in docs/large-models.md); here, the
``meta`` device stands in for an accelerator wherever only placement is checked.
"""

from __future__ import annotations

import pytest
import torch
from test_cli import FAST, assert_clean_failure, invoke

from densetomoe import devices
from densetomoe.errors import UsageError
from densetomoe.ffn import DenseFFN
from densetomoe.surgery import LayerSplit

no_accelerator = pytest.mark.skipif(torch.accelerator.is_available(), reason="checks the refusal on a machine without an accelerator")


def test_auto_is_the_process_device_and_cpu_is_always_there():
    assert devices.resolve(None, torch.device("cpu")) == torch.device("cpu")
    assert devices.resolve("auto", torch.device("meta")) == torch.device("meta")  # whatever the process has
    assert devices.resolve("cpu", torch.device("meta")) == torch.device("cpu")


@pytest.mark.parametrize("asked", ["gpu", "cuda:x", ""])
def test_a_name_that_is_no_device_is_refused(asked):
    with pytest.raises(UsageError, match="not a device name"):
        devices.resolve(asked, torch.device("cpu"))


@no_accelerator
def test_an_accelerator_the_machine_lacks_is_refused_with_the_way_out():
    with pytest.raises(UsageError, match="no cuda device; use --device cpu"):
        devices.resolve("cuda", torch.device("cpu"))


@no_accelerator
def test_convert_on_a_missing_device_fails_in_one_line_and_writes_nothing(tiny_decoders, tmp_path):
    out = tmp_path / "moe"
    result = invoke("convert", tiny_decoders["llama"], "--experts", 4, "--top-k", 2, "--device", "cuda", "--out", out, *FAST)
    assert_clean_failure(result, "--device cuda: this machine has no cuda device", out)


def test_nested_tensors_move_and_everything_else_stays():
    t = torch.ones(2)
    moved = devices.to_device({"a": [t, (t, 3)], "b": "text", "c": None}, "meta")
    assert moved["a"][0].is_meta and moved["a"][1][0].is_meta
    assert isinstance(moved["a"][1], tuple) and moved["a"][1][1] == 3
    assert moved["b"] == "text" and moved["c"] is None
    assert not t.is_meta  # the original is left where it was


def _ffn(d_ff=8, hidden=4):
    return DenseFFN(torch.randn(d_ff, hidden), None, torch.randn(hidden, d_ff), torch.zeros(hidden), torch.nn.SiLU(), torch.randn(d_ff, hidden))


def test_a_layer_split_moves_every_tensor_it_holds():
    from densetomoe.moe import Router

    split = LayerSplit(
        routed=_ffn(), labels=torch.arange(8) % 2, router=Router(4, 2, 0), experts=2, activation="silu",
        sample=torch.randn(5, 4), shared=_ffn(2), refit_to=_ffn(),
    )  # fmt: skip
    moved = split.to("meta")
    tensors = [moved.labels, moved.sample, *moved.router.parameters()]
    for ffn in (moved.routed, moved.shared, moved.refit_to):
        tensors += [t for t in (ffn.w_up, ffn.w_gate, ffn.w_down, ffn.b_down) if t is not None]
    assert all(t.is_meta for t in tensors)
    assert moved.routed.b_up is None and moved.routed.activation is split.routed.activation
    assert not split.sample.is_meta and not split.routed.w_up.is_meta  # a new split: the old one's tensors stay

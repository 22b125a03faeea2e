"""What a model costs: parameters, analytical FLOPs per token, and measured speed.

FLOPs are counted from shapes (2 per multiply-add): every linear layer once per token, the MoE
feed-forward for its ``top_k`` experts plus its router and its unselected experts' means, and
attention's two sequence-length products (scores and weighted values) per layer. Speed is measured,
never assumed: models are timed in interleaved rounds in the same process and compared by their
medians.
"""

from __future__ import annotations

import contextlib
import fcntl
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..moe import MoEFeedForward


@dataclass
class Cost:
    params_total: int
    params_active: int  # per token: inactive experts' weights excluded
    ffn_flops: float  # per token, all FFN layers
    flops: float  # per token, the whole forward at the given sequence length

    def as_dict(self) -> dict:
        return asdict(self)


def ffn_flops(hidden_size: int, neurons: int, gated: bool) -> float:
    """FLOPs per token (2 per multiply-add) of ``neurons`` FFN neurons: up, down and, if gated, gate."""
    return 2.0 * hidden_size * (3 if gated else 2) * neurons


def _expert_params(m: MoEFeedForward) -> int:
    per_neuron = m.hidden_size * (3 if m.gated else 2) + (1 if m.b_up is not None else 0) * (2 if m.gated else 1)
    return per_neuron * m.expert_size


def active_neurons(m: MoEFeedForward) -> int:
    """FFN neurons one token computes: its ``top_k`` experts' plus the shared expert's."""
    return min(m.top_k, m.num_experts) * m.expert_size + m.shared_size


def moe_ffn_flops(m: MoEFeedForward) -> float:
    """Per token: the active neurons' projections (:func:`active_neurons`), plus, when tokens skip
    experts (:attr:`~densetomoe.moe.MoEFeedForward.sparse`), the router and the unselected experts'
    mean outputs (one ``experts x hidden`` product: 6% of SmolLM2's FFN at 256 experts)."""
    flops = ffn_flops(m.hidden_size, active_neurons(m), m.gated)
    if m.sparse:
        flops += sum(_linear_flops(layer) or 0.0 for layer in m.router.modules())
        flops += 2.0 * m.num_experts * m.hidden_size
    return flops


def model_ffn_flops(modules: list[MoEFeedForward], dense_ffn_size: int, num_layers: int) -> tuple[float, float]:
    """``(dense, moe)`` multiply-adds x 2 per token summed over all FFN layers (router included), for a
    model whose converted layers are ``modules``."""
    if not modules:
        return 0.0, 0.0
    per_layer = ffn_flops(modules[0].hidden_size, dense_ffn_size, modules[0].gated)  # a dense FFN
    unconverted = (num_layers - len(modules)) * per_layer
    return num_layers * per_layer, unconverted + sum(moe_ffn_flops(m) for m in modules)


def is_sparse_block(module: nn.Module) -> bool:
    """A transformers MoE block: a ``gate`` router with a fixed ``top_k`` and stacked ``experts``."""
    gate, experts = getattr(module, "gate", None), getattr(module, "experts", None)
    return hasattr(gate, "top_k") and hasattr(experts, "gate_up_proj") and hasattr(experts, "down_proj")


def expert_neurons(block: nn.Module) -> int:
    """Neurons of one routed expert (``gate_up_proj`` is ``(experts, 2 x neurons, hidden)``)."""
    return block.experts.gate_up_proj.shape[1] // 2


def block_flops(block: nn.Module) -> tuple[float, int]:
    """``(FLOPs per token, inactive parameters)`` of a sparse block's router and routed experts: the
    router's product, and ``top_k`` of the experts' projections (the shared expert is counted as the
    linear layers it is)."""
    experts, k, count = block.experts, block.gate.top_k, block.gate.weight.shape[0]
    per_expert = (experts.gate_up_proj.numel() + experts.down_proj.numel()) // count  # parameters
    routed = ffn_flops(experts.gate_up_proj.shape[2], k * expert_neurons(block), gated=True)
    return 2.0 * block.gate.weight.numel() + routed, (count - k) * per_expert


def _linear_flops(module: nn.Module) -> float | None:
    if isinstance(module, nn.Linear):
        return 2.0 * module.in_features * module.out_features
    if type(module).__name__ == "Conv1D":  # GPT-2: weight (in, out)
        return 2.0 * module.weight.numel()
    return None


def cost(model: nn.Module, seq_len: int, ffn_linears: set[nn.Module] | None = None) -> Cost:
    """Parameters and per-token FLOPs of ``model`` at ``seq_len`` tokens per sequence.

    ``ffn_linears``: the linear layers that make up the FFNs, for a dense model or a native one's
    shared experts (so that FFN FLOPs can be told apart); MoE feed-forwards are recognised by type,
    a native folder's sparse blocks by their shape (:func:`is_sparse_block`).
    """
    ffn_linears = ffn_linears or set()
    total = sum(p.numel() for p in model.parameters())
    inactive, ffn, flops = 0, 0.0, 0.0

    def visit(module: nn.Module) -> None:
        nonlocal inactive, ffn, flops
        if isinstance(module, MoEFeedForward):
            inactive += (module.num_experts - min(module.top_k, module.num_experts)) * _expert_params(module)
            f = moe_ffn_flops(module)
            ffn, flops = ffn + f, flops + f
            return
        if is_sparse_block(module):  # a native folder's block: router and top-k experts here, its shared expert below
            f, unused = block_flops(module)
            inactive += unused
            ffn, flops = ffn + f, flops + f
            for name, child in module.named_children():
                if name not in ("gate", "experts"):
                    visit(child)
            return
        f = _linear_flops(module)
        if f is not None:
            flops += f
            if module in ffn_linears:
                ffn += f
            return
        for child in module.children():
            visit(child)

    visit(model)
    config = getattr(model, "config", None)
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layers", 0) or 0
    hidden = getattr(config, "hidden_size", None) or getattr(config, "dim", 0) or 0
    flops += layers * 2 * 2.0 * seq_len * hidden  # QK^T and attention x V, per token
    return Cost(total, total - inactive, ffn, flops)


@dataclass
class Timing:
    median_s: float
    runs_s: list[float]
    tokens: int

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.median_s


@torch.inference_mode()
def time_models(models: dict[str, nn.Module], inputs: dict, repeats: int = 7, warmup: int = 2) -> dict[str, Timing]:
    """Median forward time of each model on ``inputs``, from interleaved rounds (A B A B ...), so
    that drifts of the machine (other load, clocks) fall on all models alike."""
    for _ in range(warmup):
        for model in models.values():
            model(**inputs)
    runs = {name: [] for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            start = time.perf_counter()
            model(**inputs)
            runs[name].append(time.perf_counter() - start)
    tokens = int(inputs["attention_mask"].sum()) if "attention_mask" in inputs else inputs["input_ids"].numel()
    return {name: Timing(statistics.median(r), r, tokens) for name, r in runs.items()}


def random_inputs(vocab_size: int, batch: int, seq_len: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, min(vocab_size, 20000), (batch, seq_len), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


BENCH_LOCK = "/tmp/bench.lock"


@contextlib.contextmanager
def bench_lock(path: str = BENCH_LOCK):
    """Hold ``path`` exclusively, as ``flock path <command>`` would: timed sections of benchmarks on the
    same cores never overlap."""
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def median_rounds(names: list[str], run: Callable[[str], object], repeats: int) -> dict[str, list]:
    """``run(name)`` for every name, ``repeats`` interleaved rounds (the order rotates each round), so
    that drifts of the machine fall on all alike; the results per name, for medians."""
    results: dict[str, list] = {n: [] for n in names}
    for r in range(repeats):
        for n in names[r % len(names) :] + names[: r % len(names)]:
            results[n].append(run(n))
    return results

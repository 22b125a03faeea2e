"""Run calibration text through the dense model and keep bounded statistics per FFN layer.

Memory stays bounded whatever the amount of text: per layer, running per-neuron sums and a uniform
reservoir sample of the FFN's *inputs* (``sample_tokens x hidden``). Neuron activations for the
sampled tokens are recomputed from those inputs and the layer's weights when they are needed, so the
full activation matrix of every token is never held.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..archs import Arch
from ..console import progress
from ..data import batches, teacher_forced
from ..ffn import DenseFFN
from ..moe import blocks_of


class Reservoir:
    """A uniform random sample of at most ``size`` rows from a stream (Vitter's algorithm R)."""

    def __init__(self, size: int, generator: torch.Generator):
        self.size, self.generator, self.seen = size, generator, 0
        self.rows: torch.Tensor | None = None
        self.filled = 0

    def add(self, rows: torch.Tensor) -> None:
        if self.rows is None:
            self.rows = rows.new_empty(self.size, rows.shape[1])
        take = min(self.size - self.filled, rows.shape[0])
        self.rows[self.filled : self.filled + take] = rows[:take]
        self.filled += take
        self.seen += take
        rest = rows[take:]
        if len(rest):
            # the slots are drawn where the generator draws (the CPU), whatever device the rows are on
            here = self.generator.device
            index = torch.arange(self.seen, self.seen + len(rest), dtype=torch.float64, device=here)
            slot = (torch.rand(len(rest), generator=self.generator, dtype=torch.float64, device=here) * (index + 1)).long()
            # Several rows of one batch can draw the same slot. Row by row, the last of them would win;
            # an assignment with repeated indices (rows[slot] = rest) leaves the winner undefined, and on
            # several threads it changes from run to run. Pick the last row per slot explicitly.
            keep = (slot < self.size).nonzero().squeeze(1)  # positions in rest
            last = torch.full((self.size,), -1, dtype=torch.long, device=here).scatter_reduce_(0, slot[keep], keep, "amax")
            taken = (last >= 0).nonzero().squeeze(1)  # slots replaced
            self.rows[taken.to(rows.device)] = rest[last[taken].to(rows.device)]
            self.seen += len(rest)

    def sample(self) -> torch.Tensor:
        return self.rows[: self.filled]


@dataclass
class LayerStats:
    """What calibration learned about one FFN layer."""

    inputs: torch.Tensor  # (samples, hidden): reservoir of FFN inputs
    tokens: int  # tokens seen
    mean_abs: torch.Tensor  # (d_ff,): mean |activation| per neuron
    fire_rate: torch.Tensor  # (d_ff,): share of tokens with activation > 0

    def subset(self, neurons: torch.Tensor) -> LayerStats:
        return LayerStats(self.inputs, self.tokens, self.mean_abs[neurons], self.fire_rate[neurons])


@dataclass
class ActivationStats:
    layers: dict[int, LayerStats] = field(default_factory=dict)
    tokens: int = 0
    sequences: int = 0


STREAMS = ("sample", "split")  # what a layer draws random numbers for: its calibration sample, its split


def layer_generator(seed: int, index: int, stream: str = "sample") -> torch.Generator:
    """Layer ``index``'s own random stream for ``stream`` (:data:`STREAMS`), so that what a layer draws
    does not depend on which layers were handled before it, or where: all at once, one block at a
    time, or shared out between the processes of an ``accelerate launch``."""
    return torch.Generator().manual_seed((seed * 1_000_003 + index) * len(STREAMS) + STREAMS.index(stream))


class LayerRecorder:
    """Running per-neuron statistics and a reservoir sample of one FFN layer's inputs."""

    def __init__(self, ffn: DenseFFN, sample_tokens: int, generator: torch.Generator):
        self.ffn = ffn
        self.reservoir = Reservoir(sample_tokens, generator)
        self.sums = torch.zeros(ffn.size, dtype=torch.float64, device=ffn.w_up.device)
        self.fired = torch.zeros(ffn.size, dtype=torch.float64, device=ffn.w_up.device)

    def add(self, x: torch.Tensor) -> None:
        """``x`` ``(real tokens, hidden)``: FFN inputs, padding already removed."""
        a = self.ffn.neurons(x)  # (real tokens, d_ff)
        self.sums += a.abs().sum(0, dtype=torch.float64)
        self.fired += (a > 0).sum(0, dtype=torch.float64)
        self.reservoir.add(x)

    def stats(self, tokens: int) -> LayerStats:
        return LayerStats(
            inputs=self.reservoir.sample(),
            tokens=tokens,
            mean_abs=(self.sums / max(tokens, 1)).float(),
            fire_rate=(self.fired / max(tokens, 1)).float(),
        )

    def hook(self, mask: dict[str, torch.Tensor]):
        """A forward pre-hook for the FFN's input projection; ``mask["tokens"]`` marks the real tokens."""
        return real_token_inputs(self.add, mask)


def real_token_inputs(add: Callable[[torch.Tensor], None], mask: dict[str, torch.Tensor]):
    """A forward pre-hook that hands a module's input to ``add`` as ``(real tokens, hidden)`` float32
    rows, padding removed (``mask["tokens"]``, set before each batch, marks the real tokens)."""

    def record(module, args):
        x = args[0].float()
        add(x.reshape(-1, x.shape[-1])[mask["tokens"].reshape(-1)])  # OPT passes (tokens, hidden)

    return record


@torch.no_grad()
def calibrate(
    model: nn.Module,
    tokenizer,
    texts: list[str],
    arch: Arch,
    ffns: dict[int, DenseFFN],
    *,
    tokens: int,
    seq_len: int,
    batch_size: int,
    sample_tokens: int,
    seed: int = 0,
    show_progress: bool = True,
) -> ActivationStats:
    """Feed ``texts`` until ``tokens`` real (non-padding) tokens have passed; hook the FFN inputs of the
    layers in ``ffns``."""
    blocks = blocks_of(model, arch.layers)
    mask: dict[str, torch.Tensor] = {}
    recorders = {i: LayerRecorder(ffn, sample_tokens, layer_generator(seed, i)) for i, ffn in ffns.items()}
    handles = [blocks[i].get_submodule(arch.up).register_forward_pre_hook(r.hook(mask)) for i, r in recorders.items()]
    stats = ActivationStats()
    device = next(model.parameters()).device
    try:
        with progress(show_progress) as bar:
            task = bar.add_task("calibrating", total=tokens)
            for batch in calibration_batches(tokenizer, texts, seq_len, batch_size, tokens):
                if arch.seq2seq:  # the decoder's FFNs see the same text, teacher-forced
                    batch = teacher_forced(batch)
                mask["tokens"] = batch["attention_mask"].bool().to(device)
                model(**{k: v.to(device) for k, v in batch.items()})
                stats.tokens += int(batch["attention_mask"].sum())
                stats.sequences += len(batch["input_ids"])
                bar.update(task, completed=min(stats.tokens, tokens))
    finally:
        for handle in handles:
            handle.remove()
    stats.layers = {i: r.stats(stats.tokens) for i, r in recorders.items()}
    return stats


def calibration_batches(tokenizer, texts: list[str], seq_len: int, batch_size: int, tokens: int):
    """The batches calibration runs: as many as it takes to pass ``tokens`` real tokens."""
    seen = 0
    for batch in batches(tokenizer, texts, seq_len, batch_size):
        yield batch
        seen += int(batch["attention_mask"].sum())
        if seen >= tokens:
            return

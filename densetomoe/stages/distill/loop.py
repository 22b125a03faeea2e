"""The training loop of distillation (:mod:`densetomoe.stages.distill` says what it trains and why)."""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ... import memory
from ...archs import Arch
from ...console import progress
from ...data import packed
from ...errors import UsageError
from ...evaluation.quick import next_token_nll
from ...recipe import Distill
from .data import STATE_FILE, latest_checkpoint, save, tokenize, training_texts, windows
from .fsdp import skeleton, unsharded
from .gates import engine_routing, param_groups
from .losses import fused_head, losses, total
from .teacher import check_apart, moe_blocks, trainable


@dataclass
class History:
    """The loss curve: one point every ``log_every`` steps, a held-out point every ``eval_every``."""

    steps: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    parts: dict[str, list[float]] = field(default_factory=dict)
    held_out: list[dict] = field(default_factory=list)  # {step, seconds, loss[, perplexity]}
    dense_perplexity: float | None = None  # causal LM: the teacher's on the same held-out texts
    step: int = 0
    elapsed: float = 0.0  # training seconds, over all resumed runs
    tokens: int = 0  # real tokens trained on
    settings: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> History:
        return cls(**data)


def lr_factor(step: int, elapsed: float, settings: Distill) -> float:
    """Linear warm-up, then cosine decay to ``final_lr`` (a fraction of the peak) over whichever budget
    (steps or minutes) runs out first."""
    if step < settings.warmup:
        return (step + 1) / (settings.warmup + 1)
    done = 0.0
    if settings.steps:
        done = max(done, (step - settings.warmup) / max(settings.steps - settings.warmup, 1))
    if settings.minutes:
        done = max(done, elapsed / (settings.minutes * 60))
    end = settings.final_lr
    return end + (1 - end) * 0.5 * (1 + math.cos(math.pi * min(done, 1.0)))


def _finished(history: History, settings: Distill) -> bool:
    if settings.steps is not None and history.step >= settings.steps:
        return True
    return settings.minutes is not None and history.elapsed >= settings.minutes * 60


def distill_model(
    student: nn.Module,
    teacher: nn.Module,
    tokenizer,
    settings: Distill,
    arch: Arch | None,
    default_texts: list[str],
    held_out_texts: list[str],
    *,
    workdir: Path | None = None,
    resume: bool = False,
    show_progress: bool = True,
    log: Callable[[str], None] = lambda message: None,
    seed: int = 0,
) -> tuple[nn.Module, History]:
    """Train ``student`` to match ``teacher``; returns the trained student and the loss history.

    The student comes back as an ordinary module on the device it came from: ``student`` itself,
    trained in place, or, where ``accelerate launch`` sharded it with FSDP (which turns the module
    into a sharded one in place), a plain copy of it gathered whole (:func:`unsharded`). Go on with
    the returned module, not with ``student``.

    ``teacher`` is frozen and put in eval mode here; it may share any weight the student does not
    train (:func:`dense_teacher`, :func:`share_frozen`), and none that it does.

    ``default_texts`` (the calibration text) are used when ``settings.data`` is None or names them
    (:func:`training_texts`); ``held_out_texts`` give the held-out points of the curve and are removed
    from the training text. With ``workdir``, checkpoints are written there every
    ``settings.checkpoint_every`` steps and removed once training has finished.
    """
    from accelerate.utils import set_seed

    texts = training_texts(settings.data, default_texts)
    unseen = set(held_out_texts)
    texts = [t for t in texts if t not in unseen]  # the held-out points must stay held out
    if not texts:
        raise UsageError("distillation has no training text")
    accelerator = _accelerator(settings)
    set_seed(seed)
    home = next(student.parameters()).device
    like = skeleton(student)  # should FSDP shard the student: what it turns back into, after training
    params = trainable(student, settings)
    check_apart(teacher, params)
    moe_modules = moe_blocks(student)
    if not moe_modules:
        raise UsageError("the model has no MoE layers to distill")
    optimizer = torch.optim.AdamW(param_groups(student, params, settings), lr=settings.lr, weight_decay=settings.weight_decay)
    decoder = arch is not None and arch.decoder  # read as causal LMs are trained: windows of one token stream
    data, collate = (list(packed(tokenizer, texts, settings.seq_len)), windows) if decoder else (texts, tokenize(tokenizer, settings.seq_len))
    loader = torch.utils.data.DataLoader(
        data, batch_size=settings.batch_size, shuffle=True, drop_last=len(data) > settings.batch_size,
        collate_fn=collate, generator=torch.Generator().manual_seed(seed),
    )  # fmt: skip
    student, optimizer, loader = accelerator.prepare(student, optimizer, loader)
    teacher.to(accelerator.device).eval().requires_grad_(False)
    head = None  # the output layer the KL goes through, where that is exact (a causal LM's)
    if decoder:
        head = fused_head(accelerator.unwrap_model(student), teacher, data[0][None, :16].to(accelerator.device), accelerator.autocast)
    held_out = _held_out(accelerator, tokenizer, held_out_texts, settings, collate, decoder)
    history = _history(accelerator, settings, workdir if resume else None, resume, log)
    trainer = _Trainer(accelerator, student, teacher, settings, moe_modules, head, params, optimizer, held_out, decoder)
    with engine_routing(accelerator.unwrap_model(student)):
        trainer.train(loader, history, workdir, show_progress)
    student = unsharded(accelerator.unwrap_model(trainer.student), home, like)
    student.eval().requires_grad_(False).to(home)
    teacher.to(home)
    accelerator.wait_for_everyone()
    if workdir is not None and accelerator.is_main_process:
        shutil.rmtree(workdir, ignore_errors=True)  # finished: nothing left to resume
    log(
        f"distilled {history.step} steps, {history.tokens:,} tokens in {history.elapsed / 60:.1f} min; "
        f"held-out loss {history.held_out[0]['loss']:.4f} -> {history.held_out[-1]['loss']:.4f}"
        if history.held_out
        else f"distilled {history.step} steps in {history.elapsed / 60:.1f} min"
    )
    return student, history


def _accelerator(settings: Distill):
    """One batch of ``settings.batch_size`` texts per step, split between the processes of an
    ``accelerate launch``: every process takes the same number of steps (uneven shards of a small
    text would leave one process waiting in a collective for ever), and N processes train as one.
    An expert that no token of a process's share picked has no gradient there: DDP must expect that."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs

    _allow_precision(settings.mixed_precision)
    accelerator = Accelerator(
        mixed_precision=settings.mixed_precision,
        dataloader_config=DataLoaderConfiguration(split_batches=True),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    if settings.batch_size % accelerator.num_processes:
        raise UsageError(f"distillation batch size {settings.batch_size} does not split between {accelerator.num_processes} processes")
    return accelerator


def _allow_precision(mixed_precision: str) -> None:
    """accelerate keeps one state per process and refuses a second ``Accelerator`` with another mixed
    precision; a process that distils twice (a notebook, a test run) starts the second afresh."""
    from accelerate.state import AcceleratorState

    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision", mixed_precision) != mixed_precision:
        AcceleratorState._reset_state()


def _held_out(accelerator, tokenizer, texts: list[str], settings: Distill, collate, decoder: bool) -> list[dict]:
    """The held-out batches of the curve, on the training device, read the way training reads."""
    if not settings.eval_texts:
        return []
    data = texts[: settings.eval_texts]
    if data and decoder:
        data = list(packed(tokenizer, data, settings.seq_len))
    loader = torch.utils.data.DataLoader(data, batch_size=settings.batch_size, collate_fn=collate)
    return [{k: v.to(accelerator.device) for k, v in batch.items()} for batch in loader]


def _history(accelerator, settings: Distill, workdir: Path | None, resume: bool, log: Callable[[str], None]) -> History:
    """A new history, or with ``resume`` the latest checkpoint's (its state loaded into ``accelerator``)."""
    history = History(settings=settings.model_dump(mode="json"))
    if not resume:
        return history
    checkpoint = latest_checkpoint(workdir) if workdir else None
    if checkpoint is None:
        raise UsageError(f"--resume: no checkpoint in {workdir}")
    accelerator.load_state(str(checkpoint))
    history = History.from_dict(json.loads((checkpoint / STATE_FILE).read_text()))
    history.settings = settings.model_dump(mode="json")
    log(f"resumed from {checkpoint} at step {history.step} ({history.elapsed / 60:.1f} min trained)")
    return history


class _Trainer:
    """One distillation run's moving parts: the prepared student, the frozen teacher, the optimizer."""

    def __init__(self, accelerator, student, teacher, settings: Distill, moe_modules, head, params, optimizer, held_out, decoder: bool):
        self.accelerator, self.student, self.teacher, self.settings = accelerator, student, teacher, settings
        self.moe_modules, self.head, self.params, self.optimizer = moe_modules, head, params, optimizer
        self.held_out, self.decoder = held_out, decoder
        self.keep = {"logits_to_keep": 1} if head is not None else {}  # the KL then needs no logits

    def set_mode(self, training: bool) -> None:
        self.student.eval()  # dense parts: no dropout, the teacher's behaviour
        for m in self.moe_modules:
            m.train(training)
            m.expert_dropout = self.settings.expert_dropout if training else 0.0

    def train(self, loader, history: History, workdir: Path | None, show_progress: bool) -> None:
        """Steps until the budget runs out, with held-out points, log points and checkpoints."""
        settings, accelerator = self.settings, self.accelerator
        if not history.held_out:
            self.evaluate_held_out(history)
        self.set_mode(True)
        window: dict[str, list[float]] = {}
        on_cpu = accelerator.device.type == "cpu"  # each step allocates what the last one freed: keep it (see memory)
        with progress(show_progress and accelerator.is_local_main_process) as bar, memory.reuse_freed_memory() if on_cpu else nullcontext():
            total_units = settings.steps if settings.steps is not None else int(settings.minutes * 60)
            task = bar.add_task("distilling", total=total_units)
            while not _finished(history, settings):
                for batch in loader:
                    loss = self.step(batch, history, window)
                    if history.step % settings.log_every == 0:
                        _log_point(history, window)
                    done = history.step if settings.steps is not None else int(history.elapsed)
                    bar.update(task, completed=min(done, total_units), description=f"distilling loss {loss:.4f}")
                    if history.step % settings.eval_every == 0:
                        self.evaluate_held_out(history)
                    if workdir is not None and history.step % settings.checkpoint_every == 0:
                        save(accelerator, workdir, history)
                    if _finished(history, settings):
                        break
        if window:
            _log_point(history, window)
        if not history.held_out or history.held_out[-1]["step"] != history.step:
            self.evaluate_held_out(history)
        self.set_mode(False)

    def step(self, batch: dict, history: History, window: dict[str, list[float]]) -> float:
        """One optimisation step; returns its loss."""
        settings, accelerator = self.settings, self.accelerator
        started = time.perf_counter()
        for group in self.optimizer.param_groups:
            group["lr"] = group["peak_lr"] * lr_factor(history.step, history.elapsed, settings)
        with torch.no_grad(), accelerator.autocast():
            t_out = self.teacher(**batch, output_hidden_states=True, **self.keep)
        with accelerator.autocast():
            s_out = self.student(**batch, output_hidden_states=True, **self.keep)
            parts = losses(s_out, t_out, batch["attention_mask"], settings, self.moe_modules, self.head)
            loss = total(parts, settings)
        if not torch.isfinite(loss):
            raise UsageError(f"distillation diverged at step {history.step} (loss {loss.item()}); lower lr")
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        history.step += 1
        history.elapsed += time.perf_counter() - started
        history.tokens += int(accelerator.gather(batch["attention_mask"].sum().reshape(1)).sum())
        for name, value in [("loss", loss), *parts.items()]:
            window.setdefault(name, []).append(float(value.detach()))
        return loss.item()

    def evaluate_held_out(self, history: History) -> None:
        """A held-out point of the curve: the loss, and for a causal LM both models' perplexity."""
        if not self.held_out:
            return
        self.set_mode(False)
        point = {"step": history.step, "seconds": round(history.elapsed, 1)}
        loss_sum, nll_sum, dense_nll_sum, count = 0.0, 0.0, 0.0, 0
        with torch.no_grad(), self.accelerator.autocast():
            for batch in self.held_out:
                t_out = self.teacher(**batch, output_hidden_states=True)
                s_out = self.student(**batch, output_hidden_states=True)
                parts = losses(s_out, t_out, batch["attention_mask"], self.settings, [])
                loss_sum += float(total(parts, self.settings))
                if self.decoder:
                    targets = batch["attention_mask"][:, 1:].bool()
                    nll_sum += float(next_token_nll(s_out.logits, batch["input_ids"])[targets].sum())
                    dense_nll_sum += float(next_token_nll(t_out.logits, batch["input_ids"])[targets].sum())
                    count += int(targets.sum())
        point["loss"] = loss_sum / len(self.held_out)
        if count:
            point["perplexity"] = math.exp(nll_sum / count)
            history.dense_perplexity = math.exp(dense_nll_sum / count)
        history.held_out.append(point)
        self.set_mode(True)


def _log_point(history: History, window: dict[str, list[float]]) -> None:
    if not window.get("loss"):
        return
    history.steps.append(history.step)
    history.seconds.append(round(history.elapsed, 2))
    history.loss.append(sum(window["loss"]) / len(window["loss"]))
    for name, values in window.items():
        if name != "loss":
            history.parts.setdefault(name, []).append(sum(values) / len(values))
    window.clear()

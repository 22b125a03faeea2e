"""``densetomoe eval``: quality, speed and routing of a converted folder against its dense model.

Everything is measured in one run, dense and MoE side by side: fidelity (per-layer hidden-state
error, pooled-output cosine, head agreement), task quality on suites, analytical cost and measured
speed (interleaved, medians), and how tokens spread over experts. ``top_ks`` sweeps the
quality/speed trade-off without reconverting.
"""

from __future__ import annotations

import math
import platform
import resource
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn

from . import __version__, archs
from .console import progress
from .efficiency import cost, random_inputs, time_models
from .errors import UsageError
from .loading import load
from .metrics import perplexity
from .moe import MoEFeedForward, moe_layers, set_top_k
from .stages import export
from .stages import load as dense_loading
from .stages.calibrate import batches
from .stages.evaluate import active_ffn_share, mean_pool
from .suites import Suite, load_suite

SCHEMA = "densetomoe.report/1"


@dataclass
class Settings:
    top_ks: list[int] | None = None  # None: the folder's own top-k
    suites: list[str] = field(default_factory=lambda: ["wiki-prose"])
    base: str | None = None
    threads: int | None = None
    repeats: int = 5
    batch: int = 32
    seq_len: int = 128
    speed: bool = True
    fidelity_texts: int = 128


# -- metrics -----------------------------------------------------------------------------------------
def accuracy_f1(predicted: torch.Tensor, labels: torch.Tensor, classes: int) -> dict[str, float]:
    """Accuracy and macro-averaged F1 (each class's F1 = 2PR / (P + R), averaged unweighted)."""
    f1s = []
    for c in range(classes):
        tp = int(((predicted == c) & (labels == c)).sum())
        fp = int(((predicted == c) & (labels != c)).sum())
        fn = int(((predicted != c) & (labels == c)).sum())
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return {"accuracy": float((predicted == labels).float().mean()), "macro_f1": sum(f1s) / classes}


def routing_summary(counts: torch.Tensor) -> dict:
    """Share of routed tokens per expert, imbalance (max share x experts; 1 is even) and the entropy
    of the shares divided by log(experts) (1 is even)."""
    share = counts / counts.sum().clamp_min(1)
    entropy = -(share * share.clamp_min(1e-12).log()).sum() / math.log(len(share))
    return {"load": [round(float(s), 4) for s in share], "imbalance": float(share.max() * len(share)), "entropy": float(entropy)}


# -- running models on text --------------------------------------------------------------------------
@torch.no_grad()
def _run(model: nn.Module, tokenizer, texts: list[str], max_length: int, on_batch: Callable | None = None):
    """Per batch: (mask, hidden states of every layer, pooled final state, logits or None).
    ``on_batch(mask)`` is called before each forward pass."""
    out = []
    for batch in batches(tokenizer, texts, max_length, 32):
        mask = batch["attention_mask"].bool()
        if on_batch is not None:
            on_batch(mask)
        result = model(**batch, output_hidden_states=True)
        hidden = [h.float() for h in result.hidden_states]
        logits = getattr(result, "logits", None)
        out.append((mask, hidden, mean_pool(hidden[-1], mask), None if logits is None else logits.float()))
    return out


class RoutingRecorder:
    """Counts, per MoE layer, how many real tokens each expert receives."""

    def __init__(self, model: nn.Module):
        self.layers = [m for m in model.modules() if isinstance(m, MoEFeedForward)]
        self.counts = [torch.zeros(m.num_experts) for m in self.layers]
        self.mask: torch.Tensor | None = None
        self.handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(self.layers)]

    def _hook(self, index: int) -> Callable:
        def record(module, args, output):
            x = args[0].reshape(-1, module.hidden_size)
            if self.mask is not None:
                x = x[self.mask.reshape(-1)]
            if module.top_k >= module.num_experts:  # every expert gets every token
                self.counts[index] += len(x)
            else:
                chosen = module.select(x)  # (tokens, top_k)
                self.counts[index] += torch.bincount(chosen.reshape(-1), minlength=module.num_experts).float()

        return record

    def set_mask(self, mask: torch.Tensor) -> None:
        self.mask = mask

    def close(self) -> None:
        for h in self.handles:
            h.remove()


# -- the evaluation ----------------------------------------------------------------------------------
def _suite_quality(suite: Suite, model, dense, tokenizer, dense_cache: dict) -> tuple[dict, dict]:
    """``(dense metrics, MoE metrics)`` of one suite."""
    texts, labels = suite.examples()
    if suite.task == "classification":
        if dense_cache.get(suite.name) is None:
            dense_cache[suite.name] = _predict(dense, tokenizer, texts, suite)
        target = torch.tensor(labels)
        classes = len(suite.labels)
        return (
            accuracy_f1(dense_cache[suite.name], target, classes),
            accuracy_f1(_predict(model, tokenizer, texts, suite), target, classes),
        )
    if suite.task == "embedding":
        if dense_cache.get(suite.name) is None:
            dense_cache[suite.name] = torch.cat([p for _, _, p, _ in _run(dense, tokenizer, texts, suite.max_length)])
        moe = torch.cat([p for _, _, p, _ in _run(model, tokenizer, texts, suite.max_length)])
        cosine = nn.functional.cosine_similarity(moe, dense_cache[suite.name], dim=-1)
        return {"cosine_to_dense": 1.0}, {"cosine_to_dense": float(cosine.mean())}
    if suite.task == "perplexity":
        if not archs.arch_for(dense.config).decoder:
            raise UsageError(f"suite {suite.name} measures perplexity and needs a causal language model")
        score = lambda m: perplexity(m, tokenizer, texts, suite.window, suite.stride, max_tokens=suite.max_tokens)  # noqa: E731
        if dense_cache.get(suite.name) is None:
            dense_cache[suite.name] = score(dense).value
        return {"perplexity": dense_cache[suite.name]}, {"perplexity": score(model).value}
    raise UsageError(f"suite {suite.name}: unknown task {suite.task!r}")


@torch.no_grad()
def _predict(model, tokenizer, texts: list[str], suite: Suite) -> torch.Tensor:
    predictions = []
    for batch in batches(tokenizer, texts, suite.max_length, 64):
        logits = getattr(model(**batch), "logits", None)
        if logits is None or logits.dim() != 2:
            raise UsageError(f"suite {suite.name} needs a model with a sequence-classification head")
        predictions.append(logits.argmax(-1))
    return torch.cat(predictions)


def _fidelity(model, dense_runs, tokenizer, texts, max_length, on_batch=None) -> dict:
    num, den, cosines, agree, total, tokens = None, None, [], 0, 0, 0
    runs = _run(model, tokenizer, texts, max_length, on_batch)
    for (mask, dense_h, dense_p, dense_l), (_, h, p, l) in zip(dense_runs, runs):
        layer_num = torch.stack([(a - b)[mask].pow(2).sum() for a, b in zip(h[1:], dense_h[1:])])
        layer_den = torch.stack([b[mask].pow(2).sum() for b in dense_h[1:]])
        num = layer_num if num is None else num + layer_num
        den = layer_den if den is None else den + layer_den
        cosines.append(nn.functional.cosine_similarity(p, dense_p, dim=-1))
        tokens += int(mask.sum())
        if l is not None:
            a, b = l.argmax(-1), dense_l.argmax(-1)
            if a.dim() == 2:
                a, b = a[mask], b[mask]
            agree, total = agree + int((a == b).sum()), total + a.numel()
    return {
        "texts": len(texts),
        "tokens": tokens,
        "layer_rel_error": [round(float(x), 5) for x in (num / den.clamp_min(1e-30)).sqrt()],
        "pooled_cosine": float(torch.cat(cosines).mean()),
        "head_agreement": agree / total if total else None,
    }


def _weights_mb(model: nn.Module) -> float:
    return sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20


def evaluate(moe_dir: str | Path, settings: Settings | None = None, show_progress: bool = True) -> dict:
    """Measure ``moe_dir`` against its dense base; returns the report (see ``docs/report.md``)."""
    settings = settings or Settings()
    moe_dir = Path(moe_dir)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    suites = [load_suite(s) for s in settings.suites]  # fail fast on bad suites
    model = load(moe_dir)
    if not any(isinstance(m, MoEFeedForward) for m in model.modules()):
        raise UsageError(
            f"{moe_dir} is a native {model.config.model_type} folder: densetomoe eval measures remote-code folders "
            "(its routing statistics and top-k sweep read densetomoe's MoE module); evals/serving.py measures "
            "native folders (perplexity, transformers and llama.cpp decode speed)"
        )
    own_k = model.config.num_experts_per_tok
    top_ks = settings.top_ks or [own_k]
    for k in top_ks:
        if not 1 <= k <= model.config.num_experts:
            raise UsageError(f"--top-k {k} is outside 1..{model.config.num_experts}")

    base = settings.base or export.recorded_base(moe_dir)
    source = dense_loading.resolve(base)
    dense_config = dense_loading.load_config(source)
    arch = archs.arch_for(dense_config)
    dense, tokenizer = dense_loading.load_model(source, dense_config, causal_lm=arch.decoder)
    tokenizer = dense_loading.for_batches(tokenizer)
    blocks = moe_layers(dense, {"layers": arch.layers})
    ffn_linears = {b.get_submodule(name) for b in blocks for name in (arch.up, arch.down, arch.gate) if name}

    fidelity_texts = (suites[0].examples()[0] if suites else [])[: settings.fidelity_texts]
    if not fidelity_texts:
        raise UsageError("fidelity needs text: give at least one --suite")
    dense_runs = _run(dense, tokenizer, fidelity_texts, settings.seq_len)
    dense_cost = cost(dense, settings.seq_len, ffn_linears)
    dense_cache: dict = {}
    report = {
        "schema": SCHEMA,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "densetomoe_version": __version__,
        "moe_dir": str(moe_dir),
        "base_model": base,
        "num_experts": model.config.num_experts,
        "converted_top_k": own_k,
        "machine": {"threads": torch.get_num_threads(), "platform": platform.platform(), "torch": torch.__version__},
        "settings": {"batch": settings.batch, "seq_len": settings.seq_len, "repeats": settings.repeats, "suites": [s.name for s in suites]},
        "dense": {"cost": dense_cost.as_dict(), "weights_mb": _weights_mb(dense), "quality": {}},
        "sweep": [],
    }

    converted = [m for m in model.modules() if isinstance(m, MoEFeedForward)]
    own = {m: m.top_k for m in converted}  # per layer, where a budget chose them
    _, dense_ffn_size = archs.ffn_sizes(dense_config, arch)
    with progress(show_progress) as bar:
        task = bar.add_task("evaluating", total=len(top_ks))
        for k in top_ks:
            if k == own_k:
                for m, layer_k in own.items():
                    m.top_k = layer_k
            else:
                set_top_k(model, k)
            share = active_ffn_share(converted, dense_ffn_size, archs.num_layers(dense_config, arch))
            entry = {"top_k": k, "active_ffn_share": share}
            if k == own_k:
                recorder = RoutingRecorder(model)
                entry["fidelity"] = _with_routing(model, recorder, dense_runs, tokenizer, fidelity_texts, settings.seq_len, report)
            else:
                entry["fidelity"] = _fidelity(model, dense_runs, tokenizer, fidelity_texts, settings.seq_len)
            entry["quality"] = {}
            for suite in suites:
                dense_q, moe_q = _suite_quality(suite, model, dense, tokenizer, dense_cache)
                report["dense"]["quality"][suite.name] = dense_q
                entry["quality"][suite.name] = moe_q
            entry["cost"] = cost(model, settings.seq_len).as_dict()
            entry["weights_mb"] = _weights_mb(model)
            if settings.speed:
                entry["speed"] = _speed(dense, model, settings)
            report["sweep"].append(entry)
            bar.advance(task)
    report["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    recovery = export.recorded_figures(moe_dir).get("distillation")
    if recovery:
        report["recovery"] = recovery
    report["metrics"] = _hub_metrics(report)
    return report


def _with_routing(model, recorder, dense_runs, tokenizer, texts, max_length, report) -> dict:
    """Fidelity at the folder's own top-k, recording routing on the same real tokens."""
    try:
        fidelity = _fidelity(model, dense_runs, tokenizer, texts, max_length, on_batch=recorder.set_mask)
    finally:
        recorder.close()
    report["routing"] = {
        "top_k": model.config.num_experts_per_tok,
        "layers": [{"layer": i, **routing_summary(c)} for i, c in zip(model.config.densetomoe["moe_layers"], recorder.counts)],
    }
    return fidelity


def _speed(dense: nn.Module, model: nn.Module, settings: Settings) -> dict:
    vocab = dense.config.vocab_size
    result = {}
    for name, batch in (("throughput", settings.batch), ("latency", 1)):
        inputs = random_inputs(vocab, batch, settings.seq_len)
        t = time_models({"dense": dense, "moe": model}, inputs, repeats=settings.repeats)
        result[name] = {
            "batch": f"{batch}x{settings.seq_len}",
            "dense_ms": t["dense"].median_s * 1e3,
            "moe_ms": t["moe"].median_s * 1e3,
            "dense_tokens_per_s": t["dense"].tokens_per_s,
            "moe_tokens_per_s": t["moe"].tokens_per_s,
            "speedup": t["dense"].median_s / t["moe"].median_s,
        }
    return result


def _hub_metrics(report: dict) -> list[dict]:
    """The headline figures in a flat list (name, type, value, dataset) for the Hub's model-index."""
    sweep = report["sweep"]
    entry = next((e for e in sweep if e["top_k"] == report["converted_top_k"]), sweep[0])
    metrics = []
    for suite, values in entry["quality"].items():
        for name, value in values.items():
            metrics.append({"name": f"{suite} {name}", "type": name, "value": round(value, 4), "dataset": suite})
    if "speed" in entry:
        metrics.append({"name": "throughput speed-up vs dense", "type": "speedup", "value": round(entry["speed"]["throughput"]["speedup"], 3), "dataset": "random tokens"})
    return metrics

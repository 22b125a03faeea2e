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
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn

from .. import archs, formats, gguf
from .. import folder as folders
from .._version import __version__
from ..console import progress
from ..conversion import Dense
from ..data import batches, teacher_forced
from ..errors import UsageError
from ..loading import load
from ..moe import blocks_of, moe_modules
from ..stages import load as dense_loading
from ..stages.export import scratch
from . import served
from .costs import cost, median_rounds, random_inputs, time_models
from .metrics import chrf_bleu, perplexity
from .quick import Probe, fidelity, mean_pool, record, scored_tokens, token_nll
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
    new_tokens: int = 64  # greedy tokens timed after a prompt (transformers decode, llama.cpp)
    engine: str | None = None  # "llamacpp": also serve the folder and its dense model in llama.cpp; None: when it holds a GGUF
    gguf: Path | None = None  # the GGUF file to serve (default: the folder's own, else an f16 one made for the run)


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
def _seq2seq(model: nn.Module) -> bool:
    return bool(getattr(model.config, "is_encoder_decoder", False))


def _text_batches(model: nn.Module, tokenizer, texts: list[str], max_length: int, size: int):
    """:func:`~densetomoe.data.batches`, teacher-forced for an encoder-decoder (its decoder reads the text too)."""
    for batch in batches(tokenizer, texts, max_length, size):
        yield teacher_forced(batch) if _seq2seq(model) else batch


@torch.no_grad()
def _pooled(model: nn.Module, tokenizer, texts: list[str], max_length: int) -> torch.Tensor:
    """Mean-pooled final hidden states of ``texts``, ``(texts, hidden)`` (an encoder-decoder's: its
    decoder's, teacher-forced on the same text)."""
    pooled = []
    for batch in _text_batches(model, tokenizer, texts, max_length, 32):
        out = model(**batch, output_hidden_states=True)
        hidden = (out.decoder_hidden_states if _seq2seq(model) else out.hidden_states)[-1].float()
        pooled.append(mean_pool(hidden, batch["attention_mask"].bool()))
    return torch.cat(pooled)


@torch.no_grad()
def _teacher_forced_perplexity(model: nn.Module, tokenizer, texts: list[str], max_length: int) -> float:
    """An encoder-decoder's perplexity of each text given itself as the source (its decoder
    teacher-forced): how well the converted decoder still reads what the converted encoder saw."""
    nll, tokens = 0.0, 0
    for batch in _text_batches(model, tokenizer, texts, max_length, 32):
        targets = scored_tokens(batch)
        nll += token_nll(model(**batch).logits, batch)[targets].sum().item()
        tokens += int(targets.sum())
    return math.exp(nll / max(tokens, 1))


class Routes:
    """Every MoE layer's routing decisions, recorded on one model's forward passes and replayed, in the
    same order, on another model with the same layers (the same folder in another dtype): what changes
    apart from the routes. In half precision a converted decoder's output differs from float32's
    mostly because tokens near a routing boundary flip experts, not through its arithmetic
    (docs/results.md, Half precision)."""

    METHODS = ("selection", "select")  # dynamic top-k's (tokens, experts) mask, fixed top-k's indices

    def __init__(self) -> None:
        self.calls: list[list[torch.Tensor]] = []

    def record(self, model: nn.Module) -> _Patched:
        """``with routes.record(model):`` keeps what each MoE layer's routing returns."""
        modules = list(moe_modules(model).values())
        self.calls = [[] for _ in modules]

        def recording(original, log):
            return lambda x: log.append(original(x)) or log[-1]

        return _Patched(modules, [{n: recording(getattr(m, n), log) for n in self.METHODS} for m, log in zip(modules, self.calls)])

    def replay(self, model: nn.Module) -> _Patched:
        """``with routes.replay(model):`` gives each MoE layer the recorded routes, in order."""
        modules = list(moe_modules(model).values())
        if len(modules) != len(self.calls):
            raise ValueError(f"recorded {len(self.calls)} MoE layers, the model has {len(modules)}")
        queues = [list(log) for log in self.calls]
        return _Patched(modules, [{n: (lambda x, q=q: q.pop(0)) for n in self.METHODS} for q in queues])


class _Patched:
    """Instance attributes that shadow modules' methods for the duration of a ``with``."""

    def __init__(self, modules: list[nn.Module], methods: list[dict[str, Callable]]):
        self.modules, self.methods = modules, methods

    def __enter__(self) -> None:
        for m, methods in zip(self.modules, self.methods):
            m.__dict__.update(methods)

    def __exit__(self, *exc) -> None:
        for m, methods in zip(self.modules, self.methods):
            for name in methods:
                m.__dict__.pop(name, None)


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
            dense_cache[suite.name] = _pooled(dense, tokenizer, texts, suite.max_length)
        moe = _pooled(model, tokenizer, texts, suite.max_length)
        cosine = nn.functional.cosine_similarity(moe, dense_cache[suite.name], dim=-1)
        return {"cosine_to_dense": 1.0}, {"cosine_to_dense": float(cosine.mean())}
    if suite.task == "perplexity":
        arch = archs.arch_for(dense.config)
        if not arch.generates:
            raise UsageError(f"suite {suite.name} measures perplexity and needs a causal language model or an encoder-decoder")
        if arch.seq2seq:
            score = lambda m: _teacher_forced_perplexity(m, tokenizer, texts, suite.max_length)  # noqa: E731
            if dense_cache.get(suite.name) is None:
                dense_cache[suite.name] = score(dense)
            return {"teacher_forced_perplexity": dense_cache[suite.name]}, {"teacher_forced_perplexity": score(model)}
        score = lambda m: perplexity(m, tokenizer, texts, suite.window, suite.stride, max_tokens=suite.max_tokens)  # noqa: E731
        if dense_cache.get(suite.name) is None:
            dense_cache[suite.name] = score(dense).value
        return {"perplexity": dense_cache[suite.name]}, {"perplexity": score(model).value}
    if suite.task == "translation":
        if not archs.arch_for(dense.config).seq2seq:
            raise UsageError(f"suite {suite.name} is a translation suite and needs an encoder-decoder model")
        if dense_cache.get(suite.name) is None:
            dense_cache[suite.name] = _translate(dense, tokenizer, texts, suite)
        dense_out, moe_out = dense_cache[suite.name], _translate(model, tokenizer, texts, suite)
        to_dense = chrf_bleu(moe_out, dense_out)  # how far the MoE's outputs moved from the dense ones
        return chrf_bleu(dense_out, labels), {**chrf_bleu(moe_out, labels), "chrf_to_dense": to_dense["chrf"], "bleu_to_dense": to_dense["bleu"]}
    raise UsageError(f"suite {suite.name}: unknown task {suite.task!r}")


@torch.no_grad()
def _translate(model: nn.Module, tokenizer, texts: list[str], suite: Suite) -> list[str]:
    """What ``model`` generates for each source text (greedy, or beam search with ``suite.num_beams``)."""
    outputs = []
    for batch in batches(tokenizer, texts, suite.max_length, 16):
        tokens = model.generate(**batch, max_new_tokens=suite.max_new_tokens, num_beams=suite.num_beams, do_sample=False)
        outputs += tokenizer.batch_decode(tokens, skip_special_tokens=True)
    return outputs


@torch.no_grad()
def _predict(model, tokenizer, texts: list[str], suite: Suite) -> torch.Tensor:
    predictions = []
    for batch in batches(tokenizer, texts, suite.max_length, 64):
        logits = getattr(model(**batch), "logits", None)
        if logits is None or logits.dim() != 2:
            raise UsageError(f"suite {suite.name} needs a model with a sequence-classification head")
        predictions.append(logits.argmax(-1))
    return torch.cat(predictions)


def _fidelity(model, probe: Probe, on_batch=None) -> dict:
    """The report's fidelity entry: :func:`densetomoe.stages.evaluate.fidelity` on the suite's texts."""
    f = fidelity(model, probe, on_batch)
    entry = {
        "texts": f.texts,
        "tokens": f.tokens,
        "layer_rel_error": [round(x, 5) for x in f.layer_rel_error],
        "pooled_cosine": f.embedding_cosine,
        "head_agreement": f.head_agreement,
    }
    if f.perplexity is not None:  # an encoder-decoder's, teacher-forced on the probe's texts
        entry["dense_perplexity"], entry["perplexity"] = f.dense_perplexity, f.perplexity
    return entry


def _weights_mb(model: nn.Module) -> float:
    return sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20


def evaluate(moe_dir: str | Path, settings: Settings | None = None, show_progress: bool = True, log=lambda message: None) -> dict:
    """Measure ``moe_dir`` (remote code or native) against its dense base; returns the report (its
    schema: :mod:`densetomoe.report`)."""
    settings = settings or Settings()
    moe_dir = Path(moe_dir)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    suites = [load_suite(s) for s in settings.suites]  # fail fast on bad suites
    engine = served.check_engine(settings.engine, moe_dir, settings.gguf)  # before any work: what cannot run is one line now
    model = load(moe_dir)
    format = formats.of(moe_dir)
    layers = format.layers(model)
    top_ks = settings.top_ks or [layers.top_k]
    for k in top_ks:
        try:
            layers.check_top_k(k)
        except ValueError:
            raise UsageError(f"--top-k {k} is outside 1..{layers.num_experts}") from None

    base = settings.base or folders.recorded_base(moe_dir)
    described = Dense.describe(base, allow_pickle=False)
    arch = described.arch
    dense, tokenizer = dense_loading.load_model(described.source, described.config, causal_lm=arch.decoder)
    blocks = blocks_of(dense, arch.layers)
    ffn_linears = {b.get_submodule(name) for b in blocks for name in (arch.up, arch.down, arch.gate) if name}

    fidelity_texts = (suites[0].examples()[0] if suites else [])[: settings.fidelity_texts]
    if not fidelity_texts:
        raise UsageError("fidelity needs text: give at least one --suite")
    probe = record(dense, list(_text_batches(dense, tokenizer, fidelity_texts, settings.seq_len, 32)), causal_lm=arch.seq2seq, all_layers=True)
    dense_cost = cost(dense, settings.seq_len, ffn_linears)
    report = {
        "schema": SCHEMA,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "densetomoe_version": __version__,
        "moe_dir": moe_dir.name,  # the report may be published: names, never local paths
        "base_model": folders.public_name(described.source.name, described.source.hub_id),
        "format": format.name,
        "num_experts": layers.num_experts,
        "converted_top_k": layers.top_k,
        "machine": {"threads": torch.get_num_threads(), "platform": platform.platform(), "torch": torch.__version__},
        "settings": {"batch": settings.batch, "seq_len": settings.seq_len, "repeats": settings.repeats, "suites": [s.name for s in suites]},
        "dense": {"cost": dense_cost.as_dict(), "weights_mb": _weights_mb(dense), "quality": {}},
        "sweep": [],
    }

    decoding = tokenizer if arch.decoder and not arch.seq2seq else None
    run = _Sweep(layers, model, dense, tokenizer, decoding, probe, suites, described, settings)
    with progress(show_progress) as bar:
        task = bar.add_task("evaluating", total=len(top_ks))
        for k in top_ks:
            report["sweep"].append(_sweep_entry(k, run, report))
            bar.advance(task)
    layers.restore()
    if engine:
        report["llama_cpp"] = _engine_row(moe_dir, dense, tokenizer, suites, settings, log)
    elif settings.engine == "llamacpp" or settings.gguf is not None:
        report["llama_cpp"] = {"none": served.engine_reason(moe_dir)}
    report["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    recovery = folders.read_figures(moe_dir).get("distillation")
    if recovery:
        report["recovery"] = recovery
    report["metrics"] = _hub_metrics(report)
    return report


@dataclass
class _Sweep:
    """What every top-k of the sweep is measured with."""

    layers: object  # the folder's MoE layers (formats.Layers)
    model: nn.Module
    dense: nn.Module
    tokenizer: object
    decoding: object  # the tokenizer where greedy decoding is timed (decoder LMs), else None
    probe: Probe
    suites: list[Suite]
    described: Dense
    settings: Settings
    dense_cache: dict = field(default_factory=dict)  # the dense model's suite results, measured once


def _sweep_entry(k: int, run: _Sweep, report: dict) -> dict:
    """One top-k of the sweep: share, fidelity (with routing at the folder's own top-k), quality on
    each suite (the dense model's into ``report`` too), cost and speed."""
    layers, model = run.layers, run.model
    layers.set_top_k(k)  # modules and config together; the folder's own: per layer, as converted
    entry = {"top_k": k, "active_ffn_share": layers.active_ffn_share(run.described.ffn_size, run.described.num_layers)}
    entry["fidelity"] = _with_routing(layers, run.probe, report, label=k) if k == layers.top_k else _fidelity(model, run.probe)
    entry["quality"] = {}
    for suite in run.suites:
        dense_q, moe_q = _suite_quality(suite, model, run.dense, run.tokenizer, run.dense_cache)
        report["dense"]["quality"][suite.name] = dense_q
        entry["quality"][suite.name] = moe_q
    entry["cost"] = cost(model, run.settings.seq_len, layers.ffn_linears()).as_dict()
    entry["weights_mb"] = _weights_mb(model)
    if run.settings.speed:
        entry["speed"] = _speed(run.dense, model, run.settings, run.decoding)
    return entry


def _engine_row(moe_dir: Path, dense, tokenizer, suites, settings: Settings, log) -> dict:
    """The llama.cpp row: the folder and its dense model served, on the first perplexity suite's text."""
    suite = next((s for s in suites if s.task == "perplexity"), None) or load_suite(gguf.SCORED_ON)
    with scratch(moe_dir, None, "engine") as work:
        return served.engine_comparison(
            moe_dir, dense, tokenizer, suite, work, settings.gguf, settings.threads or torch.get_num_threads(),
            settings.new_tokens, settings.repeats, log,
        )  # fmt: skip


def _with_routing(layers, probe: Probe, report: dict, label: int) -> dict:
    """Fidelity at the folder's own top-k (``label``), recording routing on the same real tokens."""
    recorder = layers.recorder()
    try:
        result = _fidelity(layers.model, probe, on_batch=recorder.set_mask)
    finally:
        recorder.close()
    report["routing"] = {
        "top_k": label,
        "layers": [
            {"layer": i, "top_k": layers.layer_top_k(i), "experts_per_token": float(c.sum()) / max(n, 1), **routing_summary(c)}
            for i, c, n in zip(layers.modules, recorder.counts, recorder.tokens)
        ],
    }
    return result


def _speed(dense: nn.Module, model: nn.Module, settings: Settings, tokenizer=None) -> dict:
    """Forward time at batch x seq_len and 1 x seq_len; with a decoder's ``tokenizer``, also greedy
    decoding at batch 1 (:data:`densetomoe.served.PROMPT`, then ``settings.new_tokens`` tokens)."""
    vocab = dense.config.vocab_size
    result = {}
    for name, batch in (("throughput", settings.batch), ("latency", 1)):
        inputs = random_inputs(vocab, batch, settings.seq_len)
        if _seq2seq(dense):
            inputs = teacher_forced(inputs)
        t = time_models({"dense": dense, "moe": model}, inputs, repeats=settings.repeats)
        result[name] = {
            "batch": f"{batch}x{settings.seq_len}",
            "dense_ms": t["dense"].median_s * 1e3,
            "moe_ms": t["moe"].median_s * 1e3,
            "dense_tokens_per_s": t["dense"].tokens_per_s,
            "moe_tokens_per_s": t["moe"].tokens_per_s,
            "speedup": t["dense"].median_s / t["moe"].median_s,
        }
    if tokenizer is not None:
        rates = decode_rates({"dense": dense, "moe": model}, served.prompt_ids(tokenizer), settings.new_tokens, settings.repeats)
        result["decode"] = {
            "new_tokens": settings.new_tokens,
            "dense_tokens_per_s": rates["dense"],
            "moe_tokens_per_s": rates["moe"],
            "speedup": rates["moe"] / rates["dense"],
        }
    return result


@torch.inference_mode()
def decode_rates(models: dict[str, nn.Module], prompt: list[int], new_tokens: int, repeats: int) -> dict[str, float]:
    """Median tokens/s of transformers' greedy ``generate`` at batch 1 (the prompt's pass included), the
    models interleaved, after one untimed run each."""
    inputs = torch.tensor([prompt])

    def run(name: str) -> float:
        start = time.perf_counter()
        models[name].generate(inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        return new_tokens / (time.perf_counter() - start)

    for name in models:
        run(name)
    return {name: statistics.median(r) for name, r in median_rounds(list(models), run, repeats).items()}


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
    served_row = report.get("llama_cpp", {})
    if "decode_speedup" in served_row:
        suite = served_row["suite"]
        metrics.append({"name": f"{suite} llama.cpp perplexity ({served_row['type']})", "type": "perplexity", "value": round(served_row["moe"]["perplexity"], 4), "dataset": suite})
        metrics.append({"name": "llama.cpp decode speed-up vs dense", "type": "speedup", "value": round(served_row["decode_speedup"], 3), "dataset": "batch 1"})
    return metrics

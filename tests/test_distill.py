"""Recovery: the MoE module's training path, shared experts, pruning, per-layer budgets,
distillation with checkpoints and resume, and the folders all of that writes."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
import transformers
from test_moe import build, dense_output, random_ffn
from torch import nn

import densetomoe
from conftest import quick_recipe, run_fresh, run_without_densetomoe, sample_inputs
from densetomoe import archs, memory, surgery
from densetomoe.data import packed
from densetomoe.moe import Router, output_shares
from densetomoe.recipe import Distill
from densetomoe.stages import budget
from densetomoe.stages.coverage import reset_coverage
from densetomoe.stages.distill import (
    History,
    distill_model,
    fused_head,
    head_kl,
    latest_checkpoint,
    losses,
    lr_factor,
    moe_blocks,
    share_frozen,
    trainable,
    training_texts,
)
from densetomoe.stages.partition import at_random


# -- the module's training path ----------------------------------------------------------------------
@pytest.mark.parametrize("gated", [False, True])
def test_training_forward_has_the_inference_value_and_trains_the_router(gated):
    ffn = random_ffn(gated=gated)
    moe, _ = build(ffn, top_k=2)
    with torch.no_grad():
        moe.skip_mean.normal_()
    x = torch.randn(30, 16)
    moe.eval()
    with torch.no_grad():
        expected = moe(x)
    moe.train()
    got = moe(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    loss = got.pow(2).sum() + moe.aux["balance"] + moe.aux["router"]
    loss.backward()
    router_grad = sum(p.grad.abs().sum() for p in moe.router.parameters())
    assert router_grad > 0
    assert moe.w_up.grad.abs().sum() > 0 and moe.skip_mean.grad.abs().sum() > 0


def test_the_router_target_is_each_experts_share_of_the_output_norms():
    """The router loss's target, from Gram matrices, equals the norms of the experts' actual outputs."""
    moe, _ = build(random_ffn(gated=True), top_k=2)
    x = torch.randn(30, 16)
    a = moe._neurons(x, slice(None)).reshape(len(x), moe.num_experts, moe.expert_size)
    outputs = torch.einsum("tes,esh->teh", a, moe.w_down)  # each expert's output, (tokens, experts, hidden)
    norms = outputs.norm(dim=-1)
    torch.testing.assert_close(output_shares(a, moe.w_down), norms / norms.sum(-1, keepdim=True), rtol=1e-4, atol=1e-6)


def test_straight_through_gate_alone_reaches_the_router():
    """Without the aux losses, the router still gets a gradient from the output through the gate."""
    moe, _ = build(random_ffn(), top_k=2)
    moe.train()
    moe(torch.randn(20, 16)).sum().backward()
    assert sum(p.grad.abs().sum() for p in moe.router.parameters()) > 0


def test_balance_loss_is_one_when_routing_is_even_and_larger_when_not():
    moe, _ = build(random_ffn(), experts=4, top_k=1)
    moe.train()
    x = torch.randn(400, 16)
    moe(x)
    uneven = float(moe.aux["balance"].detach())
    with torch.no_grad():  # a router that sends everything to expert 0 with certainty
        last = moe.router.layers[-1]
        last.weight.zero_()
        last.bias.copy_(torch.tensor([50.0, 0.0, 0.0, 0.0]))
    moe(x)
    assert float(moe.aux["balance"].detach()) == pytest.approx(4.0, rel=1e-3)
    assert uneven < 4.0


def test_expert_dropout_acts_only_while_training():
    moe, _ = build(random_ffn(), top_k=2)
    x = torch.randn(200, 16)
    moe.train()
    plain = moe(x).detach()
    moe.expert_dropout = 0.5
    dropped = moe(x).detach()
    assert not torch.allclose(plain, dropped)
    moe.eval()
    with torch.no_grad():
        torch.testing.assert_close(moe(x), plain, rtol=1e-5, atol=1e-5)


# -- shared experts and pruning ----------------------------------------------------------------------
@pytest.mark.parametrize("gated", [False, True])
def test_shared_expert_plus_all_routed_experts_is_the_dense_ffn(gated):
    ffn = random_ffn(gated=gated, d_ff=48)
    sample = torch.randn(64, 16)
    shared_idx, routed_idx = surgery.shared_neurons(ffn, sample, 12)
    assert len(set(shared_idx.tolist()) | set(routed_idx.tolist())) == 48
    routed = ffn.subset(routed_idx)
    labels = at_random(routed, None, 4, torch.Generator().manual_seed(0))
    router = Router(16, 4, hidden=8)
    activation = "silu" if gated else "gelu"
    moe = surgery.moe_from_dense(routed, labels, router, 4, 4, activation, sample, shared=ffn.subset(shared_idx, with_bias=False))
    assert moe.shared_size == 12 and moe.expert_size == 9
    x = torch.randn(7, 16)
    with torch.no_grad():
        torch.testing.assert_close(moe(x), dense_output(ffn, x), rtol=1e-5, atol=1e-5)
    # the shared neurons are the ones that contribute most on the sample
    importance = ffn.importance(sample)
    assert importance[shared_idx].min() >= importance[routed_idx].max()


def test_pruning_keeps_each_experts_most_important_neurons():
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
    importance = torch.tensor([3.0, 1.0, 2.0, 0.1, 0.3, 0.2, 9.0, 8.0, 7.0])
    pruned = surgery.prune_experts(labels, importance, 3, keep=2)
    assert pruned.tolist() == [0, -1, 0, -1, 1, 1, 2, 2, -1]


# -- per-layer budgets -------------------------------------------------------------------------------
def test_levels_and_uniform_budget_meet_the_average():
    options = budget.levels(experts=8, expert_size=8, shared_size=0, ffn_size=64)
    assert [o.top_k for o in options] == [1, 2, 4, 6, None]
    plan = budget.uniform(list(range(6)), options, 0.5, 6)
    assert budget.mean_share(plan, 6) == pytest.approx(0.5)
    assert {level.top_k for level in plan.values()} == {4}
    with pytest.raises(ValueError):
        budget.uniform(list(range(6)), options, 0.1, 6)


def test_sensitivity_budget_gives_the_sensitive_layer_more():
    options = budget.levels(experts=8, expert_size=8, shared_size=0, ffn_size=64)
    robust = [0.05, 0.04, 0.02, 0.01, 0.0]
    sensitive = [5.0, 3.0, 1.0, 0.5, 0.0]
    table = {0: sensitive, 1: robust, 2: robust, 3: robust}
    plan = budget.by_sensitivity([0, 1, 2, 3], options, 0.5, 4, table)
    assert budget.mean_share(plan, 4) <= 0.5 + 1e-9
    assert plan[0].share > max(plan[i].share for i in (1, 2, 3))


# -- recipes -----------------------------------------------------------------------------------------
def test_recipe_rejects_impossible_combinations():
    with pytest.raises(densetomoe.UsageError, match="top_k or ffn_budget"):
        densetomoe.Recipe.build(model="m", top_k=2, ffn_budget=0.5)
    with pytest.raises(densetomoe.UsageError, match="steps, minutes"):
        densetomoe.Recipe.build(model="m", distill={"steps": None})
    with pytest.raises(densetomoe.UsageError, match="distill.lerning_rate"):
        densetomoe.Recipe.build(model="m", distill={"lerning_rate": 1})
    with pytest.raises(densetomoe.UsageError, match="expert_dropout"):
        densetomoe.Recipe.build(model="m", distill={"expert_dropout": 1.5})


def test_nested_recipe_overrides_merge_key_by_key(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model: m\nexperts: 8\ndistill:\n  steps: 100\n  lr: 0.001\n")
    recipe = densetomoe.Recipe.from_yaml(path, distill={"steps": 5})
    assert recipe.distill.steps == 5 and recipe.distill.lr == 0.001
    again = densetomoe.Recipe.from_yaml(_write(tmp_path / "again.yaml", recipe.to_yaml()))
    assert again == recipe


def _write(path, text):
    path.write_text(text)
    return path


# In a fresh process, and the defaults checked first: memory freed inside the block can leave a hole in
# the middle of the heap, and glibc, by default too, serves later allocations from such a hole and keeps
# that memory resident when it is freed (CI saw 16 MB kept so, in a process that had run other tests).
_FREED_MEMORY_SCRIPT = """
import os, torch
from densetomoe import memory

def resident_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

def allocate_and_free():  # resident bytes kept after 64 MB were written and freed
    before = resident_bytes()
    tensors = [torch.ones(4 << 20) for _ in range(4)]  # 4 x 16 MB
    del tensors
    return resident_bytes() - before

with memory.reuse_freed_memory():
    pass
kept_after = allocate_and_free()
with memory.reuse_freed_memory():
    memory.return_freed_memory()  # so that what the process freed before is not what gets reused
    kept = allocate_and_free()
    inside = resident_bytes()
print(kept, inside - resident_bytes(), kept_after)
"""


@pytest.mark.slow  # allocates and frees for real: about 3 s
@pytest.mark.skipif(memory._libc is None, reason="glibc's allocator only (Linux)")
def test_training_keeps_freed_memory_for_reuse_and_returns_it_after():
    """Inside the block freed 16 MB tensors stay resident for the next ones; leaving it hands them back
    and restores glibc's defaults."""
    kept, handed_back, kept_after = (int(n) for n in run_fresh(_FREED_MEMORY_SCRIPT, timeout=120).split())
    assert kept >= 48 << 20  # of 64 MB (other allocations of the process move the figures a little)
    assert handed_back >= 48 << 20  # on leaving
    assert kept_after < 16 << 20  # after a block, freed memory is returned as by default


def test_learning_rate_warms_up_then_decays_to_a_tenth_or_the_final_lr():
    s = Distill(steps=100, warmup=10)
    assert lr_factor(0, 0, s) < lr_factor(9, 0, s) <= 1.0
    assert lr_factor(10, 0, s) == pytest.approx(1.0)
    assert lr_factor(100, 0, s) == pytest.approx(0.1)
    timed = Distill(steps=None, minutes=1, warmup=0)
    assert lr_factor(5, 30.0, timed) == pytest.approx(0.55)
    to_zero = Distill(steps=None, minutes=1, warmup=0, final_lr=0.0)
    assert lr_factor(5, 30.0, to_zero) == pytest.approx(0.5) and lr_factor(50, 60.0, to_zero) == 0.0


# -- distillation ------------------------------------------------------------------------------------
class Interrupting:
    """A tokenizer that raises KeyboardInterrupt on its ``after``-th call (a Ctrl-C mid-run)."""

    def __init__(self, tokenizer, after: int):
        self.tokenizer, self.calls, self.after = tokenizer, 0, after

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.after:
            raise KeyboardInterrupt
        return self.tokenizer(*args, **kwargs)


class Recording:
    """A tokenizer that remembers every text it was given."""

    def __init__(self, tokenizer):
        self.tokenizer, self.seen = tokenizer, []

    def __call__(self, texts, *args, **kwargs):
        self.seen.append([texts] if isinstance(texts, str) else list(texts))
        return self.tokenizer(texts, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def _pair(folder, texts_file, **settings):
    """(student conversion, dense teacher) for a tiny model."""
    conversion = densetomoe.convert(quick_recipe(folder, texts_file, **settings), show_progress=False)
    teacher = type(conversion.model).from_pretrained(folder).eval()
    return conversion, teacher


def test_distillation_lowers_the_held_out_loss(tiny_models, texts_file):
    conversion, teacher = _pair(tiny_models["BertForSequenceClassification"], texts_file, top_k=1)
    texts = texts_file.read_text().splitlines()
    settings = Distill(steps=40, batch_size=8, seq_len=32, lr=3e-3, warmup=2, log_every=5, eval_texts=8)
    _, history = distill_model(conversion.model, teacher, conversion.tokenizer, settings, None, texts[8:], texts[:8], show_progress=False)
    assert history.step == 40 and len(history.steps) == 8
    assert {"hidden", "logits", "balance", "router"} <= set(history.parts)
    assert history.held_out[-1]["loss"] < 0.7 * history.held_out[0]["loss"]
    assert not any(p.requires_grad for p in conversion.model.parameters())
    assert not conversion.model.training


def test_decoder_distillation_tracks_held_out_perplexity_against_dense(tiny_decoders, texts_file):
    folder = tiny_decoders["llama"]
    conversion = densetomoe.convert(quick_recipe(folder, texts_file), show_progress=False)
    teacher = type(conversion.model).from_pretrained(folder).eval()
    texts = texts_file.read_text().splitlines()
    settings = Distill(steps=20, batch_size=8, seq_len=32, lr=3e-3, warmup=2, eval_texts=8)
    arch = archs.arch_for(teacher.config)
    _, history = distill_model(conversion.model, teacher, conversion.tokenizer, settings, arch, texts[8:], texts[:8], show_progress=False)
    first, last = history.held_out[0], history.held_out[-1]
    # Each held-out point holds the student's perplexity, and the history the dense model's on the same texts.
    # Random weights give them no order to rely on (the split model may start above or below dense, and
    # a few steps may move it either way); what distillation must do is bring the student to the teacher.
    assert math.isfinite(history.dense_perplexity) and all(math.isfinite(p["perplexity"]) for p in history.held_out)
    assert first["perplexity"] != pytest.approx(history.dense_perplexity, rel=1e-3)  # top-2 of 4 is not dense
    assert last["loss"] < first["loss"]


def test_distillation_keeps_dynamic_top_k_on_its_budget(tiny_decoders, texts_file, tmp_path):
    """Training moves the routers and what reaches them; the coverage is then set again, so that the
    calibration tokens still take each layer's top-k experts on average, as the FLOPs are counted."""
    out = tmp_path / "moe"
    settings = {"steps": 20, "batch_size": 8, "seq_len": 32, "lr": 1e-2, "warmup": 0, "eval_texts": 0}
    conversion = densetomoe.convert(quick_recipe(tiny_decoders["llama"], texts_file, distill=settings), out, show_progress=False)
    model = densetomoe.load(out)
    recipe = conversion.recipe
    assert recipe.dynamic
    # measured anew on the written folder: what its tokens take (the first of each pair), then set again
    measured = reset_coverage(model, conversion.tokenizer, conversion.dense.calibration_texts, recipe.seq_len, recipe.batch_size)
    assert measured and all(before == pytest.approx(recipe.top_k, rel=0.01) for before, _ in measured.values()), measured


class Characters:
    """A tokenizer of one id per character, with a BOS it adds as LLaMA's does (``bos=True``) or not."""

    bos_token_id, eos_token_id = 0, 1

    def __init__(self, bos: bool):
        self.bos = bos

    def __call__(self, text, add_special_tokens=True, **kwargs):
        return {"input_ids": [0] * (self.bos and add_special_tokens) + [2 + ord(c) % 50 for c in text]}


@pytest.mark.parametrize("bos", [False, True])
def test_a_causal_lm_reads_its_text_in_full_windows_of_the_joined_documents(bos):
    tokenizer, texts = Characters(bos), ["first document", "second", "and a third, longer one"]
    windows = packed(tokenizer, texts, 8)
    stream = tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"]
    body = windows[:, 1:] if bos else windows
    assert windows.shape == (len(stream) // body.shape[1], 8)
    assert (windows[:, 0] == 0).all() if bos else (windows != 0).all()  # a BOS starts each window, or none
    assert body.flatten().tolist() == stream[: body.numel()]  # every token once, in order; only a short tail dropped
    assert packed(tokenizer, ["short"], 64).shape == (1, 5 + bos)


@pytest.mark.parametrize("temperature, bias", [(1.0, False), (2.0, True)])
def test_the_fused_output_layer_gives_the_logits_kl_and_its_gradient(temperature, bias):
    torch.manual_seed(0)
    weight, b = torch.randn(300, 16), torch.randn(300) if bias else None
    student, teacher = torch.randn(37, 16, requires_grad=True), torch.randn(37, 16)
    fused = head_kl(student, teacher, weight, b, temperature, chunk=8)  # 37 tokens: a short last chunk
    (got,) = torch.autograd.grad(fused, student)
    log_q = (nn.functional.linear(student, weight, b) / temperature).log_softmax(-1)
    log_p = (nn.functional.linear(teacher, weight, b) / temperature).log_softmax(-1)
    plain = (log_p.exp() * (log_p - log_q)).sum(-1).mean() * temperature**2
    (expected,) = torch.autograd.grad(plain, student)
    torch.testing.assert_close(fused, plain)
    torch.testing.assert_close(got, expected)
    with pytest.raises(ValueError, match="frozen"):
        head_kl(student, teacher, weight.requires_grad_(), b)


def test_a_causal_lm_distills_through_its_shared_output_layer_where_that_is_exact(tiny_decoders, texts_file):
    conversion, teacher = _pair(tiny_decoders["llama"], texts_file)
    student, settings = conversion.model, Distill()
    trainable(student, settings)
    teacher = share_frozen(teacher, student, settings)
    windows = packed(conversion.tokenizer, texts_file.read_text().splitlines(), 32)
    head = fused_head(student, teacher, windows[:1, :16])
    assert head is not None and head.weight is student.get_output_embeddings().weight

    # The same losses and gradients as the KL on the models' own logits, which are not computed.
    batch = {"input_ids": windows[:4], "attention_mask": torch.ones_like(windows[:4])}
    student.eval()
    moes = moe_blocks(student)
    for m in moes:
        m.train()
    results = []
    for fused in (False, True):
        keep = {"logits_to_keep": 1} if fused else {}
        with torch.no_grad():
            t_out = teacher(**batch, output_hidden_states=True, **keep)
        s_out = student(**batch, output_hidden_states=True, **keep)
        assert s_out.logits.shape[1] == (1 if fused else 32)
        parts = losses(s_out, t_out, batch["attention_mask"], settings, moes, head if fused else None)
        sum(parts.values()).backward()
        results.append(({k: v.detach() for k, v in parts.items()}, moes[0].w_up.grad.clone()))
        student.zero_grad()
    (plain, plain_grad), (fused, fused_grad) = results
    assert plain.keys() == fused.keys()
    for name in plain:
        torch.testing.assert_close(fused[name], plain[name], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(fused_grad, plain_grad, rtol=1e-3, atol=1e-7)

    # Not where it would be wrong: a head that trains, one the teacher does not share, other logits.
    assert fused_head(student, teacher, windows[:1, :16]) is head
    own = type(teacher).from_pretrained(tiny_decoders["llama"]).eval()
    assert fused_head(student, own, windows[:1, :16]) is None

    class Scaled(type(teacher)):
        def forward(self, *args, logits_to_keep=0, **kwargs):
            out = super().forward(*args, logits_to_keep=logits_to_keep, **kwargs)
            out.logits = out.logits * 2
            return out

    teacher.__class__ = Scaled
    assert fused_head(student, teacher, windows[:1, :16]) is None
    student.requires_grad_(True)
    assert fused_head(student, own, windows[:1, :16]) is None


def test_mixed_precision_distillation_keeps_the_fused_head(tiny_decoders, texts_file):
    """accelerate autocasts a bf16 student's own forward: the head's check must run under the same
    autocast, or its logits never match and every step builds the (tokens, vocabulary) logits."""
    conversion, teacher = _pair(tiny_decoders["llama"], texts_file)
    texts = texts_file.read_text().splitlines()
    settings = Distill(steps=2, batch_size=2, seq_len=32, eval_texts=0, mixed_precision="bf16")
    teacher = share_frozen(teacher, conversion.model, settings)
    rows = []
    head = conversion.model.get_output_embeddings()
    head.register_forward_hook(lambda module, args, out: rows.append(args[0].shape[-2]))
    distill_model(conversion.model, teacher, conversion.tokenizer, settings, archs.arch_for(teacher.config), texts, [], show_progress=False)
    assert rows[-2:] == [1, 1]  # one position kept a step (after the check's own calls on 16 tokens)
    assert 32 not in rows  # never the logits of a whole window


def test_a_causal_lm_trains_on_windows_with_no_padding(tiny_decoders, texts_file):
    conversion, teacher = _pair(tiny_decoders["gpt2"], texts_file)
    texts = texts_file.read_text().splitlines()
    recording = Recording(conversion.tokenizer)
    settings = Distill(steps=3, batch_size=2, seq_len=16, eval_texts=4)
    arch = archs.arch_for(teacher.config)
    _, history = distill_model(conversion.model, teacher, recording, settings, arch, texts[4:], texts[:4], show_progress=False)
    assert history.tokens == 3 * 2 * 16  # every position a token of text
    joined = [t for call in recording.seen for t in call if len(t) > 200]  # the training text, the held-out text
    assert len(joined) == 2 and joined[1] == "\n\n".join(texts[:4])
    assert not any(t in joined[0] for t in texts[:4])


def test_held_out_texts_are_never_trained_on(tiny_models, texts_file):
    conversion, teacher = _pair(tiny_models["BertModel"], texts_file)
    texts = texts_file.read_text().splitlines()
    recording = Recording(conversion.tokenizer)
    settings = Distill(steps=12, batch_size=4, seq_len=32, eval_texts=4)
    distill_model(conversion.model, teacher, recording, settings, None, texts, texts[:4], show_progress=False)
    held_out, *training = recording.seen  # the first call tokenizes the held-out texts
    assert held_out == texts[:4]
    assert not {t for batch in training for t in batch} & set(texts[:4])


@pytest.mark.parametrize("sources", ["extra", ["calibration", "extra"]])
def test_distillation_reads_the_sources_it_is_given(tiny_models, texts_file, tmp_path, sources):
    conversion, teacher = _pair(tiny_models["BertModel"], texts_file)
    texts = texts_file.read_text().splitlines()
    extra = tmp_path / "extra.txt"
    extra.write_text("\n".join(f"an extra document number {i} about nothing in particular" for i in range(8)))
    data = str(extra) if sources == "extra" else ["calibration", str(extra)]
    assert training_texts(data, texts) == (extra.read_text().splitlines() if sources == "extra" else texts + extra.read_text().splitlines())
    recording = Recording(conversion.tokenizer)
    settings = Distill(data=data, steps=20, batch_size=4, seq_len=32, eval_texts=4)
    distill_model(conversion.model, teacher, recording, settings, None, texts, texts[:4], show_progress=False)
    seen = {t for batch in recording.seen[1:] for t in batch}
    assert seen & set(extra.read_text().splitlines())
    assert bool(seen & set(texts[4:])) == (sources != "extra")
    assert not seen & set(texts[:4])  # held out whatever the sources


def test_interrupted_distillation_resumes_from_its_checkpoint(tiny_models, texts_file, tmp_path):
    folder = tiny_models["BertModel"]
    texts = texts_file.read_text().splitlines()
    settings = Distill(steps=6, batch_size=4, seq_len=32, checkpoint_every=2, log_every=1, eval_texts=4)
    workdir = tmp_path / "ckpt"
    conversion, teacher = _pair(folder, texts_file)
    with pytest.raises(KeyboardInterrupt):  # call 1: held-out texts; accelerate reads a batch ahead, so call 7 stops it after step 4
        distill_model(conversion.model, teacher, Interrupting(conversion.tokenizer, 7), settings, None, texts, texts[:4], workdir=workdir, show_progress=False)
    assert latest_checkpoint(workdir).name == "checkpoint-4"
    saved = History.from_dict(json.loads((latest_checkpoint(workdir) / "densetomoe_distill_state.json").read_text()))
    assert saved.step == 4

    fresh, teacher = _pair(folder, texts_file)
    _, history = distill_model(fresh.model, teacher, fresh.tokenizer, settings, None, texts, texts[:4], workdir=workdir, resume=True, show_progress=False)
    assert history.step == 6
    assert history.steps == [1, 2, 3, 4, 5, 6]  # the curve continues where the checkpoint left it
    assert not workdir.exists()  # finished: checkpoints are removed


# -- the command line, end to end --------------------------------------------------------------------
@pytest.mark.slow
def test_convert_with_every_recovery_option_writes_a_folder_that_reloads(tiny_models, texts_file, tmp_path):
    folder, out = tiny_models["BertForSequenceClassification"], tmp_path / "moe"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"model: {folder}\nexperts: 3\nshared_experts: 1\nffn_budget: 0.6\nprune: 0.25\ncalib: {texts_file}\n"
        "calib_tokens: 1024\nsample_tokens: 512\nrouter_steps: 20\nrouter_hidden: 16\n"
        "distill:\n  steps: 50\n  batch_size: 4\n  seq_len: 32\n  log_every: 2\n  checkpoint_every: 2\n"
    )
    run = subprocess.run(
        [sys.executable, "-m", "densetomoe.cli", "convert", str(folder), "--recipe", str(recipe), "--distill-steps", "4", "--out", str(out), "--no-progress"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    figures = json.loads((out / "densetomoe_conversion.json").read_text())
    assert figures["distillation"]["step"] == 4  # the flag won over the recipe's 50
    assert (out / "loss_curve.png").stat().st_size > 1000
    assert not (tmp_path / "moe.checkpoints").exists()
    saved = densetomoe.Recipe.from_yaml(out / "densetomoe_recipe.yaml")
    assert saved.distill.steps == 4 and saved.shared_experts == 1 and saved.ffn_budget == 0.6
    config = json.loads((out / "config.json").read_text())
    structure = config["densetomoe"]
    assert structure["shared_size"] == 16 and structure["expert_size"] == 12  # 64 / (3 + 1), pruned by a quarter
    assert "share of FFN neurons" in run.stdout

    # reloads without densetomoe, to the very same outputs as densetomoe's own loader
    inputs = sample_inputs(folder)
    with torch.no_grad():
        expected = densetomoe.load(out)(**inputs).logits
    torch.save({"inputs": inputs, "expected": expected}, tmp_path / "case.pt")
    stdout = run_without_densetomoe(f"""
import torch, transformers
case = torch.load({str(tmp_path / "case.pt")!r})
model = transformers.AutoModelForSequenceClassification.from_pretrained({str(out)!r}, trust_remote_code=True).eval()
with torch.no_grad():
    torch.testing.assert_close(model(**case["inputs"]).logits, case["expected"], rtol=1e-5, atol=1e-6)
print("ok")
""")
    assert stdout.strip() == "ok"

    # the budget's per-layer top-k survive a reload; an explicit top-k applies to every layer
    per_layer = {int(i): k for i, k in structure["top_k"].items()}
    assert len(set(per_layer.values())) > 1  # the budget chose a different top-k per layer
    layers = densetomoe.load(out).bert.encoder.layer
    assert [layer.intermediate.top_k for layer in layers] == [per_layer[i] for i in range(2)]
    uniform = transformers.AutoModelForSequenceClassification.from_pretrained(out, trust_remote_code=True, num_experts_per_tok=3)
    assert [layer.intermediate.top_k for layer in uniform.bert.encoder.layer] == [3, 3]
    assert [layer.intermediate.top_k for layer in densetomoe.load(out, top_k=3).bert.encoder.layer] == [3, 3]


@pytest.mark.slow
def test_distill_command_updates_a_folder_in_place_and_eval_reports_the_curve(tiny_models, texts_file, tmp_path):
    folder, out = tiny_models["BertModel"], tmp_path / "moe"
    densetomoe.convert(quick_recipe(folder, texts_file), out=out, show_progress=False)
    before = json.loads((out / "densetomoe_conversion.json").read_text())["quick_eval"]
    run = subprocess.run(
        [sys.executable, "-m", "densetomoe.cli", "distill", str(out), "--steps", "30", "--batch-size", "8", "--seq-len", "32", "--lr", "0.003",
         "--data", "calibration", "--data", str(texts_file), "--no-progress"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert "- calibration" in (out / "densetomoe_recipe.yaml").read_text()  # the repeated --data, as a list
    figures = json.loads((out / "densetomoe_conversion.json").read_text())
    assert figures["distillation"]["step"] == 30
    assert figures["quick_eval"]["hidden_rel_error"] < before["hidden_rel_error"]
    assert "recovery" in (out / "README.md").read_text()

    suite = tmp_path / "suite.yaml"
    suite.write_text(f"name: tiny-text\ntask: embedding\ndata: {{file: {texts_file}}}\n")
    evaluation = subprocess.run(
        [sys.executable, "-m", "densetomoe.cli", "eval", str(out), "--suite", str(suite), "--no-speed", "--no-progress"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert evaluation.returncode == 0, evaluation.stderr[-3000:]
    report = json.loads((out / "eval" / "report.json").read_text())
    assert report["recovery"]["step"] == 30
    assert (out / "eval" / "loss_curve.png").is_file()
    assert "## Recovery" in (out / "eval" / "report.md").read_text()


@pytest.mark.slow
@pytest.mark.parametrize(
    "args,message",
    [
        (["--top-k", "2", "--ffn-budget", "0.5"], "top_k or ffn_budget"),
        (["--no-distill", "--distill-steps", "3"], "contradicts"),
        (["--resume"], "no checkpoints"),
        (["--ffn-budget", "0.05"], "budget"),
        (["--experts", "5", "--shared-experts", "1"], "do not split"),
        (["--distill-data", "calibration", "--distill-data", "corpora/missing.txt.gz"], "distillation text corpora/missing.txt.gz does not exist"),
    ],
)
def test_bad_recovery_settings_fail_in_one_line(tiny_models, texts_file, tmp_path, args, message):
    folder = tiny_models["BertModel"]
    run = subprocess.run(
        [sys.executable, "-m", "densetomoe.cli", "convert", str(folder), "--experts", "4", "--calib", str(texts_file), "--calib-tokens", "512", "--out", str(tmp_path / "o"), "--no-progress", *args],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 2, run.stderr
    assert message in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_distill_command_refuses_a_folder_it_did_not_write(tmp_path):
    run = subprocess.run([sys.executable, "-m", "densetomoe.cli", "distill", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "not a model folder" in run.stderr

"""The distillation teacher shares every weight the student does not train: with
``train: moe`` a conversion holds one model plus its dense FFNs, not two models, and trains exactly
as it did with a separate copy of the dense model; with ``train: blocks`` it shares the embeddings and
the output layer alone; with ``train: all`` the teacher is a real copy."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers

import densetomoe
from conftest import quick_recipe, sample_inputs, slow_except
from densetomoe import archs, pipeline, schedulers
from densetomoe.moe import blocks_of
from densetomoe.recipe import Distill
from densetomoe.stages import distill as distill_stage
from densetomoe.stages.distill import dense_teacher, distill_model, moe_blocks

DISTILL = dict(steps=6, batch_size=4, seq_len=32, lr=3e-3, warmup=1, log_every=1, eval_every=3, eval_texts=4)

# (fixture, model, recipe settings): an encoder with a head, a decoder, and a decoder made native
# (LLaMA with tied embeddings -> qwen2_moe, whose head is written untied)
CASES = {
    "encoder": ("tiny_models", "BertForSequenceClassification", {}),
    "decoder": ("tiny_decoders", "llama", {}),
    "native": ("tiny_decoders", "llama", {"format": "native"}),
}


def _folder(request, case: str):
    fixture, key, settings = CASES[case]
    return request.getfixturevalue(fixture)[key], settings


def _storages(params) -> dict[int, int]:
    """Distinct storages of ``params``: data pointer -> bytes."""
    return {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in params}


def _dense(folder) -> torch.nn.Module:
    config = transformers.AutoConfig.from_pretrained(folder)
    return getattr(transformers, config.architectures[0]).from_pretrained(folder).eval()


def _still_dense(teacher: torch.nn.Module, dense: torch.nn.Module) -> None:
    """The teacher is still the dense model, every weight of it (the teacher's on the conversion's
    device: a GPU where there is one)."""
    kept = teacher.state_dict()
    for name, tensor in dense.state_dict().items():
        assert torch.equal(kept[name].cpu(), tensor), name


def _ffn_bytes(dense: torch.nn.Module) -> int:
    """Bytes of the dense FFN weights of every block (the tiny conversions convert them all)."""
    arch = archs.arch_for(dense.config)
    names = [n for n in (arch.up, arch.gate, arch.down) if n]
    return sum(p.nbytes for block in blocks_of(dense, arch.layers) for n in names for p in block.get_submodule(n).parameters())


def _embeddings(student: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The input embeddings and the output layer: what ``train: blocks`` leaves frozen."""
    modules = [student.get_input_embeddings(), student.get_output_embeddings()]
    return [p for m in modules if m is not None for p in m.parameters()]


@pytest.fixture
def handed(monkeypatch):
    """The (student, teacher) pairs that convert() and distill() hand to distill_model, after training."""
    pairs = []

    def spy(student, teacher, *args, **kwargs):
        trained, history = distill_model(student, teacher, *args, **kwargs)
        pairs.append((trained, teacher))
        return trained, history

    monkeypatch.setattr(pipeline, "distill_model", spy)
    return pairs


def _same_training(a: densetomoe.Conversion, b: densetomoe.Conversion) -> None:
    """The same loss curve, held-out points and final weights, to float tolerance."""
    assert a.history.steps == b.history.steps == list(range(1, DISTILL["steps"] + 1))
    torch.testing.assert_close(a.history.loss, b.history.loss, rtol=1e-6, atol=1e-7)
    for name in a.history.parts:
        torch.testing.assert_close(a.history.parts[name], b.history.parts[name], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close([p["loss"] for p in a.history.held_out], [p["loss"] for p in b.history.held_out], rtol=1e-6, atol=1e-7)
    mine, theirs = a.model.state_dict(), b.model.state_dict()
    assert mine.keys() == theirs.keys()
    # On a GPU the two teachers' forwards differ in the last bits (the same elements run after run:
    # the kernels chosen, not chance), and Adam's step, divided by a gradient near zero, carries that
    # to 1e-5 of a weight in one element in thousands (H200, 2026-12-04). On a CPU they agree to 1e-6.
    rtol, atol = (1e-4, 1e-5) if torch.cuda.is_available() else (1e-6, 1e-7)
    for name in mine:
        torch.testing.assert_close(mine[name], theirs[name], rtol=rtol, atol=atol, msg=lambda why: f"{name}: {why}")


# -- convert --distill -------------------------------------------------------------------------------
@pytest.mark.parametrize("case", slow_except("encoder", list(CASES)))
def test_shared_teacher_trains_as_a_copied_teacher(request, monkeypatch, texts_file, tmp_path, case):
    folder, settings = _folder(request, case)
    recipe = quick_recipe(folder, texts_file, distill=DISTILL, **settings)
    shared = densetomoe.convert(recipe, out=tmp_path / "shared", show_progress=False)
    monkeypatch.setattr(schedulers, "dense_teacher", lambda dense, settings: copy.deepcopy(dense))  # as before issue 10
    copied = densetomoe.convert(recipe, show_progress=False)
    _same_training(shared, copied)
    assert not shared.stats.layers  # the calibration samples were let go before training
    untrained = densetomoe.convert(recipe.model_copy(update={"distill": None}), show_progress=False).model.state_dict()
    assert any(not torch.equal(t, untrained[n]) for n, t in shared.model.state_dict().items())  # training moved it

    # the folder holds its own tensors (none shared with the dense model, a tied head written apart) and reloads
    inputs = sample_inputs(folder)
    with torch.no_grad():
        expected = shared.model(**inputs).logits
        torch.testing.assert_close(densetomoe.load(tmp_path / "shared")(**inputs).logits, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "case,train",
    slow_except(
        ("encoder", "moe"),
        [("encoder", "moe"), ("decoder", "moe"), ("native", "moe"), ("encoder", "blocks"), ("decoder", "blocks"), ("encoder", "all"), ("native", "all")],
    ),
)
def test_the_teacher_shares_exactly_the_weights_the_student_does_not_train(request, handed, texts_file, case, train):
    folder, settings = _folder(request, case)
    recipe = quick_recipe(folder, texts_file, distill={**DISTILL, "train": train}, **settings)
    conversion = densetomoe.convert(recipe, show_progress=False)
    (student, teacher), dense = handed[0], _dense(folder)
    assert student is conversion.model and not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())

    mine, theirs = _storages(student.parameters()), _storages(teacher.parameters())
    if train == "moe":  # the teacher's own memory is the dense FFNs the experts replaced, nothing more
        own = sum(nbytes for ptr, nbytes in theirs.items() if ptr not in mine)
        assert own == _ffn_bytes(dense)
        trained = [p for m in moe_blocks(student) for p in m.parameters()]
        assert trained and not set(_storages(trained)) & set(theirs)
    else:  # the student trained its attention, the teacher did not follow
        frozen = _embeddings(student) if train == "blocks" else []
        assert set(mine) & set(theirs) == set(_storages(frozen))
        attention = next(n for n in dict(student.named_parameters()) if "attention" in n or "self_attn" in n)
        assert not torch.equal(dict(student.named_parameters())[attention].cpu(), dense.state_dict()[attention])

    _still_dense(teacher, dense)  # either way


def test_the_teacher_follows_the_student_where_it_moves(tiny_decoders):
    """Shared Parameter objects, not just storage: moving (here: casting) the student moves the
    teacher's shared weights too, so a GPU run holds them once on the GPU as well."""
    dense = _dense(tiny_decoders["llama"])
    teacher = dense_teacher(dense, Distill())
    dense.double()
    assert {p.dtype for p in teacher.parameters()} == {torch.float64}
    assert _storages(teacher.parameters()) == _storages(dense.parameters())


def test_a_teacher_sharing_weights_the_student_trains_is_refused(tiny_models, texts_file):
    folder = tiny_models["BertModel"]
    conversion = densetomoe.convert(quick_recipe(folder, texts_file), show_progress=False)
    twin = dense_teacher(conversion.model, Distill())  # shares the attention the student would train
    texts = texts_file.read_text().splitlines()
    with pytest.raises(ValueError, match="shares weights that the student trains"):
        distill_model(conversion.model, twin, conversion.tokenizer, Distill(train="all", steps=1), None, texts, [], show_progress=False)


# -- densetomoe distill on a folder ------------------------------------------------------------------
FOLDERS = {  # (fixture, model, conversion settings, distill settings)
    "remote-code": ("tiny_models", "BertModel", {}, {}),
    "native": ("tiny_decoders", "llama", {"format": "native"}, {}),
    "remote-code->native, train all": ("tiny_decoders", "qwen2", {"router": "linear", "routing": "top-k"}, {"train": "all"}),
    "decoder, train blocks": ("tiny_decoders", "llama", {}, {"train": "blocks"}),
}


@pytest.mark.parametrize("case", slow_except("remote-code", list(FOLDERS)))
def test_distilling_a_folder_shares_the_frozen_weights_and_trains_as_before(request, monkeypatch, handed, texts_file, tmp_path, case):
    fixture, key, convert_settings, distill_settings = FOLDERS[case]
    folder, moe_dir = request.getfixturevalue(fixture)[key], tmp_path / "moe"
    densetomoe.convert(quick_recipe(folder, texts_file, **convert_settings), out=moe_dir, show_progress=False)
    settings = Distill(**{**DISTILL, **distill_settings})
    to_native = {"format": "native"} if "->native" in case else {}
    shared = densetomoe.distill(moe_dir, settings, out=tmp_path / "shared", show_progress=False, **to_native)
    monkeypatch.setattr(pipeline, "share_frozen", lambda teacher, student, settings: copy.deepcopy(teacher))  # as before
    copied = densetomoe.distill(moe_dir, settings, out=tmp_path / "copied", show_progress=False, **to_native)
    _same_training(shared, copied)

    (student, teacher), dense = handed[0], _dense(folder)
    mine, theirs = _storages(student.parameters()), _storages(teacher.parameters())
    if settings.train == "moe":
        assert sum(nbytes for ptr, nbytes in theirs.items() if ptr not in mine) == _ffn_bytes(dense)
    else:  # what trains is the teacher's own (train all: a native model built on the dense parameters got a copy)
        assert set(mine) & set(theirs) == set(_storages(_embeddings(student) if settings.train == "blocks" else []))
    _still_dense(teacher, dense)


# -- what distillation hands back ---------------------------------------------------------------------
def test_the_module_distillation_hands_back_is_the_one_evaluated_and_written(monkeypatch, tiny_decoders, texts_file, tmp_path):
    """Under FSDP, distillation ends with a new, unsharded module (the one it trained is sharded in
    place, and cannot be evaluated off the GPU): convert and distill must go on with that one. Here
    :func:`unsharded` fills the model's skeleton with its MoE layers' weights halved, as a stand-in
    for FSDP's (which a CPU cannot run under accelerate): in memory, the skeleton is of a dense
    model whose FFNs were swapped for MoE layers; from a folder, of the remote-code class."""
    handed_back = []

    def new_module(model, device, like):  # FSDP's gathers each tensor whole, which moves nothing
        state = {name: t * 0.5 if ".mlp." in name else t for name, t in model.state_dict().items()}  # only it has these
        handed_back.append(distill_stage.filled(like, state, device))
        return handed_back[-1]

    monkeypatch.setattr(distill_stage.loop, "unsharded", new_module)
    recipe = quick_recipe(tiny_decoders["llama"], texts_file, distill=DISTILL)
    converted = densetomoe.convert(recipe, out=tmp_path / "converted", show_progress=False)
    distilled = densetomoe.distill(tmp_path / "converted", Distill(**DISTILL), out=tmp_path / "distilled", show_progress=False)
    assert [converted.model, distilled.model] == handed_back  # (the same objects: modules compare by identity)
    for result, folder in [(converted, tmp_path / "converted"), (distilled, tmp_path / "distilled")]:
        written = densetomoe.load(folder).state_dict()
        assert all(torch.equal(written[name], t) for name, t in result.model.state_dict().items())


def test_a_model_filled_into_its_skeleton_is_the_model_again(tiny_decoders, texts_file):
    """What FSDP's student turns back into: the skeleton, taken after a training forward (whose aux
    losses hold a graph), filled with the model's weights computes what the model does, on the
    weights given, with the tied head tied again."""
    model = densetomoe.convert(quick_recipe(tiny_decoders["llama"], texts_file), show_progress=False).model
    ids = torch.tensor([[5, 9, 2, 7, 3, 8, 1, 4]])
    model.train()
    model(ids).logits.sum().backward()  # as a training step leaves it
    model.eval()
    like = distill_stage.skeleton(model)
    assert all(p.is_meta for p in like.parameters())
    state = {name: t.clone() for name, t in model.state_dict().items()}
    plain = distill_stage.filled(like, state, "cpu")
    assert plain.config.tie_word_embeddings and plain.lm_head.weight is plain.get_input_embeddings().weight
    assert all(t is state[name] or torch.equal(t, state[name]) for name, t in plain.state_dict().items())
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, model(ids).logits, rtol=0, atol=0)

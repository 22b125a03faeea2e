"""Perplexity by sliding windows: every token scored once, with the context the windows give it."""

from __future__ import annotations

import math

import pytest
import torch
import transformers

from densetomoe.evaluation.metrics import adds_bos, perplexity

TEXTS = ["The river floods every spring, and the farmers plant rice on the wet fields.", "Markets fell on Monday."] * 4


@pytest.fixture(scope="module")
def lm(tiny_decoders):
    folder = tiny_decoders["llama"]
    return transformers.LlamaForCausalLM.from_pretrained(folder).eval(), transformers.AutoTokenizer.from_pretrained(folder)


def full_sequence_nll(model, ids: list[int]) -> torch.Tensor:
    """-log p of tokens 1.. given all earlier tokens, one forward pass over the whole sequence."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
    return torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="none")


def test_uniform_model_has_the_vocabulary_size_as_perplexity(tiny_decoders):
    folder = tiny_decoders["mistral"]  # untied head
    model = transformers.MistralForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        model.lm_head.weight.zero_()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    result = perplexity(model, tokenizer, TEXTS, window=16, stride=8)
    assert result.value == pytest.approx(model.config.vocab_size, rel=1e-4)


def test_one_window_equals_the_full_sequence_computation(lm):
    model, tokenizer = lm
    ids = tokenizer("\n\n".join(TEXTS), add_special_tokens=False)["input_ids"]
    expected = full_sequence_nll(model, ids)
    result = perplexity(model, tokenizer, TEXTS, window=len(ids) + 5, stride=4, add_bos=False)
    assert result.tokens == len(ids) - 1 and result.windows == 1
    assert result.nll == pytest.approx(expected.mean().item(), rel=1e-5)


@pytest.mark.parametrize("add_bos", [False, True])
@pytest.mark.parametrize("window,stride", [(16, 8), (16, 15), (12, 3)])
def test_sliding_windows_score_each_token_once_with_their_context(lm, add_bos, window, stride):
    model, tokenizer = lm
    ids = tokenizer("\n\n".join(TEXTS), add_special_tokens=False)["input_ids"][:50]
    result = perplexity(model, tokenizer, TEXTS, window=window, stride=stride, add_bos=add_bos, max_tokens=50)
    assert result.tokens == (50 if add_bos else 49)
    # the same windows computed by hand: token t is scored in the first window that holds it after position 0
    bos = [tokenizer.bos_token_id] if add_bos else []
    span, total, done, begin = window - len(bos), 0.0, 0, 0
    while done < 50:
        end = min(begin + span, 50)
        nll = full_sequence_nll(model, bos + ids[begin:end])
        total += (nll[-(end - done) :] if done else nll).sum().item()  # the first window scores all
        done, begin = end, begin + stride
    assert result.nll == pytest.approx(total / result.tokens, rel=1e-5)
    assert math.isclose(result.value, math.exp(result.nll))


def test_an_engine_given_as_a_function_is_scored_on_the_same_windows(lm):
    """What llama.cpp's scorer does: a function from a window's ids to its logits."""
    model, tokenizer = lm
    seen = []

    def engine(ids: torch.Tensor) -> torch.Tensor:
        seen.append(len(ids))
        return model(input_ids=ids[None]).logits[0]

    expected = perplexity(model, tokenizer, TEXTS, window=16, stride=8)
    result = perplexity(engine, tokenizer, TEXTS, window=16, stride=8)
    assert result == expected and len(seen) == result.windows and max(seen) == 16


def test_overlap_changes_the_windows_not_the_tokens_scored(lm):
    """Windows that overlap more give each token more context: a different, still finite figure."""
    model, tokenizer = lm
    a = perplexity(model, tokenizer, TEXTS, window=16, stride=15)
    b = perplexity(model, tokenizer, TEXTS, window=16, stride=4)
    assert a.tokens == b.tokens and a.windows < b.windows and math.isfinite(a.value) and math.isfinite(b.value)


def test_bos_follows_the_tokenizer(tiny_decoders):
    folder = tiny_decoders["llama"]
    assert not adds_bos(transformers.AutoTokenizer.from_pretrained(folder))  # SmolLM2 has a BOS but does not add it
    llama_style = transformers.AutoTokenizer.from_pretrained(folder, add_bos_token=True)
    assert adds_bos(llama_style)
    model = transformers.LlamaForCausalLM.from_pretrained(folder).eval()
    assert perplexity(model, llama_style, TEXTS, window=16, stride=8).add_bos


def test_bad_stride_is_refused(lm):
    model, tokenizer = lm
    with pytest.raises(ValueError, match="stride"):
        perplexity(model, tokenizer, TEXTS, window=16, stride=16)

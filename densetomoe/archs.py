"""What each model family's feed-forward looks like, kept as data.

Adding a family means adding one :class:`Arch` entry to :data:`ARCHS`. The conversion reads the dense
weights through these names, and the converted config records the same names (see ``moe.py``) so
that the exported folder can rebuild its structure without this table.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import UsageError


@dataclass(frozen=True)
class Arch:
    """Where a family keeps its FFN, relative to ``model.base_model``, and which config keys size it."""

    family: str
    model_types: tuple[str, ...]
    layers: str  # ModuleList of blocks
    up: str  # Linear hidden -> d_ff, relative to a block
    down: str  # Linear d_ff -> hidden
    moe_at: str  # the submodule replaced by the MoE feed-forward
    identity: tuple[str, ...] = ()  # submodules whose work moves into the MoE module
    gate: str | None = None  # Linear hidden -> d_ff of a gated (GLU) FFN
    fused_gate_up: bool = False  # ``up`` is one Linear hidden -> 2 d_ff: gate rows, then up rows (Phi-3)
    hidden_size_key: str = "hidden_size"
    ffn_size_key: str = "intermediate_size"
    ffn_size_default: int = 0  # when the config leaves the FFN size unset (GPT-2 ``n_inner``): this x hidden
    activation_key: str = "hidden_act"
    num_layers_key: str = "num_hidden_layers"
    decoder: bool = False  # a causal LM: loaded with its LM head, exported with a generation config
    examples: tuple[str, ...] = field(default=(), compare=False)


_BERT_LIKE = dict(
    layers="encoder.layer",
    up="intermediate.dense",
    down="output.dense",
    moe_at="intermediate",
    identity=("output.dense",),
)

# Decoders whose block calls ``self.mlp(x)`` = ``down(act(gate x) * up x)``: the MoE module replaces the mlp.
_LLAMA_LIKE = dict(
    layers="layers",
    up="mlp.up_proj",
    gate="mlp.gate_proj",
    down="mlp.down_proj",
    moe_at="mlp",
    decoder=True,
)

ARCHS: tuple[Arch, ...] = (
    Arch("BERT", ("bert",), **_BERT_LIKE, examples=("bert-base", "bert-large", "all-minilm-l6-v2")),
    Arch("RoBERTa", ("roberta",), **_BERT_LIKE, examples=("roberta-base", "roberta-large")),
    Arch("XLM-RoBERTa", ("xlm-roberta",), **_BERT_LIKE, examples=("xlm-roberta-base",)),
    Arch("ELECTRA", ("electra",), **_BERT_LIKE, examples=("electra-base",)),
    Arch("MPNet", ("mpnet",), **_BERT_LIKE, examples=("mpnet-base", "all-mpnet-base-v2")),
    Arch(
        "DistilBERT",
        ("distilbert",),
        layers="transformer.layer",
        up="ffn.lin1",
        down="ffn.lin2",
        moe_at="ffn.lin1",
        identity=("ffn.activation", "ffn.lin2"),
        hidden_size_key="dim",
        ffn_size_key="hidden_dim",
        activation_key="activation",
        num_layers_key="n_layers",
        examples=("distilbert",),
    ),
    Arch(
        "GPT-2",
        ("gpt2",),
        layers="h",
        up="mlp.c_fc",  # Conv1D: weights stored (in, out)
        down="mlp.c_proj",
        moe_at="mlp",
        ffn_size_key="n_inner",
        ffn_size_default=4,
        activation_key="activation_function",
        decoder=True,
        examples=("gpt2", "distilgpt2"),
    ),
    Arch(
        "OPT",
        ("opt",),
        layers="decoder.layers",
        up="fc1",
        down="fc2",
        moe_at="fc1",
        identity=("activation_fn", "fc2"),
        ffn_size_key="ffn_dim",
        activation_key="activation_function",
        decoder=True,
        examples=("facebook/opt-125m",),
    ),
    Arch("LLaMA", ("llama",), **_LLAMA_LIKE, examples=("SmolLM2-135M", "Llama-3.2-1B")),
    Arch("Mistral", ("mistral",), **_LLAMA_LIKE, examples=("Mistral-7B",)),
    Arch("Qwen2", ("qwen2",), **_LLAMA_LIKE, examples=("Qwen2.5-0.5B",)),
    Arch("Qwen3", ("qwen3",), **_LLAMA_LIKE, examples=("Qwen3-0.6B",)),
    Arch("Gemma", ("gemma",), **_LLAMA_LIKE, examples=("gemma-2b",)),
    Arch("Gemma 2", ("gemma2",), **_LLAMA_LIKE, activation_key="hidden_activation", examples=("gemma-2-2b",)),
    Arch("Gemma 3", ("gemma3_text",), **_LLAMA_LIKE, activation_key="hidden_activation", examples=("gemma-3-1b",)),
    Arch(
        "Phi-3",
        ("phi3",),
        layers="layers",
        up="mlp.gate_up_proj",
        fused_gate_up=True,
        down="mlp.down_proj",
        moe_at="mlp",
        decoder=True,
        examples=("Phi-3-mini", "Phi-4-mini"),
    ),
)


def supported() -> str:
    """One line listing the supported families, for error messages and ``--help``."""
    return ", ".join(f"{a.family} ({'/'.join(a.model_types)})" for a in ARCHS)


def arch_for(config) -> Arch:
    """The :class:`Arch` entry for a transformers config, or a :class:`UsageError` naming the supported ones."""
    model_type = getattr(config, "model_type", None)
    for arch in ARCHS:
        if model_type in arch.model_types:
            return arch
    raise UsageError(f"model type {model_type!r} is not supported; supported families: {supported()}")


def ffn_sizes(config, arch: Arch) -> tuple[int, int]:
    """``(hidden_size, ffn_size)`` read from ``config`` through the family's keys."""
    hidden = getattr(config, arch.hidden_size_key)
    ffn = getattr(config, arch.ffn_size_key, None)
    if ffn is None and arch.ffn_size_default:
        ffn = arch.ffn_size_default * hidden
    return hidden, ffn


def num_layers(config, arch: Arch) -> int:
    return getattr(config, arch.num_layers_key)


def activation(config, arch: Arch) -> str:
    act = getattr(config, arch.activation_key)
    if not isinstance(act, str):
        raise UsageError(f"the FFN activation must be named in the config, got {act!r}")
    return act

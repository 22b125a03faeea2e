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
    # The stacks of blocks, in order, each a ModuleList; layer indices run over the stacks in this order
    # (an encoder-decoder's encoder 0..n-1, then its decoder n..). A ``*`` step stands for each element:
    # ``encoder.block.*.layer.1`` is the module at ``layer.1`` of each of ``encoder.block``'s blocks.
    layers: str | tuple[str, ...]
    up: str  # Linear hidden -> d_ff, relative to a block
    down: str  # Linear d_ff -> hidden
    moe_at: str  # the submodule replaced by the MoE feed-forward
    identity: tuple[str, ...] = ()  # submodules whose work moves into the MoE module
    gate: str | None = None  # Linear hidden -> d_ff of a gated (GLU) FFN
    fused_gate_up: bool = False  # ``up`` is one Linear hidden -> 2 d_ff: gate rows, then up rows (Phi-3)
    hidden_size_key: str = "hidden_size"
    ffn_size_key: str | tuple[str, ...] = "intermediate_size"  # several: one per stack, all equal
    ffn_size_default: int = 0  # when the config leaves the FFN size unset (GPT-2 ``n_inner``): this x hidden
    activation_key: str = "hidden_act"
    num_layers_key: str | tuple[str, ...] = "num_hidden_layers"  # several: one per stack, summed
    decoder: bool = False  # a causal LM: loaded with its LM head, exported with a generation config
    seq2seq: bool = False  # an encoder-decoder LM: loaded with its LM head, the decoder teacher-forced
    when: tuple[str, object] | None = None  # (config key, value): the entry applies only where they match
    classes: tuple[str, ...] = ()  # the entry applies only to checkpoints saved as one of these classes
    examples: tuple[str, ...] = field(default=(), compare=False)

    @property
    def generates(self) -> bool:
        """A model that generates text with its LM head: a causal LM or an encoder-decoder."""
        return self.decoder or self.seq2seq

    @property
    def stacks(self) -> tuple[str, ...]:
        return (self.layers,) if isinstance(self.layers, str) else self.layers


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

# T5's blocks are lists of sublayers whose last one holds the FFN (encoder: layer.1; decoder: layer.2,
# after cross-attention); that sublayer is the "block" here and its DenseReluDense becomes the MoE module.
_T5_LIKE = dict(
    layers=("encoder.block.*.layer.1", "decoder.block.*.layer.2"),
    down="DenseReluDense.wo",
    moe_at="DenseReluDense",
    hidden_size_key="d_model",
    ffn_size_key="d_ff",
    activation_key="dense_act_fn",
    num_layers_key=("num_layers", "num_decoder_layers"),
    seq2seq=True,
)

_T5_ENCODER = dict(
    _T5_LIKE,
    layers="encoder.block.*.layer.1",
    num_layers_key="num_layers",
    seq2seq=False,
    classes=("T5EncoderModel", "MT5EncoderModel", "UMT5EncoderModel"),
)

# Encoder-decoders whose layers compute ``fc2(act(fc1 x))`` in both stacks, as OPT's do.
_BART_LIKE = dict(
    layers=("encoder.layers", "decoder.layers"),
    up="fc1",
    down="fc2",
    moe_at="fc1",
    identity=("activation_fn", "fc2"),
    hidden_size_key="d_model",
    ffn_size_key=("encoder_ffn_dim", "decoder_ffn_dim"),
    activation_key="activation_function",
    num_layers_key=("encoder_layers", "decoder_layers"),
    seq2seq=True,
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
    # A T5 encoder alone (T5EncoderModel: the text encoder of image generators), before the full models
    Arch("T5 encoder", ("t5", "mt5", "umt5"), up="DenseReluDense.wi", **_T5_ENCODER, when=("is_gated_act", False), examples=("t5-base encoder",)),
    Arch(
        "T5 encoder (gated)",
        ("t5", "mt5", "umt5"),
        up="DenseReluDense.wi_1",
        gate="DenseReluDense.wi_0",
        **_T5_ENCODER,
        when=("is_gated_act", True),
        examples=("t5-v1_1-xxl encoder",),
    ),
    Arch("T5", ("t5", "mt5", "umt5"), up="DenseReluDense.wi", **_T5_LIKE, when=("is_gated_act", False), examples=("t5-small", "t5-base")),
    Arch(
        "T5 (gated)",
        ("t5", "mt5", "umt5"),
        up="DenseReluDense.wi_1",
        gate="DenseReluDense.wi_0",
        **_T5_LIKE,
        when=("is_gated_act", True),
        examples=("flan-t5-base", "mt5-small"),
    ),
    Arch("BART", ("bart",), **_BART_LIKE, examples=("facebook/bart-base",)),
    Arch("mBART", ("mbart",), **_BART_LIKE, examples=("facebook/mbart-large-50",)),
    Arch("Pegasus", ("pegasus",), **_BART_LIKE, examples=("google/pegasus-xsum",)),
    Arch("Marian", ("marian",), **_BART_LIKE, examples=("Helsinki-NLP/opus-mt-en-de",)),
)


def supported() -> str:
    """One line listing the supported families, for error messages and ``--help``."""
    return ", ".join(f"{a.family} ({'/'.join(a.model_types)})" for a in ARCHS)


def arch_for(config) -> Arch:
    """The :class:`Arch` entry for a transformers config, or a :class:`UsageError` naming the supported ones."""
    model_type = getattr(config, "model_type", None)
    for arch in ARCHS:
        if (
            model_type in arch.model_types
            and (arch.when is None or getattr(config, arch.when[0], None) == arch.when[1])
            and (not arch.classes or set(arch.classes) & set(getattr(config, "architectures", None) or ()))
        ):
            return arch
    raise UsageError(f"model type {model_type!r} is not supported; supported families: {supported()}")


def ffn_sizes(config, arch: Arch) -> tuple[int, int]:
    """``(hidden_size, ffn_size)`` read from ``config`` through the family's keys."""
    hidden = getattr(config, arch.hidden_size_key)
    keys = (arch.ffn_size_key,) if isinstance(arch.ffn_size_key, str) else arch.ffn_size_key
    sizes = {getattr(config, key, None) for key in keys}
    if len(sizes) > 1:
        raise UsageError(f"the stacks' FFNs differ in size ({', '.join(f'{k}={getattr(config, k)}' for k in keys)}): they must be equal")
    ffn = sizes.pop()
    if ffn is None and arch.ffn_size_default:
        ffn = arch.ffn_size_default * hidden
    return hidden, ffn


def num_layers(config, arch: Arch) -> int:
    """Blocks with an FFN, all stacks together (``--layers`` indices are 0 to this, less 1)."""
    keys = (arch.num_layers_key,) if isinstance(arch.num_layers_key, str) else arch.num_layers_key
    return sum(getattr(config, key) for key in keys)


def activation(config, arch: Arch) -> str:
    act = getattr(config, arch.activation_key)
    if not isinstance(act, str):
        raise UsageError(f"the FFN activation must be named in the config, got {act!r}")
    return act

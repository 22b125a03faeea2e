"""Turn a converted decoder into a *native* transformers MoE model: no remote code, and a model type
that serving engines (llama.cpp, vLLM, SGLang, ...) already run.

Targets are data (:data:`TARGETS`): LLaMA, Mistral and Qwen2 blocks become ``qwen2_moe`` blocks (the
attention is LLaMA's plus q/k/v biases, written as zeros), Qwen3 blocks become ``qwen3_moe`` blocks
(the same attention with QK-norm, copied as it is).

A native MoE block computes ``sum_{e in top-k} p_e(x) E_e(x)`` (+ ``sigmoid(g.x) S(x)`` for qwen2_moe's
shared expert), with ``p`` the router's softmax, while densetomoe's own module sums the selected
experts unweighted and adds the unselected experts' mean output. The native weights are set so that
the two agree where they can:

* **weights ~ 1.** The router's logits are scaled by a power of two ``alpha`` (ranking unchanged) so
  that every token's logit spread is below :data:`ROUTER_SPREAD`: the softmax is then uniform to
  ~2%, and each expert's down projection is multiplied by ``E`` (by ``k`` where the engines
  renormalise the top-k weights, as qwen3_moe does); the refit below absorbs what is left. The
  spread cannot be much smaller: the engines rank the experts by the float32 softmax, which cannot
  tell apart logits closer than ~1e-7: at 2^-14 about 1% of SmolLM2's routing decisions became
  ties, which llama.cpp and transformers broke differently. At ``top_k == experts`` the ranking does
  not matter, the spread is :data:`ALL_EXPERTS_SPREAD` and the native model is the dense model.
* **The shared expert's gate** is a tiny constant weight, so ``sigmoid(g.x) = 1/2`` to ~1e-5 and its
  down projection is doubled. It is never exactly zero: llama.cpp computes this sigmoid as
  ``silu(z) / z``, which is NaN at ``z = 0``. llama.cpp needs a shared expert in every qwen2_moe layer;
  without ``--shared-experts`` the block gets an all-zero one of :data:`EMPTY_SHARED` neurons.
* **The compensation** (unselected experts' mean output) has no place in a bias-free native block,
  so instead the down projections are refit by least squares to the dense FFN output on the
  calibration tokens, under the exact routing and weights above (:mod:`.refit`).
* **Tied embeddings** are written as two matrices for qwen2_moe, whose llama.cpp loader requires a
  separate output matrix (the model computes the same; the file grows by one embedding matrix).
* **Per-layer structure**: layers that stay dense become ``mlp_only_layers``. Every MoE layer must use
  the same top-k (the config has one ``num_experts_per_tok``).
* **The engine's limit on top-k**: llama.cpp sizes its compute graph at 8 nodes per weight tensor, and
  its MoE layer adds two nodes per selected expert; past :attr:`Target.llama_cpp_top_k` experts per
  token it aborts at load (``ggml_new_object: not enough space in the context's memory pool``), so the
  export refuses such a structure before any work.
* **One expert** (``--experts 1 --top-k 1 --prune P``) is the FFN pruned to a narrower width, refit and
  trained as an MoE; :func:`dense_equivalent` writes it as the dense family it came from.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

import torch
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from ..errors import UsageError
from ..ffn import CHUNK, DenseFFN
from ..moe import MoEFeedForward
from ..stages.refit import RIDGE, LayerFit, NormalEquations

ROUTER_SPREAD = 2.0**-6  # largest logit spread of a token after scaling: softmax uniform to ~2%, ranks kept in float32
ALL_EXPERTS_SPREAD = 2.0**-14  # ... at top_k == experts, where no ranking is needed: uniform to ~1e-4
SHARED_GATE = 2.0**-20  # the shared expert's gate weight (every entry): sigmoid(g.x) = 1/2 + O(1e-5)
EMPTY_SHARED = 32  # neurons of the all-zero shared expert a qwen2_moe block gets without --shared-experts


@dataclass(frozen=True)
class Target:
    """A native transformers MoE model type that converted decoders of ``sources`` become."""

    model_type: str
    sources: tuple[str, ...]  # dense model types
    shared_expert: bool  # an always-on shared expert with a sigmoid gate (required by llama.cpp)
    renormalises: bool  # the engines renormalise the top-k weights to sum 1 (norm_topk_prob)
    engines: str  # who runs it, for the model card and messages
    untied_head: bool = False  # llama.cpp needs its own output matrix: tied embeddings are written twice
    llama_cpp_top_k: int | None = None  # the most experts per token llama.cpp loads (see check_top_k)
    dense_type: str = ""  # the dense model type a one-expert folder is written as (dense_equivalent; LLaMA's if its biases are zero)

    def check_top_k(self, top_k: int) -> None:
        """Refuse a top-k that llama.cpp, which serves this model type, aborts on at load."""
        if self.llama_cpp_top_k is not None and top_k > self.llama_cpp_top_k:
            raise UsageError(
                f"--format native: llama.cpp aborts at load on a {self.model_type} with more than {self.llama_cpp_top_k} "
                f"experts per token (its compute graph runs out of room), this one has {top_k}; use --top-k "
                f"{self.llama_cpp_top_k} or less (fewer, larger experts keep the share of the FFN)"
            )


TARGETS: tuple[Target, ...] = (
    Target(
        "qwen2_moe",
        ("llama", "mistral", "qwen2"),
        shared_expert=True,
        renormalises=False,  # llama.cpp's qwen2moe never renormalises, whatever norm_topk_prob says
        engines="transformers, vLLM, SGLang; llama.cpp when every layer is MoE",
        untied_head=True,  # llama.cpp's qwen2moe requires output.weight, with no fallback to the embeddings
        llama_cpp_top_k=40,  # llama.cpp 0.3.36: 40 loads and 41 aborts at 16 and at 30 layers (tests/test_llamacpp.py)
        dense_type="qwen2",  # LLaMA attention with q/k/v biases, as qwen2_moe's
    ),
    Target(
        "qwen3_moe",
        ("qwen3",),
        shared_expert=False,
        renormalises=True,
        engines="transformers, vLLM, SGLang, llama.cpp",
        llama_cpp_top_k=22,  # llama.cpp 0.3.36: 22 loads and 23 aborts at 16 and at 30 layers (no shared-expert tensors)
        dense_type="qwen3",
    ),
)


def supported() -> str:
    return ", ".join(f"{'/'.join(t.sources)} -> {t.model_type}" for t in TARGETS)


def target_for(config) -> Target:
    """The native target of a dense config, or one line saying which models have one."""
    for target in TARGETS:
        if config.model_type in target.sources:
            return target
    raise UsageError(
        f"--format native: {config.model_type!r} models have no native MoE model type in transformers "
        f"(supported: {supported()}); use --format remote-code"
    )


def check_source(config, shared_experts: int, top_k: int | None = None) -> Target:
    """Everything about the dense config that the target must match, before weights are read; ``top_k``:
    the recipe's, when it is fixed before planning (no FFN budget)."""
    target = target_for(config)
    if top_k is not None:
        target.check_top_k(top_k)
    act = getattr(config, "hidden_act", None)
    if act != "silu":
        raise UsageError(f"--format native: the engines' {target.model_type} uses SiLU, this model's FFN uses {act!r}")
    if getattr(config, "mlp_bias", False):
        raise UsageError(f"--format native: {target.model_type} has no FFN biases, this model has them")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if target.model_type == "qwen2_moe" and head_dim * config.num_attention_heads != config.hidden_size:
        raise UsageError("--format native: qwen2_moe needs head_dim x heads == hidden size")
    if shared_experts and not target.shared_expert:
        raise UsageError(f"--format native: {target.model_type} has no shared expert; drop --shared-experts")
    return target


def check_plan(plan: dict[int, int | None], experts: int, target: Target) -> int:
    """The one top-k every MoE layer of a native model shares (dense layers: ``None`` in ``plan``)."""
    used = sorted({k for k in plan.values() if k is not None})
    if len(used) > 1:
        layers = {k: [i for i, v in plan.items() if v == k] for k in used}
        listing = "; ".join(f"top-{k}: layers {', '.join(map(str, ls))}" for k, ls in layers.items())
        raise UsageError(
            f"--format native: a native MoE config has one top-k for all MoE layers, this plan mixes them ({listing}); "
            "use --top-k, or --format remote-code for per-layer top-k"
        )
    top_k = used[0] if used else experts
    target.check_top_k(top_k)
    return top_k


@dataclass
class NativeReport:
    """What the native conversion did, as ``densetomoe_conversion.json`` records it (``native``)."""

    target: str
    mlp_only_layers: list[int]
    shared_expert_size: int  # 0: none asked for (qwen2_moe then has an all-zero one)
    refit_error_before: float = 0.0  # mean over MoE layers
    refit_error_after: float = 0.0

    @property
    def llama_cpp(self) -> bool:
        """llama.cpp's qwen2moe builds every layer as MoE: dense layers are not supported there."""
        return not (self.target == "qwen2_moe" and self.mlp_only_layers)

    @classmethod
    def from_fits(cls, target: str, mlp_only_layers: list[int], shared: int, fits: list[LayerFit]) -> NativeReport:
        mean = lambda xs: round(sum(xs) / max(len(xs), 1), 4)  # noqa: E731
        return cls(target, mlp_only_layers, shared, mean([f.error_before for f in fits]), mean([f.error_after for f in fits]))

    @classmethod
    def from_dict(cls, data: dict) -> NativeReport:
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})

    def as_dict(self) -> dict:
        return {**asdict(self), "llama_cpp": self.llama_cpp}


def router_scale(logits: torch.Tensor, spread: float = ROUTER_SPREAD) -> float:
    """The power of two that brings every token's logit spread (max - min) below ``spread``."""
    widest = float((logits.max(-1).values - logits.min(-1).values).max().clamp_min(1e-30))
    return 2.0 ** math.floor(math.log2(spread / widest))


def routing_weights(logits: torch.Tensor, top_k: int, renormalise: bool) -> torch.Tensor:
    """``(tokens, experts)``: each selected expert's weight as the engines compute it (fp32 softmax of
    the logits, top-k, optionally renormalised); zero for unselected experts."""
    probs = logits.float().softmax(-1)
    values, chosen = probs.topk(top_k, dim=-1)
    if renormalise:
        values = values / values.sum(-1, keepdim=True)
    return torch.zeros_like(probs).scatter_(1, chosen, values)


def native_layer(
    module: MoEFeedForward, dense: DenseFFN, sample: torch.Tensor, target: Target
) -> tuple[dict[str, torch.Tensor], LayerFit]:
    """One MoE layer's native tensors (block-relative names, float32) and what the refit achieved."""
    if module.b_up is not None or not module.gated:
        raise UsageError(f"--format native: {target.model_type} experts are gated and bias-free")
    router = module.router.layers
    if len(router) != 1 or float(router[0].bias.detach().abs().max()) > 0:
        raise UsageError("--format native: the router must be one linear map without bias (--router linear or centroid)")
    experts, size, k = module.num_experts, module.expert_size, module.top_k
    x = sample.float()  # (tokens, hidden)
    weight = router[0].weight.detach().float()  # (experts, hidden)
    alpha = router_scale(x @ weight.T, ROUTER_SPREAD if k < experts else ALL_EXPERTS_SPREAD)
    gate = alpha * weight
    coef = routing_weights(x @ gate.T, k, target.renormalises)  # (tokens, experts)
    scale = k if target.renormalises else experts  # 1 / the (uniform) weight of a selected expert
    with torch.no_grad():
        down = [scale * module.w_down.detach().float().reshape(-1, module.hidden_size).T]  # (hidden, experts*size)
        tensors = {"mlp.gate.weight": gate}  # the experts' gate_up_proj once the refit's equations are freed
        shared_gate = torch.full((1, module.hidden_size), SHARED_GATE)
        if target.shared_expert:
            tensors["mlp.shared_expert_gate.weight"] = shared_gate
            if module.shared_size:
                up, gate_w = module.shared_up.detach().float(), module.shared_gate.detach().float()
                down.append(2.0 * module.shared_down.detach().float().T)  # (hidden, shared)
                tensors["mlp.shared_expert.gate_proj.weight"] = gate_w
                tensors["mlp.shared_expert.up_proj.weight"] = up
            else:
                empty = torch.zeros(EMPTY_SHARED, module.hidden_size)
                tensors["mlp.shared_expert.gate_proj.weight"] = empty
                tensors["mlp.shared_expert.up_proj.weight"] = empty.clone()
                tensors["mlp.shared_expert.down_proj.weight"] = empty.T.clone()
        with_shared = target.shared_expert and module.shared_size
        initial = torch.cat(down, dim=1) if len(down) > 1 else down[0]  # (hidden, routed + shared neurons)
        del down
        equations = NormalEquations(initial.shape[1], module.hidden_size)
        for part, part_coef in zip(x.split(CHUNK), coef.split(CHUNK)):  # the features, a chunk of tokens at a time
            acts = module._neurons(part, slice(None)).float().reshape(len(part), experts, size)
            features = (acts * part_coef.unsqueeze(-1)).reshape(len(part), -1)
            if with_shared:
                sigmoid = torch.sigmoid(part @ shared_gate.T)  # (tokens, 1)
                features = torch.cat([features, sigmoid * module.act(part @ gate_w.T) * (part @ up.T)], dim=1)
            y = dense.neurons(part) @ dense.w_down.T  # (tokens, hidden): what the dense FFN outputs
            equations.add(features, y)
        before = equations.error(initial)
        refit = equations.solve(initial, RIDGE) if k < experts else initial
        after = equations.error(refit)
        del equations, initial  # the Gram matrix (256 MB at FFN 8,192) before the experts' copy below
        tensors["mlp.experts.gate_up_proj"] = torch.cat([module.w_gate, module.w_up], dim=1).detach().float()
        routed = experts * size
        tensors["mlp.experts.down_proj"] = refit[:, :routed].reshape(module.hidden_size, experts, size).permute(1, 0, 2).contiguous()
        if with_shared:
            tensors["mlp.shared_expert.down_proj.weight"] = refit[:, routed:].contiguous()
    return tensors, LayerFit(before, after)


def native_config(dense_config, target: Target, ffn_size: int, module: MoEFeedForward, top_k: int, mlp_only: list[int]):
    """The native MoE config: the dense config's attention, norms, rope and vocabulary, plus the experts."""
    c = dense_config
    settings = dict(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=ffn_size,  # the layers that stay dense
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=getattr(c, "num_key_value_heads", None) or c.num_attention_heads,
        hidden_act=c.hidden_act,
        max_position_embeddings=c.max_position_embeddings,
        initializer_range=getattr(c, "initializer_range", 0.02),
        rms_norm_eps=c.rms_norm_eps,
        tie_word_embeddings=getattr(c, "tie_word_embeddings", False),
        rope_parameters=getattr(c, "rope_parameters", None),
        attention_dropout=0.0,
        bos_token_id=c.bos_token_id,
        eos_token_id=c.eos_token_id,
        pad_token_id=getattr(c, "pad_token_id", None),
        num_experts=module.num_experts,
        num_experts_per_tok=top_k,
        moe_intermediate_size=module.expert_size,
        norm_topk_prob=target.renormalises,
        decoder_sparse_step=1,
        mlp_only_layers=mlp_only,
    )
    if target.model_type == "qwen2_moe":
        settings.update(shared_expert_intermediate_size=module.shared_size or EMPTY_SHARED, qkv_bias=True)
    else:  # qwen3_moe: Qwen3's attention as it is
        settings.update(head_dim=c.head_dim, attention_bias=getattr(c, "attention_bias", False))
    window = getattr(c, "sliding_window", None)
    if window and (c.model_type == "mistral" or getattr(c, "use_sliding_window", False)):
        settings.update(use_sliding_window=True, sliding_window=window, max_window_layers=c.num_hidden_layers)
        settings["layer_types"] = getattr(c, "layer_types", None) or ["sliding_attention"] * c.num_hidden_layers
    return CONFIG_MAPPING[target.model_type](**settings)


def native_block(
    block: dict[str, torch.Tensor],
    target: Target,
    module: MoEFeedForward | None = None,
    dense: DenseFFN | None = None,
    sample: torch.Tensor | None = None,
) -> tuple[dict[str, torch.Tensor], LayerFit | None]:
    """One dense block's state (block-relative names) as the native block's: attention and norms as
    they are (zero q/k/v biases for qwen2_moe), and the FFN replaced by ``module``'s native tensors
    (:func:`native_layer`) when the block is converted (a block left dense keeps its FFN)."""
    state = {}
    for name, tensor in block.items():
        if module is not None and name.startswith("mlp."):
            continue  # replaced below
        if name == "self_attn.o_proj.bias":
            raise UsageError(f"--format native: {target.model_type} has no output-projection bias, this model has one")
        state[name] = tensor
    if target.model_type == "qwen2_moe":  # LLaMA/Mistral attention without q/k/v biases: zeros are exact
        for proj in ("q_proj", "k_proj", "v_proj"):
            weight = state[f"self_attn.{proj}.weight"]
            state.setdefault(f"self_attn.{proj}.bias", weight.new_zeros(weight.shape[0]))
    if module is None:
        return state, None
    tensors, fit = native_layer(module, dense, sample, target)
    state.update(tensors)
    return state, fit


def to_native(
    dense: nn.Module,
    target: Target,
    layers_attr: str,
    modules: dict[int, MoEFeedForward],
    ffns: dict[int, DenseFFN],
    samples: dict[int, torch.Tensor],
    ffn_size: int,
    show_progress: bool = True,
) -> tuple[nn.Module, NativeReport]:
    """The native MoE model for ``dense`` with ``modules`` at their block indices; ``ffns`` and
    ``samples`` are the converted layers' dense FFNs and calibration FFN inputs.

    The native model is built on ``dense``'s own parameters: its attention, embeddings, norms and
    dense layers *are* the dense model's ``Parameter`` objects (nothing is allocated for them, not even
    at construction), so only the experts, the zero q/k/v biases and an untied head are new memory.
    ``dense`` is left unchanged, but training those shared weights changes it: a teacher that must
    stay dense while they train is a copy (:func:`~densetomoe.stages.distill.dense_teacher`). The
    folder ``save_pretrained`` writes holds only the native model's own tensors, so the sharing
    never reaches it."""
    from accelerate import init_empty_weights

    from ..console import progress

    top_k = next(iter(modules.values())).top_k
    num_layers = dense.config.num_hidden_layers
    mlp_only = [i for i in range(num_layers) if i not in modules]
    first = next(iter(modules.values()))
    config = native_config(dense.config, target, ffn_size, first, top_k, mlp_only)
    if target.untied_head:  # the dense state dict holds lm_head.weight even when tied: it is copied as its own matrix
        config.tie_word_embeddings = False
    state = {}
    prefix = f"model.{layers_attr}."
    blocks: dict[int, dict[str, torch.Tensor]] = {}
    for name, tensor in dense.state_dict(keep_vars=True).items():  # the Parameters themselves, to be shared
        if name.startswith(prefix):
            index, rest = name[len(prefix) :].split(".", 1)
            blocks.setdefault(int(index), {})[rest] = tensor
        else:
            state[name] = tensor
    fits = []
    with progress(show_progress) as bar:
        task = bar.add_task("native experts", total=len(modules))
        for i in range(num_layers):
            tensors, fit = native_block(blocks[i], target, modules.get(i), ffns.get(i), samples.get(i))
            state.update({f"{prefix}{i}.{name}": t.to(dense.dtype) for name, t in tensors.items()})
            if fit is not None:
                fits.append(fit)
                bar.advance(task)
    head = state.get("lm_head.weight")
    if head is not None and not config.tie_word_embeddings and head is state.get("model.embed_tokens.weight"):
        state["lm_head.weight"] = nn.Parameter(head.detach().clone())  # tied in the dense model, apart here
    with init_empty_weights():  # parameters on the meta device: every one is assigned below
        model = AutoModelForCausalLM.from_config(config, dtype=dense.dtype)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [m for m in missing if not (m == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:  # a mapping bug, not bad input
        raise RuntimeError(f"native weights do not match {target.model_type}: missing {missing[:4]}, unexpected {unexpected[:4]}")
    if config.tie_word_embeddings:
        model.tie_weights()
    model.generation_config = dense.generation_config
    return model.eval(), NativeReport.from_fits(target.model_type, mlp_only, first.shared_size, fits)


def dense_equivalent(model: nn.Module) -> nn.Module:
    """A native MoE of one expert per layer (the FFN pruned to a narrower width: ``--experts 1 --top-k 1
    --prune P``) as the dense model it is, with ``intermediate_size`` the expert's width: ``llama`` when
    its q/k/v biases are the zeros the export wrote for a LLaMA or Mistral source, else ``qwen2``
    (``qwen3`` from ``qwen3_moe``). The same function: a lone expert's softmax weight is exactly 1, and
    the all-zero shared expert adds nothing. Serving engines then run a plain FFN, the honest baseline
    that an MoE of the same share of neurons has to beat."""
    config = model.config
    target = next((t for t in TARGETS if t.model_type == config.model_type), None)
    if target is None or config.num_experts != 1:
        raise UsageError(f"only a native MoE of one expert has a dense equivalent, this is {config.model_type} with {getattr(config, 'num_experts', 0)} experts")
    if config.mlp_only_layers:
        raise UsageError(f"layers {config.mlp_only_layers} stayed dense at full width: a dense config has one FFN width")
    state = model.state_dict()
    if any(float(t.abs().max()) > 0 for name, t in state.items() if name.endswith("shared_expert.down_proj.weight")):
        raise UsageError("the shared expert computes something: with it the model is not one FFN of the expert's width")
    biases = [name for name in state if re.search(r"self_attn\.[qkv]_proj\.bias$", name)]
    dense_type = target.dense_type
    if dense_type == "qwen2" and all(float(state[name].abs().max()) == 0 for name in biases):
        dense_type, state = "llama", {k: v for k, v in state.items() if k not in biases}  # LLaMA attention, as converted
    keep = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act",
            "max_position_embeddings", "initializer_range", "rms_norm_eps", "tie_word_embeddings", "rope_parameters",
            "attention_bias", "use_sliding_window", "sliding_window", "max_window_layers", "layer_types",
            "bos_token_id", "eos_token_id", "pad_token_id")  # fmt: skip
    settings = {k: v for k, v in config.to_dict().items() if k in keep}
    dense_config = CONFIG_MAPPING[dense_type](**settings, intermediate_size=config.moe_intermediate_size)
    dense_state = {}
    for name, tensor in state.items():
        prefix, _, rest = name.partition(".mlp.")
        if not rest:
            dense_state[name] = tensor
        elif rest == "experts.gate_up_proj":  # (1, 2 x width, hidden)
            gate, up = tensor[0].chunk(2)
            dense_state[f"{prefix}.mlp.gate_proj.weight"], dense_state[f"{prefix}.mlp.up_proj.weight"] = gate, up
        elif rest == "experts.down_proj":  # (1, hidden, width)
            dense_state[f"{prefix}.mlp.down_proj.weight"] = tensor[0]
    dense = AutoModelForCausalLM.from_config(dense_config, dtype=model.dtype)
    dense.load_state_dict(dense_state, strict=True)
    dense.generation_config = model.generation_config
    return dense.eval()

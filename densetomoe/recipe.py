"""The validated settings of one conversion: what a ``recipes/*.yaml`` file holds.

Everything that can be checked without loading weights is checked here, so a bad combination fails
before any heavy work; checks that need the model's config live in :func:`check_against_model`.
Named algorithms (partition, router, budget) and output formats are validated against their
registries, so a newly registered one is accepted here, offered by the CLI and described in the card.
Defaults live here and nowhere else: the CLI reads them from these fields.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import UsageError
from .ffn import expert_size, neuron_share
from .formats import FORMATS
from .stages.budget import BUDGETS
from .stages.partition import PARTITIONS
from .stages.router import ROUTERS

# Names that must be registry entries (checked when a recipe is built, so late registrations count).
Partition = Annotated[str, AfterValidator(PARTITIONS.check)]
RouterKind = Annotated[str, AfterValidator(ROUTERS.check)]
Budget = Annotated[str, AfterValidator(BUDGETS.check)]
Format = Annotated[str, AfterValidator(FORMATS.check)]
DType = Literal["float32", "bfloat16", "float16"]
Trainable = Literal["moe", "blocks", "all"]
Gates = Literal["frozen", "learn"]
RoutingKind = Literal["top-k", "dynamic", "dynamic-soft"]
RAMP = 0.1  # dynamic-soft's ramp unless the recipe names one (docs/results.md, Half precision)
MixedPrecision = Literal["no", "bf16", "fp16"]


class Distill(BaseModel):
    """How to recover quality by distilling the MoE model from its dense original (``distill:``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    data: str | list[str] | None = Field(
        None,
        description="unlabelled training text: a source as calib, or a list of them read in turn; 'calibration' names the "
        "calibration text, so [calibration, more.txt.gz] adds to it; None: the calibration text",
    )
    steps: int | None = Field(300, gt=0, description="optimisation steps; None: until minutes run out")
    minutes: float | None = Field(None, gt=0, description="wall-clock budget; training stops at whichever comes first")
    batch_size: int = Field(16, gt=0, description="texts per step (split between the processes under accelerate launch)")
    seq_len: int = Field(128, ge=8, description="tokens per text, longer ones are cut")
    lr: float = Field(3e-4, gt=0, description="peak learning rate (AdamW, warm-up then cosine decay)")
    warmup: int = Field(20, ge=0, description="warm-up steps")
    final_lr: float = Field(0.1, ge=0, le=1, description="the learning rate the cosine decay ends at, as a fraction of lr")
    weight_decay: float = Field(0.0, ge=0)
    hidden_loss: float = Field(1.0, ge=0, description="weight of the per-layer hidden-state loss (normalised MSE)")
    logits_loss: float = Field(1.0, ge=0, description="weight of KL(dense || MoE) on logits, where the model has a head or an LM")
    pooled_loss: float = Field(1.0, ge=0, description="weight of 1 - cosine of mean-pooled outputs (models without a head)")
    balance_loss: float = Field(0.01, ge=0, description="weight of the Switch load-balancing loss")
    router_loss: float = Field(0.1, ge=0, description="weight of the router's cross-entropy to each expert's measured output share")
    temperature: float = Field(1.0, gt=0, description="softmax temperature of the logit KL")
    expert_dropout: float = Field(0.0, ge=0, lt=1, description="probability of dropping each selected expert per token while training")
    train: Trainable = Field("moe", description="moe: only experts, routers and corrections learn; blocks: every weight but the embeddings and the output layer; all: every weight")
    gates: Gates = Field(
        "frozen",
        description="native folders' routers: frozen: they keep the conversion's choice of experts; learn: they train under the "
        "engines' softmax routing, each at its experts' rate relative to its size",
    )
    mixed_precision: MixedPrecision = Field("no", description="accelerate's mixed precision (bf16 on recent GPUs and CPUs)")
    checkpoint_every: int = Field(100, gt=0, description="steps between checkpoints (for --resume)")
    log_every: int = Field(10, gt=0, description="steps between points of the loss curve")
    eval_every: int = Field(50, gt=0, description="steps between held-out points of the loss curve")
    eval_texts: int = Field(32, ge=0, description="held-out texts scored on the loss curve (0: none)")

    @model_validator(mode="after")
    def _has_budget(self) -> Distill:
        if self.steps is None and self.minutes is None:
            raise ValueError("distillation needs steps, minutes or both")
        return self

    @classmethod
    def build(cls, **settings) -> Distill:
        """A :class:`Distill` from keyword settings, with errors as one readable :class:`UsageError`."""
        try:
            return cls(**settings)
        except ValidationError as e:
            raise UsageError(_describe(e, "distill")) from None


class Recipe(BaseModel):
    """How to turn one dense checkpoint into an MoE checkpoint."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(description="local folder, Hub id, or alias such as bert-base")
    experts: int = Field(8, gt=0, description="experts per FFN layer; they split its neurons equally")
    top_k: int = Field(2, gt=0, description="experts each token uses (with ffn_budget: chosen per layer)")
    shared_experts: int = Field(0, ge=0, description="always-on experts (the most important neurons); the FFN splits into experts + shared_experts equal parts")
    ffn_budget: float | None = Field(None, gt=0, le=1, description="average share of FFN neurons a token uses, over all layers; each layer's top-k (or dense) is then chosen by budget")
    budget: Budget = Field("sensitivity", description="how ffn_budget is shared out: sensitivity (measured per layer) or uniform")
    prune: float = Field(0.0, ge=0, lt=1, description="share of each expert's neurons removed by activation x weight importance")
    partition: Partition = Field("coactivation", description="how neurons are grouped into experts")
    router: RouterKind = Field("mlp", description="how each token's experts are chosen (format native: linear by default)")
    calib: str | None = Field(None, description="calibration text; None means the embedded Wikipedia sample")
    calib_tokens: int | None = Field(None, gt=0, description="calibration tokens run through the dense model; None: twice sample_tokens, at least 32,768")
    seq_len: int = Field(128, ge=8, description="tokens per calibration sequence")
    batch_size: int = Field(16, gt=0)
    sample_tokens: int | None = Field(None, gt=0, description="tokens per layer kept to cluster neurons, train routers and refit; None: 8,192, and for decoder LMs up to 32,768 while a layer's sampled activations stay within 256 MB")
    router_hidden: int = Field(128, ge=0, description="hidden width of the MLP router")
    router_steps: int = Field(400, ge=0, description="optimisation steps per MLP router")
    compensate: bool = Field(True, description="add unselected experts' mean output (training-free correction)")
    refit: bool | None = Field(None, description="refit the experts' down projections (and the unselected experts' means) by least squares to the dense FFN output on the calibration tokens, under the routing inference uses; None: for decoder LMs. A refit folder is tuned for its top-k")
    routing: RoutingKind | None = Field(None, description="top-k: every token takes top_k experts; dynamic: a token takes experts by router probability until they cover a share of it, set per layer so that calibration tokens take top_k on average (format remote-code only: engines take a fixed top-k); dynamic-soft: dynamic with a soft boundary, experts whose probability is near a token's threshold taken in part (see ramp): outputs move smoothly with the router, so half precision flips fewer experts, at some cost in quality; None: dynamic for decoder LMs in format remote-code")
    ramp: float | None = Field(None, gt=0, le=1, description="routing dynamic-soft (None: 0.1): an expert whose probability p is within a factor 1 + ramp above a token's threshold t counts by (p - t) / (ramp t). Wider: steadier in half precision, further from the hard rule (SmolLM2 at half the FFN, bfloat16 agreement with float32 and perplexity against the hard rule: 0.1, 0.954 and +12%; 0.03, 0.912 and +3%; the hard rule 0.820; docs/results.md, Half precision)")
    layers: list[int] | None = Field(None, description="indices of the layers to convert; None converts all. An encoder-decoder's run over both stacks: encoder 0..n-1, then decoder n..")
    sequential: bool | None = Field(None, description="convert one block at a time, reading its weights from the checkpoint: memory stays one block whatever the depth; None: for decoders of 1B parameters and more, where the recipe allows")
    seed: int = 0
    dtype: DType = "float32"
    allow_pickle: bool = Field(False, description="accept a checkpoint stored only as pickle (.bin)")
    distill: Distill | None = Field(None, description="recover quality by distillation from the dense model; None: training-free")
    format: Format = Field(
        "remote-code",
        description="remote-code: densetomoe's own MoE module, loaded with trust_remote_code; native: a decoder as a "
        "standard transformers MoE model (qwen2_moe / qwen3_moe) that serving engines run",
    )

    @model_validator(mode="before")
    @classmethod
    def _format_defaults(cls, data):
        """What the format chooses where the recipe is silent (a native MoE's router is one linear map)."""
        if isinstance(data, dict) and data.get("format", cls.model_fields["format"].default) in FORMATS:
            data = FORMATS[data.get("format", cls.model_fields["format"].default)].recipe_defaults(data)
        return data

    @model_validator(mode="after")
    def _consistent(self) -> Recipe:
        if self.top_k > self.experts:
            raise ValueError(f"top_k ({self.top_k}) cannot exceed experts ({self.experts})")
        if self.ffn_budget is not None and "top_k" in self.model_fields_set:
            raise ValueError("give top_k or ffn_budget, not both: with ffn_budget each layer's top-k is chosen")
        if self.sequential is True and self.distill is not None:
            raise ValueError("sequential conversion holds one block at a time and cannot distill: convert, then run densetomoe distill on the folder")
        if self.sequential is True and self.ffn_budget is not None:
            raise ValueError("sequential conversion takes one top-k for every layer: use top_k instead of ffn_budget")
        if self.ramp is not None and self.routing != "dynamic-soft":
            raise ValueError("ramp is the width of dynamic-soft routing's soft boundary: give routing dynamic-soft with it")
        FORMATS[self.format].check_recipe(self)
        return self

    @property
    def dynamic(self) -> bool:
        """Whether tokens take a varying number of experts (dynamic top-k, with or without a soft boundary)."""
        return self.routing in ("dynamic", "dynamic-soft")

    @property
    def boundary_ramp(self) -> float:
        """The soft boundary's ramp with ``dynamic-soft``; 0 (a hard boundary) otherwise."""
        if self.routing != "dynamic-soft":
            return 0.0
        return RAMP if self.ramp is None else self.ramp

    @property
    def parts(self) -> int:
        """Equal parts each FFN splits into: routed experts plus shared ones."""
        return self.experts + self.shared_experts

    @classmethod
    def build(cls, **settings) -> Recipe:
        """A :class:`Recipe` from keyword settings, with errors as one readable :class:`UsageError`."""
        try:
            return cls(**settings)
        except ValidationError as e:
            raise UsageError(_describe(e)) from None

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides) -> Recipe:
        """Read a recipe file; ``overrides`` (for example command-line flags) win over its keys."""
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise UsageError(f"cannot read recipe {path}: {e}") from None
        if not isinstance(data, dict):
            raise UsageError(f"recipe {path} must be a mapping of settings")
        return cls.build(**merge(data, overrides))

    def published(self, model_name: str) -> Recipe:
        """The recipe as an uploaded folder may show it: the model by its public name and a local
        calibration file by its file name (local paths stay in the folder's unpublished local file)."""
        calib = self.calib
        if calib and Path(calib).expanduser().exists():
            calib = Path(calib).name
        return self.model_copy(update={"model": model_name, "calib": calib})

    def to_yaml(self) -> str:
        """Every setting, so the file reproduces the conversion (top_k is left out under a budget)."""
        exclude = {"top_k"} if self.ffn_budget is not None else set()
        return yaml.safe_dump(self.model_dump(mode="json", exclude=exclude), sort_keys=False)


def merge(base: dict, overrides: dict) -> dict:
    """``base`` with ``overrides`` on top; nested mappings (``distill:``) merge key by key."""
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def _describe(error: ValidationError, prefix: str = "") -> str:
    parts = []
    for item in error.errors():
        where = ".".join(str(p) for p in (prefix, *item["loc"]) if p != "")
        message = item["msg"].removeprefix("Value error, ")
        parts.append(f"{where}: {message}" if where else message)
    return "invalid settings: " + "; ".join(parts)


def check_against_model(recipe: Recipe, ffn_size: int, num_layers: int) -> None:
    """Checks that need the model's shapes; run on the config, before the weights are loaded."""
    parts = recipe.parts
    if parts > ffn_size:
        raise UsageError(f"--experts {recipe.experts} exceeds the FFN's {ffn_size} neurons")
    if ffn_size % parts:
        divisors = [d for d in (2, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128) if ffn_size % d == 0]
        shared = f" (with {recipe.shared_experts} shared)" if recipe.shared_experts else ""
        choices = ", ".join(str(d - recipe.shared_experts) for d in divisors if d > recipe.shared_experts)
        raise UsageError(
            f"the FFN's {ffn_size} neurons do not split into {recipe.experts} equal experts{shared}; "
            f"choose one of {choices}"
        )
    size = expert_size(ffn_size, recipe.experts, recipe.shared_experts)
    routed = expert_size(ffn_size, recipe.experts, recipe.shared_experts, recipe.prune)
    if routed < 1:
        raise UsageError(f"--prune {recipe.prune} leaves no neuron in experts of {size}")
    if recipe.ffn_budget is not None:  # the cheapest plan: top-1 in every converted layer
        converted = len(set(recipe.layers)) if recipe.layers else num_layers
        top_1 = neuron_share(1, routed, recipe.shared_experts * size, ffn_size)
        least = (converted * top_1 + num_layers - converted) / num_layers
        if recipe.ffn_budget < least - 1e-9:
            raise UsageError(
                f"--ffn-budget {recipe.ffn_budget} is below the least this structure can use ({least:.3f}: top-1 "
                "everywhere); use more experts, fewer shared ones or a larger budget"
            )
    for index in recipe.layers or []:
        if not 0 <= index < num_layers:
            raise UsageError(f"layer {index} does not exist: the model has layers 0..{num_layers - 1}")

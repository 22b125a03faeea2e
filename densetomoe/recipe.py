"""The validated settings of one conversion: what a ``recipes/*.yaml`` file holds.

Everything that can be checked without loading weights is checked here, so a bad combination fails
before any heavy work; checks that need the model's config live in :func:`check_against_model`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import UsageError

Partition = Literal["coactivation", "parameters", "random"]
RouterKind = Literal["mlp", "centroid"]
DType = Literal["float32", "bfloat16", "float16"]


class Recipe(BaseModel):
    """How to turn one dense checkpoint into an MoE checkpoint."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(description="local folder, Hub id, or alias such as bert-base")
    experts: int = Field(8, gt=0, description="experts per FFN layer; they split its neurons equally")
    top_k: int = Field(2, gt=0, description="experts each token uses")
    partition: Partition = Field("coactivation", description="how neurons are grouped into experts")
    router: RouterKind = Field("mlp", description="how each token's experts are chosen")
    calib: str | None = Field(None, description="calibration text; None means the embedded Wikipedia sample")
    calib_tokens: int = Field(32768, gt=0, description="calibration tokens run through the dense model")
    seq_len: int = Field(128, ge=8, description="tokens per calibration sequence")
    batch_size: int = Field(16, gt=0)
    sample_tokens: int = Field(8192, gt=0, description="tokens per layer kept to cluster neurons and train routers")
    router_hidden: int = Field(128, ge=0, description="hidden width of the MLP router")
    router_steps: int = Field(400, ge=0, description="optimisation steps per MLP router")
    compensate: bool = Field(True, description="add unselected experts' mean output (training-free correction)")
    layers: list[int] | None = Field(None, description="indices of the layers to convert; None converts all")
    seed: int = 0
    dtype: DType = "float32"
    allow_pickle: bool = Field(False, description="accept a checkpoint stored only as pickle (.bin)")

    @model_validator(mode="after")
    def _top_k_fits(self) -> Recipe:
        if self.top_k > self.experts:
            raise ValueError(f"top_k ({self.top_k}) cannot exceed experts ({self.experts})")
        return self

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
        return cls.build(**{**data, **overrides})

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _describe(error: ValidationError) -> str:
    parts = []
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"])
        message = item["msg"].removeprefix("Value error, ")
        parts.append(f"{where}: {message}" if where else message)
    return "invalid settings: " + "; ".join(parts)


def check_against_model(recipe: Recipe, ffn_size: int, num_layers: int) -> None:
    """Checks that need the model's shapes; run on the config, before the weights are loaded."""
    if recipe.experts > ffn_size:
        raise UsageError(f"--experts {recipe.experts} exceeds the FFN's {ffn_size} neurons")
    if ffn_size % recipe.experts:
        divisors = [d for d in (2, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128) if ffn_size % d == 0]
        raise UsageError(
            f"the FFN's {ffn_size} neurons do not split into {recipe.experts} equal experts; "
            f"choose one of {', '.join(map(str, divisors))}"
        )
    for index in recipe.layers or []:
        if not 0 <= index < num_layers:
            raise UsageError(f"layer {index} does not exist: the model has layers 0..{num_layers - 1}")

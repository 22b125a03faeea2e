"""What an output format decides, and the registry of formats.

A format is how a converted model is held in its folder: densetomoe's own MoE module as remote code,
or a native transformers MoE that serving engines run. Each format is one module of this package,
which subclasses :class:`Format` once and registers the instance in :data:`FORMATS`; the pipeline,
the recipe, loading, evaluation, GGUF and the model card ask the format what differs, and none of
them names a format.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .. import folder as folders
from ..errors import UsageError
from ..registry import Registry


class Layers:
    """A loaded folder's MoE layers as ``densetomoe eval`` reads them: the top-k to sweep, the share of
    the FFN a token computes, the linear layers that are FFN, and a recorder of each token's experts."""

    num_experts: int
    top_k: int

    def check_top_k(self, k: int) -> None: ...
    def set_top_k(self, k: int) -> None: ...
    def restore(self) -> None: ...
    def layer_top_k(self, index: int) -> int: ...
    def active_ffn_share(self, dense_ffn_size: int, num_layers: int) -> float: ...
    def ffn_linears(self) -> set[nn.Module] | None: ...
    def recorder(self): ...


@dataclass
class BlockContext:
    """What a format needs to know of a conversion run one block at a time."""

    arch: object  # densetomoe.archs.Arch
    config: object  # the dense config
    shell: nn.Module  # the dense model on the meta device: its checkpoint names
    dtype: torch.dtype
    device: torch.device | str
    ffn_size: int
    converted: set[int]  # the blocks that convert


class Builder:
    """How one conversion assembles its model in a format, made once the dense config is known
    (:meth:`Format.builder`): in memory from every converted layer at once (:meth:`assemble`), or one
    block at a time (:meth:`block`, then :meth:`finish`)."""

    untied_head = False  # the format writes a tied head as its own matrix

    def check_plan(self, plan: dict[int, int | None], experts: int) -> None:
        """Refuse a plan of per-layer top-k (None: dense) that the format cannot hold."""

    def check_modules(self, modules: dict) -> None:
        """Refuse converted modules (block index -> densetomoe's module) that the format cannot hold."""

    def assemble(self, model, arch, modules, ffns, samples, ffn_size: int, show_progress: bool, log):
        """``(model, details)``: the converted model with ``modules`` at their block indices; ``ffns``
        and ``samples``: the converted layers' dense FFNs and calibration FFN inputs."""
        raise NotImplementedError

    def block(self, index: int, block: nn.Module, module, ffn, sample, context):
        """One block of a conversion run one block at a time: ``(state, prefix, names, block)``, the
        block's tensors (block-relative names) with the prefix the folder gives them, the model whose
        checkpoint names they take (:func:`~densetomoe.stages.blockwise.as_saved`), and the block the
        converted stream runs through. ``module``: the block's converted FFN, None where it stays dense."""
        raise NotImplementedError

    def finish(self, shell: nn.Module, arch, modules) -> tuple[nn.Module, object]:
        """``(model, details)`` once every block is written: the model the folder's config describes."""
        raise NotImplementedError


class Format:
    """One output format. Subclasses answer each question where their format differs."""

    name = ""
    llama_cpp = False  # llama.cpp can serve folders of this format (as GGUF files)
    refits_split = True  # the split's down projections are refit to the dense FFN (else the format refits its own way)

    # -- the recipe --------------------------------------------------------------------------------
    def recipe_defaults(self, settings: dict) -> dict:
        """The recipe's settings before validation, with what this format chooses where they are silent."""
        return settings

    def check_recipe(self, recipe) -> None:
        """A :class:`ValueError` for settings the format cannot hold (before any work)."""

    def routing(self, decoder: bool) -> str:
        """The routing a recipe that names none gets."""
        return "top-k"

    # -- the conversion ----------------------------------------------------------------------------
    def builder(self, config, recipe, top_k: int | None) -> Builder:
        """How this conversion builds its model; checks the dense ``config`` first (``top_k``: the
        recipe's, when fixed before planning)."""
        raise NotImplementedError

    def details(self, figures: dict):
        """What the conversion recorded about the format in the folder's figures (None: nothing)."""
        return None

    def top_k(self, model: nn.Module, num_layers: int) -> dict[int, int]:
        """Each converted layer's top-k (layers left dense are absent)."""
        raise NotImplementedError

    def shared_size(self, model: nn.Module, details) -> int:
        raise NotImplementedError

    def can_become(self, other: Format) -> str | None:
        """Why a folder of this format cannot be trained into ``other``; None when it can."""
        return None if other is self else f"a {self.name} folder cannot become {other.name}"

    # -- the folder --------------------------------------------------------------------------------
    def write(self, model: nn.Module, staging: Path) -> None:
        """The model itself (weights and config) into the staging folder."""
        raise NotImplementedError

    def write_config(self, model: nn.Module, staging: Path) -> None:
        """What the format writes besides weights written elsewhere (one block at a time: ``model`` is
        a skeleton on the meta device)."""
        raise NotImplementedError

    def recognises(self, config: dict, figures: dict) -> bool:
        raise NotImplementedError

    def load(self, folder: Path, config: dict, top_k: int | None, **kwargs) -> nn.Module:
        raise NotImplementedError

    def layers(self, model: nn.Module) -> Layers:
        raise NotImplementedError

    def card_combination(self, details, distilled: bool) -> str | None:
        """How the card describes the experts' combination (None: the recipe's own words)."""
        return None

    def card_use(self, details, auto: str) -> str:
        """The card's "Use" section."""
        raise NotImplementedError

    def gguf_refusal(self, config: dict) -> str | None:
        """Why llama.cpp cannot serve a folder of this format with this ``config``; None when it can."""
        return None


FORMATS: Registry[Format] = Registry("format")


def format_of(folder: str | Path) -> str:
    """The :data:`FORMATS` entry ``folder`` was written in, or a :class:`UsageError` saying why it is
    not a densetomoe folder."""
    folder = Path(folder)
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UsageError(f"{folder} is not a model folder: {e}") from None
    figures = folders.read_figures(folder)
    for name in FORMATS:
        if isinstance(config, dict) and FORMATS[name].recognises(config, figures):
            return name
    raise UsageError(f"{folder} was not written by densetomoe (its config is none of {', '.join(FORMATS)}, and no {folders.FIGURES_FILE} names one)")


def of(folder: str | Path) -> Format:
    """The format of a converted ``folder`` (:func:`format_of`)."""
    return FORMATS[format_of(folder)]


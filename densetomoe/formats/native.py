"""Format ``native``: a LLaMA/Mistral/Qwen2/Qwen3 decoder as a standard transformers MoE checkpoint
(``qwen2_moe``, ``qwen3_moe``) that transformers, vLLM, SGLang and llama.cpp run without remote code.

What the format asks of a recipe (a linear router, routing top-k, no float16), how its model is built
in memory or one block at a time, how its folder loads and is measured, and what its card says live
here; the tensors themselves (targets, the router scaling, the refit) are :mod:`.qwen_moe`'s.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from torch import nn

from .. import memory
from ..errors import UsageError
from ..evaluation.costs import expert_neurons, is_sparse_block
from ..evaluation.metrics import ExpertLoad
from ..ffn import neuron_share
from ..moe import check_top_k
from ..stages import blockwise
from ..stages.router import ROUTERS
from . import qwen_moe
from .base import FORMATS, Builder, Format, Layers
from .qwen_moe import TARGETS, NativeReport, Target


class RouterRecorder(ExpertLoad):
    """:class:`~densetomoe.metrics.ExpertLoad` of a native model's sparse blocks, from each router's own
    choice (its third output: the ``(tokens, top_k)`` expert indices)."""

    def __init__(self, blocks: list[nn.Module]):
        super().__init__([b.gate for b in blocks], [b.gate.weight.shape[0] for b in blocks], _chosen)


def _chosen(router: nn.Module, args: tuple, output) -> torch.Tensor:
    return torch.nn.functional.one_hot(output[2], router.weight.shape[0]).sum(1)  # (tokens, experts)


class NativeLayers(Layers):
    """The MoE layers of a native model as transformers builds them: each sparse block holds a ``gate``
    (the router: a weight and a fixed ``top_k``), ``experts`` (every expert's projections in two
    stacked tensors), and a ``shared_expert`` where the model type has one."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.layers = list(model.model.layers)
        self.modules = {i: layer.mlp for i, layer in enumerate(self.layers) if is_sparse_block(layer.mlp)}  # block index -> sparse block
        first = next(iter(self.modules.values()))
        self.num_experts, self.top_k = first.gate.weight.shape[0], first.gate.top_k

    def check_top_k(self, k: int) -> None:
        check_top_k(k, self.num_experts)

    def set_top_k(self, k: int) -> None:
        for block in self.modules.values():
            block.gate.top_k = k
        self.model.config.num_experts_per_tok = k

    def restore(self) -> None:
        self.set_top_k(self.top_k)

    def layer_top_k(self, index: int) -> int:
        return self.modules[index].gate.top_k

    def active_ffn_share(self, dense_ffn_size: int, num_layers: int) -> float:
        """Mean over the layers of the share of the dense FFN's neurons a token computes: ``top_k``
        experts and the shared expert (an all-zero one too: the engine computes it) in a sparse
        block, every neuron of a layer kept dense."""
        used = 0.0
        for layer in self.layers:
            mlp = layer.mlp
            if is_sparse_block(mlp):
                shared = getattr(mlp, "shared_expert", None)
                used += neuron_share(mlp.gate.top_k, expert_neurons(mlp), shared.up_proj.out_features if shared is not None else 0, dense_ffn_size)
            else:
                used += neuron_share(1, mlp.up_proj.out_features, 0, dense_ffn_size)
        return used / max(num_layers, 1)

    def ffn_linears(self) -> set[nn.Module]:
        """Every linear layer of every FFN (shared experts, their gates, layers kept dense)."""
        return {m for layer in self.layers for m in layer.mlp.modules() if isinstance(m, nn.Linear)}

    def recorder(self) -> RouterRecorder:
        return RouterRecorder(list(self.modules.values()))


class NativeBuilder(Builder):
    """A new native model, built on the dense one's parameters (in memory) or block by block."""

    def __init__(self, target: Target):
        self.target = target
        self.untied_head = target.untied_head
        self.fits = []
        self.shell = None  # one block at a time: the native model on the meta device, once the first block converts

    def check_plan(self, plan, experts):
        qwen_moe.check_plan(plan, experts, self.target)

    def check_modules(self, modules) -> None:
        if any(m.coverage for m in modules.values()):
            raise UsageError("--format native: this model uses dynamic top-k, and a native MoE gives every token the same number of experts; convert with --routing top-k")

    def assemble(self, model, arch, modules, ffns, samples, ffn_size, show_progress, log):
        model, report = qwen_moe.to_native(model, self.target, arch.layers, modules, ffns, samples, ffn_size, show_progress)
        if not report.llama_cpp:
            log(f"note: layers {', '.join(map(str, report.mlp_only_layers))} stay dense (mlp_only_layers): "
                "transformers and vLLM run this folder, llama.cpp (every layer MoE) does not")  # fmt: skip
        return model, report

    def block(self, index, block, module, ffn, sample, context):
        """A block left dense computes what it did; a converted one is built anew, as the native model's."""
        memory.return_freed_memory()  # the refit below allocates anew (its Gram matrix, 256 MB at 1B)
        state, fit = qwen_moe.native_block(block.state_dict(), self.target, module, ffn, sample)
        if module is None:
            return state, f"model.{context.arch.layers}.", context.shell, block
        self.fits.append(fit)
        if self.shell is None:
            mlp_only = [j for j in range(context.config.num_hidden_layers) if j not in context.converted]
            self.shell = self._shell(context.config, context.ffn_size, module, mlp_only)
        blockwise.release(block)
        block = blockwise.materialise(self.shell, context.arch, index, state, context.dtype, context.device)
        return state, f"model.{context.arch.layers}.", self.shell, block

    def _shell(self, config, ffn_size: int, module, mlp_only: list[int]) -> nn.Module:
        """The native model on the meta device, its config made from the first converted ``module``."""
        native_config = qwen_moe.native_config(config, self.target, ffn_size, module, module.top_k, mlp_only)
        if self.target.untied_head:
            native_config.tie_word_embeddings = False
        with torch.device("meta"):
            return transformers.AutoModelForCausalLM.from_config(native_config).to(module.w_up.dtype).eval()

    def finish(self, shell, arch, modules):
        first = next(iter(modules.values()))
        return self.shell, NativeReport.from_fits(self.target.model_type, self.shell.config.mlp_only_layers, first.shared_size, self.fits)


class Native(Format):
    name = "native"
    llama_cpp = True
    refits_split = False  # the export refits the down projections under the engines' routing (qwen_moe.native_layer)

    def recipe_defaults(self, settings):
        """A native MoE's router is one linear map: the router defaults to ``linear``."""
        return {**settings, "router": "linear"} if settings.get("router") is None else settings

    def check_recipe(self, recipe):
        if recipe.dynamic:
            raise ValueError(f"format {self.name} takes routing top-k: the engines that serve it give every token the same number of experts")
        if recipe.dtype == "float16":
            raise ValueError(f"format {self.name} needs dtype float32 or bfloat16: its scaled router weights (~1e-7) underflow in float16")
        if not ROUTERS.entry(recipe.router).settings["linear"]:
            linear = ", ".join(name for name in ROUTERS if ROUTERS.entry(name).settings["linear"])
            raise ValueError(f"format {self.name} needs a linear router (a native MoE's gate is one linear map): use router {linear}")

    def builder(self, config, recipe, top_k):
        return NativeBuilder(qwen_moe.check_source(config, recipe.shared_experts, top_k))

    def details(self, figures):
        data = figures.get(self.name)
        return NativeReport.from_dict(data) if data else None

    def top_k(self, model, num_layers):
        dense = set(model.config.mlp_only_layers)
        return {i: model.config.num_experts_per_tok for i in range(num_layers) if i not in dense}

    def shared_size(self, model, details):
        return details.shared_expert_size

    def can_become(self, other):
        if other is self:
            return None
        return f"is a {self.name} folder and cannot become {other.name.replace('-', ' ')} again; convert the dense model with --format {other.name}"

    def write(self, model, staging):
        model.save_pretrained(staging)

    def write_config(self, model, staging):
        model.config.architectures = [type(model).__name__]  # what save_pretrained records about the model
        model.config.dtype = model.dtype
        model.config.save_pretrained(staging)
        if model.can_generate() and model.generation_config is not None:
            model.generation_config.save_pretrained(staging)

    def recognises(self, config, figures):
        return figures.get("format") == self.name

    def load(self, folder: Path, config, top_k, **kwargs):
        if top_k is not None:
            kwargs["num_experts_per_tok"] = top_k
        return transformers.AutoModelForCausalLM.from_pretrained(folder, **kwargs).eval()

    def layers(self, model):
        return NativeLayers(model)

    def card_combination(self, details, distilled):
        return (
            f"native `{details.target}`: router logits scaled so the selected experts' weights are uniform, down projections "
            f"scaled to match and refit by least squares to the dense FFN output on calibration tokens (relative error "
            f"{details.refit_error_before:.3f} -> {details.refit_error_after:.3f})" + ("; experts then distilled" if distilled else "")
        )

    def card_use(self, details, auto):
        engines = next(t.engines for t in TARGETS if t.model_type == details.target)
        llama = "" if details.llama_cpp else (
            "\nllama.cpp cannot run this folder: its qwen2moe makes every layer MoE, and layers "
            f"{', '.join(map(str, details.mlp_only_layers))} stay dense here.\n"
        )
        return f"""## Use

A standard transformers `{details.target}` checkpoint: no remote code. Runs in {engines}.

```python
from transformers import {auto}
model = {auto}.from_pretrained("path/to/this/folder")
```
{llama}
For llama.cpp: `python convert_hf_to_gguf.py path/to/this/folder --outtype f16` (the script that ships with llama.cpp).
"""

    def gguf_refusal(self, config):
        layers = config.get("mlp_only_layers")
        if layers:
            return f"llama.cpp makes every layer of a native MoE an MoE layer, and this one keeps layers {layers} dense: it has no GGUF"
        return None


NATIVE = Native()
FORMATS.register(
    NATIVE.name,
    "a LLaMA/Mistral/Qwen2/Qwen3 decoder as a standard qwen2_moe/qwen3_moe checkpoint that transformers, vLLM and llama.cpp run without remote code",
)(NATIVE)

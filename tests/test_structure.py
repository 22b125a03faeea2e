"""One home for each fact: top-k lives in the model's structure, the package is a five-floor house,
and a new algorithm is one registration away from the recipe, the pipeline and the model card."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch
import transformers
from torch import nn

import densetomoe
from conftest import quick_recipe
from densetomoe import archs, moe, surgery
from densetomoe.errors import UsageError
from densetomoe.ffn import dense_ffn
from densetomoe.moe import Router, Routing, Structure, set_top_k, structure_of
from densetomoe.stages.partition import PARTITIONS, at_random

PACKAGE = Path(densetomoe.__file__).parent

# The house, from the ground up: a module imports only from its own floor or below. A name is a module,
# or a package whose modules share its floor unless one is placed on its own (evaluation's are spread).
FLOORS = {
    1: {"_version", "errors", "moe", "console", "memory", "registry", "processes", "evaluation.metrics"},
    2: {"archs", "data", "devices", "ffn", "folder", "llamacpp", "evaluation.costs", "evaluation.suites"},
    3: {"recipe", "surgery", "card", "loading", "stages", "formats", "gguf", "evaluation.quick"},  # stages.*: calibrate ... export, distill
    4: {"conversion", "defaults", "layer", "planning", "schedulers", "pipeline", "evaluation", "hub", "tables"},
    5: {"cli", "__init__"},
}


def _floor(module: str) -> int:
    """The floor of the longest placed name that ``module`` is or lies in."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        name = ".".join(parts[:n])
        for floor, names in FLOORS.items():
            if name in names:
                return floor
    raise StopIteration(module)


def _imports(path: Path) -> set[str]:
    """densetomoe modules that ``path`` imports, anywhere in it (inside functions too), relative to the package."""
    here = path.relative_to(PACKAGE).with_suffix("").parts  # ("stages", "native")
    package = here[:-1] if here[-1] != "__init__" else here[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(package[: len(package) - node.level + 1])
            elif node.module and node.module.split(".")[0] == "densetomoe":
                base, node_module = [], node.module.split(".", 1)[1] if "." in node.module else ""
                base += node_module.split(".") if node_module else []
                found |= _resolve(base, node.names)
                continue
            else:
                continue
            base += node.module.split(".") if node.module else []
            found |= _resolve(base, node.names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("densetomoe."):
                    found.add(alias.name.split(".", 1)[1])
    return found


def _resolve(base: list[str], names) -> set[str]:
    """``from base import name``: the module ``base.name`` where it is one, else ``base`` (a name its
    ``__init__`` must define, for a package; a name that is neither stays unresolved, and is reported)."""
    out = set()
    for alias in names:
        candidate = [*base, alias.name]
        if (PACKAGE.joinpath(*candidate).with_suffix(".py")).is_file() or PACKAGE.joinpath(*candidate).is_dir():
            out.add(".".join(candidate))
        elif PACKAGE.joinpath(*base).is_dir():
            init = PACKAGE.joinpath(*base, "__init__.py")
            defined = init.is_file() and alias.name in init.read_text()
            out.add(".".join([*base, "__init__"]) if defined and base else ".".join(candidate))
        else:
            out.add(".".join(base))
    return out


def _graph() -> dict[str, set[str]]:
    graph = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        graph[name] = {m for m in _imports(path) if m != name and not m.endswith("__init__")}
    return graph


def test_no_module_imports_from_a_higher_floor():
    graph = _graph()
    assert "formats.native" in graph and "formats.base" in graph["stages.export"] | graph["formats.native"]  # the parser sees the packages
    upward = [f"{a} (floor {_floor(a)}) imports {b} (floor {_floor(b)})" for a, deps in graph.items() for b in deps if _floor(b) > _floor(a)]
    assert not upward, "\n".join(upward)


def test_the_import_graph_has_no_cycles():
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*path[path.index(nxt) :], nxt]))
            if nxt in graph and state.get(nxt) is None:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for node in graph:
        if state.get(node) is None:
            visit(node, [node])


def test_every_module_has_a_floor_and_every_import_resolves():
    graph = _graph()
    for name, deps in graph.items():
        _floor(name)  # StopIteration for a module nobody placed
        missing = {d for d in deps if d not in graph and f"{d}.__init__" not in graph}
        assert not missing, f"{name} imports modules that do not exist: {missing}"


def test_the_version_module_imports_nothing():
    tree = ast.parse((PACKAGE / "_version.py").read_text())
    assert not [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]


# -- top-k: one structure --------------------------------------------------------------------------------
def _tiny_moe_model(top_k: dict[int, int]) -> nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=32
    )
    model = transformers.BertModel(config).eval()
    arch = archs.arch_for(config)
    blocks = moe.blocks_of(model, arch.layers)
    modules = {}
    for i, k in top_k.items():
        ffn = dense_ffn(blocks[i], arch, nn.GELU())
        labels = at_random(ffn, None, 4, torch.Generator().manual_seed(i))
        modules[i] = surgery.moe_from_dense(ffn, labels, Router(16, 4), 4, k, "gelu")
    surgery.swap_in(model, arch, modules)
    return model


def test_set_top_k_changes_modules_and_config_together_and_returns_the_previous_setting():
    model = _tiny_moe_model({0: 2, 2: 1})
    assert structure_of(model.config).top_k == {0: 2, 2: 1} and model.config.num_experts_per_tok == 2
    previous = set_top_k(model, 3)
    assert previous == {0: Routing(2), 2: Routing(1)}
    assert {i: m.top_k for i, m in moe.moe_modules(model).items()} == {0: 3, 2: 3}
    assert structure_of(model.config).top_k == {0: 3, 2: 3} and model.config.num_experts_per_tok == 3
    set_top_k(model, previous)  # restores per layer, config included
    assert structure_of(model.config).top_k == {0: 2, 2: 1} and model.config.num_experts_per_tok == 2
    assert set_top_k(model, {2: 4}) == {0: Routing(2), 2: Routing(1)} and moe.moe_modules(model)[2].top_k == 4
    for bad in (0, 5, {1: 2}, {0: 9}):
        with pytest.raises(ValueError):
            set_top_k(model, bad)
    assert structure_of(model.config).top_k == {0: 2, 2: 4}  # a refused setting changes nothing
    with pytest.raises(ValueError, match="no MoE"):
        set_top_k(nn.Linear(2, 2), 1)


def test_the_structure_is_stored_once_and_reads_the_older_layout():
    model = _tiny_moe_model({0: 2, 1: 2, 2: 4})
    stored = model.config.to_dict()[moe.CONFIG_KEY]
    assert stored["top_k"] == {"0": 2, "1": 2, "2": 4}
    assert not {"moe_layers", "layer_top_k"} & set(stored)  # derived facts are not stored again
    older = {k: v for k, v in stored.items() if k != "top_k"} | {"moe_layers": [0, 1, 2], "top_k": 2, "layer_top_k": {"2": 4}}
    assert Structure.from_dict(older) == Structure.from_dict(stored)
    # transformers' convention: a num_experts_per_tok given at load time applies to every layer
    assert structure_of({moe.CONFIG_KEY: stored, "num_experts_per_tok": 1}).top_k == {0: 1, 1: 1, 2: 1}
    assert structure_of({moe.CONFIG_KEY: stored, "num_experts_per_tok": 2}).top_k == {0: 2, 1: 2, 2: 4}


def test_a_per_layer_folder_reloads_with_its_own_top_k_and_with_one_given_at_load(tmp_path, tiny_models, texts_file):
    conversion = densetomoe.convert(quick_recipe(tiny_models["BertModel"], texts_file), tmp_path / "o", show_progress=False)
    set_top_k(conversion.model, {0: 1})
    conversion.write(tmp_path / "p", overwrite=False)
    config = json.loads((tmp_path / "p" / "config.json").read_text())
    assert config[moe.CONFIG_KEY]["top_k"] == {"0": 1, "1": 2} and config["num_experts_per_tok"] == 2
    loaded = densetomoe.load(tmp_path / "p")
    assert {i: m.top_k for i, m in moe.moe_modules(loaded).items()} == {0: 1, 1: 2}
    remote = transformers.AutoModel.from_pretrained(tmp_path / "p", trust_remote_code=True, num_experts_per_tok=3)
    assert {i: m.top_k for i, m in moe.moe_modules(remote).items()} == {0: 3, 1: 3}
    with pytest.raises(UsageError, match="between 1 and 4"):
        densetomoe.load(tmp_path / "p", top_k=7)


# -- registries ------------------------------------------------------------------------------------------
def test_a_new_partition_method_is_one_registration(tmp_path, tiny_models, texts_file):
    summary = "neurons in index order, a contiguous block per expert (test entry)"

    @PARTITIONS.register("contiguous", summary)
    def contiguous(ffn, stats, experts, generator):
        return torch.arange(ffn.size) * experts // ffn.size

    try:
        recipe = quick_recipe(tiny_models["BertModel"], texts_file, partition="contiguous")
        conversion = densetomoe.convert(recipe, tmp_path / "o", show_progress=False)
        card = (tmp_path / "o" / "README.md").read_text()
        assert f"`contiguous`: {summary}" in card
        block = moe.moe_modules(conversion.model)[0]
        dense = transformers.AutoModel.from_pretrained(tiny_models["BertModel"]).encoder.layer[0].intermediate.dense
        torch.testing.assert_close(block.w_up[0], dense.weight[: block.expert_size])  # expert 0 holds neurons 0..n-1
    finally:
        PARTITIONS._entries.pop("contiguous")
    with pytest.raises(UsageError, match="unknown partition method 'contiguous'; choose one of: coactivation"):
        quick_recipe(tiny_models["BertModel"], texts_file, partition="contiguous")

"""The recipes shipped in recipes/: every one validates, and the MiniLM one runs end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import densetomoe
from densetomoe.recipe import check_against_model

RECIPES = sorted((Path(__file__).resolve().parent.parent / "recipes").glob("*.yaml"))

# (FFN neurons, layers) of each recipe's model, to check the structure fits without loading it
SHAPES = {"minilm": (1536, 6), "minilm-sentiment": (1536, 6), "bert-base": (3072, 12), "smollm2": (1536, 30), "smollm2-served": (1536, 30), "llama-7b": (11008, 32)}


def test_the_four_model_families_have_recipes():
    assert {"minilm", "bert-base", "smollm2", "llama-7b"} <= {path.stem for path in RECIPES}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_is_valid_and_fits_its_model(path):
    recipe = densetomoe.Recipe.from_yaml(path)
    check_against_model(recipe, *SHAPES[path.stem])
    assert recipe.distill is not None  # every shipped recipe recovers quality
    again = densetomoe.Recipe.from_yaml(path, distill={"steps": 7})
    assert again.distill.steps == 7 and again.distill.lr == recipe.distill.lr


@pytest.mark.slow
def test_minilm_recipe_runs_end_to_end(minilm, tmp_path):
    out = tmp_path / "minilm-recovered"
    recipe = RECIPES[[p.stem for p in RECIPES].index("minilm")]
    run = subprocess.run(
        [sys.executable, "-m", "densetomoe.cli", "convert", "all-minilm-l6-v2", "--recipe", str(recipe),
         "--calib-tokens", "2048", "--distill-steps", "3", "--out", str(out), "--no-progress"],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    figures = json.loads((out / "densetomoe_conversion.json").read_text())
    assert figures["distillation"]["step"] == 3
    assert densetomoe.Recipe.from_yaml(out / "densetomoe_recipe.yaml").distill.minutes == 10


@pytest.mark.parametrize("path", sorted((RECIPES[0].parent / "accelerate").glob("*.yaml")), ids=lambda p: p.stem)
def test_the_accelerate_configs_are_what_accelerate_reads(path):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(path))
    assert config.num_processes >= 1 and config.distributed_type.value in {"NO", "MULTI_GPU", "FSDP"}
    if config.distributed_type.value == "FSDP":
        assert config.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"


FRONTIER = Path(__file__).resolve().parent.parent / "evals" / "examples" / "frontier"


@pytest.mark.parametrize("path", sorted(p for p in FRONTIER.glob("*.yaml") if not p.stem.startswith("recovery")), ids=lambda p: p.stem)
def test_every_frontier_row_is_a_native_smollm2_recipe_that_takes_the_shared_recovery(path):
    """evals/examples/frontier.py's rows: each validates with the one recovery every row gets, fits SmolLM2, and is
    a structure llama.cpp serves (native, every layer MoE, top-k within the engine's limit)."""
    recovery = densetomoe.Recipe.from_yaml(FRONTIER / "recovery-30min-lr5.yaml", model="-").distill
    recipe = densetomoe.Recipe.from_yaml(path, distill=recovery.model_dump())
    check_against_model(recipe, *SHAPES["smollm2"])
    assert recipe.format == "native" and recipe.layers is None and recipe.ffn_budget is None
    assert recipe.distill.minutes == 30 and recipe.top_k <= 40


def test_the_served_recipe_is_the_frontier_row_it_quotes_with_the_frontier_recovery():
    """recipes/smollm2-served.yaml is evals/examples/frontier/shared3-5x1.yaml with recovery-30min-lr5.yaml's distillation:
    the figures in its header are that row's."""
    served = densetomoe.Recipe.from_yaml(RECIPES[0].parent / "smollm2-served.yaml")
    recovery = densetomoe.Recipe.from_yaml(FRONTIER / "recovery-30min-lr5.yaml", model="-").distill
    row = densetomoe.Recipe.from_yaml(FRONTIER / "shared3-5x1.yaml", distill=recovery.model_dump())
    assert served.to_yaml() == row.to_yaml()

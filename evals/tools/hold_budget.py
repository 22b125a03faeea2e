"""A folder distilled before distillation held dynamic top-k's budget, copied and given that reset.

Distillation now sets each dynamic layer's coverage again after training
(:func:`densetomoe.stages.coverage.reset_coverage`), on 16,384 tokens of the folder's calibration
text. This applies the same step to a folder distilled before, written to a copy (without its
``eval/``), and prints each layer's experts per token on those tokens before and after:

    python evals/tools/hold_budget.py runs/v-b2l12 runs/v-b2l12-reset
    densetomoe eval runs/v-b2l12-reset --suite wiki-perplexity --threads 2 --no-speed
"""

import json
import shutil
import sys
from pathlib import Path

import transformers

import densetomoe
from densetomoe import data
from densetomoe.conversion import split_texts
from densetomoe.moe import CONFIG_KEY, moe_modules
from densetomoe.recipe import Recipe
from densetomoe.stages.coverage import reset_coverage


def main() -> None:
    if len(sys.argv) != 3:
        raise SystemExit(f"usage: python evals/tools/hold_budget.py SOURCE_FOLDER COPY_FOLDER\n\n{__doc__}")
    src, dst = Path(sys.argv[1]), Path(sys.argv[2])
    shutil.copytree(src, dst, dirs_exist_ok=True, ignore=shutil.ignore_patterns("eval"))
    model = densetomoe.load(dst).eval()
    recipe = Recipe.from_yaml(dst / "densetomoe_recipe.yaml")
    calibration, _, _ = split_texts(data.load_texts(recipe.calib), recipe.seed)
    tokenizer = data.for_batches(transformers.AutoTokenizer.from_pretrained(dst))
    changed = reset_coverage(model, tokenizer, calibration, recipe.seq_len, recipe.batch_size)
    for i, (b, a) in changed.items():
        print(f"layer {i}: {b:.2f} -> {a:.2f}")
    print("mean", sum(b for b, _ in changed.values()) / len(changed), "->", sum(a for _, a in changed.values()) / len(changed))
    config = json.loads((dst / "config.json").read_text())
    config[CONFIG_KEY]["coverage"] = {str(i): m.coverage for i, m in moe_modules(model).items() if m.coverage}
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")


if __name__ == "__main__":
    main()

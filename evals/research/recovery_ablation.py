"""What each recovery option does to the MiniLM sentiment classifier: accuracy and size.

Starts from recipes/minilm-sentiment.yaml (8 experts, top-2, calibrated on the unlabelled Rotten
Tomatoes train snippets) and changes one thing per row: pruning inside experts, expert dropout during
distillation, a shared expert, finer experts (the rows of ``recovery_ablation.yaml`` beside this
script). Each row converts, distills for ``--steps`` (a fixed number of steps, so rows compare fairly
on a busy machine; 0: the training-free conversion only) and scores the held-out suite
``rotten-tomatoes-sentiment`` against the dense classifier in the same process.

    python evals/tools/rt_train_text.py && python evals/tools/finetune_classifier.py --out runs/minilm-rt-classifier
    python evals/research/recovery_ablation.py --steps 200
    python evals/research/recovery_ablation.py --steps 0 --rows base e16 e32
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import transformers

import densetomoe

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # evals/, for common.py
from common import experiment_rows
from densetomoe.data import batches
from densetomoe.evaluation.costs import cost
from densetomoe.evaluation.suites import load_suite

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "minilm-sentiment.yaml"
ROWS = experiment_rows(__file__)  # recovery_ablation.yaml: name -> what it is, recipe overrides (distillation under distill:)


@torch.no_grad()
def accuracy(model, tokenizer, texts, labels) -> float:
    predictions = [model(**b).logits.argmax(-1) for b in batches(tokenizer, texts, 128, 64)]
    return float((torch.cat(predictions) == torch.tensor(labels)).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="distillation steps per row (0: training-free)")
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    transformers.utils.logging.set_verbosity_error()

    texts, labels = load_suite("rotten-tomatoes-sentiment").examples()
    base = densetomoe.Recipe.from_yaml(RECIPE)
    dense = transformers.AutoModelForSequenceClassification.from_pretrained(ROOT / base.model).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(ROOT / base.model)
    dense_accuracy = accuracy(dense, tokenizer, texts, labels)
    print(json.dumps({"row": "dense", "accuracy": dense_accuracy, "params": sum(p.numel() for p in dense.parameters())}), flush=True)
    for name in args.rows:
        overrides = json.loads(json.dumps(ROWS[name]["recipe"]))
        distill = {**(base.distill.model_dump() if base.distill else {}), **overrides.pop("distill", {})}
        distill.update(minutes=None, steps=args.steps)
        settings = {**base.model_dump(), **overrides, "distill": distill if args.steps > 0 else None}
        settings["model"], settings["calib"] = str(ROOT / base.model), str(ROOT / base.calib)
        distill_data = settings["distill"] and settings["distill"]["data"]
        if distill_data:
            settings["distill"]["data"] = str(ROOT / distill_data)
        start = time.perf_counter()
        conversion = densetomoe.convert(densetomoe.Recipe.build(**settings), show_progress=False)
        c = cost(conversion.model, 128)
        row = {
            "row": name,
            "overrides": ROWS[name]["recipe"],
            "steps": args.steps,
            "accuracy": accuracy(conversion.model, conversion.tokenizer, texts, labels),
            "dense_accuracy": dense_accuracy,
            "active_ffn_share": round(conversion.report.active_ffn_share, 4),
            "params_total": c.params_total,
            "params_active": c.params_active,
            "ffn_flops_per_token": c.ffn_flops,
            "seconds": round(time.perf_counter() - start, 1),
        }
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()

"""Write the Rotten Tomatoes *train* snippets as plain text, one per line, without labels.

The sentiment recipe (recipes/minilm-sentiment.yaml) calibrates and distills on this unlabelled
in-domain text; the suite ``rotten-tomatoes-sentiment`` scores the held-out fifth that neither this
file nor ``evals/tools/finetune_classifier.py`` ever contains (the split is by a hash of the text).

    python evals/tools/rt_train_text.py           # -> runs/rt-train.txt (10,185 snippets)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # evals/, for common.py
from common import rotten_tomatoes

ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "rt-train.txt")
    args = parser.parse_args()
    texts = [text for text, _ in rotten_tomatoes("train")]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(texts) + "\n")
    print(f"{len(texts):,} snippets -> {args.out}")


if __name__ == "__main__":
    main()

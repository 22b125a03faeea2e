"""The scripts in evals/: each example (evals/examples/) exercised for real in the cheapest honest way
(its main path on a tiny model where that takes a second or two, else its pure helpers on small
inputs), and its documented command lines parsed by its own argument parser; every research and
tools script imports cleanly (the research scripts' YAML rows validate as they load); every command
a docstring shows names a script and files that exist."""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib.util
import io
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

from densetomoe import MoEFeedForward

ROOT = Path(__file__).resolve().parent.parent
EVALS = ROOT / "evals"
EXAMPLES = EVALS / "examples"


def script(path: Path):
    """``path`` loaded as ``python evals/<kind>/<name>.py`` runs it (its folder first on ``sys.path``),
    but not as ``__main__``; ``sys.path`` is left as it was."""
    saved = list(sys.path)
    sys.path.insert(0, str(path.parent))
    try:
        spec = importlib.util.spec_from_file_location(f"evals_{path.parent.name}_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path[:] = saved
    return module


def commands(path: Path) -> list[list[str]]:
    """Every ``python evals/...`` command line that a script's docstring (a shell script's or a
    Makefile's text) shows: continuation lines joined, ``&&`` chains split, comments off;
    ``[script, *args]``."""
    text = path.read_text()
    if path.suffix == ".py":
        text = ast.get_docstring(ast.parse(text), clean=False) or ""
    found = []
    for line in re.sub(r"\\\n\s*", " ", text).splitlines():
        for part in line.split("&&"):
            if match := re.search(r"\bpython3? (evals/[^\s`]+)([^`]*)", part):
                found.append([match.group(1), *shlex.split(re.split(r"\s#", match.group(2))[0])])
    return found


def documented(name: str) -> list[argparse.Namespace]:
    """``evals/examples/<name>.py``'s documented command lines, parsed by its own parser (which exits
    on a flag it does not know); at least one."""
    module = script(EXAMPLES / f"{name}.py")
    lines = [args for first, *args in commands(EXAMPLES / f"{name}.py") if first == f"evals/examples/{name}.py"]
    assert lines, f"{name}.py documents no command line"
    return [module.arguments(args) for args in lines]


def run_main(main, argv: list[str]) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main(argv)
    return out.getvalue()


# -- every script ------------------------------------------------------------------------------------
SCRIPTS = sorted(p for kind in ("examples", "research", "tools") for p in (EVALS / kind).glob("*.py"))


def test_the_scripts_are_sorted_into_examples_research_and_tools():
    assert sorted(p.name for p in EVALS.glob("*.py")) == ["common.py"]  # only the shared helpers at the top
    assert {p.stem for p in EXAMPLES.glob("*.py")} == {
        "serving", "speed", "scale", "frontier", "gguf_types", "minilm_similarity", "smollm_perplexity", "decode"
    }  # fmt: skip


@pytest.mark.parametrize("path", [*SCRIPTS, EVALS / "tools" / "gpu_check.sh", ROOT / "Makefile"], ids=lambda p: p.name)
def test_every_command_shown_names_a_script_and_files_that_exist(path):
    for first, *args in commands(path):
        assert (ROOT / first).is_file(), f"{path.name} shows {first}, which does not exist"
        for arg in args:
            if arg.startswith(("evals/", "recipes/")):
                assert (ROOT / arg).exists(), f"{path.name} shows {arg}, which does not exist"


@pytest.mark.parametrize("path", sorted((EVALS / "research").glob("*.py")) + sorted((EVALS / "tools").glob("*.py")), ids=lambda p: p.stem)
def test_research_and_tools_scripts_import_cleanly(path):
    if path.stem == "build_wiki_corpus":
        pytest.importorskip("mwparserfromhell")
    module = script(path)
    assert callable(module.main)  # importing runs nothing: the work waits for __main__
    if (rows := path.with_suffix(".yaml")).is_file():  # a research script's rows, validated as it loaded
        assert list(module.ROWS) and all(isinstance(row, dict) for row in module.ROWS.values()), rows


def test_the_gpu_check_is_valid_bash():
    run = subprocess.run(["bash", "-n", str(EVALS / "tools" / "gpu_check.sh")], check=False, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


def test_a_misspelt_research_row_fails_when_the_script_starts(tmp_path):
    common = script(EVALS / "common.py")
    (tmp_path / "ablation.yaml").write_text("rows:\n  good: {what: fine, recipe: {experts: 4, top_k: 2}}\n")
    assert common.experiment_rows(tmp_path / "ablation.py") == {"good": {"what": "fine", "recipe": {"experts": 4, "top_k": 2}}}
    (tmp_path / "ablation.yaml").write_text("rows:\n  good: {recipe: {experts: 4, top_k: 2}}\n  bad: {recipe: {exprts: 4}}\n")
    with pytest.raises(SystemExit, match="row bad"):
        common.experiment_rows(tmp_path / "ablation.py")
    (tmp_path / "ablation.yaml").write_text("rows:\n  bad: {distill: {mixed_precision: fp8}}\n")
    with pytest.raises(SystemExit, match="row bad"):
        common.experiment_rows(tmp_path / "ablation.py")


# -- the examples, one test each -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_bert(tiny_models) -> Path:
    return tiny_models["BertModel"]


@pytest.fixture(scope="module")
def tiny_llama(tiny_decoders) -> Path:
    return tiny_decoders["llama"]


def test_serving_converts_once_and_tabulates_each_folders_report(tiny_llama, tmp_path, monkeypatch):
    parsed = documented("serving")
    assert parsed[1].configs == ["8:2"] and parsed[1].formats == ["native"] and parsed[1].max_tokens == 4096
    assert parsed[0].workdir == ROOT / "runs" / "serving"
    serving = script(EXAMPLES / "serving.py")
    monkeypatch.setattr(serving, "smollm_gguf", lambda: str(tiny_llama))
    said = []
    settings = {"calib_tokens": 1024, "sample_tokens": 512, "router_steps": 20, "router_hidden": 16, "seed": 0}
    folder = serving.converted(tmp_path, 4, 2, "remote-code", settings, said.append)
    assert (folder / "config.json").is_file() and folder.name == "remote-code-4x2"
    assert serving.converted(tmp_path, 4, 2, "remote-code", settings, said.append) == folder
    assert len([s for s in said if s.startswith("converting")]) == 1  # the second call found the same recipe

    report = {
        "settings": {"suites": ["heldout"]},
        "dense": {"quality": {"heldout": {"perplexity": 16.0}}},
        "sweep": [{"quality": {"heldout": {"perplexity": 20.0}}, "active_ffn_share": 0.25, "speed": {"decode": {"speedup": 1.5}}}],
        "llama_cpp": {"moe": {"perplexity": 21.0, "decode_tokens_per_s": 90.0}, "perplexity_ratio": 1.3, "decode_speedup": 1.2, "end_to_end_speedup": 1.1},
    }  # fmt: skip
    served = serving.row("native-8x2", report)
    assert served["perplexity_vs_dense"] == 1.25 and served["llama_cpp_decode_vs_dense"] == 1.2
    del report["llama_cpp"], report["sweep"][0]["speed"]
    table = serving.table([served, serving.row("remote-code-8x2", report)]).splitlines()
    assert len(table) == 4 and table[0].count("|") == table[1].count("|") == table[2].count("|") == table[3].count("|")
    assert table[2] == "| native-8x2 | 25% | 20.00 | 1.25x | 21.00 | 1.30x | 1.20x | 1.10x | 1.50x |"
    assert table[3] == "| remote-code-8x2 | 25% | 20.00 | 1.25x |  |  |  |  |  |"


def test_speed_times_a_tiny_encoder_against_its_moe_copy(tiny_bert):
    parsed = documented("speed")
    assert parsed[1].top_k == [1, 2, 4, 8] and parsed[0].top_k == [2] and parsed[0].repeats == 7
    speed = script(EXAMPLES / "speed.py")
    dense = transformers.AutoModel.from_pretrained(tiny_bert).eval()
    inputs = {"input_ids": torch.randint(1000, 1024, (2, 12))}
    with torch.no_grad():  # every expert selected: the split FFN computes what the dense one does
        whole = speed.moe_copy(dense, 4, 4)(**inputs).last_hidden_state
        half = speed.moe_copy(dense, 4, 2)(**inputs).last_hidden_state
        reference = dense(**inputs).last_hidden_state
    torch.testing.assert_close(whole, reference, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(half, reference, atol=1e-3)

    rows = speed.measure(dense, 4, [2, 4], threads=1, repeats=1, batches=(2,), seq_len=16)
    assert [(r["top_k"], r["batch"]) for r in rows] == [(2, "2x16"), (4, "2x16")]
    assert rows[0]["ffn_flops_ratio"] < rows[1]["ffn_flops_ratio"] and 0.4 < rows[0]["ffn_flops_ratio"] < 0.75
    assert all(r["dense_ms"] > 0 and r["moe_ms"] > 0 and r["speedup"] > 0 for r in rows)
    lines = speed.table(rows).splitlines()
    assert len(lines) == 3 and lines[0].split() == list(rows[0])


def test_scale_builds_a_random_checkpoint_once_and_converts_it_in_a_child_process(tiny_llama, tmp_path, monkeypatch):
    parsed = documented("scale")
    assert [a.paths for a in parsed] == [["sequential", "in-memory"], ["sequential"], ["sequential", "in-memory"], ["sequential"]]
    assert parsed[0].calib_tokens == 8192 and parsed[3].calib_tokens is None and parsed[3].recipe == Path("recipes/smollm2-served.yaml")
    scale = script(EXAMPLES / "scale.py")
    monkeypatch.setitem(scale.SHAPES, "tiny", (2, 32, 64, 2, 1, 1024))
    folder = scale.build(tmp_path / "tiny", "tiny", None, tiny_llama)
    assert json.loads((folder / "config.json").read_text())["num_hidden_layers"] == 2
    weights = folder / "model.safetensors"
    made = weights.stat().st_mtime_ns
    assert scale.build(folder, "tiny", None, tiny_llama) == folder and weights.stat().st_mtime_ns == made  # reused
    scale.build(folder, "tiny", 1, tiny_llama)
    assert json.loads((folder / "config.json").read_text())["num_hidden_layers"] == 1  # rebuilt: another depth
    floats = sum(t.numel() for t in load_file(weights).values())
    assert 4 * floats < scale.weight_bytes(folder) < 4.2 * floats  # float32 weights and a small header

    ran = []

    def fake_run(command, **kwargs):
        ran.append(command)
        return subprocess.CompletedProcess(command, 1, "", "Error: out of memory\n")

    monkeypatch.setattr(scale.subprocess, "run", fake_run)
    failed = scale.convert(folder, tmp_path / "out", True, scale.arguments(["--experts", "4", "--top-k", "1", "--device", "cpu"]))
    assert failed["error"] == "Error: out of memory"
    command = ran[0]
    assert command[1:4] == ["-m", "densetomoe.cli", "convert"] and "--sequential" in command
    assert command[command.index("--experts") + 1] == "4" and command[command.index("--calib-tokens") + 1] == "8192"


def test_frontier_reads_its_rows_as_recipes_and_tabulates_a_run(tmp_path):
    parsed = documented("frontier")
    frontier = script(EXAMPLES / "frontier.py")
    rows = parsed[0].rows
    assert [p.stem for p in rows] == sorted(p.stem for p in (EXAMPLES / "frontier").glob("*.yaml") if not p.stem.startswith("recovery"))
    assert parsed[0].workdir == ROOT / "runs" / "frontier" and parsed[1].recovery == Path("evals/examples/frontier/recovery-30min.yaml")
    recovery = frontier.yaml.safe_load((ROOT / parsed[1].recovery).read_text())["distill"]
    for path in rows:
        recipe = frontier.recipe_of(path, recovery)
        assert recipe.format == "native" and recipe.distill.minutes == 30
    assert frontier.recipe_of(rows[0], None).distill is None

    folder = tmp_path / "moe-8x2"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"num_experts": 8}))
    (folder / "densetomoe_conversion.json").write_text(json.dumps({"seconds": {"total": 900.0, "distill": 600.0}, "quick_eval": {"ffn_flops_ratio": 0.25}}))
    assert frontier.costs(folder) == {"ffn_flops": 0.25, "convert_min": 5.0, "recovery_min": 10.0}
    assert frontier.served_folder(folder) == folder  # an MoE is served as it is
    assert frontier.kind("moe-8x2", folder) == "moe" and frontier.kind("dense", tmp_path) == "dense"
    (tmp_path / "pruned").mkdir()
    (tmp_path / "pruned" / "config.json").write_text(json.dumps({"num_experts": 1}))
    assert frontier.kind("pruned", tmp_path / "pruned") == "pruned"
    row = {"perplexity": 20.0, "perplexity_vs_dense": 1.25, "decode_tok_s": 50.0, "decode_vs_dense": 1.3, "end_to_end_vs_dense": 1.2}
    table = frontier.table({"rows": [{"row": "moe-8x2", **row, "pruned_at_same_speed": 1.5, **frontier.costs(folder)}]}).splitlines()
    assert table[2] == "| moe-8x2 | 20.00 | 1.25x | 1.50x | 50.0 | 1.30x | 1.20x | 0.250 | 5.0 min | 10.0 min |"


def test_frontier_reads_the_pruned_baseline_at_each_moes_own_speed():
    frontier = script(EXAMPLES / "frontier.py")
    rows = [
        {"kind": "dense", "decode_vs_dense": 1.0, "perplexity_vs_dense": 1.0},
        {"kind": "pruned", "decode_vs_dense": 1.4, "perplexity_vs_dense": 4.0},
        {"kind": "moe", "decode_vs_dense": 1.2, "perplexity_vs_dense": 1.5},  # not on the curve
        {"kind": "pruned", "decode_vs_dense": 1.2, "perplexity_vs_dense": 2.0},
    ]
    curve = frontier.pruned_curve(rows)
    assert curve == [(1.0, 1.0), (1.2, 2.0), (1.4, 4.0)]
    assert frontier.pruned_at(curve, 1.3) == pytest.approx(2 ** 1.5)  # log-linear: the geometric mean of 2 and 4
    assert frontier.pruned_at(curve, 1.2) == pytest.approx(2.0) and frontier.pruned_at(curve, 1.1) == pytest.approx(2**0.5)
    assert frontier.pruned_at(curve, 1.5) is None and frontier.pruned_at(curve, 0.9) is None  # never extrapolated


def test_gguf_types_tabulates_each_type_against_its_folders_first(tmp_path):
    parsed = documented("gguf_types")
    assert parsed[0].folders == [Path("runs/frontier-30min/dense"), Path("runs/frontier-30min/shared2-6x1")]
    assert parsed[0].types == "f16,q8_0,q6_k,q5_k_m,q4_k_m,q4_0" and parsed[0].workdir == ROOT / "runs" / "gguf-types"
    gguf_types = script(EXAMPLES / "gguf_types.py")
    with pytest.raises(SystemExit):
        gguf_types.arguments([])  # --folders is required
    rows = [
        {"folder": "dense", "type": "f16", "bytes": 270e6, "perplexity": 18.0, "fallbacks": []},
        {"folder": "dense", "type": "q4_0", "bytes": 80e6, "perplexity": 19.8, "fallbacks": ["token_embd.weight: q8_0"]},
    ]
    table = gguf_types.table(rows).splitlines()
    assert table[2] == "| dense | F16 | 270.0 MB | 18.00 | 1.000x | none |"
    assert table[3] == "| dense | Q4_0 | 80.0 MB | 19.80 | 1.100x | token_embd.weight: q8_0 |"


def test_minilm_similarity_runs_on_a_tiny_encoder(tiny_bert):
    parsed = documented("minilm_similarity")
    assert parsed[0].model == "all-minilm-l6-v2" and parsed[1].router == "centroid" and parsed[1].top_k == 4
    minilm_similarity = script(EXAMPLES / "minilm_similarity.py")
    argv = ["--model", str(tiny_bert), "--experts", "4", "--router", "centroid", "--calib-tokens", "1024", "--snippets", "12"]
    out = run_main(minilm_similarity.main, [*argv, "--threads", "1", "--json"])
    result = json.loads(out.strip().splitlines()[-1])
    assert result["snippets"] == 12 and result["experts"] == 4 and result["top_k"] == 2 and result["router"] == "centroid"
    assert -1.0 <= result["cosine_p10"] <= result["cosine_median"] <= 1.0 and -1.0 <= result["cosine_mean"] <= 1.0
    assert 0.3 < result["ffn_flops_ratio"] < 0.8 and 0 < result["calib_tokens"] <= 2048


def test_smollm_perplexity_runs_on_a_tiny_decoder(tiny_llama, monkeypatch):
    parsed = documented("smollm_perplexity")
    assert parsed[0].top_k == [4, 2] and parsed[1].top_k == [4] and parsed[1].json and parsed[1].max_tokens == 4096
    smollm_perplexity = script(EXAMPLES / "smollm_perplexity.py")
    texts = smollm_perplexity.heldout_corpus()[:30]  # enough for 256 tokens: the rest would only be tokenized
    monkeypatch.setattr(smollm_perplexity, "heldout_corpus", lambda: texts)
    argv = ["--model", str(tiny_llama), "--experts", "4", "--top-k", "2", "--max-tokens", "256", "--window", "64", "--stride", "32"]
    out = run_main(smollm_perplexity.main, [*argv, "--calib-tokens", "1024", "--threads", "1", "--json"])
    result = json.loads(out.strip().splitlines()[-1])
    assert [r["model"] for r in result["rows"]] == ["dense", "top-2 of 4"]
    assert result["window"] == 64 and 0 < result["tokens_scored"] <= 256
    assert all(1.0 < r["perplexity"] < 1e5 for r in result["rows"])  # a random-weight model: near its vocabulary size
    assert result["rows"][1]["quick_eval"] and result["rows"][1]["calibration_tokens"] > 0


def test_decode_times_the_ffn_part_on_a_tiny_shape_and_pairs_a_decoder_with_its_moe(tiny_llama, monkeypatch):
    parsed = documented("decode")
    assert parsed[0].part == "all" and parsed[1].configs == ["8:2", "8:4", "32:8"] and parsed[2].router == "mlp"
    assert parsed[4].models == ["smollm2"] and parsed[4].smollm_split == "random" and parsed[4].dispatch
    decode = script(EXAMPLES / "decode.py")
    mlp = transformers.models.llama.modeling_llama.LlamaMLP(transformers.LlamaConfig(hidden_size=32, intermediate_size=64)).eval()
    x = torch.randn(1, 3, 32)
    with torch.no_grad():
        torch.testing.assert_close(decode.moe_of(mlp, 4, 4, "centroid")(x), mlp(x), atol=1e-5, rtol=1e-4)  # every expert: the dense FFN
        assert decode.moe_of(mlp, 4, 1, "mlp")(x).shape == x.shape

    calls = []
    medians = decode.interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3, warmup=1, before_round=calls.append)
    assert set(medians) == {"a", "b"} and calls == [0, "a", "b", 1, "a", "b", 2, "a", "b", 3, "a", "b"]

    monkeypatch.setattr(decode, "HIDDEN", 32)
    monkeypatch.setattr(decode, "FFN", 64)
    rows = decode.ffn_rows(argparse.Namespace(layers=2, configs=["4:2"], tokens=[1, 2], router="centroid", repeats=2, warmup=1))
    assert [(r["experts"], r["top_k"], r["tokens"], r["ffn_share"]) for r in rows] == [(4, 2, 1, 0.5), (4, 2, 2, 0.5)]
    assert all(r["dense_ms"] > 0 and r["moe_ms"] > 0 for r in rows)
    assert decode.table(rows).splitlines()[0] == "| " + " | ".join(rows[0]) + " |"

    monkeypatch.setattr(decode, "smollm_gguf", lambda: str(tiny_llama))  # the generate part's SmolLM2 pair, on a tiny decoder
    dense, moe, how = decode.smollm_pair(argparse.Namespace(smollm_split="random", experts=4, top_k=2))
    assert how == "random split, centroid router" and not dense.training and not moe.training
    assert len([m for m in moe.modules() if isinstance(m, MoEFeedForward)]) == dense.config.num_hidden_layers

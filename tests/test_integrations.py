"""The outputs used as people use them, with the tools they use them with: reports never delete, figures name their top-k,
results reach the Hub card, and the CLI follows the usual conventions."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from typer.testing import CliRunner

import densetomoe
from conftest import BarePython, quick_recipe
from densetomoe import moe
from densetomoe.cli import app
from densetomoe.evaluation.command import Settings, evaluate
from fake_hub import TOKEN, metadata


@pytest.fixture(scope="module")
def classifier_once(tiny_models, tmp_path_factory) -> Path:
    """A tiny converted classifier at 4 experts, top-2 (never modified: copy it to change it)."""
    out = tmp_path_factory.mktemp("eco") / "moe"
    densetomoe.convert(quick_recipe(tiny_models["BertForSequenceClassification"]), out, show_progress=False)
    return out


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_eval_out_refuses_a_folder_it_did_not_write_and_deletes_nothing(classifier_once, tmp_path):
    import shutil

    folder = Path(shutil.copytree(classifier_once, tmp_path / "moe"))
    before = _files(folder)
    result = CliRunner().invoke(app, ["eval", str(folder), "--out", str(folder), "--no-speed", "--no-progress"])
    assert result.exit_code == 2, result.output
    assert "not an evaluation report" in result.output and "Traceback" not in result.output
    assert _files(folder) == before  # the model is untouched
    other = tmp_path / "notes"
    other.mkdir()
    (other / "mine.txt").write_text("keep me")
    assert CliRunner().invoke(app, ["eval", str(folder), "--out", str(other), "--no-speed"]).exit_code == 2
    assert (other / "mine.txt").read_text() == "keep me"


def test_a_sweep_labels_every_figure_with_the_top_k_it_measured(classifier_once, tmp_path):
    """Sweeping 1,2,4 on a top-2 folder: routing is recorded at top-2 and says so, and the model is
    left at its own setting (modules and config)."""
    report = evaluate(classifier_once, Settings(top_ks=[1, 2, 4], speed=False, suites=["wiki-prose"]), show_progress=False)
    assert report["converted_top_k"] == 2
    assert report["routing"]["top_k"] == 2
    assert all(layer["top_k"] == 2 for layer in report["routing"]["layers"])
    from densetomoe.evaluation import report as reports

    md = (reports.write(report, tmp_path / "r") / "report.md").read_text()
    assert "Routing at top-2" in md and "Routing at top-1" not in md and "Routing at top-4" not in md


def test_eval_then_push_puts_the_measured_results_on_the_card(classifier_once, tmp_path, fake_hub):
    import shutil

    from densetomoe import hub

    folder = Path(shutil.copytree(classifier_once, tmp_path / "moe"))
    result = CliRunner().invoke(app, ["eval", str(folder), "--no-speed", "--no-progress"])
    assert result.exit_code == 0, result.output
    hub.push(folder, "tester/evaluated", token=TOKEN, endpoint=fake_hub.url)
    uploaded = fake_hub.repos["tester/evaluated"]
    assert "eval/report.json" in uploaded
    results = metadata(uploaded["README.md"])["model-index"][0]["results"]
    names = {m["name"] for r in results for m in r["metrics"]}
    assert "wiki-prose cosine_to_dense" in names  # from eval/report.json, not only the conversion figures


def test_version_and_short_help():
    version = CliRunner().invoke(app, ["--version"])
    assert version.exit_code == 0 and version.output.strip() == densetomoe.__version__
    short = CliRunner().invoke(app, ["-h"])
    assert short.exit_code == 0 and "convert" in short.output
    sub = CliRunner().invoke(app, ["convert", "-h"])
    assert sub.exit_code == 0 and "--experts" in sub.output


def _python(script: str, without_densetomoe: bool = False) -> SimpleNamespace:
    """``script`` in a fresh process whose stdin stays open: a remote-code prompt would wait for an
    answer (until the timeout). ``returncode``, ``stdout`` and ``stderr``, as ``subprocess.run`` gives them."""
    prelude = "import sys\nsys.modules['densetomoe'] = None\n" if without_densetomoe else ""
    code, stdout, stderr = BarePython.shared().run(prelude + script, timeout=120)
    return SimpleNamespace(returncode=code, stdout=stdout, stderr=stderr)


@pytest.mark.slow  # three fresh processes, each importing densetomoe or running remote code: over 3 s
def test_the_tokenizer_of_a_remote_code_folder_loads_without_a_prompt(classifier_once):
    load_tokenizer = f"from transformers import AutoTokenizer\nprint(type(AutoTokenizer.from_pretrained({str(classifier_once)!r}{{}})).__name__)"
    plain = load_tokenizer.format("")
    for run in (
        _python("import densetomoe\n" + plain),  # the MoE config types are registered on import
        _python(load_tokenizer.format(", trust_remote_code=True"), without_densetomoe=True),  # runs the config class only
    ):
        assert run.returncode == 0, run.stderr[-2000:]
        assert run.stdout.strip() == "BertTokenizer"
        assert "custom code" not in run.stdout + run.stderr and "model of type" not in run.stderr
    # registering the config does not make the model load without consent
    refused = _python(f"import densetomoe\nfrom transformers import AutoModel\nAutoModel.from_pretrained({str(classifier_once)!r}, trust_remote_code=False)")
    assert refused.returncode != 0 and "trust_remote_code" in refused.stderr


def test_a_native_folder_is_a_densetomoe_folder_for_push(tiny_decoders, tmp_path):
    from densetomoe import formats, hub

    out = tmp_path / "native"
    densetomoe.convert(quick_recipe(tiny_decoders["llama"], format="native", router_steps=5), out, show_progress=False)
    assert formats.format_of(out) == "native" and moe.CONFIG_KEY not in json.loads((out / "config.json").read_text())
    hub.check_folder(out)  # no error: native folders are published like remote-code ones
    card = yaml.safe_load((out / "README.md").read_text().split("---")[1])
    assert "densetomoe" in card["tags"]


def test_no_local_path_reaches_the_hub_and_eval_and_distill_still_find_their_sources(tiny_models, texts_file, tmp_path, fake_hub):
    from densetomoe import folder as folders
    from densetomoe import hub

    source = tiny_models["BertForSequenceClassification"]
    out = tmp_path / "moe"
    densetomoe.convert(quick_recipe(source, texts_file), out, show_progress=False)
    assert CliRunner().invoke(app, ["eval", str(out), "--no-speed", "--no-progress"]).exit_code == 0
    hub.push(out, "tester/private-paths", token=TOKEN, endpoint=fake_hub.url)
    uploaded = fake_hub.repos["tester/private-paths"]
    assert "densetomoe_recipe.yaml" in uploaded and "eval/report.json" in uploaded
    assert folders.LOCAL_FILE not in uploaded  # the one file that holds local paths stays here
    secrets = {str(tmp_path), str(source.parent), str(texts_file.parent), "/tmp/"}
    leaks = {name for name, data in uploaded.items() for s in secrets if s.encode() in data}
    assert not leaks, f"local paths in {leaks}"
    recipe = yaml.safe_load(uploaded["densetomoe_recipe.yaml"])
    assert recipe["model"] == source.name and recipe["calib"] == texts_file.name
    # the local file lets eval find the dense model and distill the calibration text again
    assert folders.recorded_base(out) == str(source)
    result = densetomoe.distill(out, densetomoe.Distill(steps=2, eval_texts=0, batch_size=4), out=tmp_path / "d", show_progress=False)
    assert result.recipe.calib == str(texts_file) and (tmp_path / "d" / folders.LOCAL_FILE).is_file()


def test_a_bare_encoder_folder_loads_as_a_classifier_and_round_trips_through_trainer_and_pipeline(tiny_models, texts_file, tmp_path):
    """Fine-tuning as people do it: any head class of the family from a bare MoE folder, the HF
    Trainer, save, then ``pipeline('text-classification')`` on the saved folder."""
    import torch
    import transformers

    out = tmp_path / "bare"
    densetomoe.convert(quick_recipe(tiny_models["BertModel"], texts_file), out, show_progress=False)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(out, trust_remote_code=True, num_labels=2, output_router_logits=True)
    assert type(model).__name__ == "MoEBertForSequenceClassification"
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    texts = ["a fine film", "a dull film", "great fun", "boring"] * 4
    encoded = tokenizer(texts, padding=True, return_tensors="pt")
    rows = [{"input_ids": encoded["input_ids"][i], "attention_mask": encoded["attention_mask"][i], "labels": torch.tensor(i % 2)} for i in range(len(texts))]
    args = transformers.TrainingArguments(tmp_path / "train", max_steps=2, per_device_train_batch_size=4, report_to=[], use_cpu=True, save_strategy="no")
    transformers.Trainer(model=model, args=args, train_dataset=rows).train()
    model.save_pretrained(tmp_path / "tuned")
    tokenizer.save_pretrained(tmp_path / "tuned")
    config = json.loads((tmp_path / "tuned" / "config.json").read_text())
    assert config["architectures"] == ["MoEBertForSequenceClassification"] and moe.CONFIG_KEY in config
    classify = transformers.pipeline("text-classification", model=str(tmp_path / "tuned"), trust_remote_code=True)
    reloaded = classify.model
    assert type(reloaded).__name__ == "MoEBertForSequenceClassification"
    for a, b in zip(model.state_dict().values(), reloaded.state_dict().values()):
        torch.testing.assert_close(a, b.to(a.device))  # the pipeline takes a GPU where there is one
    assert classify("a fine film")[0]["label"] in {"LABEL_0", "LABEL_1"}


def test_a_decoder_card_names_its_task_and_carries_its_perplexity_to_the_hub(tiny_decoders, tmp_path, fake_hub):
    from huggingface_hub import ModelCard

    from densetomoe import hub

    out = tmp_path / "moe"
    conversion = densetomoe.convert(quick_recipe(tiny_decoders["llama"], router_steps=5), out, show_progress=False)
    card = ModelCard((out / "README.md").read_text())  # parses as a Hub card
    assert card.data.pipeline_tag == "text-generation" and card.data.library_name == "transformers"
    hub.push(out, "tester/decoder", token=TOKEN, endpoint=fake_hub.url)
    results = metadata(fake_hub.repos["tester/decoder"]["README.md"])["model-index"][0]["results"]
    perplexity = [m for r in results for m in r["metrics"] if m["type"] == "perplexity"]
    assert perplexity and perplexity[0]["value"] == pytest.approx(conversion.report.perplexity, rel=1e-5)


def test_a_gguf_source_gives_its_licence_languages_and_origin(tmp_path):
    import gguf

    from densetomoe.stages import load

    path = tmp_path / "model.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_license("apache-2.0")
    writer.add_languages(["en", "fr"])
    writer.add_source_repo_url("https://huggingface.co/SomeOrg/Some-Model-1B")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    source = load.Source(tmp_path, str(path), gguf_file=path.name)
    assert load.source_card(source) == {"license": "apache-2.0", "language": ["en", "fr"], "base_model": "SomeOrg/Some-Model-1B"}


def test_the_real_smollm2_gguf_names_its_licence_and_language(smollm):
    from densetomoe.stages import load

    source = load.resolve("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert source.gguf_file and load.source_card(source) == {"license": "apache-2.0", "language": ["en"]}


def test_fine_tuning_adds_the_load_balancing_loss_as_transformers_moe_models_do(classifier_once, tmp_path):
    """``output_router_logits=True`` at load: in training the output carries ``aux_loss`` and the loss
    includes ``router_aux_loss_coef`` times it (Mixtral's and Qwen2-MoE's convention); off by default."""
    import torch
    import transformers

    def loss_and_output(**settings):
        model = transformers.AutoModelForSequenceClassification.from_pretrained(classifier_once, trust_remote_code=True, **settings)
        model.train()
        torch.manual_seed(0)  # the same dropout in both runs
        inputs = {"input_ids": torch.tensor([[2, 15, 27, 33, 3]] * 4), "labels": torch.tensor([0, 1, 0, 1])}
        return model(**inputs)

    plain = loss_and_output()
    balanced = loss_and_output(output_router_logits=True, router_aux_loss_coef=0.5)
    assert "aux_loss" not in plain and balanced.aux_loss.item() > 0
    torch.testing.assert_close(balanced.loss, plain.loss + 0.5 * balanced.aux_loss)
    balanced.loss.backward()  # the balance term reaches the routers
    config = json.loads((classifier_once / "config.json").read_text())
    assert config["output_router_logits"] is False and config["router_aux_loss_coef"] == moe.ROUTER_AUX_LOSS_COEF


@pytest.mark.parametrize(("family", "routing"), [pytest.param("llama", "dynamic", marks=pytest.mark.slow), ("gpt2", "top-k")])  # compiling the dynamic graph: over 3 s
def test_a_converted_decoder_compiles_in_one_graph_and_exports(tiny_decoders, texts_file, family, routing):
    """``torch.compile(fullgraph=True)`` and ``torch.export`` trace the MoE (every expert, masked:
    no routing-dependent shapes, with a fixed or a dynamic top-k) and compute what eager does
    (selected experts only). The aot_eager backend captures the same graph as inductor without
    compiling C++ kernels."""
    import torch

    recipe = quick_recipe(tiny_decoders[family], texts_file, top_k=2, router_steps=5, routing=routing)
    conversion = densetomoe.convert(recipe, show_progress=False)
    model = conversion.model.eval()
    ids = torch.randint(5, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids, "use_cache": False}  # no cache object in the outputs: export returns tensors
    with torch.no_grad():
        eager = model(**inputs).logits
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(**inputs).logits
        exported = torch.export.export(model, (), inputs).module()(**inputs).logits
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(exported, eager, rtol=1e-4, atol=1e-4)


def test_lora_on_the_experts_trains_merges_and_reloads(tiny_decoders, texts_file, tmp_path):
    """PEFT's ``target_parameters`` reaches the experts' 3-D weights (``target_modules`` cannot: they
    are parameters of one module): a few steps change what the experts compute, ``merge_and_unload``
    gives a plain converted model with the same outputs, and its saved folder reloads to them."""
    import torch
    import transformers

    peft = pytest.importorskip("peft", reason="needs peft (make test installs it)")
    out = tmp_path / "moe"
    densetomoe.convert(quick_recipe(tiny_decoders["llama"], texts_file, top_k=2, router_steps=5), out, show_progress=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    ids = torch.randint(5, model.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model.eval()(input_ids=ids).logits
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=[], target_parameters=["w_up", "w_gate", "w_down"])
    tuned = peft.get_peft_model(model, config)
    trainable = {n for n, p in tuned.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n and ".mlp." in n for n in trainable)  # the experts' adapters, nothing else
    optimizer = torch.optim.AdamW([p for p in tuned.parameters() if p.requires_grad], lr=1e-2)
    tuned.train()
    for _ in range(3):
        tuned(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():
        adapted = tuned.eval()(input_ids=ids).logits
    assert (adapted - before).abs().max() > 1e-3  # the adapters changed the experts
    merged = tuned.merge_and_unload()
    assert type(merged).__name__ == "MoELlamaForCausalLM"
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted, rtol=1e-4, atol=1e-4)
    merged.save_pretrained(tmp_path / "merged")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", trust_remote_code=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, adapted, rtol=1e-4, atol=1e-4)

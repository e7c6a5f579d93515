"""Dependencies fit the commands: the core install (pyproject.toml's dependencies, nothing of
the extras) trains and searches, and every command that needs an extra says which in one line
(exit 2) where it is missing; `test` and `all` name the extras instead of repeating them."""

import importlib.metadata
import json
import subprocess
import sys
import sysconfig

import pytest
import yaml
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.helpers import ROOT, TINY_BASE, write_spec

pytestmark = pytest.mark.slow  # trains, serves or kills: make test-fast leaves it out

PROJECT = "resformer-nas"
CORE = {"torch", "lightning", "torchmetrics", "optuna", "pyyaml", "pydantic", "numpy", "tqdm"}
EXTRAS = {"report", "dashboard", "image", "hf", "tokenizers", "tensorboard", "mlflow", "wandb",
          "postgres"}


def requirements(extra: str | None = None) -> list[Requirement]:
    """The project's requirements as pip reads them (its installed metadata): the core ones,
    or those of one extra."""
    found = []
    for line in importlib.metadata.requires(PROJECT):
        req = Requirement(line)
        if req.marker is None if extra is None else (
                req.marker is not None and req.marker.evaluate({"extra": extra})):
            found.append(req)
    return found


def test_the_core_is_what_training_needs_and_test_and_all_name_the_extras():
    assert {canonicalize_name(r.name) for r in requirements()} == CORE
    [everything] = requirements("all")
    assert canonicalize_name(everything.name) == PROJECT and everything.extras == EXTRAS
    test = requirements("test")
    assert [(r.name, r.extras) for r in test if canonicalize_name(r.name) == PROJECT] == [
        (PROJECT, {"all"})]
    assert {canonicalize_name(r.name) for r in test} - {PROJECT} == {
        "pytest", "pytest-timeout", "pytest-xdist", "ruff", "mkdocs"}  # tools only, none twice


def core_site(tmp_path):
    """A folder of links to the installed distributions the core requirements need, their
    own requirements followed: what `pip install resformer-nas` would install, taken from
    this environment."""
    site = tmp_path / "core-site"
    site.mkdir()
    installed = sysconfig.get_paths()["purelib"]
    environment = default_environment()
    todo, seen = list(requirements()), set()
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in seen or (req.marker and not req.marker.evaluate({**environment,
                                                                     "extra": ""})):
            continue
        seen.add(name)
        dist = importlib.metadata.distribution(name)
        for extra in req.extras:  # e.g. a package's own [extra]
            todo += [Requirement(r) for r in dist.requires or []
                     if Requirement(r).marker and Requirement(r).marker.evaluate(
                         {**environment, "extra": extra})]
        todo += [Requirement(r) for r in dist.requires or [] if not Requirement(r).marker
                 or Requirement(r).marker.evaluate({**environment, "extra": ""})]
        for top in {f.parts[0] for f in dist.files or [] if f.parts[0] != ".."}:
            link = site / top
            if not link.exists() and not top.endswith(".pth"):
                link.symlink_to(f"{installed}/{top}")
    return site, seen


def run_core(tmp_path, commands):
    """Run `nas` commands, in process, in an interpreter that sees the core distributions
    and the source tree only; each one's exit code and what it wrote to stderr."""
    site, installed = core_site(tmp_path)
    assert not installed & {"scipy", "plotly", "optuna-dashboard", "transformers",
                            "tokenizers", "mlflow", "mlflow-skinny", "wandb", "tensorboard",
                            "kaleido", "psycopg"}, installed
    program = f"""
import contextlib, importlib.util, io, json, sys
sys.path[:0] = [{str(ROOT)!r}, {str(site)!r}]
assert importlib.util.find_spec("scipy") is None and importlib.util.find_spec("nas")
from nas.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(argv)
    results.append([code, err.getvalue()])
print(json.dumps(results))
"""
    done = subprocess.run([sys.executable, "-I", "-S", "-c", program, json.dumps(commands)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_core_install_trains_and_searches_and_each_extra_is_named_where_missing(
        tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({**TINY_BASE, "train": {**TINY_BASE["train"],
                                                             "steps": 4, "compile": False}}))
    tensorboard = tmp_path / "tb.yaml"
    tensorboard.write_text(yaml.safe_dump({**TINY_BASE, "train": {
        **TINY_BASE["train"], "logger": "tensorboard"}}))
    spec = write_spec(tmp_path, n_trials=2)
    text = tmp_path / "text.txt"
    text.write_text("a few words\n" * 50)
    run = tmp_path / "run"
    commands = [
        ["train", str(config), "--out", str(run)],
        ["search", str(spec)],
        ["report", str(spec), "--out", str(tmp_path / "report.html")],
        ["dashboard", str(spec)],
        ["export", str(run), "--hf", "--out", str(tmp_path / "hf")],
        ["prepare", str(text), "--vocab-size", "300", "--out", str(tmp_path / "prepared")],
        ["train", str(tensorboard), "--out", str(tmp_path / "tb")],
    ]
    (trained, trained_err), (searched, searched_err), *refused = run_core(tmp_path, commands)
    assert trained == 0, trained_err
    assert (run / "metrics.json").is_file()
    assert searched == 0, searched_err
    expected = [
        "nas report: error: nas report needs plotly and scipy: pip install "
        "'resformer-nas[report]'",
        "nas dashboard: error: nas dashboard needs optuna_dashboard and plotly and scipy: "
        "pip install 'resformer-nas[dashboard]'",
        "nas export: error: --hf needs transformers and safetensors (safetensors is "
        "missing): pip install 'resformer-nas[hf]'",
        "nas prepare: error: nas prepare needs the tokenizers package: pip install "
        "'resformer-nas[tokenizers]'",
        "nas train: error: train.logger: tensorboard needs the tensorboard package: pip "
        "install 'resformer-nas[tensorboard]'",
    ]
    assert [(code, err.strip()) for code, err in refused] == [(2, line) for line in expected]
    assert not (tmp_path / "report.html").exists() and not (tmp_path / "tb").exists()

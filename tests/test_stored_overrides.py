"""A study remembers how it was run: a search with `--set` stores its overrides, and every
later command on the study (export and a `nas train` of what it exported, report, analyze, a
dashboard serving it, a resumed search) applies them without being told, saying so in one
line; a resume given other values is refused, naming the key and both values."""

import json
import re
import urllib.request

import optuna
import pytest

from nas.cli import main
from nas.config import load_config
from nas.errors import ConfigError
from nas.search.spec import load_spec
from nas.search.study import open_existing
from tests.helpers import write_spec
from tests.processes import start, wait_for

pytestmark = pytest.mark.slow  # trains, serves or kills: make test-fast leaves it out

SETS = ["--set", "model.preset=pico", "--set", "train.steps=8"]
NOTE = "applying the study's stored --set model.preset=pico --set train.steps=8"
PICO = {"n_layer": 2, "d_model": 32, "n_head": 2, "seq_len": 32}


def trials(spec) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name="tiny",
                             storage=f"sqlite:///{spec.parent}/tiny.db").trials


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def search_with_overrides(folder):
    """A tiny study searched with --set model.preset=pico (the spec's base and space name
    d_model, n_head, seq_len and n_layer: the preset replaces them) and train.steps=8."""
    spec = write_spec(folder)
    assert main(["search", str(spec), "--n-trials", "2", "--no-progress", *SETS]) == 0
    return spec


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    """The study, for the tests that only read it."""
    return search_with_overrides(tmp_path_factory.mktemp("searched"))


def test_the_study_stores_its_overrides_and_trains_the_presets_size(searched):
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{searched.parent}/tiny.db")
    assert study.user_attrs["overrides"] == ["model.preset=pico", "train.steps=8"]
    assert "overrides" in study.user_attrs["fingerprint"]
    configs = [t.user_attrs["config"] for t in study.trials if "config" in t.user_attrs]
    assert len(configs) == 2
    for config in configs:
        assert {k: config["model"][k] for k in PICO} == PICO and config["train"]["steps"] == 8


def test_export_report_and_analyze_apply_the_stored_overrides(searched, tmp_path, capsys):
    out = tmp_path / "exported"
    code, printed, err = run(capsys, "export", str(searched), "--best", "1", "--out", str(out))
    assert code == 0, err
    assert err == f"nas export: {NOTE}\n"
    [exported] = out.glob("*.yaml")
    cfg = load_config(exported)
    assert (cfg.model.n_layer, cfg.model.d_model, cfg.model.seq_len) == (2, 32, 32)
    # what was exported trains again, unchanged, to the trial's own loss
    code, _, err = run(capsys, "train", str(exported), "--out", str(tmp_path / "again"),
                       "--no-progress")
    assert code == 0, err
    trial = int(exported.stem.rsplit("-", 1)[1])
    metrics = json.loads((tmp_path / "again" / "metrics.json").read_text())
    assert metrics["val_loss"] == trials(searched)[trial].user_attrs["val_loss"]

    html = tmp_path / "report.html"
    code, printed, err = run(capsys, "report", str(searched), "--out", str(html))
    assert code == 0, err
    assert err.splitlines()[0] == f"nas report: {NOTE}" and html.is_file()

    code, printed, err = run(capsys, "analyze", str(searched), "--trial", str(trial), "--json")
    assert code == 0, err
    assert err == f"nas analyze: {NOTE}\n"
    assert len(json.loads(printed)["analysis"]["attention_entropy"]) == PICO["n_layer"]


def test_a_dashboard_serves_a_study_searched_with_overrides(searched, tmp_path):
    log = tmp_path / "dashboard.log"
    server = start("dashboard", str(searched), "--port", "0", "--refresh", "0", log=log)
    try:
        address = wait_for(lambda: re.search(r"(http://\S+)/dashboard/studies/(\d+)",
                                             log.read_text()), server, log, "its address")
        with urllib.request.urlopen(f"{address[1]}/api/studies/{address[2]}", timeout=60) as r:
            detail = json.loads(r.read())
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert detail["name"] == "tiny" and len(detail["trials"]) == 2
    assert "### Search space" in detail["note"]["body"]
    assert f"nas dashboard: {NOTE}" in log.read_text().splitlines()


def test_a_resume_applies_them_and_refuses_other_values(tmp_path, capsys):
    searched = search_with_overrides(tmp_path)
    capsys.readouterr()
    held = len(trials(searched))
    for sets, key, stored, given in (
            (["--set", "model.preset=nano"], "model.preset", "with model.preset=pico",
             "here model.preset=nano"),
            (["--set", "train.steps=8", "--set", "train.lr=1e-3"], "train.lr", "without it",
             "here train.lr=1e-3")):
        code, _, err = run(capsys, "search", str(searched), "--n-trials", "1", *sets)
        assert code == 2 and err.count("\n") == 1, err
        assert err.startswith(f"nas search: error: --set {key}: study 'tiny' was searched "
                              f"{stored}, {given}; leave --set out"), err
        assert "use a new study name" not in err
    assert len(trials(searched)) == held

    # no --set: the study's own apply; the same value of one of them: the other applies
    for sets, note in (([], NOTE), (["--set", "model.preset=pico"],
                                    "applying the study's stored --set train.steps=8")):
        code, _, err = run(capsys, "search", str(searched), "--n-trials", "1", "--no-progress",
                           *sets)
        assert code == 0, err
        assert err == f"nas search: {note}\n"
    new = trials(searched)[held:]
    assert len(new) == 2
    for t in new:
        assert t.user_attrs["config"]["model"]["d_model"] == PICO["d_model"]


def test_the_fingerprint_refuses_the_spec_without_its_overrides(searched):
    # through the Python API, which does not apply them: the line names the override
    with pytest.raises(ConfigError, match=r"--set model\.preset: study 'tiny' was searched with "
                                        r"model\.preset=pico, here without it"):
        open_existing(load_spec(searched))

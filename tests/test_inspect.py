"""Export, report and dashboard on one tiny study: real training, a real optuna-dashboard server
answering real HTTP requests, and a real headless browser rendering its page."""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.artifacts import download_artifact
from optuna.trial import TrialState, create_trial

from nas.cli import main
from nas.config import from_dict, load_config
from nas.reading.arms import best_arms
from nas.reading.figures import FIGURES, build_figures
from nas.reading.fits import fit_scaling
from nas.reading.scaling import parameter_savings
from nas.search.artifacts import artifact_dir, artifact_store
from nas.search.spec import load_spec
from nas.search.study import open_study
from nas.search.trials import TrialRecord, front
from nas.search.worker import run_search
from tests.helpers import env_for_cli, free_port, nas_cmd, run_cli, write_spec
from tests.processes import wait_for

pytestmark = pytest.mark.slow  # trains, serves or kills: make test-fast leaves it out

NAME = "inspect-tiny-study"


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    """Four trials, trained once for the module: learnable and vanilla at two sizes each."""
    folder = tmp_path_factory.mktemp("inspect")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RESFORMER_NAS_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
        path = write_spec(folder, name=NAME, n_trials=4, space={
            "model": {"n_layer": [2, 3]},
            "value_residual": {"mode": ["vanilla", "learnable"],
                               "lambda1": {"low": 0.2, "high": 2.0}}})
        spec = load_spec(path)
        study = open_study(spec)
        for n_layer in (2, 3):
            study.enqueue_trial({"model.n_layer": n_layer, "value_residual.mode": "learnable",
                                 "value_residual.lambda1": 0.5})
        run_search(spec, progress=False, echo=lambda *_: None)
    study = optuna.load_study(study_name=NAME, storage=spec.storage)
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 4
    return path, spec, study


def test_trials_carry_config_and_curve_artifacts(tiny_study, tmp_path):
    _, spec, study = tiny_study
    folder = artifact_dir(spec.storage, spec.name)
    assert folder.name == "tiny-artifacts" and folder.is_dir()  # next to tiny.db
    store = artifact_store(folder)
    for t in study.get_trials(states=(TrialState.COMPLETE,)):
        metas = {json.loads(v)["filename"]: json.loads(v)["artifact_id"]
                 for k, v in t.system_attrs.items() if k.startswith("artifacts:")}
        assert set(metas) == {"config.yaml", "curve.csv"}
        cfg_file, curve_file = tmp_path / f"{t.number}.yaml", tmp_path / f"{t.number}.csv"
        download_artifact(artifact_store=store, artifact_id=metas["config.yaml"],
                          file_path=str(cfg_file))
        download_artifact(artifact_store=store, artifact_id=metas["curve.csv"],
                          file_path=str(curve_file))
        assert load_config(cfg_file) == from_dict(t.user_attrs["config"])
        rows = list(csv.reader(io.StringIO(curve_file.read_text())))
        assert rows[0] == ["step", "val_loss"]
        assert [[int(s), float(v)] for s, v in rows[1:]] == t.user_attrs["curve"]


def test_export_then_train_reproduces_the_trial(tiny_study, tmp_path):
    path, _, study = tiny_study
    out = tmp_path / "best"
    proc = run_cli("export", str(path), "--best", "1", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    best = min(study.get_trials(states=(TrialState.COMPLETE,)),
               key=lambda t: t.user_attrs["val_loss"])
    # Every name holds the study's: two studies exported into one folder never collide.
    exported = out / f"{NAME}-trial-{best.number:04d}.yaml"
    assert sorted(p.name for p in out.iterdir()) == sorted([exported.name, f"{NAME}-summary.csv",
                                                            f"{NAME}-summary.json"])
    cfg = load_config(exported)
    assert cfg == from_dict(best.user_attrs["config"])
    assert cfg.data.source == "builtin" and cfg.train.seed == 0
    summary = json.loads((out / f"{NAME}-summary.json").read_text())
    assert summary["trials"][0]["trial"] == best.number
    assert summary["trials"][0]["val_loss"] == best.user_attrs["val_loss"]
    with (out / f"{NAME}-summary.csv").open() as f:
        assert [int(r["trial"]) for r in csv.DictReader(f)] == [best.number]

    started = time.perf_counter()
    proc = run_cli("train", str(exported), "--out", str(tmp_path / "again"))
    assert proc.returncode == 0, proc.stderr
    again = json.loads((tmp_path / "again" / "metrics.json").read_text())
    print(f"trial {best.number}: val_loss {best.user_attrs['val_loss']:.6f} in the study, "
          f"{again['val_loss']:.6f} retrained ({time.perf_counter() - started:.1f} s)")
    assert abs(again["val_loss"] - best.user_attrs["val_loss"]) < 1e-3
    assert again["n_params"] == best.user_attrs["n_params"]

    pareto = tmp_path / "pareto"
    assert main(["export", str(path), "--pareto", "--out", str(pareto)]) == 0
    numbers = [t["trial"]
               for t in json.loads((pareto / f"{NAME}-summary.json").read_text())["trials"]]
    assert numbers == [t.number for t in front(study)]
    assert all((pareto / f"{NAME}-trial-{n:04d}.yaml").is_file() for n in numbers)


def test_report_is_one_plotly_page_with_every_figure(tiny_study, tmp_path):
    path, _, _ = tiny_study
    out = tmp_path / "report.html"
    proc = run_cli("report", str(path), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    page = out.read_text()
    assert page.count("* plotly.js v") == 1  # the library, inlined once
    assert not re.search(r"<script[^>]+src=", page)  # self-contained: nothing to fetch
    titles = {
        "pareto": "Pareto front: val_loss against parameters",
        "inference": "Validation loss against inference cost",
        "coefficients": "Mixing coefficients per layer",
        "scaling": "Scaling fits per variant and parameter saving vs vanilla",
        "savings": "Equivalent parameter saving against vanilla, per size and per seed",
        "lr": "Validation loss against learning rate, per variant and size",
        "tokens": "Loss against training tokens per variant",
        "analysis": "Per-layer attention entropy and value similarity to layer 0",
        "curves": "Validation curves",
        "importances": "Parameter importances for val_loss",
        "hypervolume": "Hypervolume history",
        "confirmation": "Confirmation on fresh seeds",  # `nas confirm` not run: left out
    }
    assert list(titles) == list(FIGURES)
    left_out = page.partition("<section id='left-out'>")[2]
    for key, title in titles.items():
        drawn = re.search(rf'Plotly\.newPlot\(\s*"fig-{key}"', page)
        # a figure with nothing to show is left out, with one line saying why
        assert bool(drawn) != (f"<p>{FIGURES[key].title}: " in left_out), key
        assert not drawn or title in page, key
    for key in ("pareto", "coefficients", "scaling", "curves", "hypervolume"):
        assert f'id="fig-{key}"' in page, key
    assert "<h3>Equivalent parameter saving against vanilla" in page
    assert re.search(r"<tr><td>learnable</td><td>", page)  # two sizes: fitted or explained
    assert "lambda1 L1" in page and "lambda2 L2" in page


def _trial(mode: str, n_layer: int, n_params: float, loss: float) -> TrialRecord:
    return TrialRecord.from_trial(create_trial(value=loss, user_attrs={
        "mode": mode, "source": "first_layer", "n_params": n_params, "val_loss": loss,
        "n_params_non_embedding": n_params, "tokens": 1000,
        "config": {"model": {"n_layer": n_layer}}}))


def test_equivalent_parameter_saving_recovers_a_known_saving():
    # learnable reaches vanilla's loss with 20% fewer parameters at every size.
    def vanilla(n):
        return 2.0 + 3.0 * (n / 1e5) ** -0.3

    sizes = [1e5, 2e5, 4e5, 8e5]
    trials = [_trial("vanilla", i, n, vanilla(n)) for i, n in enumerate(sizes)]
    trials += [_trial("learnable", i, n, vanilla(n / 0.8)) for i, n in enumerate(sizes)]
    trials += [_trial("resformer", i, n, vanilla(n / 0.9))
               for i, n in enumerate(sizes[:2])]
    trials += [_trial("svformer", 0, 1e5, 2.5)]
    base, savings = parameter_savings(best_arms(trials))
    assert base is not None and base.kind == "power" and base.alpha == pytest.approx(0.3, 1e-3)
    assert base.n_free == 3 and len(base.residuals) == 4
    assert max(abs(r) for r in base.residuals) < 1e-3
    by_name = {s.variant: s for s in savings}
    learnable = by_name["learnable"]
    assert learnable.fit.kind == "power"
    assert learnable.headline == pytest.approx(0.2, abs=1e-3)
    # at vanilla's smallest size the reading (0.8e5) lies below learnable's smallest: apart
    assert [lv.x for lv in learnable.extrapolated] == [1e5]
    assert learnable.extrapolated[0].saving == pytest.approx(0.2, abs=1e-3)
    assert by_name["resformer"].fit.kind == "log"  # two sizes: a log-linear fit
    assert by_name["resformer"].headline == pytest.approx(0.1, abs=0.03)
    assert [lv.x for lv in by_name["resformer"].levels if lv.interpolated] == [2e5]
    assert by_name["svformer"].headline is None
    assert "too few model sizes" in by_name["svformer"].note
    assert fit_scaling([1e5, 2e5], [3.0, 3.1]) is None  # loss rising with size: no fit


def _get(url: str):
    with urllib.request.urlopen(url, timeout=10) as r:
        body = r.read()
    return json.loads(body) if r.headers.get_content_type() == "application/json" else body


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def test_dashboard_serves_the_study_its_attrs_and_artifacts(tiny_study):
    path, _, study = tiny_study
    server, base = _start_dashboard(str(path))
    try:
        assert _listening(_port(base)) == {"127.0.0.1"}  # this machine only, by default
        assert _get(f"{base}/api/meta")["artifact_is_available"] is True
        listed = {s["study_name"]: s for s in _get(f"{base}/api/studies")["study_summaries"]}
        assert NAME in listed
        study_id = listed[NAME]["study_id"]
        detail = _get(f"{base}/api/studies/{study_id}")
        assert detail["name"] == NAME and detail["objective_names"] == ["val_loss", "n_params"]
        assert {a["key"] for a in detail["user_attrs"]} >= {"objectives", "space"}
        assert "### Search space" in detail["note"]["body"]
        assert "### Pareto front" in detail["note"]["body"]
        assert "Equivalent parameter saving against vanilla" in detail["note"]["body"]
        drawn, _ = build_figures(study)  # those with something to show
        assert {g["id"] for g in detail["plotly_graph_objects"]} == {f"nas-{k}" for k in drawn}
        assert len(detail["trials"]) == 4
        for t in detail["trials"]:
            attrs = {a["key"]: a["value"] for a in t["user_attrs"]}
            assert {"n_params", "n_params_non_embedding", "val_loss", "coefficients",
                    "config", "curve", "mode"} <= set(attrs)
            if attrs["mode"] == "learnable":
                assert "L1.lambda1" in json.loads(attrs["coefficients"])
            files = {a["filename"]: a["artifact_id"] for a in t["artifacts"]}
            assert set(files) == {"config.yaml", "curve.csv"}
            body = _get(f"{base}/artifacts/{study_id}/{t['trial_id']}/{files['config.yaml']}")
            stored = study.trials[t["number"]].user_attrs["config"]
            assert from_dict(yaml.safe_load(body)) == from_dict(stored)

        browser = _chromium()
        if browser is None:
            pytest.fail("chromium is not installed (scripts/ensure-system-deps.sh installs it)")
        with tempfile.TemporaryDirectory(prefix="nas-chromium-") as profile:
            page = subprocess.run(
                [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}",
                 "--virtual-time-budget=15000", "--dump-dom",
                 f"{base}/dashboard/studies/{study_id}"],
                capture_output=True, text=True, timeout=120)
        assert NAME in page.stdout, page.stderr[-2000:]
        assert "val_loss" in page.stdout  # the named objectives, rendered by React
    finally:
        server.terminate()
        out, _ = server.communicate(timeout=30)
    assert f"{base}/dashboard/studies/" in out


def _start_dashboard(*args: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    server = subprocess.Popen(nas_cmd("dashboard", *args, "--port", str(port), "--refresh", "0"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env_for_cli())
    base = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        try:
            _get(f"{base}/api/meta")
        except OSError:
            return False
        return True

    wait_for(answers, server, what="the dashboard to answer")
    return server, base


def _port(base: str) -> int:
    return int(base.rsplit(":", 1)[1])


def _listening(port: int) -> set[str]:
    """The IPv4 addresses a socket listens on at `port`, read from the kernel's table."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, _, state = line.split()[1:4]
        address, hex_port = local.split(":")
        if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
            found.add(socket.inet_ntoa(bytes.fromhex(address)[::-1]))  # little-endian
    return found


def test_dashboard_refuses_a_public_host_unless_allowed(tiny_study, capsys):
    path, _, _ = tiny_study
    for host in ("0.0.0.0", "192.0.2.1", "dashboard.example.org"):
        assert main(["dashboard", str(path), "--host", host, "--port", "8765"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        assert f"--host: {host} is not a loopback address" in err
        assert "--allow-remote" in err and "ssh -L 8765:127.0.0.1:8765" in err
    server, base = _start_dashboard(str(path), "--host", "0.0.0.0", "--allow-remote")
    port = _port(base)
    try:
        assert _listening(port) == {"0.0.0.0"}
        assert _get(f"{base}/api/meta")["artifact_is_available"] is True
    finally:
        server.terminate()
        _, err = server.communicate(timeout=30)
    assert "warning: optuna-dashboard has no authentication" in err
    assert f"ssh -L {port}:127.0.0.1:{port}" in err


@pytest.mark.parametrize("kind", ["journal", "postgres"])
def test_journal_and_postgres_storages(tiny_study, tmp_path, kind, request):
    path, spec, study = tiny_study
    if kind == "journal":
        url = f"journal:{tmp_path}/copy.log"
        target = optuna.storages.JournalStorage(
            optuna.storages.journal.JournalFileBackend(str(tmp_path / "copy.log")))
    else:
        url = target = request.getfixturevalue("pg_url")
    optuna.copy_study(from_study_name=NAME, from_storage=spec.storage, to_storage=target)
    assert main(["report", str(path), "--storage", url, "--out", str(tmp_path / "r.html")]) == 0
    assert 'id="fig-hypervolume"' in (tmp_path / "r.html").read_text()
    assert main(["export", str(path), "--storage", url, "--pareto",
                 "--out", str(tmp_path / "x")]) == 0
    assert len(json.loads((tmp_path / "x" / f"{NAME}-summary.json").read_text())["trials"]) == (
        len(front(study)))
    # The copied trials point at the SQLite study's artifact files: --artifacts names them.
    server, base = _start_dashboard(str(path), "--storage", url, "--artifacts",
                                    str(artifact_dir(spec.storage, spec.name)))
    try:
        listed = {s["study_name"]: s for s in _get(f"{base}/api/studies")["study_summaries"]}
        study_id = listed[NAME]["study_id"]
        detail = _get(f"{base}/api/studies/{study_id}")
        assert len(detail["trials"]) == 4 and "### Pareto front" in detail["note"]["body"]
        t = detail["trials"][0]
        files = {a["filename"]: a["artifact_id"] for a in t["artifacts"]}
        body = _get(f"{base}/artifacts/{study_id}/{t['trial_id']}/{files['curve.csv']}")
        assert body.decode().startswith("step,val_loss")
    finally:
        server.terminate()
        server.communicate(timeout=30)


def test_bad_input_is_one_clear_line(tiny_study, tmp_path, capsys):
    path, spec, _ = tiny_study

    def fails(*argv: str) -> str:
        assert main(list(argv)) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        return err

    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump({**yaml.safe_load(path.read_text()), "name": "nope"}))
    for command in (["report", str(other), "--out", str(tmp_path / "r.html")],
                    ["export", str(other), "--best", "1", "--out", str(tmp_path / "x")],
                    ["dashboard", str(other), "--port", "0"]):
        assert f"no study 'nope' in {spec.storage}" in fails(*command)
    missing = f"sqlite:///{tmp_path}/absent/none.db"
    err = fails("report", str(path), "--storage", missing, "--out", str(tmp_path / "r.html"))
    assert "does not exist" in err and not (tmp_path / "absent").exists()
    empty = f"sqlite:///{tmp_path}/empty.db"
    optuna.storages.RDBStorage(empty)  # a storage that holds no study
    assert "studies there: none" in fails("export", str(path), "--storage", empty, "--pareto",
                                          "--out", str(tmp_path / "x"))
    assert "--best" in fails("export", str(path), "--best", "0", "--out", str(tmp_path / "x"))
    assert "exactly one" in fails("export", str(path), "--out", str(tmp_path / "x"))
    assert "exactly one" in fails("export", str(path), "--pareto", "--best", "2",
                                  "--out", str(tmp_path / "x"))
    assert "file not found" in fails("report", str(tmp_path / "missing.yaml"),
                                     "--out", str(tmp_path / "r.html"))
    assert "--image" in fails("report", str(path), "--out", str(tmp_path / "r.html"),
                              "--image", str(tmp_path / "r.gif"))
    assert not (tmp_path / "x").exists() and not (tmp_path / "r.html").exists()


def test_inspection_modules_do_not_import_torch():
    code = ("import sys, nas.reading.report, nas.reading.export, nas.reading.dashboard, "
            "nas.search.artifacts, nas.cli; sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0

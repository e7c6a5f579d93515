"""What a tool that runs for days on shared machines must survive, tested the way it happens:
SIGTERM and a preemption notice to a real `nas search` worker while it waits for a slot and
while it trains, on every storage, and SIGTERM in the middle of journal writes; a real `nas
train` killed with SIGKILL or stopped with SIGTERM; a storage URL holding a password, through
every command, against a real PostgreSQL server. Tiny models."""

from __future__ import annotations

import os
import random
import re
import signal
import stat
import threading
import time
import urllib.request
from pathlib import Path

import optuna
import pytest
import sqlalchemy
import yaml
from optuna.trial import TrialState

from nas.cli import main
from nas.config import dump_config
from nas.interrupt import CTRL_C, Interrupted
from nas.search.storage import make_storage
from tests.helpers import TINY_BASE, tiny
from tests.processes import LONG_STEPS, start, trials, wait_for

pytestmark = pytest.mark.slow  # trains, serves or kills: make test-fast leaves it out

PASSWORD = "s3cretpw"
# -- SIGTERM and a preemption notice stop a worker, whatever it is doing -----------------------


@pytest.mark.parametrize("backend", ["sqlite", "journal", "postgres"])
def test_sigterm_while_waiting_for_a_slot_and_a_preemption_notice_while_training(tmp_path,
                                                                                request, backend):
    storage = (request.getfixturevalue("pg_url") if backend == "postgres"
               else {"sqlite": f"sqlite:///{tmp_path}/slot.db",
                     "journal": f"journal:{tmp_path}/slot.log"}[backend])
    spec = tmp_path / "slot.yaml"
    # One slot, held by a trial far longer than the test; the second worker waits for it
    # (as long as its lease lives).
    spec.write_text(yaml.safe_dump({
        "name": "slot", "n_trials": 1, "storage": storage, "baselines": False,
        "space": {"model": {"n_layer": 2}, "value_residual": {"mode": ["vanilla"]}},
        "objectives": ["val_loss"], "sampler": {"type": "random"},
        "base": {**TINY_BASE, "train": {**TINY_BASE["train"], "steps": LONG_STEPS,
                                         "eval_every": 50}},
        "heartbeat": {"interval": 1, "grace_period": 120},
        "artifacts": str(tmp_path / "artifacts")}))
    log_a, log_b = tmp_path / "a.log", tmp_path / "b.log"
    a = start("search", str(spec), "--no-progress", "--threads", "1", log=log_a)
    wait_for(lambda: any(t.state == TrialState.RUNNING and t.user_attrs.get("last_validation")
                         for t in trials(storage, "slot")), a, log_a, "a trial validating")

    b = start("search", str(spec), "--no-progress", "--threads", "1", log=log_b)
    wait_for(lambda: "waiting for" in log_b.read_text(), b, log_b, "the wait for a slot")
    b.send_signal(signal.SIGTERM)
    assert b.wait(timeout=60) == 143, log_b.read_text()
    assert log_b.read_text().splitlines()[-1] == "nas search: interrupted (SIGTERM)"
    assert len(trials(storage, "slot")) == 1  # the waiting worker started nothing

    a.send_signal(signal.SIGUSR1)  # SLURM's --signal=USR1@SECONDS: the job ends soon
    assert a.wait(timeout=60) == 143, log_a.read_text()
    text = log_a.read_text()
    assert "nas search: interrupted (SIGUSR1, a preemption notice)" in text
    assert "Traceback" not in text
    [trial] = trials(storage, "slot")
    assert trial.state == TrialState.FAIL
    assert trial.user_attrs["failure"] == "interrupted (SIGUSR1, a preemption notice)"


def test_a_signal_inside_a_journal_write_is_raised_once_the_write_is_whole(tmp_path):
    # Raised inside the journal's lock, the interrupt broke the lock's own cleanup (a
    # FileNotFoundError in place of the interrupt, or a lock left held or taken from another
    # worker). A worker that trains a moment between writes, signalled at random moments:
    journal = tmp_path / "study.log"
    study = optuna.create_study(storage=make_storage(f"journal:{journal}"))
    trial = study.ask()
    for _ in range(40):
        with pytest.raises(Interrupted), CTRL_C:
            threading.Timer(random.uniform(0.0, 0.05), os.kill,
                            (os.getpid(), signal.SIGTERM)).start()
            while True:
                trial.set_user_attr("step", 1)
                time.sleep(0.001)
        assert [p.name for p in tmp_path.iterdir()] == ["study.log"]  # no lock left
    trial.set_user_attr("step", 2)  # the journal takes writes as before


# -- `nas train` writes its run folder at once ---------------------------------------------------


def run_config(tmp_path: Path, steps: int, seed: int = 0) -> Path:
    path = tmp_path / f"run-{steps}-{seed}.yaml"
    dump_config(tiny("learnable", n_layer=2, steps=steps, eval_every=max(1, steps // 4),
                     batch_size=4, seed=seed), path)
    return path


def beside(out: Path) -> list[str]:
    """`out` and the folders named after it (`<out>.incomplete-<pid>`, `<out>.replaced-<pid>`)."""
    return sorted(p.name for p in out.parent.iterdir()
                  if p.name == out.name or p.name.startswith(f"{out.name}."))


def test_a_killed_train_leaves_no_run_folder(tmp_path):
    out = tmp_path / "runs" / "run"
    config = str(run_config(tmp_path, steps=LONG_STEPS))
    log = tmp_path / "train.log"
    proc = start("train", config, "--out", str(out), log=log)
    staging = out.with_name(f"{out.name}.incomplete-{proc.pid}")
    wait_for(lambda: (staging / "metrics.csv").is_file(), proc, log, "training to log")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    # Only the folder being written, named as incomplete; no half-written `out`.
    assert not out.exists() and beside(out) == [staging.name]
    assert not (staging / "metrics.json").exists() and not (staging / "model.pt").exists()

    proc = start("train", config, "--out", str(out), log=log)
    wait_for(lambda: out.with_name(f"{out.name}.incomplete-{proc.pid}").is_dir(), proc, log,
             "the second run's folder")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143, log.read_text()
    assert "nas train: interrupted (SIGTERM)" in log.read_text()
    assert "Traceback" not in log.read_text()
    assert beside(out) == [staging.name]  # it cleaned up its own folder, and only its own


def test_a_non_empty_out_is_refused_unless_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    first, second = run_config(tmp_path, steps=4), run_config(tmp_path, steps=4, seed=1)
    assert main(["train", str(first), "--out", str(out)]) == 0
    files = {p.name: p.read_bytes() for p in out.iterdir()}
    assert {"config.yaml", "metrics.csv", "metrics.json", "model.pt"} <= set(files)
    capsys.readouterr()

    assert main(["train", str(second), "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"nas train: error: --out: {out} is not empty; pass --overwrite to replace it, or "
        "choose another folder"]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == files  # untouched
    # --overwrite replaces a run folder, never a folder of something else.
    assert main(["train", str(second), "--out", str(tmp_path), "--overwrite"]) == 2
    assert "not a run folder" in (err := capsys.readouterr().err), err
    assert first.is_file() and (out / "model.pt").is_file()

    assert main(["train", str(second), "--out", str(out), "--overwrite"]) == 0
    assert (out / "config.yaml").read_bytes() == second.read_bytes()
    assert (out / "model.pt").read_bytes() != files["model.pt"]  # the new run's, whole
    assert beside(out) == ["run"]  # nothing left beside it


# -- the tests' own PostgreSQL server lets nobody else in ---------------------------------------


def test_the_test_database_listens_on_a_private_socket_and_checks_its_password(pg_cluster,
                                                                              pg_url):
    engine = sqlalchemy.create_engine(pg_url)
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SHOW listen_addresses").scalar() == ""  # no TCP at all
        assert conn.exec_driver_sql("SHOW unix_socket_directories").scalar() == str(
            pg_cluster.root)
    engine.dispose()
    assert stat.S_IMODE(pg_cluster.root.stat().st_mode) == 0o700  # its owner's alone
    wrong = sqlalchemy.engine.make_url(pg_url).set(password="not-the-password")
    with pytest.raises(sqlalchemy.exc.OperationalError, match="password authentication failed"):
        sqlalchemy.create_engine(wrong).connect()


# -- no password is ever printed -----------------------------------------------------------------


def test_no_command_prints_a_storage_password(tmp_path, pg_url, capfd):
    url = pg_url  # with the test server's own password (tests/pg.py), which the server checks
    password = sqlalchemy.engine.make_url(url).password
    spec = tmp_path / "secret.yaml"
    spec.write_text(yaml.safe_dump({
        "name": "secret", "n_trials": 2, "storage": url, "baselines": False,
        "space": {"model": {"n_layer": 2}, "value_residual": {"mode": ["vanilla", "resformer"]}},
        "objectives": ["val_loss", "n_params"], "sampler": {"type": "random"},
        "base": {**TINY_BASE, "train": {**TINY_BASE["train"], "steps": 4, "eval_every": 2}},
        "artifacts": str(tmp_path / "artifacts")}))
    outputs = []

    def run(*args: str) -> int:
        """The command in-process, as `nas` runs it; everything it printed, to any stream (the
        file descriptors too: a library's logger), kept for the check."""
        code = main(list(args))
        captured = capfd.readouterr()
        outputs.append(captured.out + captured.err)
        return code

    def ok(*args: str) -> None:
        assert run(*args) == 0, outputs[-1]

    one_thread = ("--no-progress", "--threads", "1")  # this process's torch as it was
    ok("search", str(spec), *one_thread)
    ok("report", str(spec), "--out", str(tmp_path / "report.html"))
    ok("export", str(spec), "--best", "1", "--out", str(tmp_path / "export"))
    ok("analyze", str(spec), "--trial", "0")
    ok("search", str(spec), "--storage", url, *one_thread)  # done: prints the front
    # the password as a query parameter, which psycopg reads as well: a report, and a warm
    # start whose stored origin names the storage
    query_url = url.replace(f":{password}@", "@") + f"&password={password}"
    ok("report", str(spec), "--storage", query_url, "--out", str(tmp_path / "query.html"))
    warm = tmp_path / "warm.yaml"
    warm.write_text(yaml.safe_dump({**yaml.safe_load(spec.read_text()), "name": "warm",
                                    "n_trials": 1, "storage": query_url,
                                    "warm_start": {"study": "secret", "storage": query_url}}))
    ok("search", str(warm), *one_thread)

    # a server: its own process
    log = tmp_path / "dashboard.log"
    server = start("dashboard", str(spec), "--port", "0", "--refresh", "0", log=log)
    try:
        address = wait_for(lambda: re.search(r"(http://\S+)/dashboard/studies/(\d+)",
                                             log.read_text()), server, log, "its address")
        with urllib.request.urlopen(f"{address[1]}/api/studies/{address[2]}", timeout=30) as r:
            page = r.read().decode()  # the study as the dashboard serves it, note included
    finally:
        server.terminate()
        server.wait(timeout=30)
    startup = log.read_text()
    assert "for study 'secret' (postgresql" in startup and ":***@" in startup  # masked
    assert "Search space" in page
    outputs += [startup, page]

    for bad in ("postgresql://user:s3cretpw@127.0.0.1:1/db",
                "postgresql://user:s3cretpw@127.0.0.1:notaport/db",
                "postgresql://user:s3cr@etpw@127.0.0.1:1/db",
                "postgresql://user@127.0.0.1:1/db?password=s3cretpw",
                "postgresql://user:***@127.0.0.1:1/db?sslmode=disable&password=s3cretpw"):
        for command in (["search", str(spec)], ["report", str(spec), "--out",
                                                str(tmp_path / "r.html")],
                        ["export", str(spec), "--best", "1", "--out", str(tmp_path / "x")],
                        ["dashboard", str(spec), "--port", "0"]):
            assert run(*command, "--storage", bad) == 2, outputs[-1]
            assert len(outputs[-1].strip().splitlines()) == 1, outputs[-1]

    written = [p.read_text() for p in [tmp_path / "report.html", tmp_path / "query.html",
                                       *(tmp_path / "export").iterdir()]]
    storage = make_storage(url)  # every attribute stored, the warm start's origin included
    for name in ("secret", "warm"):
        study = optuna.load_study(study_name=name, storage=storage)
        system = storage.get_study_system_attrs(storage.get_study_id_from_name(name))
        written.append(repr([study.user_attrs, system,
                             [(t.user_attrs, t.system_attrs) for t in study.trials]]))
    assert any("warm_start" in text and "password=***" in text for text in written)
    leaks = [text for text in outputs + written
             if any(piece in text for piece in (password, PASSWORD, "s3cr", "etpw"))]
    assert not leaks, leaks[0][-2000:]


@pytest.mark.parametrize("url,secret", [
    ("postgresql://nas:s3cretpw@db.example/nas", "s3cretpw"),
    ("postgresql+psycopg://nas:s3cr@etpw@db.example:5432/nas", "s3cr@etpw"),  # an unquoted @
    ("postgresql://nas@db.example/nas?password=s3cretpw", "s3cretpw"),
    ("postgresql://db.example/nas?user=nas&password=s3cretpw&sslmode=require", "s3cretpw"),
    ("postgresql://nas@db.example/nas?sslpassword=s3cretpw", "s3cretpw"),
    ("postgresql://nas:***@db.example/nas?password=s3cretpw", "s3cretpw"),  # beside a mask
    ("postgresql://nas@db.example/nas?password=s3cr%40etpw", "s3cr@etpw"),  # percent-encoded
    ("mysql+pymysql://nas@db.example/nas?passwd=s3cretpw", "s3cretpw"),
    ("postgresql://nas@db.example/nas?PASSWORD='s3cretpw'", "s3cretpw"),
])
def test_redaction_masks_every_place_a_password_sits(url, secret):
    from nas.search.storage import redact

    # a driver's error quotes the URL, its settings as a libpq DSN, and the password alone
    error = (f"could not connect to {url}: host=db.example user=nas password={secret} "
             f"dbname=nas; password authentication failed ({secret})")
    pieces = {secret, *(secret.split("@") if url.count("@") > 1 else ())}
    for text in (redact(url), redact(url, error)):
        assert not any(piece in text for piece in pieces), text
        assert "***" in text
    assert redact("sqlite:///runs/x.db") == "sqlite:///runs/x.db"  # nothing to mask


@pytest.mark.parametrize("signum,status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)],
                         ids=["SIGINT", "SIGTERM"])
def test_the_dashboard_exits_130_on_ctrl_c_and_143_on_sigterm(tmp_path, signum, status):
    storage = f"sqlite:///{tmp_path}/board.db"
    optuna.create_study(study_name="board", storage=storage,
                        directions=["minimize", "minimize"])
    spec = tmp_path / "board.yaml"
    spec.write_text(yaml.safe_dump({"name": "board", "storage": storage, "base": TINY_BASE,
                                    "space": {"model": {"n_layer": [2]}}}))
    log = tmp_path / "dashboard.log"
    server = start("dashboard", str(spec), "--port", "0", "--refresh", "0", log=log)
    try:
        wait_for(lambda: "/dashboard/studies/" in log.read_text(), server, log, "its address")
        server.send_signal(signum)
        assert server.wait(timeout=60) == status, log.read_text()
    finally:
        if server.poll() is None:
            server.kill()
    last = log.read_text().strip().splitlines()[-1]
    assert last == f"nas dashboard: interrupted ({'Ctrl+C' if status == 130 else 'SIGTERM'})"

"""A study cannot silently mix measurements: its stored fingerprint (objectives, max_params, the
space with its base, and the validation and test tokens) refuses a resume that changes any of
them, lets a moved but identical corpus resume, is waited for by a worker that loads the study
before its creator wrote it, and is adopted by a study from before fingerprints (the committed
database, on a copy). Real SQLite files, tiny models; the bad-input side (exit 2, one line, the
file unchanged) is in tests/test_bad_input.py."""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest

import nas.search.study
from nas.cli import main
from nas.errors import ConfigError
from nas.search.spec import data_fingerprint, load_spec
from nas.search.storage import make_storage
from nas.search.study import FINGERPRINT, fingerprint, open_study
from nas.search.trials import OBJECTIVES
from tests.helpers import ROOT, write_spec

pytestmark = pytest.mark.slow  # trains, serves or kills: make test-fast leaves it out

CORPUS = "some text to train a tiny model on, long enough for its three splits. " * 100
ONE_TRIAL = {"n_trials": 1, "baselines": False, "sampler": {"type": "random"},
             "space": {"model": {"n_layer": 2}, "value_residual": {"mode": ["vanilla"]}}}


def stored(db: Path, name: str) -> tuple[dict, list]:
    """A study's attributes and its trials as a resume may not change them."""
    study = optuna.load_study(study_name=name, storage=make_storage(f"sqlite:///{db}"))
    return study.user_attrs, [(t.number, t.state, t.values, t.params) for t in study.trials]


def test_a_moved_corpus_resumes_and_other_data_is_refused(tmp_path, capsys):
    first, moved, other = tmp_path / "a" / "corpus.txt", tmp_path / "b" / "corpus.txt", \
        tmp_path / "other.txt"
    for path, text in ((first, CORPUS), (moved, CORPUS), (other, CORPUS.upper())):
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    spec = write_spec(tmp_path, **ONE_TRIAL)
    assert main(["search", str(spec), "--data", str(first), "--no-progress"]) == 0
    attrs, trials = stored(tmp_path / "tiny.db", "tiny")
    assert set(attrs[FINGERPRINT]) == {"objectives", "max_params", "space", "data"}
    assert [state for _, state, _, _ in trials] == [optuna.trial.TrialState.COMPLETE]

    # The same tokens at another path: the same study, which is done.
    assert main(["search", str(spec), "--data", str(moved), "--no-progress"]) == 0
    assert stored(tmp_path / "tiny.db", "tiny") == (attrs, trials)
    capsys.readouterr()

    # Other tokens: refused, naming what changed, with nothing stored changed.
    assert main(["search", str(spec), "--data", str(other), "--no-progress"]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"nas search: error: {spec}: data.source: the validation and test "
                           f"data of '{other}' differ from those the stored study 'tiny'")
    assert stored(tmp_path / "tiny.db", "tiny") == (attrs, trials)


def test_a_worker_waits_for_the_fingerprint_of_a_study_created_a_moment_ago(tmp_path,
                                                                             monkeypatch):
    (tmp_path / "other.txt").write_text(CORPUS.upper())
    creator = load_spec(write_spec(tmp_path, **ONE_TRIAL))
    joiner = load_spec(write_spec(tmp_path, **ONE_TRIAL), data=str(tmp_path / "other.txt"))
    url = f"sqlite:///{tmp_path}/tiny.db"
    # Created, with its fingerprint still to come: what a worker sees that loads the study
    # between its creator's create_study and the creator's next write.
    optuna.create_study(study_name="tiny", storage=make_storage(url),
                        directions=[OBJECTIVES[o] for o in creator.objectives])
    # The creator writes its fingerprint once the joiner has looked, found none and begun to
    # wait (its first pause between two looks): the order of events, not a delay.
    looked, written = threading.Event(), threading.Event()

    def pause(seconds: float) -> None:
        looked.set()
        time.sleep(seconds)

    monkeypatch.setattr(nas.search.study, "time",
                        SimpleNamespace(monotonic=time.monotonic, sleep=pause))

    def finish_creating() -> None:
        looked.wait(timeout=300)
        study = optuna.load_study(study_name="tiny", storage=make_storage(url))
        study.set_user_attr(FINGERPRINT, fingerprint(creator, data_fingerprint(creator)))
        written.set()

    writer = threading.Thread(target=finish_creating)
    writer.start()
    try:
        # Without the wait it would find no fingerprint and adopt its own other data.
        with pytest.raises(ConfigError, match="data.source: the validation and test data"):
            open_study(joiner, echo=lambda *_: None)
        # refused against the creator's fingerprint, so only once it was written
        assert written.is_set()
    finally:
        looked.set()  # a joiner that never waited must not leave the writer waiting
        writer.join()


def test_a_study_from_before_fingerprints_adopts_one_on_its_first_search(tmp_path, capsys):
    spec = ROOT / "studies" / "resformer_scaling.yaml"
    copy = tmp_path / "results.db"
    # A consistent copy of the committed database (a search may be writing to it), read-only.
    source = ROOT / "docs" / "results" / "resformer_scaling.db"
    with contextlib.closing(sqlite3.connect(f"file:{source}?mode=ro", uri=True)) as src, \
            contextlib.closing(sqlite3.connect(copy)) as dst:
        src.backup(dst)
    attrs, trials = stored(copy, "resformer_scaling")
    assert FINGERPRINT not in attrs and trials  # a study from before fingerprints

    # Reading commands never write: a study without a fingerprint reads as it is.
    assert main(["export", str(spec), "--storage", f"sqlite:///{copy}", "--best", "1",
                 "--out", str(tmp_path / "export")]) == 0
    assert stored(copy, "resformer_scaling") == (attrs, trials)

    capsys.readouterr()
    assert main(["search", str(spec), "--storage", f"sqlite:///{copy}", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert out.count("predates fingerprints") == 1, out
    adopted, after = stored(copy, "resformer_scaling")
    assert after == trials and adopted == {**attrs, FINGERPRINT: adopted[FINGERPRINT]}
    assert set(adopted[FINGERPRINT]) == {"objectives", "max_params", "space", "data"}

    assert main(["search", str(spec), "--storage", f"sqlite:///{copy}", "--no-progress"]) == 0
    assert "predates fingerprints" not in capsys.readouterr().out  # adopted once
    (tmp_path / "other.txt").write_text(CORPUS * 100)
    assert main(["search", str(spec), "--storage", f"sqlite:///{copy}", "--no-progress",
                 "--data", str(tmp_path / "other.txt")]) == 2
    assert "data.source" in capsys.readouterr().err
    assert stored(copy, "resformer_scaling") == (adopted, trials)

"""Calls to a database server that cannot double, against the real PostgreSQL server of
tests/pg.py: a commit that lands just before its connection is lost (the server's answer never
arrives) is not made a second time, whether it created a trial or told one's result; and workers
starting together on a new database all create or find Optuna's tables."""

from __future__ import annotations

import subprocess
import sys

import optuna
import psycopg
import pytest
import sqlalchemy
from optuna.trial import TrialState

from nas.search.storage import ServerStorage, make_storage

pytestmark = pytest.mark.slow  # trains, serves or kills: make test-fast leaves it out


class LostAnswer:
    """The next commit that writes lands on the server, and then the driver reports its
    connection lost (psycopg's OperationalError), as when the server's answer never arrives:
    the database's own commit wrapped, on the storage's engine."""

    def __init__(self, storage: ServerStorage) -> None:
        self.dialect = storage.engine.dialect
        self.armed = self.fired = self.wrote = False
        self.commit = self.dialect.do_commit

    def __enter__(self) -> LostAnswer:
        sqlalchemy.event.listen(sqlalchemy.orm.Session, "after_flush", self._wrote)
        self.dialect.do_commit = self._do_commit
        self.armed = True
        return self

    def __exit__(self, *exc: object) -> None:
        sqlalchemy.event.remove(sqlalchemy.orm.Session, "after_flush", self._wrote)
        del self.dialect.do_commit

    def _wrote(self, _session, _context) -> None:
        self.wrote = True

    def _do_commit(self, dbapi_connection) -> None:
        self.commit(dbapi_connection)  # landed
        if self.armed and self.wrote:
            self.armed, self.fired = False, True
            raise psycopg.OperationalError("server closed the connection unexpectedly")
        self.wrote = False


@pytest.fixture
def storage(pg_url):
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    storage = make_storage(pg_url)
    assert isinstance(storage, ServerStorage)
    return storage


@pytest.fixture
def study(storage):
    return optuna.create_study(study_name="calls", storage=storage)


def test_a_created_trial_whose_answer_is_lost_is_created_once(storage, study):
    with LostAnswer(storage) as lost:
        trial = study.ask()
    assert lost.fired
    trials = study.get_trials(deepcopy=False)
    assert [t.number for t in trials] == [trial.number] == [0]
    assert trials[0].state == TrialState.RUNNING


def test_a_queued_trial_whose_answer_is_lost_is_queued_once(storage, study):
    with LostAnswer(storage) as lost:
        study.enqueue_trial({"x": 1.0})
    assert lost.fired
    assert [t.state for t in study.get_trials(deepcopy=False)] == [TrialState.WAITING]


def test_a_told_result_whose_answer_is_lost_is_told_once(storage, study):
    trial = study.ask()
    with LostAnswer(storage) as lost:
        study.tell(trial, 1.5)  # made again, Optuna would refuse: the trial is finished
    assert lost.fired
    (stored,) = study.get_trials(deepcopy=False)
    assert stored.state == TrialState.COMPLETE and stored.values == [1.5]


def test_creating_a_study_is_not_made_again(storage):
    with LostAnswer(storage) as lost, pytest.raises(optuna.exceptions.StorageInternalError):
        storage.create_new_study([optuna.study.StudyDirection.MINIMIZE], "once")
    assert lost.fired
    # it landed: the caller finds it, as a worker that lost the race to create it does
    assert optuna.get_all_study_names(storage) == ["once"]


def test_workers_starting_together_on_a_new_database_all_open_it(pg_cluster):
    url = pg_cluster.create_database("t_first_workers")
    opener = ("import sys; from nas.search.storage import make_storage; import optuna; "
              "print(optuna.get_all_study_names(make_storage(sys.argv[1])))")
    workers = [subprocess.Popen([sys.executable, "-c", opener, url], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for _ in range(4)]
    results = [(w.wait(timeout=300), *w.communicate()) for w in workers]
    assert [code for code, _, _ in results] == [0] * 4, results
    assert all(out.strip() == "[]" for _, out, _ in results), results

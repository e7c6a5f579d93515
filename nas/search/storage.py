"""Optuna storages from URLs: SQLite (one machine), PostgreSQL or MySQL (many), journal files.

`make_storage` opens one with clear errors (a ConfigError naming the option or spec key), WAL
mode on SQLite and connection timeouts; on a database server, calls ride out a restart
(`ServerStorage`). A dead worker's trial is failed and retried through leases (`nas.search.lease`),
the same on every storage. Knows nothing of torch or of studies.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import fcntl
import functools
import inspect
import os
import random
import re
import secrets
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import optuna
import sqlalchemy
from optuna.storages._rdb import models
from optuna.storages._rdb.storage import _create_scoped_session
from optuna.trial import FrozenTrial, TrialState

from nas.errors import ConfigError, first_line


def journal_path(url: str) -> Path | None:
    """The journal file of a `journal:PATH` URL or a plain path (no scheme), else None."""
    if url.startswith("journal:"):
        return Path(url.removeprefix("journal:"))
    return None if ":" in url else Path(url)


def storage_file(url: str) -> Path | None:
    """The file a storage lives in (the SQLite database or the journal); None for a server."""
    if url.startswith("sqlite:///"):
        db = url.removeprefix("sqlite:///")
        return Path(db) if db and db != ":memory:" else None
    return journal_path(url)


# What a storage keeps beside its file: SQLite's write-ahead log, its index and its rollback
# journal; a journal file's lock.
SIDE_FILES = {"sqlite": ("-wal", "-shm", "-journal"), "journal": (".lock",)}


def side_files(url: str) -> tuple[str, ...]:
    """The suffixes of the files a storage keeps beside its file (`SIDE_FILES`)."""
    return SIDE_FILES["sqlite" if url.startswith("sqlite") else "journal"]


def in_memory(url: str) -> bool:
    """Whether a URL names an in-memory database, which is gone when the process exits:
    `sqlite://`, `sqlite:///:memory:`, SQLite's `file::memory:` and `mode=memory` URIs."""
    if not url.startswith("sqlite"):
        return False
    return storage_file(url) is None or ":memory:" in url or "mode=memory" in url


def check_access(url: str, write: bool, where: str = "--storage") -> None:
    """Refuse a storage file this process cannot read or, with `write` (a search), cannot write,
    or whose folder it cannot write into (SQLite keeps its -wal and -shm files beside the
    database, a journal its lock file): one line before anything starts, not a driver's
    error in the middle of a search. A file still to be created is make_storage's."""
    path = storage_file(url)
    if path is None or not path.exists():
        return
    # access(2), never open(): closing any descriptor of a SQLite file drops every lock this
    # process holds on it, which corrupts a database it has open (SQLite's own warning).
    effective = os.access in os.supports_effective_ids
    for flag, doing in ((os.R_OK, "read"), (os.W_OK, "write"))[:2 if write else 1]:
        if not os.access(path, flag, effective_ids=effective):
            raise ConfigError(f"{where}: cannot {doing} {str(path)!r} (permission denied or a "
                              "read-only file system); a search needs to read and write its "
                              "storage file, the other commands to read it")
    if write and not os.access(path.parent, os.W_OK | os.X_OK, effective_ids=effective):
        raise ConfigError(f"{where}: cannot write in the folder of {str(path)!r}; a search keeps "
                          "files beside its storage file (SQLite's -wal and -shm, a journal's "
                          "lock)")


# scheme://user:PASSWORD@rest: the password runs to the last @, as a password with an unquoted @
# in it would (masking too much is safe; sqlalchemy's parser would show the part after its @).
_PASSWORD = re.compile(r"^(?P<user>[\w+.-]+://[^:/@]*):(?P<password>.*)@(?P<rest>[^@]*)$", re.S)
# A password as a key: a URL's query parameter (`?password=...`, `&sslpassword=...`) or a libpq
# DSN's `password=...` (quoted or not), as drivers echo connection settings.
_PASSWORD_KEY = re.compile(r"(?i)(?P<key>\b(?:ssl)?(?:password|passwd|pwd|pass)\s*=\s*)"
                           r"(?P<value>'(?:[^'\\]|\\.)*'|[^&;\s]*)")


def passwords(url: str) -> list[str]:
    """Every password a storage URL holds, as written and percent-decoded: in its userinfo
    (and each piece of one an unquoted @ split) and in its query parameters."""
    match = _PASSWORD.match(url)
    found = [match["password"], *match["password"].split("@")] if match else []
    found += [m["value"].strip("'") for m in _PASSWORD_KEY.finditer(url)]
    return sorted({form for p in found for form in (p, unquote(p)) if form}, key=len,
                  reverse=True)


def redact(url: str, text: str | None = None) -> str:
    """The storage URL without its passwords (userinfo and query parameters), for every
    message, log line, page and error that names a storage; with `text` (an error raised while
    opening `url`), that text with the URL, any `password=` setting and every password of the
    URL masked. The one place a password is hidden: what prints a URL calls it."""
    match = _PASSWORD.match(url)
    masked = f"{match['user']}:***@{match['rest']}" if match else url
    masked = _PASSWORD_KEY.sub(r"\g<key>***", masked)
    if text is None:
        return masked
    text = _PASSWORD_KEY.sub(r"\g<key>***", text.replace(url, masked))
    for password in passwords(url):
        text = text.replace(password, "***")
    return text


# Seconds a call to a database server keeps being made again while the server is unreachable
# (a restart, a failover) before it fails.
RECONNECT_SECONDS = 60.0


def lost_connection(exc: BaseException | None) -> sqlalchemy.exc.OperationalError | None:
    """The error of a database connection that was ended or refused (a server restarting or
    gone, a network cut) that caused `exc`, if one did: an SQLAlchemy OperationalError in its
    chain, as a traceback would show it."""
    while exc is not None:
        if isinstance(exc, sqlalchemy.exc.OperationalError):
            return exc
        exc = exc.__cause__ if exc.__cause__ or exc.__suppress_context__ else exc.__context__
    return None


Landed = Callable[..., Any]  # what a call did if it landed before its connection was lost


def _made_again_on_lost_connections(method: Callable[..., Any],
                                    landed: Landed | None = None) -> Callable[..., Any]:
    """`method`, made again every second for up to RECONNECT_SECONDS while its connection is
    lost; with `landed` (a call that is not idempotent), first asked whether the lost attempt
    was committed after all (its answer, or None where it was not)."""
    @functools.wraps(method)
    def call(*args: Any, **kwargs: Any) -> Any:
        deadline = time.monotonic() + RECONNECT_SECONDS
        while True:
            try:
                return method(*args, **kwargs)
            except optuna.exceptions.StorageInternalError as exc:
                if lost_connection(exc) is None or time.monotonic() >= deadline:
                    raise
                time.sleep(1.0)
            if landed is not None:
                with contextlib.suppress(optuna.exceptions.StorageInternalError):
                    # unanswered (the server still away): the next attempt asks again
                    if (answer := landed(*args, **kwargs)) is not None:
                        return answer
    return call


TRIAL_TOKEN = "nas:created_by"  # a trial's system attribute: the token of the call creating it
# Not made again: the same call twice is an error or a second study.
NOT_MADE_AGAIN = ("create_new_study", "delete_study")


class ServerStorage(optuna.storages.RDBStorage):
    """Optuna's RDB storage on a database server (PostgreSQL, MySQL) that rides out a restart:
    a call whose connection the server ended or refused is made again every second for up to
    RECONNECT_SECONDS. A server that ends a connection rolls back its open transaction, so a
    failed call mostly wrote nothing; but a commit that landed just before the connection was
    lost reads as failed too. So the calls that are not idempotent are made again only where
    that is safe: a new trial carries a token (`TRIAL_TOKEN`) that is looked for before the
    next attempt; a finished trial's tell is looked up; creating or deleting a study is not
    made again. (The pool's pre-ping replaces connections that ended while idle.)"""

    def _create_new_trial(self, study_id: int,
                          template_trial: FrozenTrial | None = None) -> FrozenTrial:
        # What create_new_trial and Optuna's cache call. One attempt at a time: Optuna's own
        # retries on any StorageInternalError, a lost commit included, which would create the
        # trial twice.
        template = copy.deepcopy(template_trial) if template_trial else FrozenTrial(
            number=-1, state=TrialState.RUNNING, value=None,
            datetime_start=datetime.datetime.now(), datetime_complete=None, params={},
            distributions={}, user_attrs={}, system_attrs={}, intermediate_values={},
            trial_id=-1)  # what Optuna creates without a template, as a template
        template.system_attrs[TRIAL_TOKEN] = secrets.token_hex(16)
        return self._create_once(study_id, template)

    def _create_once(self, study_id: int, template: FrozenTrial) -> FrozenTrial:
        with _create_scoped_session(self.scoped_session) as session:
            # the study row locked: trial numbers are counted inside the transaction
            models.StudyModel.find_or_raise_by_id(study_id, session, for_update=True)
            trial = self._get_prepared_new_trial(study_id, template, session)
            created = copy.deepcopy(template)
            created.number, created.datetime_start = trial.number, trial.datetime_start
            created._trial_id = trial.trial_id
        return created

    def _created(self, study_id: int, template: FrozenTrial) -> FrozenTrial | None:
        token = template.system_attrs[TRIAL_TOKEN]
        return next((t for t in self.get_all_trials(study_id, deepcopy=False)
                     if t.system_attrs.get(TRIAL_TOKEN) == token), None)

    def _told(self, trial_id: int, state: TrialState,
              values: Sequence[float] | None = None) -> bool | None:
        if not state.is_finished():  # a claim of a queued trial: the retry answers it
            return None
        trial = self.get_trial(trial_id)
        told = trial.state == state and (values is None or trial.values == list(values))
        return True if told else None


for _name, _method in vars(optuna.storages.RDBStorage).items():
    if inspect.isfunction(_method) and not _name.startswith("_") and _name not in NOT_MADE_AGAIN:
        _landed = {"set_trial_state_values": ServerStorage._told}.get(_name)
        setattr(ServerStorage, _name, _made_again_on_lost_connections(_method, _landed))
ServerStorage._create_once = _made_again_on_lost_connections(  # type: ignore[method-assign]
    ServerStorage._create_once, landed=ServerStorage._created)


@contextlib.contextmanager
def _folder_lock(db: Path | None) -> Iterator[None]:
    """An exclusive flock(2) on the folder of `db`, held for the block (nothing for no file,
    or where the file system refuses the lock)."""
    if db is None:
        yield
        return
    fd = os.open(db.parent, os.O_RDONLY)
    try:
        with contextlib.suppress(OSError):  # e.g. a network file system without flock
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


SCHEMA_LOCK = 0x6E6173  # "nas": the PostgreSQL advisory lock held while Optuna checks its tables


@contextlib.contextmanager
def _schema_lock(url: str, engine_kwargs: dict[str, Any]) -> Iterator[None]:
    """One process at a time checks and creates Optuna's tables: workers starting together on
    a new database would otherwise race to create them (Optuna checks, then stamps its schema
    version), and the losers fail. On PostgreSQL a session advisory lock holds it; on a SQLite
    file, flock(2) on the database's folder (the file itself may not exist yet, and a lock on
    it would be SQLite's to drop); elsewhere nothing."""
    if url.startswith("sqlite"):
        with _folder_lock(None if in_memory(url) else storage_file(url)):
            yield
        return
    if not url.startswith("postgresql"):
        yield
        return
    engine = sqlalchemy.create_engine(url, **engine_kwargs)
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql(f"SELECT pg_advisory_lock({SCHEMA_LOCK})")
            try:
                yield
            finally:  # (a lost connection has released it already)
                with contextlib.suppress(sqlalchemy.exc.SQLAlchemyError):
                    conn.exec_driver_sql(f"SELECT pg_advisory_unlock({SCHEMA_LOCK})")
    finally:
        engine.dispose()


def make_storage(url: str, where: str = "--storage") -> optuna.storages.BaseStorage:
    """An Optuna storage from a URL: `sqlite:///PATH` (one machine), `postgresql://` or
    `postgresql+psycopg://` (many machines), `mysql+DRIVER://`, or a journal file
    (`journal:PATH` or a plain path). Bad input is a ConfigError naming `where` (the option or
    the spec's key)."""
    journal = journal_path(url)
    if journal is not None:
        try:
            journal.parent.mkdir(parents=True, exist_ok=True)
            return optuna.storages.JournalStorage(
                optuna.storages.journal.JournalFileBackend(str(journal)))
        except OSError as exc:
            raise ConfigError(f"{where}: cannot open journal file {str(journal)!r}: "
                              f"{exc.strerror or exc}") from None
    scheme = url.split("://", 1)[0] if "://" in url else url.split(":", 1)[0]
    if "://" not in url or scheme.split("+")[0] not in ("sqlite", "postgresql", "mysql"):
        raise ConfigError(f"{where}: unknown storage scheme {scheme + ':'!r} in {redact(url)!r};"
                          " allowed: sqlite:///PATH, postgresql+psycopg://USER@HOST/DB, "
                          "mysql+DRIVER://..., journal:PATH or a plain file path")
    if scheme == "postgresql":
        url = "postgresql+psycopg" + url.removeprefix("postgresql")  # psycopg 3 is our driver
    engine_kwargs: dict[str, Any] = {}
    if scheme.startswith("sqlite"):
        db = storage_file(url)
        if db is not None:
            try:
                db.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ConfigError(f"{where}: cannot create the folder of {str(db)!r}: "
                                  f"{exc.strerror or exc}") from None
        # Several workers on one SQLite file wait up to a minute for the write lock.
        engine_kwargs["connect_args"] = {"timeout": 60}
    else:
        engine_kwargs["pool_pre_ping"] = True
        if scheme.startswith("postgresql"):
            engine_kwargs["connect_args"] = {"connect_timeout": 10}
    for attempt in range(2):
        try:
            rdb = optuna.storages.RDBStorage if scheme.startswith("sqlite") else ServerStorage
            with _schema_lock(url, engine_kwargs):
                storage = rdb(url, engine_kwargs=engine_kwargs)
            break
        except Exception as exc:  # sqlalchemy's errors carry multi-line context
            if attempt == 0:
                # Workers that start together on a new database race to create its tables.
                time.sleep(0.5 + random.random())
                continue
            first = first_line(exc)
            raise ConfigError(f"{where}: cannot open {redact(url)!r}: "
                              f"{redact(url, first)}") from None
    if scheme.startswith("sqlite"):
        # Write-ahead logging: readers (the dashboard, waiting workers) never block a writer.
        try:
            with storage.engine.connect() as conn:
                conn.exec_driver_sql("PRAGMA journal_mode=WAL")
        except sqlalchemy.exc.OperationalError:
            pass  # a read-only file: a speed-up only
    return storage

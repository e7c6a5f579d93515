"""Optuna storages from URLs: SQLite (one machine), PostgreSQL or MySQL (many), journal files.

`make_storage` opens one with clear errors (a ConfigError naming the option or spec key), WAL
mode on SQLite and connection timeouts; on a database server, calls ride out a restart
(`ServerStorage`). A dead worker's trial is failed and retried through leases (`nas.lease`), the
same on every storage. Knows nothing of torch or of studies.
"""

from __future__ import annotations

import functools
import inspect
import os
import random
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import optuna
import sqlalchemy

from .config import ConfigError
from .errors import first_line


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


def _made_again_on_lost_connections(method: Callable[..., Any]) -> Callable[..., Any]:
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
    return call


class ServerStorage(optuna.storages.RDBStorage):
    """Optuna's RDB storage on a database server (PostgreSQL, MySQL) that rides out a restart:
    a call whose connection the server ended or refused is made again every second for up to
    RECONNECT_SECONDS. Safe: a server that ends a connection rolls back its open transaction,
    so the failed call wrote nothing. (The pool's pre-ping replaces connections that ended
    while idle.)"""


for _name, _method in vars(optuna.storages.RDBStorage).items():
    if inspect.isfunction(_method) and not _name.startswith("__"):
        setattr(ServerStorage, _name, _made_again_on_lost_connections(_method))


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

"""Optuna storages from URLs: SQLite (one machine), PostgreSQL or MySQL (many), journal files.

`make_storage` opens one with clear errors (a ConfigError naming the option or spec key), WAL
mode on SQLite, connection timeouts, and heartbeats on RDB storages so that a dead worker's trial
is failed and retried. Knows nothing of torch or of studies.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy

from .config import ConfigError

# Heartbeats on RDB storages (seconds; the study spec's `heartbeat` overrides them): a RUNNING
# trial with no heartbeat for grace_period is failed and retried up to max_retry times.
HEARTBEAT = {"interval": 10, "grace_period": 30, "max_retry": 2}


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


def redact(url: str) -> str:
    """The URL without its password, for messages."""
    try:
        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL sqlalchemy can parse: it holds no password either
        return url


def make_storage(url: str, heartbeat: dict[str, int] | None = None,
                 where: str = "--storage") -> optuna.storages.BaseStorage:
    """An Optuna storage from a URL: `sqlite:///PATH` (one machine), `postgresql://` or
    `postgresql+psycopg://` (many machines), `mysql+DRIVER://`, or a journal file
    (`journal:PATH` or a plain path). `heartbeat` (`interval`, `grace_period`, `max_retry`,
    see HEARTBEAT) turns on heartbeats on RDB storages: a trial whose worker stopped beating is
    failed and retried as a new WAITING copy of itself. Bad input is a ConfigError naming
    `where` (the option or the spec's key)."""
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
    extra: dict[str, Any] = {}
    if heartbeat:  # None, False or {}: no heartbeats
        hb = {**HEARTBEAT, **heartbeat}
        extra = {"heartbeat_interval": hb["interval"], "grace_period": hb["grace_period"],
                 "heartbeat_stale_trial_callback":
                     optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=hb["max_retry"])}
    for attempt in range(2):
        try:
            storage = optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, **extra)
            break
        except Exception as exc:  # sqlalchemy's errors carry multi-line context
            if attempt == 0:
                # Workers that start together on a new database race to create its tables.
                time.sleep(0.5 + random.random())
                continue
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConfigError(f"{where}: cannot open {redact(url)!r}: {first}") from None
    if scheme.startswith("sqlite"):
        # Write-ahead logging: readers (the dashboard, waiting workers) never block a writer.
        try:
            with storage.engine.connect() as conn:
                conn.exec_driver_sql("PRAGMA journal_mode=WAL")
        except sqlalchemy.exc.OperationalError:
            pass  # a read-only file: a speed-up only
    return storage

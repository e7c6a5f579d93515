"""Leases: which worker runs each trial, and whether it still lives. Knows nothing of torch.

Every running trial, on every storage (SQLite, PostgreSQL, a journal file), holds a lease: a
system attribute naming its worker (host and pid) and when that worker last renewed it, every
`interval` seconds, from a thread of its own. Any other worker fails a trial whose worker is gone
(a dead pid on this host) or whose lease went unrenewed for `grace_period` seconds, and queues a
retry of it (Optuna's `RetryHeartbeatStaleTrialCallback`, up to `max_retry` times), as Optuna's
heartbeats do on RDB storages only. Expiry is judged on the reclaiming worker's own clock (a
lease it has seen unchanged for `grace_period`), so clocks that differ between machines never
fail a live trial.

Also here, for sharing a host's cores: the `nas search` workers alive on this host.
"""

from __future__ import annotations

import copy
import os
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState
from pydantic import Field, model_validator
from pydantic.dataclasses import dataclass

from nas.errors import first_line
from nas.parsing import STRICT, Refusal, refuse
from nas.search.trials import TrialRecord, record_attrs

HEARTBEAT_MAX = 10**6  # seconds (11 days) or retries; a thread's wait holds no more than ~2**53
SECONDS = Refusal(f"must be an integer in 1..{HEARTBEAT_MAX} (seconds for interval and "
                  "grace_period), got {value!r}")


@dataclass(config=STRICT)
class Heartbeat:
    """A study spec's `heartbeat` section: a worker renews its trial's lease every `interval`
    seconds; a lease unrenewed for `grace_period` seconds is expired, and its trial failed and
    retried up to `max_retry` times. grace_period is at least twice interval: a renewal may come
    up to one interval late, plus the time the write takes."""

    interval: Annotated[int, SECONDS] = Field(10, ge=1, le=HEARTBEAT_MAX)
    grace_period: Annotated[int, SECONDS] = Field(30, ge=1, le=HEARTBEAT_MAX)
    max_retry: Annotated[int, Refusal(f"must be an integer in 0..{HEARTBEAT_MAX}, got "
                                      "{value!r}")] = Field(2, ge=0, le=HEARTBEAT_MAX)

    @model_validator(mode="after")
    def _grace_outlasts_a_late_renewal(self) -> Heartbeat:
        if self.grace_period < 2 * self.interval:
            # less grace would fail live trials as dead
            raise refuse(f"must be at least twice heartbeat.interval ({self.interval} s), got "
                         f"{self.grace_period}: a live worker's lease may be renewed an "
                         "interval late", key="grace_period")
        return self

KEY = "lease"  # the trial system attribute
RETRY_SECONDS = 1.0  # between attempts to renew a lease whose last renewal failed


def _pid_namespace() -> str | None:
    # Containers sharing a host name (host networking) may have their own pid namespaces; a pid
    # means something only in its own.
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


PID_NAMESPACE = _pid_namespace()


def worker_name() -> str:
    """This worker as a trial records it: `host:pid`."""
    return f"{socket.gethostname()}:{os.getpid()}"


def alive(pid: int) -> bool:
    """Whether process `pid` (of this pid namespace) still runs; a zombie (killed, not yet reaped
    by its parent) does not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True  # no /proc to ask: it exists
    return state not in ("Z", "X")


def _gone(lease: dict[str, Any]) -> bool:
    """Whether the lease's worker ran on this host, in this pid namespace, and is dead."""
    host, _, pid = str(lease.get("worker", "")).rpartition(":")
    return (host == socket.gethostname() and lease.get("pidns") == PID_NAMESPACE
            and pid.isdigit() and not alive(int(pid)))


def _first_line(exc: BaseException) -> str:
    # Optuna wraps a database error in StorageInternalError; the cause names what failed.
    cause = exc.__cause__ or exc
    return f"{type(cause).__name__}: {first_line(cause)}" if str(cause).strip() else type(
        cause).__name__


class TrialLost(BaseException):
    """Another worker failed this worker's running trial, its lease taken for expired (the
    worker was frozen, or its storage unreachable, for longer than grace_period). Not an
    Exception: Optuna records nothing for it (the trial is already FAIL and read-only) and hands
    it to `nas.search.worker`, which drops the trial with one line and goes on."""

    @classmethod
    def of(cls, failed: TrialRecord) -> TrialLost:
        """The TrialLost of trial `failed`, with the reason the other worker recorded."""
        return cls(f"trial {failed.number}: failed by another worker "
                   f"({failed.failure or failed.state.name}); this worker drops it")


class Lease:
    """The lease of one running trial, renewed every `interval` seconds by a thread while the
    `with` block runs (the first renewal before the block starts).

    A renewal that fails (a locked SQLite file, a dropped PostgreSQL connection, a full disk) is
    retried every RETRY_SECONDS, never given up: one line to `echo` when renewals start failing
    and one when one succeeds again. A renewal that finds the trial finished (another worker
    failed it) stops the thread, and `check()` raises TrialLost in the worker."""

    def __init__(self, trial: optuna.Trial, interval: float, echo: Callable[[str], None]):
        self.trial, self.interval, self.echo = trial, interval, echo
        self.lost = False
        self._failing = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew_until_stopped, daemon=True,
                                        name=f"lease-trial-{trial.number}")

    def __enter__(self) -> Lease:
        self._renew()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _renew_until_stopped(self) -> None:
        while not self._stop.wait(RETRY_SECONDS if self._failing else self.interval):
            if not self._renew():
                return

    def _renew(self) -> bool:
        """One renewal; False once the trial is lost."""
        lease = {"worker": worker_name(), "pidns": PID_NAMESPACE,
                 "renewed": datetime.now(timezone.utc).isoformat(timespec="milliseconds")}
        try:
            # What Optuna's own heartbeat thread writes through: the trial's storage and id.
            self.trial.storage.set_trial_system_attr(self.trial._trial_id, KEY, lease)
        except UpdateFinishedTrialError:
            self.lost = True
            return False
        except Exception as exc:
            if not self._failing:
                self.echo(f"trial {self.trial.number}: renewing its lease failed "
                          f"({_first_line(exc)}); retrying every {RETRY_SECONDS:g} s")
            self._failing = True
            return True
        if self._failing:
            self.echo(f"trial {self.trial.number}: lease renewed again")
            self._failing = False
        return True

    def check(self) -> None:
        """Raise TrialLost if another worker has failed this trial."""
        if self.lost:
            raise self.lost_trial()

    def lost_trial(self) -> TrialLost:
        """The TrialLost for this trial, with the reason the other worker recorded."""
        return TrialLost.of(TrialRecord.from_trial(
            self.trial.storage.get_trial(self.trial._trial_id)))


def failed_by_another_worker(trial: optuna.Trial) -> TrialLost | None:
    """The TrialLost for this worker's `trial` if another worker failed it as lost (its lease
    taken for expired, by a Reclaimer), else None."""
    record = TrialRecord.from_trial(trial.storage.get_trial(trial._trial_id))
    lost = record.state == TrialState.FAIL and (record.failure or "").startswith("lost: ")
    return TrialLost.of(record) if lost else None


class Reclaimer:
    """Fails the running trials of dead workers and queues their retries. One per worker
    process: it remembers when it first saw each lease, to judge expiry on its own clock."""

    def __init__(self, grace_period: float, max_retry: int):
        self.grace, self.max_retry = grace_period, max_retry
        self.retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=max_retry)
        self.seen: dict[int, tuple[Any, float]] = {}  # trial number -> (lease, first seen)

    def reclaim(self, study: optuna.Study) -> list[str]:
        """Fail every expired trial of `study`; one line per trial failed."""
        now = time.monotonic()
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        self.seen = {t.number: self.seen[t.number] for t in running if t.number in self.seen}
        lines = []
        for t in running:
            why = self._expired(t, now)
            if why is not None and (line := self._fail(study, t, why)):
                lines.append(line)
        return lines

    def _expired(self, trial: FrozenTrial, now: float) -> str | None:
        lease = trial.system_attrs.get(KEY)
        if lease and _gone(lease):
            return f"its worker {lease['worker']} is gone"
        first = self.seen.get(trial.number)
        if first is None or first[0] != lease:
            self.seen[trial.number] = (lease, now)
            return None
        held = now - first[1]
        if held < self.grace:
            return None
        if lease:
            return (f"its worker {lease['worker']} did not renew its lease for {held:.0f} s "
                    f"(grace_period {self.grace:g} s)")
        # Its worker died between taking the trial and writing the first lease.
        return f"no worker took its lease in {held:.0f} s (grace_period {self.grace:g} s)"

    def _fail(self, study: optuna.Study, trial: FrozenTrial, why: str) -> str | None:
        """Fail `trial` and queue its retry; None if it finished meanwhile (its worker ended
        it, or another worker failed it first: a finished trial is read-only everywhere)."""
        storage = study._storage  # what Optuna's own fail_stale_trials fails trials through
        try:
            # Through the storage: an optuna.Trial of another worker's trial would run the
            # sampler's before_trial on it.
            for key, value in record_attrs(failure=f"lost: {why}").items():
                storage.set_trial_user_attr(trial._trial_id, key, value)
            storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        except UpdateFinishedTrialError:
            return None
        failed = storage.get_trial(trial._trial_id)
        # The retry inherits what the trial was queued with, not its lease or measurements.
        retry = copy.deepcopy(failed)
        retry.user_attrs = TrialRecord.from_trial(failed).queued_attrs()
        retry.system_attrs = {k: v for k, v in failed.system_attrs.items() if k != KEY}
        self.retry(study, retry)
        # RetryHeartbeatStaleTrialCallback's rule: at most max_retry retries of one trial.
        retried = len(failed.system_attrs.get("retry_history", [])) < self.max_retry
        return (f"trial {trial.number} failed: lost: {why}; "
                + ("a retry of it is queued" if retried
                   else f"not retried again (max_retry {self.max_retry})"))


def cores() -> int:
    """The CPU cores this process may run on (its affinity: taskset, a cgroup's cpuset)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


class HostWorkers:
    """The `nas search` workers alive on this host: each holds, while the `with` block runs, a
    file named by its pid in one folder ($RESFORMER_NAS_WORKERS, default a folder of this user's
    in the system's temporary folder); a killed worker's file is removed by the next count."""

    def __init__(self) -> None:
        default = Path(tempfile.gettempdir()) / f"resformer-nas-workers-{os.getuid()}"
        self.folder = Path(os.environ.get("RESFORMER_NAS_WORKERS") or default)
        self.mine = self.folder / str(os.getpid())

    def __enter__(self) -> HostWorkers:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.mine.touch()
        return self

    def __exit__(self, *exc: object) -> None:
        self.mine.unlink(missing_ok=True)

    def count(self) -> int:
        n = 0
        for entry in self.folder.iterdir():
            if not entry.name.isdigit():
                continue
            if alive(int(entry.name)):
                n += 1
            else:
                entry.unlink(missing_ok=True)
        return max(n, 1)

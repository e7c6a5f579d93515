"""The worker loop of `nas search`: open or resume the study, then run trials until it holds
`n_trials` finished ones, however many workers share it.

Only COMPLETE and PRUNED trials count toward `n_trials`; a failed trial (diverged, raised or
interrupted, with the reason in its `failure` attribute, or lost with its worker) stays in the
study as FAIL and another trial takes its slot. On every storage, leases (`nas.search.lease`) fail a
dead worker's trial and queue a retry of it; `Objective._claim_slot` and `Gate` keep the workers
from running more than `n_trials`, and a worker that stops short of it says why (SearchError),
as one that lost its database server for longer than it waits for it does.
Ctrl+C, SIGTERM and a preemption notice (`nas.interrupt`) fail the running trial and stop the
worker, in a trial or in the gate's wait. Terminal output lives in `nas.search.console`. Knows
nothing of torch (it only sets the thread count: `CoreShare`).
"""

from __future__ import annotations

import contextlib
import functools
import os
import secrets
import time
from collections.abc import Callable, Iterator

import optuna
from optuna.trial import TrialState

from nas.errors import first_line
from nas.interrupt import CTRL_C
from nas.search import lr_sweep
from nas.search.artifacts import artifact_dir
from nas.search.console import TrialPrinter
from nas.search.lease import (
    Heartbeat,
    HostWorkers,
    Reclaimer,
    TrialLost,
    cores,
    failed_by_another_worker,
)
from nas.search.objective import Objective
from nas.search.samplers import auto_kind, make_sampler
from nas.search.spec import StudySpec, check_trainable
from nas.search.storage import lost_connection, redact
from nas.search.study import (
    FINISHED,
    check_outputs,
    finished_count,
    open_study,
    own_trials,
    resolve_storage,
)
from nas.search.trials import TrialRecord

MAX_FAILURES = 5  # a worker stops after this many of its trials failed in a row


def worker_seed_offset(study_storage_has_running: bool, worker_id: int | None) -> int:
    """Workers must not share a sampler seed, or their random start-up trials repeat: the seed
    is the spec's plus --worker-id; without it, plus 0 for a worker alone on its study (a
    reproducible run) and plus a random offset for one joining running workers."""
    if worker_id is not None:
        return worker_id
    return secrets.randbelow(2**31) + 1 if study_storage_has_running else 0


class SearchError(RuntimeError):
    """A worker stopped short of its target: its trials kept failing, --timeout ran out, or its
    storage was lost (the CLI exits with status 1 and says which)."""


class Gate:
    """Decides, before each trial of one worker, whether to start it, wait or stop; an Optuna
    callback after each trial, and the check before the first.

    Every check first fails the running trials of dead workers (`nas.search.lease.Reclaimer`), which
    queues their retries. With a target, a worker stops once the study holds `target` finished
    trials. While running trials of other workers hold the remaining slots it waits, as long as
    their leases live: each such trial finishes (the study may be done), fails (this worker
    takes its slot) or loses its worker (its lease expires, and this worker runs its retry). A
    worker that stops short of the target sets `short` to why: --timeout ran out, or
    MAX_FAILURES of its trials failed in a row (a bug or a broken machine)."""

    def __init__(self, target: int | None, lease: Heartbeat, timeout: float | None,
                 echo: Callable[[str], None],
                 queue: Callable[[optuna.Study], int] | None = None, listed: bool = False):
        self.target, self.timeout, self.echo = target, timeout, echo
        self.deadline = time.monotonic() + timeout if timeout else float("inf")
        self.interval = lease.interval
        self.reclaimer = Reclaimer(lease.grace_period, lease.max_retry)
        self.failures: list[str] = []
        self.short: str | None = None
        # A queue-driven study (an lr sweep, nas.search.lr_sweep; a derived study's fixed list,
        # `listed`: nas confirm) trains only queued trials: `queue` adds what has become due,
        # a worker with nothing queued waits for running trials, and the study is done when
        # nothing is queued or running (n_trials is then a bound).
        self.queue = queue
        self.listed = listed  # the queue is a fixed list (a derived study's), not a protocol's
        self.done_said = False

    def ready(self, study: optuna.Study) -> bool:
        """True when this worker should start a trial now; may wait (see the class)."""
        waiting = False
        while True:
            for line in self.reclaimer.reclaim(study):
                self.echo(line)
            timed_out = time.monotonic() >= self.deadline
            if self.target is None:
                return not timed_out
            queued = self.queue(study) if self.queue else 0
            trials = own_trials(study, (*FINISHED, TrialState.RUNNING, TrialState.WAITING))
            states = [t.state for t in trials]
            finished = sum(s in FINISHED for s in states)
            running = states.count(TrialState.RUNNING)
            queued += states.count(TrialState.WAITING)
            if finished >= self.target:
                # a copy of a trial left queued (`lr_sweep.earlier_copy`) is taken, to end
                # surplus, rather than left waiting in the study
                return self.queue is not None and any(
                    lr_sweep.earlier_copy(trials, t.number, lr_sweep.queued_params(t)) is not None
                    for t in trials if t.state == TrialState.WAITING)
            if timed_out:
                return self._stop_short(finished, f"--timeout {self.timeout:g} s ran out; run "
                                        "the same command again to go on")
            if finished + running < self.target and (queued or not self.queue):
                return True
            if not running:  # under a queue: nothing queued, and no running trial to queue more
                if not self.done_said:
                    self.echo(f"the queue is done: {finished} finished trial(s)" if self.listed
                              else f"the lr_sweep is done: {finished} finished trial(s), every "
                              "arm's choice interior to its rates or at the extension's limit")
                    self.done_said = True
                return False
            if not waiting:
                self.echo(f"waiting for {running} running trial(s) of other workers to end (a "
                          "dead worker's trial is failed and retried here within grace_period "
                          f"{self.reclaimer.grace:g} s)")
                waiting = True
            time.sleep(max(0.0, min(self.interval, self.deadline - time.monotonic())))

    def _stop_short(self, finished: int, why: str) -> bool:
        self.short = f"stopped with {finished} of n_trials {self.target} finished: {why}"
        return False

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        CTRL_C.check()
        failure = TrialRecord.from_trial(trial).failure or ""
        if trial.state == TrialState.FAIL and not failure.startswith("surplus"):
            self.failures.append(failure or "see the log")
        elif trial.state != TrialState.FAIL:
            self.failures = []
        if len(self.failures) >= MAX_FAILURES:
            self.short = (f"{MAX_FAILURES} trials in a row failed, the last with "
                          f"{self.failures[-1]}; stopping this worker")
            study.stop()
        elif not self.ready(study):
            study.stop()


class CoreShare:
    """Sets torch's CPU threads before each trial (an Optuna callback, and a call before the
    first): `threads` when given; else, unless OMP_NUM_THREADS sets them, this host's cores
    divided among its live `nas search` workers, recounted each time as workers come and go
    (oversubscribed threads slow CPU training by an order of magnitude)."""

    def __init__(self, threads: int | None, workers: HostWorkers, echo: Callable[[str], None]):
        self.threads, self.workers, self.echo = threads, workers, echo
        self.current: int | None = None

    def __call__(self, *_: object) -> None:
        if self.threads is None and os.environ.get("OMP_NUM_THREADS"):
            return  # torch took its thread count from it
        n, why = self.threads, None
        if n is None:
            n_cores, n_workers = cores(), self.workers.count()
            n = max(1, n_cores // n_workers)
            why = f"{n_cores} core(s) / {n_workers} nas search worker(s) on this host"
        if n != self.current:
            import torch

            torch.set_num_threads(n)
            self.current = n
            if why:
                self.echo(f"threads: {n} ({why})")


def run_search(spec: StudySpec, storage_url: str | None = None, n_trials: int | None = None,
               timeout: float | None = None, worker_id: int | None = None,
               progress: bool = True, echo: Callable[[str], None] = print,
               threads: int | None = None, force: bool = False) -> optuna.Study:
    """Create or resume the study and run trials; returns the study.

    Without `n_trials`, this worker runs trials until the study holds the spec's n_trials
    finished (COMPLETE or PRUNED) trials, however many workers share it; failed trials
    (diverged, raised, interrupted, lost with their worker) do not count, so another trial
    takes their place. With `n_trials`, it starts that many trials whatever their outcome.
    `force` skips the memory check of the space's draws (`check_trainable`)."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    check_outputs(spec, storage_url)  # before the draws and the data are checked
    check_trainable(spec, force=force)
    where = resolve_storage(spec, storage_url)
    with _stop_if_storage_lost(where):
        offset = worker_id or 0
        study = open_study(spec, storage_url, echo=echo, seed_offset=offset)
        if worker_id is None and study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            # a worker joining others without --worker-id learns it only from the open study
            offset = worker_seed_offset(True, None)
            study.sampler = make_sampler(spec, spec.seed + offset)
        target = spec.n_trials if n_trials is None else None
        queue = (functools.partial(lr_sweep.enqueue_missing, wanted=spec.queue) if spec.queue
                 else functools.partial(lr_sweep.enqueue_pending, space=spec.merged_space,
                                        sweep=spec.lr_sweep, seed=spec.seed)
                 if spec.queue_driven else None)
        gate = Gate(target, spec.heartbeat, timeout, echo, queue, listed=bool(spec.queue))
        done = finished_count(study)
        echo(f"study {spec.name!r} in {redact(where)}: {done} finished trial(s); "
             + (f"running {n_trials} more" if target is None else f"target {target}")
             + (f" (worker seed {spec.seed + offset})" if offset else ""))
        if spec.sampler.type == "auto":
            kind, why = auto_kind(spec)
            echo(f"sampler auto: {kind} ({why})")
        with HostWorkers() as workers:
            share = CoreShare(threads, workers, echo)
            if gate.ready(study):
                printer = TrialPrinter(spec, echo, progress, total=target or n_trials or 0,
                                       study_done=done if target else None)
                objective = Objective(spec, target,
                                      artifact_dir(where, spec.name, spec.artifacts),
                                      lease_interval=spec.heartbeat.interval, echo=printer.note)
                try:
                    _run_trials(study, objective, n_trials, gate, share, printer)
                finally:
                    printer.close()
    if gate.short:
        raise SearchError(gate.short)
    return study


@contextlib.contextmanager
def _stop_if_storage_lost(where: str) -> Iterator[None]:
    """A database server unreachable for longer than a server storage waits for it
    (`nas.search.storage.ServerStorage`) stops the worker with one line (SearchError). Its running
    trial stays RUNNING under its lease, and the same command run again fails and retries it."""
    try:
        yield
    except Exception as exc:
        lost = lost_connection(exc)
        if lost is None:
            raise
        raise SearchError(f"lost its storage {redact(where)}: {redact(where, first_line(lost))};"
                          " run the same command again once it is back") from None


def _run_trials(study: optuna.Study, objective: Objective, n_trials: int | None, gate: Gate,
                share: CoreShare, printer: TrialPrinter) -> None:
    """Optuna's trial loop, entered again after a trial that another worker failed: TrialLost
    from the objective (Optuna records nothing for it), or Optuna refusing to record a trial
    failed after its last write ("Cannot tell a FAIL trial"). This worker drops the trial with
    one line and goes on."""
    share()
    with CTRL_C:
        while n_trials is None or objective.started < n_trials:
            try:
                study.optimize(
                    objective,
                    n_trials=None if n_trials is None else n_trials - objective.started,
                    catch=(Exception,),  # recorded in the trial (state FAIL, attribute `failure`)
                    callbacks=[printer, gate, share],
                    gc_after_trial=True,
                )
                return
            except TrialLost as lost:
                printer.note(str(lost))
            except Exception as exc:
                lost = (failed_by_another_worker(objective.trial)
                        if objective.trial and lost_connection(exc) is None else None)
                if lost is None:
                    raise
                printer.note(str(lost))
            objective.trial = None  # dropped: no later error is about it
            CTRL_C.check()  # a signal that came while the trial was being dropped
            if not gate.ready(study):
                return
            share()

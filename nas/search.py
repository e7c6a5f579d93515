"""The worker loop of `nas search`: open or resume the study, then run trials until it holds
`n_trials` finished ones, however many workers share it.

Only COMPLETE and PRUNED trials count toward `n_trials`; a failed trial (diverged, raised or
interrupted, with the reason in its `failure` attribute, or lost with its worker) stays in the
study as FAIL and another trial takes its slot. On RDB storages (SQLite, PostgreSQL) heartbeats
fail a dead worker's trial and queue a retry of it; `Objective._claim_slot` and `Gate` keep the
workers from running more than `n_trials`. Terminal output lives in `nas.console`. Knows
nothing of torch (it only sets the thread count when asked).
"""

from __future__ import annotations

import functools
import secrets
import time
from collections.abc import Callable

import optuna
from optuna.trial import TrialState

from . import lr_sweep
from .artifacts import artifact_dir
from .console import TrialPrinter
from .interrupt import CTRL_C
from .objective import Objective
from .samplers import make_sampler
from .spec import StudySpec, check_trainable
from .storage import HEARTBEAT, journal_path, redact
from .study import FINISHED, finished_count, open_study, resolve_storage

MAX_FAILURES = 5  # a worker stops after this many of its trials failed in a row


def worker_seed_offset(study_storage_has_running: bool, worker_id: int | None) -> int:
    """Workers must not share a sampler seed, or their random start-up trials repeat: the seed
    is the spec's plus --worker-id; without it, plus 0 for a worker alone on its study (a
    reproducible run) and plus a random offset for one joining running workers."""
    if worker_id is not None:
        return worker_id
    return secrets.randbelow(2**31) + 1 if study_storage_has_running else 0


class SearchError(RuntimeError):
    """A worker stopped because its trials kept failing (the CLI exits with status 1)."""


class Gate:
    """Decides, before each trial of one worker, whether to start it, wait or stop; an Optuna
    callback after each trial, and the check before the first.

    With a target, a worker stops once the study holds `target` finished trials. When the
    other workers' RUNNING trials fill the remaining slots, it waits, failing stale trials:
    with heartbeats, such a trial may belong to a dead worker and is then failed and retried
    within grace_period, which a restarted worker picks up. It waits at most grace_period plus
    two heartbeat intervals (live workers finish their own trials, and start another if one
    fails); journal storage has no heartbeats, so there it stops at once. Independently, a worker
    stops after MAX_FAILURES of its trials failed in a row (a bug or a broken machine)."""

    def __init__(self, target: int | None, heartbeat: dict[str, int] | None,
                 timeout: float | None, echo: Callable[[str], None],
                 queue: Callable[[optuna.Study], int] | None = None):
        self.target, self.heartbeat, self.echo = target, heartbeat, echo
        self.deadline = time.monotonic() + timeout if timeout else float("inf")
        self.failures: list[str] = []
        # A queue-driven study (lr_sweep first_seed) trains only queued trials: `queue` adds
        # what has become due, and a worker with nothing queued waits for running trials.
        self.queue = queue

    def ready(self, study: optuna.Study) -> bool:
        """True when this worker should start a trial now; may wait (see the class)."""
        if self.target is None:
            return True
        hb = self.heartbeat
        patience = time.monotonic() + (hb["grace_period"] + 2 * hb["interval"] if hb else 0)
        waiting = False
        while True:
            optuna.storages.fail_stale_trials(study)  # a no-op without heartbeats
            queued = self.queue(study) if self.queue else 0
            states = [t.state for t in study.get_trials(
                deepcopy=False, states=(*FINISHED, TrialState.RUNNING, TrialState.WAITING))]
            finished = sum(s in FINISHED for s in states)
            running = states.count(TrialState.RUNNING)
            queued += states.count(TrialState.WAITING)
            if finished >= self.target:
                return False
            if finished + running < self.target and (queued or not self.queue):
                return True
            # Under a queue, running trials may still queue more: wait for them to end.
            for_queue = self.queue is not None and finished + running < self.target
            if for_queue and not running:
                self.echo(f"the lr_sweep grid is done with {finished} finished trial(s), short "
                          f"of n_trials {self.target}")
                return False
            if time.monotonic() >= (self.deadline if for_queue else min(patience,
                                                                         self.deadline)):
                self.echo(f"{running} trial(s) of other workers hold the last slot(s); "
                          "this worker stops (they finish the study)")
                return False
            if not waiting and hb:
                self.echo(f"waiting up to {hb['grace_period'] + 2 * hb['interval']} s for "
                          f"{running} running trial(s) of other workers (a dead worker's "
                          "trial is retried here)")
                waiting = True
            time.sleep(hb["interval"] if hb else (1 if self.queue else 0))

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        CTRL_C.check()
        failure = trial.user_attrs.get("failure", "")
        if trial.state == TrialState.FAIL and not failure.startswith("surplus"):
            self.failures.append(failure or "see the log")
        elif trial.state != TrialState.FAIL:
            self.failures = []
        if len(self.failures) >= MAX_FAILURES or not self.ready(study):
            study.stop()


def run_search(spec: StudySpec, storage_url: str | None = None, n_trials: int | None = None,
               timeout: float | None = None, worker_id: int | None = None,
               progress: bool = True, echo: Callable[[str], None] = print,
               threads: int | None = None) -> optuna.Study:
    """Create or resume the study and run trials; returns the study.

    Without `n_trials`, this worker runs trials until the study holds the spec's n_trials
    finished (COMPLETE or PRUNED) trials, however many workers share it; failed trials
    (diverged, raised, interrupted, lost with their worker) do not count, so another trial
    takes their place. With `n_trials`, it starts that many trials whatever their outcome."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    check_trainable(spec)
    if threads:
        import torch

        torch.set_num_threads(threads)
    study = open_study(spec, storage_url)
    running = bool(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))
    offset = worker_seed_offset(running, worker_id)
    if offset:
        study.sampler = make_sampler(spec, spec.seed + offset)
    where = resolve_storage(spec, storage_url)
    heartbeat = None if journal_path(where) else {**HEARTBEAT, **spec.heartbeat}
    target = spec.n_trials if n_trials is None else None
    queue = (functools.partial(lr_sweep.enqueue_pending, space=spec.merged_space, seed=spec.seed)
             if spec.lr_sweep == "first_seed" else None)
    gate = Gate(target, heartbeat, timeout, echo, queue)
    done = finished_count(study)
    echo(f"study {spec.name!r} in {redact(where)}: {done} finished trial(s); "
         + (f"running {n_trials} more" if target is None else f"target {target}")
         + (f" (worker seed {spec.seed + offset})" if offset else ""))
    if not gate.ready(study):
        return study
    printer = TrialPrinter(spec, echo, progress, total=target or n_trials or 0,
                           study_done=done if target else None)
    try:
        with CTRL_C:
            study.optimize(
                Objective(spec, target, artifact_dir(where, spec.name, spec.artifacts)),
                n_trials=n_trials,
                timeout=timeout,
                catch=(Exception,),  # recorded in the trial (state FAIL, attribute `failure`)
                callbacks=[printer, gate],
                gc_after_trial=True,
            )
    finally:
        printer.close()
    if len(gate.failures) >= MAX_FAILURES:
        raise SearchError(f"{MAX_FAILURES} trials in a row failed, the last with "
                          f"{gate.failures[-1]}; stopping this worker")
    return study

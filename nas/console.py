"""What `nas search` prints: one line per finished trial above a progress bar, and the front as
a table at the end. Reads trials; never writes them. Knows nothing of torch.
"""

from __future__ import annotations

from collections.abc import Callable

import optuna
from optuna.trial import TrialState

from .spec import StudySpec
from .study import finished_count
from .trials import describe, front


class TrialPrinter:
    """One line per trial of this worker, written above a progress bar of `total` trials (the
    study's finished trials with a target, else this worker's)."""

    def __init__(self, spec: StudySpec, echo: Callable[[str], None], progress: bool,
                 total: int = 0, study_done: int | None = None):
        self.spec, self.echo, self.progress = spec, echo, progress
        self.study_wide = study_done is not None  # else the bar counts this worker's trials
        self.bar = None
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=study_done or 0, unit="trial",
                            dynamic_ncols=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        a = trial.user_attrs
        if a.get("failure", "").startswith("surplus"):
            return
        if self.bar is not None:
            self.bar.n = finished_count(study) if self.study_wide else self.bar.n + 1
            self.bar.refresh()
        label = describe(a) + (" (baseline)" if a.get("baseline") else "")
        params = f"{a['n_params']:>10,}" if "n_params" in a else " " * 10
        if trial.state == TrialState.COMPLETE:
            status = f"val_loss {a['val_loss']:.4f}  {a['tokens_per_s']:>8,.0f} tok/s"
        elif trial.state == TrialState.PRUNED:
            status = f"pruned ({a.get('pruned_reason', 'pruned')})"
        else:
            status = f"failed ({a.get('failure', 'see the log')})"
        line = f"trial {trial.number:>3}  {label:<34} {params} params  {status}"
        if self.progress:
            from tqdm import tqdm

            tqdm.write(line)
        else:
            self.echo(line)


def front_table(study: optuna.Study) -> str:
    rows = front(study)
    title = "Pareto front" if len(study.directions) > 1 else "Best trials"
    if not rows:
        return f"{title}: no completed trials yet"
    head = f"{'trial':>5}  {'plan':<34} {'n_params':>10}  {'val_loss':>8}  {'tok/s':>8}"
    lines = [f"{title} ({len(rows)} trial(s)):", head, "-" * len(head)]
    for t in rows:
        a = t.user_attrs
        lines.append(f"{t.number:>5}  {describe(a):<34} {a['n_params']:>10,}  "
                     f"{a['val_loss']:>8.4f}  {a.get('tokens_per_s', 0):>8,.0f}")
    return "\n".join(lines)

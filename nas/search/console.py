"""What `nas search` prints: one line per finished trial above a progress bar, and the front as
a table at the end. Reads trials; never writes them. Knows nothing of torch.
"""

from __future__ import annotations

from collections.abc import Callable

import optuna
from optuna.trial import TrialState

from nas.search.spec import StudySpec
from nas.search.study import finished_count
from nas.search.trials import TrialRecord, front_rows


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
        a = TrialRecord.from_trial(trial)
        if (a.failure or "").startswith("surplus"):
            return
        if self.bar is not None:
            self.bar.n = finished_count(study) if self.study_wide else self.bar.n + 1
            self.bar.refresh()
        label = a.label + (" (baseline)" if a.baseline else "")
        params = f"{a.n_params:>10,}" if a.n_params is not None else " " * 10
        if trial.state == TrialState.COMPLETE:
            status = f"val_loss {a.val_loss:.4f}  " + (
                f"copy of trial {a.copy_of} (untrained)" if a.copy_of is not None
                else f"{a.tokens_per_s:>8,.0f} tok/s")
        elif trial.state == TrialState.PRUNED:
            status = f"pruned ({a.pruned_reason or 'pruned'})"
        else:
            status = f"failed ({a.failure or 'see the log'})"
        self.note(f"trial {trial.number:>3}  {label:<34} {params} params  {status}")

    def note(self, line: str) -> None:
        """A line of this worker's, written above the progress bar."""
        if self.progress:
            from tqdm import tqdm

            tqdm.write(line)
        else:
            self.echo(line)


def front_table(study: optuna.Study) -> str:
    """The front (nas.search.trials.front_rows: every objective of the study) as aligned columns."""
    rows = front_rows(study)
    title = "Pareto front" if len(study.directions) > 1 else "Best trials"
    if not rows:
        return f"{title}: no completed trials yet"
    widths = {key: max(len(key), *(len(str(r[key])) for r in rows)) for key in rows[0]}
    widths["plan"] = max(widths["plan"], 34)

    def line(cells: dict[str, object]) -> str:
        return "  ".join(str(v).ljust(widths[k]) if k == "plan" else str(v).rjust(widths[k])
                         for k, v in cells.items())

    head = line({key: key for key in rows[0]})
    return "\n".join([f"{title} ({len(rows)} trial(s)):", head, "-" * len(head),
                      *map(line, rows)])

"""The Pareto-aware pruner's rules on synthetic curves, and the pruning benchmark's arithmetic
(no training)."""

import sys
from pathlib import Path

import optuna
import pytest
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState, create_trial

from nas.search.pruning import ParetoPruner, nondominated_ranks

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import pruning as bench  # noqa: E402

STEPS = 100
VALIDATIONS = range(10, STEPS + 1, 10)


def curve_of(final: float, gap: float = 0.0, bend: float = 1.0) -> list[list[float]]:
    """A decreasing curve ending at `final`; `gap` is the extra loss at the first validation,
    shrinking linearly to nothing at the last step (a trial catching up) when nonzero."""
    return [[s, round(final * (1 + bend * (STEPS / s - 1) * 0.1)
                      + gap * (STEPS - s) / (STEPS - 10), 6)] for s in VALIDATIONS]


def completed(study: optuna.Study, n_params: int, curve: list[list[float]],
              tag: str = "", replicates: int = 1) -> None:
    """A completed trial; with `replicates`, one that trained that many seeds (its stored
    steps and curve are replicate 0's, as `nas.search.replicates` stores them)."""
    seeds = {"replicate_seeds": list(range(replicates))} if replicates > 1 else {}
    study.add_trial(create_trial(
        values=[curve[-1][1], n_params], params={"tag": tag or str(len(study.trials))},
        distributions={"tag": CategoricalDistribution([tag or str(len(study.trials))])},
        user_attrs={"n_params": n_params, "curve": curve, "val_loss": curve[-1][1],
                    "steps_trained": curve[-1][0], "config": {"tag": tag or len(study.trials)},
                    **seeds}))


def first_stop(pruner: ParetoPruner, study: optuna.Study, n_params: int,
               curve: list[list[float]]) -> tuple[int | None, str | None]:
    """The step at which `pruner` would stop a trial with this whole curve, and why."""
    for i in range(len(curve)):
        if reason := pruner.reason_to_prune(study, {"n_params": n_params}, curve[:i + 1],
                                            STEPS):
            return curve[i][0], reason
    return None, None


@pytest.fixture
def study() -> optuna.Study:
    """A completed reference trial of 1,000 params that ends at loss 2.0."""
    s = optuna.create_study(directions=["minimize", "minimize"])
    completed(s, 1_000, curve_of(2.0))
    return s


RULES = [ParetoPruner(),  # the default: step rule, patience 2, a trend, from 30% of the steps
         ParetoPruner(rule="step", margin=0.005, min_progress=0.1, patience=2, trend=0),
         ParetoPruner(rule="rungs"),  # rungs at 40, 60 and 80% of the steps, keep 25%
         ParetoPruner(rule="rungs", rungs=(0.3, 0.6, 0.9), keep=0.5)]


@pytest.mark.parametrize("pruner", RULES)
def test_a_trial_that_stays_dominated_is_pruned_by_the_last_rung(study, pruner):
    stop, reason = first_stop(pruner, study, 1_000, curve_of(2.2))  # 10% worse throughout
    assert stop is not None and stop <= 0.9 * STEPS and reason.startswith("pareto:")


@pytest.mark.parametrize("pruner", RULES)
def test_a_trial_that_ends_on_the_front_is_never_pruned(study, pruner):
    # Ahead of the reference from the start, by 2%: it ends on the front at its size.
    assert first_stop(pruner, study, 1_000, curve_of(1.96)) == (None, None)
    # Larger, but lower in loss: the reference does not dominate it either.
    assert first_stop(pruner, study, 2_000, curve_of(1.9)) == (None, None)


@pytest.mark.parametrize("pruner", RULES)
def test_smaller_models_are_never_pruned(study, pruner):
    # Nothing completed has as few parameters: nothing could dominate it.
    assert first_stop(pruner, study, 500, curve_of(2.5)) == (None, None)


def test_the_default_waits_for_curves_to_stop_crossing(study):
    # 2% behind the reference until 20% of the steps, then ahead: the shape of a trial that
    # ended on the front in the benchmark's sequences. Pruning from 10% cuts it.
    reference = study.trials[0].user_attrs["curve"]
    crossing = [[s, v * (1.02 if s <= 20 else 0.99)] for s, v in reference]
    early = ParetoPruner(min_progress=0.1, patience=1, trend=0)
    assert first_stop(early, study, 1_000, crossing)[0] == 10
    assert first_stop(ParetoPruner(), study, 1_000, crossing) == (None, None)
    # A trial 1% behind from the start is over the margin at 30% and 40% of its steps: stopped
    # at the second (patience 2), and the reason names the reference.
    stop, reason = first_stop(ParetoPruner(), study, 1_000, curve_of(2.02))
    assert stop == 40 and reason.startswith("pareto: val_loss 2.3230 at step 40 is over "
                                            "1.005x trial 0's 2.3000 with no more parameters "
                                            "(2 validations in a row)")
    assert reason.endswith(", and not catching up")
    # The earlier default, margin 0.0025 with patience 1 and trend 1, stops it at 30%.
    aggressive = ParetoPruner(margin=0.0025, patience=1, trend=1)
    assert first_stop(aggressive, study, 1_000, curve_of(2.02))[0] == 30


def test_trend_spares_a_trial_that_is_catching_up(study):
    # 6% behind the reference at step 10, 1% ahead at the end, closing the gap steadily.
    reference = study.trials[0].user_attrs["curve"]
    catching_up = [[s, v * (1.06 - 0.07 * (s - 10) / 90)] for s, v in reference]
    without = ParetoPruner(margin=0.005, min_progress=0.2, patience=1, trend=0)
    assert first_stop(without, study, 1_000, catching_up)[0] == 20
    for trend in (1, 2, 3):
        with_trend = ParetoPruner(margin=0.005, min_progress=0.2, patience=1, trend=trend)
        assert first_stop(with_trend, study, 1_000, catching_up) == (None, None)
    # Falling, but too slowly to end within the margin: stopped all the same.
    slow = [[s, v * (1.06 - 0.01 * (s - 10) / 90)] for s, v in reference]
    assert first_stop(ParetoPruner(margin=0.0025, min_progress=0.2, patience=1, trend=1), study,
                      1_000, slow)[0] == 20


def test_patience_and_margin(study):
    reference = study.trials[0].user_attrs["curve"]
    # 0.4% behind at every validation from step 50 on, except one noisy tie at step 60.
    noisy = [[s, v * (1.0 if s in (40, 60) else 1.004)] for s, v in reference]
    plain = {"min_progress": 0.4, "trend": 0}
    assert first_stop(ParetoPruner(margin=0.0, patience=1, **plain), study, 1_000, noisy)[0] == 50
    assert first_stop(ParetoPruner(margin=0.0, patience=2, **plain), study, 1_000, noisy)[0] == 80
    assert first_stop(ParetoPruner(margin=0.005, patience=1, **plain), study, 1_000,
                      noisy) == (None, None)
    _, reason = first_stop(ParetoPruner(margin=0.002, patience=2, **plain), study, 1_000, noisy)
    assert "over 1.002x trial 0's" in reason and reason.endswith("(2 validations in a row)")
    _, reason = first_stop(ParetoPruner(margin=0.0, patience=1, **plain), study, 1_000, noisy)
    assert "is over trial 0's" in reason


def test_rungs_rank_by_non_dominated_sorting(study):
    assert nondominated_ranks([(1.0, 2), (2.0, 1), (2.0, 2), (3.0, 3)]) == [0, 0, 1, 2]
    pruner = ParetoPruner(rule="rungs", rungs=(0.5,), keep=0.5)
    # At the 0.5 rung the trial ranks behind the reference only: 1 of 2 ahead, not kept.
    stop, reason = first_stop(pruner, study, 1_000, curve_of(2.1))
    assert stop == 50 and "1 of 2 trials rank before" in reason
    # Pruned trials' curves count at the rungs they reached.
    completed(study, 3_000, curve_of(1.5))
    assert first_stop(pruner, study, 1_000, curve_of(2.1))[0] == 50


def test_bad_options_are_type_errors():
    for bad in ({"rule": "median"}, {"patience": 0}, {"trend": -1}, {"trend": 0.5}, {"keep": 0},
                {"rungs": (0.5, 1.5)}, {"colour": "red"}):
        with pytest.raises(TypeError):
            ParetoPruner(**bad)


# -- the benchmark's arithmetic ----------------------------------------------------------------


def test_hypervolume_of_a_staircase():
    # Two points under the reference (3, 30): (1, 10) covers 2 x 10 until n_params 20, then the
    # best loss stays 1 until 30 (the dominated (2, 20) adds nothing): 2 x 20 in all = 40.
    assert bench.hv([(1.0, 10), (2.0, 20)], (3.0, 30)) == pytest.approx(40.0)
    assert bench.hv([(2.0, 10), (1.0, 20)], (3.0, 30)) == pytest.approx(10 + 20)
    assert bench.hv([(4.0, 10)], (3.0, 30)) == 0.0


def test_summary_is_mean_and_worst():
    outcomes = [bench.Outcome(0.5, 0.4, 0.01), bench.Outcome(0.3, 0.2, -0.04),
                bench.Outcome(0.4, 0.35, 0.0)]
    got = bench.summary(outcomes)
    assert got["saved_mean"] == pytest.approx(0.4) and got["saved_worst"] == 0.3
    assert got["beyond_mean"] == pytest.approx(0.95 / 3) and got["beyond_worst"] == 0.2
    assert got["hv_mean"] == pytest.approx(-0.01) and got["hv_worst"] == -0.04


def test_replay_counts_steps_and_keeps_what_the_pruner_lets_complete(study):
    unpruned = optuna.create_study(directions=["minimize", "minimize"])
    completed(unpruned, 1_000, curve_of(2.0), tag="a")
    completed(unpruned, 1_000, curve_of(2.0), tag="a")  # a repeat: no steps in the replay
    completed(unpruned, 2_000, curve_of(2.3), tag="b")  # dominated: stops at step 20
    completed(unpruned, 2_000, curve_of(1.8), tag="c")
    base = unpruned.get_trials()
    pruner = ParetoPruner(margin=0.005, min_progress=0.1, patience=2, trend=0)
    spent, kept = bench.replay(base, pruner, STEPS)
    assert spent == 100 + 20 + 100
    assert sorted(t.user_attrs["val_loss"] for t in kept) == [1.8, 2.0]
    ref = bench.reference_point(base)
    assert ref == pytest.approx((2.3 * 1.01, 2_000 * 1.01))
    outcome = bench.compare(base, spent, kept, ref)
    assert outcome.saved == pytest.approx(1 - 220 / 400)
    # The repeat's 100 steps: an unpruned run that skipped it would spend 300.
    assert bench.repeat_steps(base) == 100
    assert outcome.saved_beyond_repeats == pytest.approx(1 - 220 / 300)
    assert outcome.hv_change == 0.0  # the two dropped trials were off the front
    assert all(t.state == TrialState.COMPLETE for t in kept)



def test_replay_of_replicated_trials_counts_every_seed_a_kept_trial_trains():
    """The pruner watches replicate 0: a trial it stops spent replicate 0's steps up to there;
    one it keeps, and every trial of the unpruned run, its steps on each of its 3 seeds."""
    unpruned = optuna.create_study(directions=["minimize", "minimize"])
    completed(unpruned, 1_000, curve_of(2.0), tag="a", replicates=3)
    completed(unpruned, 2_000, curve_of(2.3), tag="b", replicates=3)  # dominated: stops at 20
    completed(unpruned, 2_000, curve_of(1.8), tag="c", replicates=3)
    base = unpruned.get_trials()
    assert bench.steps_spent(base) == 3 * 300
    pruner = ParetoPruner(margin=0.005, min_progress=0.1, patience=2, trend=0)
    spent, kept = bench.replay(base, pruner, STEPS)
    assert spent == 3 * 100 + 20 + 3 * 100
    assert bench.compare(base, spent, kept, bench.reference_point(base)).saved == \
        pytest.approx(1 - 620 / 900)

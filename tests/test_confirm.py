"""`nas confirm`: fresh seeds (and the refusal of the study's own), the winner's curse and the
paired differences on known numbers, a confirmation on a corpus the tool never saw that `nas
report` then shows, one killed half-way that the same command finishes, and every refusal of
bad input (one line, exit 2, nothing written). Real SQLite storages, tiny models, real
training."""

from __future__ import annotations

import dataclasses
import math
import random
import re
import signal
import sqlite3
from html import escape
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import FixedTrial, TrialState, create_trial

from nas.cli import main
from nas.config import from_dict
from nas.confirm import (
    choose_plans,
    confirmation_spec,
    fresh_seeds,
    load_variants,
    parse_rates,
    plan_entries,
    study_seeds,
)
from nas.errors import ConfigError
from nas.reading.arms import choose_arms, plan_key
from nas.reading.confirmation import Plan, read
from nas.reading.summary import confirmation_sections, sections_markdown
from nas.search.objective import Objective, SurplusTrial
from nas.search.space import sample
from nas.search.spec import StudySpec, load_spec
from nas.search.storage import make_storage
from nas.search.study import open_study
from nas.search.trials import TrialRecord, records
from tests.helpers import TINY_BASE, quiet, run_cli, sweep_trial, tiny
from tests.processes import start, trials, wait_for

pytestmark = pytest.mark.slow  # trains, serves or kills: make test-fast leaves it out

WORDS = "the a value residual layer learns mixes keys queries attention model token".split()


def _spec(folder: Path, corpus: Path, **overrides) -> Path:
    """A tiny two-objective study on `corpus`, without a storage (each test passes its own)."""
    spec = {"name": "tiny",
            "space": {"model": {"n_layer": [2, 3]},
                      "value_residual": {"mode": ["vanilla", "resformer", "learnable"],
                                         "lambda1": {"low": 0.2, "high": 2.0}}},
            "objectives": ["val_loss", "n_params"], "n_trials": 5,
            "base": {**TINY_BASE, "data": {"source": str(corpus)}},
            "sampler": {"type": "tpe", "n_startup_trials": 2}, "seed": 0, **overrides}
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture(scope="module")
def searched(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny study searched once on a text file no test has seen (5 trials): its spec and its
    SQLite file, which each test copies."""
    folder = tmp_path_factory.mktemp("searched")
    rng = random.Random(0)
    corpus = folder / "unseen.txt"
    corpus.write_text(" ".join(rng.choice(WORDS) for _ in range(6000)))
    spec = _spec(folder, corpus)
    quiet(load_spec(spec), f"sqlite:///{folder / 'tiny.db'}", threads=1)
    return spec, folder / "tiny.db"


def _copy(searched, tmp_path) -> tuple[str, str]:
    """The searched study's spec and a copy of its storage (SQLite's backup: the file is in
    WAL mode, its latest pages in the -wal file)."""
    spec, db = searched
    with sqlite3.connect(db) as source, sqlite3.connect(tmp_path / "tiny.db") as copy:
        source.backup(copy)
    return str(spec), f"sqlite:///{tmp_path / 'tiny.db'}"


def _studies(url: str) -> dict[str, list]:
    storage = make_storage(url)
    return {s.study_name: [(t.number, t.state, t.values) for t in
                           optuna.load_study(study_name=s.study_name, storage=storage).trials]
            for s in storage.get_all_studies()}


# -- fresh seeds ---------------------------------------------------------------------------------


def test_fresh_seeds_lie_above_every_seed_the_study_declares_or_ran():
    study = optuna.create_study()
    for seed in (0, 7):
        study.add_trial(create_trial(value=1.0, user_attrs={"config": {"train": {"seed": seed}}}))
    study.enqueue_trial({"train.seed": 9})  # queued, not yet run: its seed is taken too
    assert study_seeds(study, {"train": {"seed": [0, 1, 2]}}) == {0, 1, 2, 7, 9}
    assert study_seeds(study, {"train": {"seed": {"low": 3, "high": 5}}}) == {0, 3, 4, 5, 7, 9}
    used = study_seeds(study, {})
    assert fresh_seeds(used, 3) == [10, 11, 12]
    assert fresh_seeds(used, 2, first=20) == [20, 21]
    assert fresh_seeds(used, 2, first=1) == [1, 2]  # between the study's seeds: fresh too
    with pytest.raises(ConfigError, match=r"--first-seed: seeds 6\.\.8 overlap the study's own "
                                          r"\(7\).*choose 10 or above"):
        fresh_seeds(used, 3, first=6)
    with pytest.raises(ConfigError, match="--seeds: must be at least 2"):
        fresh_seeds(used, 1)


# -- the rate rule -------------------------------------------------------------------------------


def _sweep_spec(tmp_path: Path, train: dict) -> StudySpec:
    spec = {"name": "sweep", "space": {
        "variants": {"vanilla": {"mode": "vanilla"},
                     "identity": {"mode": "resformer", "lambda1": 0.5}},
        "model": {"d_model": [16]}, "train": train},
        "base": {"model": {"n_layer": 4}, "train": {"steps": 10}},
        "sampler": {"type": "bruteforce"}}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return load_spec(path)


def _numbered(frozen: list) -> list[TrialRecord]:
    """The records of sweep trials as a study numbers them, each config with its plan."""
    study = optuna.create_study(directions=["minimize", "minimize"])
    for t in frozen:
        study.add_trial(t)
    return [dataclasses.replace(r, config={**r.config, "value_residual": {"mode": r.mode}})
            for r in records(study.trials)]


def test_a_sweep_confirms_every_plan_and_vanilla_over_its_rates_on_every_fresh_seed(tmp_path):
    grid = [0.001, 0.0014, 0.002]
    spec = _sweep_spec(tmp_path, {"lr": grid, "seed": [0, 1]})
    # identity's arm chose the edge and its extension ran 0.002828 too
    runs = _numbered([sweep_trial(v, 16, lr, s, 2.0 + lr, 3.0) for v in ("vanilla", "identity")
                      for lr in grid for s in (0, 1)]
                     + [sweep_trial("identity", 16, 0.002828, s, 1.9, 3.0) for s in (0, 1)])
    arms = choose_arms(runs)
    chosen = choose_plans(optuna.create_study(), arms, 1, False, None)
    entries = plan_entries(spec, arms, chosen)
    assert [(e["name"], e["rates"]) for e in entries] == [
        ("vanilla", grid), (f"#{chosen[0][0]} identity", [*grid, 0.002828])]
    derived = confirmation_spec(spec, "sqlite:///x.db", "sweep-confirm", entries, [2, 3], "")
    assert derived.queue_driven and derived.n_trials == (3 + 4) * 2
    assert sorted((p["variant"], p["train.lr"], p["train.seed"]) for p in derived.queue) == \
        sorted((e["name"], lr, s) for e in entries for lr in e["rates"] for s in (2, 3))
    # each queued trial draws its plan's run config, on its rate and seed
    for params in derived.queue:
        cfg = from_dict(sample(derived.merged_space, FixedTrial(params))).to_dict()
        entry = next(e for e in entries if e["name"] == params["variant"])
        assert plan_key(cfg) == plan_key(entry["config"])
        assert (cfg["train"]["lr"], cfg["train"]["seed"]) == (params["train.lr"],
                                                              params["train.seed"])


@pytest.mark.parametrize("derived", [True, False], ids=["confirmation", "lr-sweep"])
def test_a_trial_that_no_queue_entry_made_is_failed_as_surplus(tmp_path, derived):
    """A confirmation, like the lr sweep it may derive from, runs its queue alone."""
    grid = [0.001, 0.0014]
    spec = _sweep_spec(tmp_path, {"lr": grid, "seed": [0, 1]})
    if derived:
        arms = choose_arms(_numbered([sweep_trial(v, 16, lr, 0, 2.0 + lr, 3.0)
                                      for v in ("vanilla", "identity") for lr in grid]))
        chosen = choose_plans(optuna.create_study(), arms, 1, False, None)
        spec = confirmation_spec(spec, "sqlite:///x.db", "sweep-confirm",
                                 plan_entries(spec, arms, chosen), [2, 3], "")
    assert spec.queue_driven
    study = optuna.create_study(directions=["minimize", "minimize"])
    # two workers, one queued trial: the second's ask began a trial of Optuna's own
    trial = study.ask()
    with pytest.raises(SurplusTrial):
        Objective(spec, spec.n_trials, echo=lambda *_: None)(trial)
    assert trial.user_attrs["failure"] == "surplus: nothing left in the study's queue"
    assert not trial.params  # nothing sampled, nothing trained


def test_a_searched_rate_gives_vanilla_the_rate_of_its_best_run_at_the_plan_s_shape(tmp_path):
    spec = _sweep_spec(tmp_path, {"lr": {"low": 1e-4, "high": 1e-2, "log": True}, "seed": 0})
    runs = _numbered([sweep_trial("vanilla", 16, 0.001, 0, 2.0, 3.0),
                      sweep_trial("vanilla", 16, 0.004, 0, 2.2, 3.0),
                      sweep_trial("vanilla", 24, 0.004, 0, 1.8, 3.0),  # another shape
                      sweep_trial("identity", 16, 0.002, 0, 1.9, 3.0)])
    arms = choose_arms(runs)
    entries = plan_entries(spec, arms, choose_plans(optuna.create_study(), arms, 1, False,
                                                    None))
    assert [(e["name"], e["rates"], e["trial"], e["search_val"]) for e in entries] == [
        ("vanilla", [0.001], 0, 2.0), ("#3 identity", [0.002], 3, 1.9)]
    # a fixed rate gives vanilla that rate where the study ran no vanilla at the shape
    fixed = _sweep_spec(tmp_path, {"lr": 0.002, "seed": 0})
    alone = choose_arms(runs[3:])
    entries = plan_entries(fixed, alone, [(3, alone[0])])
    assert [(e["name"], e["rates"], e["search_val"]) for e in entries] == [
        ("vanilla", [0.002], None), ("#3 identity", [0.002], 1.9)]


def test_rates_give_every_plan_and_vanilla_the_same_sweep_whatever_the_study_did(tmp_path):
    """`--rates`: a study that fixed or searched the rate, or swept its own grid, confirms every
    plan and vanilla over the given rates alone (the baseline tuned as the plans are)."""
    runs = _numbered([sweep_trial("vanilla", 16, 0.001, 0, 2.0, 3.0),
                      sweep_trial("identity", 16, 0.002, 0, 1.9, 3.0),
                      sweep_trial("identity", 16, 0.002828, 1, 1.8, 3.0)])
    rates = [0.002, 0.0028, 0.004]
    for lr in (0.002, {"low": 1e-4, "high": 1e-2, "log": True}, [0.001, 0.0014, 0.002]):
        spec = _sweep_spec(tmp_path, {"lr": lr, "seed": [0, 1]})
        arms = choose_arms(runs)
        entries = plan_entries(spec, arms, [(1, next(a for a in arms if a.variant != "vanilla"))],
                               rates)
        assert [e["rates"] for e in entries] == [rates, rates], lr
        derived = confirmation_spec(spec, "sqlite:///x.db", "rates-confirm", entries, [2, 3], "")
        assert derived.n_trials == 2 * 3 * 2
        assert sorted({p["train.lr"] for p in derived.queue}) == rates


PAPER = {"identity": {"mode": "resformer", "layers": "all", "lambda1": 0.5, "lambda2": 0.5},
         "sparse": {"mode": "resformer", "layers": {"pattern": "last_k", "k": 0.375},
                    "lambda1": 5.0, "lambda2": 1.0}}


def test_named_variants_join_each_reference_at_its_shape_and_rates_their_layers_resolved_there(
        tmp_path):
    grid = [0.001, 0.0014, 0.002]
    spec = _sweep_spec(tmp_path, {"lr": grid, "seed": [0, 1]})
    runs = _numbered([sweep_trial(v, d, lr, s, 2.0 + lr + (v == "vanilla"), 3.0)
                      for v in ("vanilla", "identity") for d in (16, 24) for lr in grid
                      for s in (0, 1)])
    # the d 24 runs at 8 layers: the paper's sparse layout is layers 2-3 of 4, 5-7 of 8
    runs = [dataclasses.replace(r, config={**r.config, "model": {**r.config["model"],
                                                                 "n_layer": 8}})
            if r.config["model"]["d_model"] == 24 else r for r in runs]
    arms = choose_arms(runs)
    chosen = choose_plans(optuna.create_study(), arms, 2, False, None)
    entries = plan_entries(spec, arms, chosen, variants=PAPER)
    by_name = {}
    for e in entries:
        by_name.setdefault(e["name"], []).append(e)
    assert sorted(by_name) == sorted(["vanilla", "identity", "sparse",
                                      *(f"#{n} identity" for n, _ in chosen)])
    for name in ("identity", "sparse"):  # one per reference, tied to it, at its rates
        assert len(by_name[name]) == 2
        for e in by_name[name]:
            ref = entries[e["reference"]]
            assert ref["name"] == "vanilla" and e["rates"] == ref["rates"] == grid
            assert e["config"]["model"] == ref["config"]["model"]
            assert (e["trial"], e["search_val"], e["on_front"]) == (None, None, False)
    assert sorted(e["config"]["value_residual"]["layers"] for e in by_name["sparse"]) == [
        [2, 3], [5, 6, 7]]
    # a named plan the search also ran stays a plan of its own (#N identity beside identity)
    derived = confirmation_spec(spec, "sqlite:///x.db", "paper-confirm", entries, [2, 3], "")
    assert derived.merged_space["variants"]["sparse"] == PAPER["sparse"]  # resolved per trial
    assert derived.n_trials == len(entries) * 3 * 2
    for params in derived.queue:  # each queued trial draws its entry's run config
        cfg = from_dict(sample(derived.merged_space, FixedTrial(params))).to_dict()
        assert plan_key(cfg) in {plan_key(e["config"]) for e in by_name[params["variant"]]}


def test_named_variants_need_a_rate_and_must_fit_every_shape(tmp_path):
    runs = _numbered([sweep_trial("vanilla", 16, 0.001, 0, 2.0, 3.0),
                      sweep_trial("identity", 16, 0.002, 0, 1.9, 3.0)])
    arms = choose_arms(runs)
    chosen = [(1, next(a for a in arms if a.variant != "vanilla"))]
    searched = _sweep_spec(tmp_path, {"lr": {"low": 1e-4, "high": 1e-2, "log": True}})
    with pytest.raises(ConfigError, match=r"--variants: study 'sweep' searched train\.lr.*"
                                          r"pass --rates"):
        plan_entries(searched, arms, chosen, variants=PAPER)
    # with --rates the search's rate no longer matters: every one sweeps the same rates
    entries = plan_entries(searched, arms, chosen, [0.001, 0.0014], PAPER)
    assert {tuple(e["rates"]) for e in entries} == {(0.001, 0.0014)}
    fixed = _sweep_spec(tmp_path, {"lr": 0.002})
    with pytest.raises(ConfigError, match=r"--variants: late at 4 layers: .*layers"):
        plan_entries(fixed, arms, chosen, variants={"late": {"mode": "resformer",
                                                            "layers": [5, 6]}})


@pytest.mark.parametrize(("text", "message"), [
    (None, "no such file"),
    ("", "no such file"),  # an empty YAML file: read as nothing
    ("model: {n_layer: 4}\n", "no `variants` mapping"),
    ("variants: {a: {mode: [resformer, learnable]}}\n",
     "variants.a.value_residual.mode: offers a choice"),
    ("variants: {a: {mode: resformer, lambda1: {low: 0.1, high: 1.0}}}\n",
     "variants.a.value_residual.lambda1: offers a choice"),
    ("variants: {a: {mode: resformer, layers: {pattern: [last_k, unet], k: 2}}}\n",
     "variants.a.value_residual.layers.pattern: offers a choice"),
    ("variants: {vanilla: {mode: vanilla}}\n", "holds no variant but vanilla"),
    ("variants: {plain: {mode: vanilla}, b: {mode: resformer}}\n",
     "variants.plain: is vanilla"),
    ("variants: {vanilla: {mode: resformer}}\n", "variants.vanilla: a name the confirmation"),
    ("variants: {a: {mode: resformr}}\n", "variants.a.value_residual: mode: unknown mode"),
    ("variants: {a: {mode: resformer, lambda9: 1}}\n", "lambda9: unknown key"),
], ids=["missing", "empty", "no-variants", "mode-choice", "range", "pattern-choice",
        "only-vanilla", "vanilla-renamed", "vanilla-name", "unknown-mode", "unknown-key"])
def test_bad_variants_files_are_one_line(tmp_path, text, message):
    path = tmp_path / "variants.yaml"
    if text is not None:
        path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(message)) as info:
        load_variants(str(path))
    assert "\n" not in str(info.value) and str(info.value).startswith(f"--variants: {path}")


@pytest.mark.parametrize(("text", "message"), [
    ("0.003", "--rates: expected two or more positive learning rates"),
    ("0.003,x", "--rates: expected two or more positive learning rates"),
    ("0.003,-0.004", "--rates: expected two or more positive learning rates"),
    ("0.003,nan", "--rates: expected two or more positive learning rates"),
    ("0.003,0.003", "--rates: the rates must differ"),
    ("0.001,0.004", "--rates: neighbouring rates must be at most sqrt(2) apart"),
], ids=["one", "not-a-number", "negative", "nan", "twice", "too-far-apart"])
def test_bad_rates_are_one_line(text, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_rates(text)


# -- the reading, on known numbers ---------------------------------------------------------------


def _record(number: int, variant: str, mode: str, seed: int, val: float, test: float,
            n_params: int, coefficients: dict[str, float] | None = None) -> TrialRecord:
    cfg = tiny(mode, seed=seed).to_dict()
    return TrialRecord(number, TrialState.COMPLETE, config=cfg, mode=mode, variant=variant,
                       val_loss=val, test_loss=test, n_params=n_params,
                       n_params_non_embedding=n_params, coefficients=coefficients or {})


def _entry(name: str, label: str, mode: str, search_val: float, reference: int | None) -> dict:
    return {"name": name, "label": label, "trial": 4, "config": tiny(mode).to_dict(),
            "rates": [3e-3], "search_val": search_val, "search_seeds": 1, "on_front": True,
            "reference": reference}


def test_the_winners_curse_paired_differences_holm_and_the_front_on_known_numbers():
    seeds = [10, 11, 12]
    plan = {"val": (2.10, 2.20, 2.30), "test": (3.00, 3.10, 3.20)}
    other = {"val": (2.50, 2.50, 2.50), "test": (3.45, 3.56, 3.47)}
    vanilla = {"val": (2.20, 2.30, 2.40), "test": (3.10, 3.25, 3.30)}
    runs = []
    for name, mode, losses, n_params in (("#4 learnable", "learnable", plan, 100),
                                         ("#7 resformer", "resformer", other, 200),
                                         ("vanilla", "vanilla", vanilla, 100)):
        runs += [_record(len(runs) + i, name, mode, s, losses["val"][i], losses["test"][i],
                         n_params, {"L1.lambda1": 0.4 + 0.1 * i, "L2.lambda1": 0.9}
                         if mode == "learnable" else None) for i, s in enumerate(seeds)]
    record = {"study": "s", "choice": "--top 2 --seeds 3", "seeds": seeds, "plans": [
        _entry("#4 learnable", "#4 learnable[1,2]", "learnable", 2.00, 2),
        _entry("#7 resformer", "#7 resformer[1,2]", "resformer", 2.40, 2),
        _entry("vanilla", "vanilla", "vanilla", 2.25, None)]}
    c = read("s-confirm", record, runs)
    mine, theirs, base = c.plans
    assert [p.label for p in c.chosen] == ["#4 learnable[1,2]", "#7 resformer[1,2]"]
    # the curse: +0.1, +0.2, +0.3 over the study's 2.00; t(0.975, 2) = 4.3027, se = 0.1/sqrt(3)
    curse = mine.curse
    assert curse.mean == pytest.approx(0.2)
    assert (curse.low, curse.high) == pytest.approx((0.2 - 0.24842, 0.2 + 0.24842), abs=1e-4)
    assert theirs.curse.mean == pytest.approx(0.1) and base.curse.mean == pytest.approx(0.05)
    # paired on the same seed: -0.10, -0.15, -0.10 and +0.35, +0.31, +0.17
    assert mine.difference.by_seed == pytest.approx({10: -0.10, 11: -0.15, 12: -0.10})
    assert mine.difference.interval.mean == pytest.approx(-0.35 / 3)
    assert theirs.difference.by_seed == pytest.approx({10: 0.35, 11: 0.31, 12: 0.17})
    # exact sign flips of 3 pairs all one way: 2 of 8; Holm doubles the smaller of two equals
    assert mine.p == pytest.approx(0.25) and theirs.p == pytest.approx(0.25)
    assert mine.p_holm == pytest.approx(0.5) and theirs.p_holm == pytest.approx(0.5)
    # the front by (test loss, n_params): the plan beats vanilla at its size and the larger,
    # worse plan
    assert (mine.stays, theirs.stays, base.stays) == (True, False, False)
    text = sections_markdown(confirmation_sections(c))
    assert "| #4 learnable[1,2] | 3L d32 | 0.003 | 3/3 | 2.0000 (1 seed(s)) | 2.2000 | " \
           "3.1000 (3.0000-3.2000) | +0.2000 [-0.0484, +0.4484] | +1.1000 | on -> on |" in text
    assert "| #4 learnable[1,2] | 3L d32 | -0.1167 [-0.1884, -0.0450] (n=3) | 0.25 (0.5) | " \
           "3/3 |" in text
    # what the learned plan ends at, per layer over its fresh seeds (layer 0 is the source)
    assert "### Learned lambda1 per layer at the end of training" in text
    assert "| 3L d32 | #4 learnable | 3 | -  0.50±0.10  0.90±0.00 |" in text
    assert "Learned lambda2" not in text  # no plan stored one


def test_a_searched_plan_meets_the_named_variant_best_on_validation_and_holm_spans_both():
    seeds = [10, 11, 12]
    losses = {  # val, test per seed
        "#4 learnable": ((2.10, 2.20, 2.30), (3.00, 3.10, 3.20)),
        "identity": ((2.00, 2.00, 2.00), (3.05, 3.20, 3.22)),  # best on validation
        "sparse": ((2.60, 2.60, 2.60), (2.90, 2.95, 2.99)),  # best on test: never chosen
        "vanilla": ((2.20, 2.30, 2.40), (3.10, 3.25, 3.30))}
    modes = {"#4 learnable": "learnable", "identity": "resformer", "sparse": "resformer",
             "vanilla": "vanilla"}
    runs = [_record(len(losses) * i + j, name, modes[name], s, val[i], test[i], 100)
            for j, (name, (val, test)) in enumerate(losses.items())
            for i, s in enumerate(seeds)]
    named = {"trial": None, "search_val": None, "search_seeds": 0, "on_front": False}
    record = {"study": "s", "choice": "--top 1 --variants identity,sparse --seeds 3",
              "seeds": seeds, "plans": [
                  _entry("#4 learnable", "#4 learnable[1,2]", "learnable", 2.00, 3),
                  {**_entry("identity", "identity", "resformer", 0, 3), **named},
                  {**_entry("sparse", "sparse", "resformer", 0, 3), **named},
                  _entry("vanilla", "vanilla", "vanilla", 2.25, None)]}
    # two named variants of one mode differ by their coefficients, as their configs do
    record["plans"][2]["config"]["value_residual"]["lambda1"] = 5.0
    for r in runs:
        if r.variant == "sparse":
            r.config["value_residual"]["lambda1"] = 5.0
    c = read("s-confirm", record, runs)
    plan, identity, sparse, _ = c.plans
    # -0.05, -0.10, -0.02: mean -0.0567, sd 0.0404, t(0.975, 2) se 4.3027 x 0.0233 = 0.1004
    assert (plan.searched, identity.named, sparse.named) == (True, True, True)
    # the searched plan against each named variant; identity the best, chosen on validation
    # though sparse tests better
    assert [(r.plan, r.named, r.best) for r in c.rivalries] == [(plan, identity, True),
                                                                (plan, sparse, False)]
    vs_identity, vs_sparse = c.rivalries
    assert vs_identity.difference.by_seed == pytest.approx({10: -0.05, 11: -0.10, 12: -0.02})
    assert vs_sparse.difference.by_seed == pytest.approx({10: 0.10, 11: 0.15, 12: 0.21})
    # one family of five: three against vanilla and two against the named variants. Every
    # p is 0.25 (three pairs, each all one way): Holm multiplies the smallest by 5, capped at 1.
    assert [p.p for p in c.chosen] + [r.p for r in c.rivalries] == pytest.approx([0.25] * 5)
    assert [p.p_holm for p in c.chosen] + [r.p_holm for r in c.rivalries] == \
        pytest.approx([1.0] * 5)
    text = sections_markdown(confirmation_sections(c))
    assert "minus each named variant's at its shape and budget" in text
    assert "| #4 learnable[1,2] | 3L d32 | identity (2.0000) best | -0.0567 [-0.1571, +0.0437] " \
           "(n=3) | 0.25 (1) | 3/3 |" in text
    assert "| #4 learnable[1,2] | 3L d32 | sparse (2.6000) | +0.1533" in text


def test_a_plan_with_one_fresh_pair_is_warned_and_one_not_run_yet_says_so():
    runs = [_record(0, "#4 learnable", "learnable", 10, 2.1, 3.0, 100),
            _record(1, "vanilla", "vanilla", 10, 2.2, 3.1, 100)]
    record = {"study": "s", "choice": "--trials 4,5", "seeds": [10, 11], "plans": [
        _entry("#4 learnable", "#4 learnable[1,2]", "learnable", 2.0, 2),
        {**_entry("#5 resformer", "#5 resformer[1,2]", "resformer", 2.1, 2), "trial": 5},
        _entry("vanilla", "vanilla", "vanilla", 2.25, None)]}
    c = read("s-confirm", record, runs)
    waiting: Plan = c.plans[1]
    assert waiting.arm is None and waiting.difference is None and math.isnan(waiting.p)
    text = sections_markdown(confirmation_sections(c))
    assert "-0.1000 (one value) (n=1) warning: 1 pair(s)" in text
    assert "| #5 resformer[1,2] | - | no pairs yet | - | 0/0 |" in text
    assert "| #5 resformer[1,2] | - | - | 0/2 | 2.1000 (1 seed(s)) | - | - | - | - | on -> - |" \
        in text


# -- end to end ----------------------------------------------------------------------------------


def test_confirm_on_an_unseen_corpus_prints_plans_against_vanilla_and_report_shows_it(
        searched, tmp_path, capsys):
    spec, url = _copy(searched, tmp_path)
    study = optuna.load_study(study_name="tiny", storage=make_storage(url))
    assert main(["confirm", spec, "--storage", url, "--top", "2", "--seeds", "2",
                 "--threads", "1", "--no-progress"]) == 0
    out = capsys.readouterr().out
    confirm = optuna.load_study(study_name="tiny-confirm", storage=make_storage(url))
    record = confirm.user_attrs["confirm"]
    chosen = [e for e in record["plans"] if e["reference"] is not None]
    assert len(chosen) == 2 and record["seeds"] == [1, 2]  # the study ran seed 0 alone
    done = [TrialRecord.from_trial(t) for t in confirm.trials]
    assert all(t.state == TrialState.COMPLETE for t in done)
    assert len(done) == 2 * len(record["plans"])
    by_number = {t.number: TrialRecord.from_trial(t) for t in study.trials}
    for e in chosen:  # each plan's runs: its study trial's config but for the seed
        runs = [t for t in done if t.variant == e["name"]]
        assert sorted(t.seed for t in runs) == [1, 2]
        assert {plan_key(t.config) for t in runs} == {plan_key(by_number[e["trial"]].config)}
        assert {t.lr for t in runs} == {by_number[e["trial"]].lr}
        label = e["label"]
        assert f"| {label} | " in out
        row = next(line for line in out.splitlines()
                   if line.startswith(f"| {label} |") and "(n=2)" in line)
        # the mean difference with its interval over the two seeds, warned
        assert re.search(r"\| [+-]\d\.\d{4} \[[+-]\d\.\d{4}, [+-]\d\.\d{4}\] \(n=2\) "
                         r"warning: 2 pair\(s\) \|", row), row
    assert "loss minus vanilla's at the same shape and budget" in out
    assert "winner's curse" in out

    html = tmp_path / "report.html"
    assert main(["report", spec, "--storage", url, "--out", str(html)]) == 0
    printed = capsys.readouterr().out
    assert "### Confirmation (tiny-confirm: --top 2 --seeds 2, fresh seeds 1..2)" in printed
    page = html.read_text()
    assert "id='confirmation'" in page and "fig-confirmation" in page
    assert "Confirmation (tiny-confirm" in page

    # the same command again resumes (nothing left) and prints the same tables
    assert main(["confirm", spec, "--storage", url, "--top", "2", "--seeds", "2",
                 "--threads", "1", "--no-progress"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == out.splitlines()[-1]
    assert len(confirm.trials) == len(done)
    # other choices are refused unless they name a new confirmation
    before = _studies(url)
    assert main(["confirm", spec, "--storage", url, "--top", "1", "--seeds", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "study 'tiny-confirm' confirms" in err and "--name NEW" in err
    assert _studies(url) == before


def test_confirm_with_rates_sweeps_every_plan_and_vanilla_on_the_fresh_seeds(searched, tmp_path,
                                                                           capsys):
    spec, url = _copy(searched, tmp_path)
    assert main(["confirm", spec, "--storage", url, "--top", "1", "--seeds", "2", "--rates",
                 "0.004,0.003", "--name", "tiny-rates", "--threads", "1", "--no-progress"]) == 0
    out = capsys.readouterr().out
    confirm = optuna.load_study(study_name="tiny-rates", storage=make_storage(url))
    record = confirm.user_attrs["confirm"]
    assert record["choice"] == "--top 1 --rates 0.003,0.004 --seeds 2"
    assert [e["rates"] for e in record["plans"]] == [[0.003, 0.004]] * 2  # vanilla and the plan
    done = [TrialRecord.from_trial(t) for t in confirm.trials]
    assert all(t.state == TrialState.COMPLETE for t in done)
    assert sorted((t.variant, t.lr, t.seed) for t in done) == sorted(
        (e["name"], lr, seed) for e in record["plans"] for lr in (0.003, 0.004)
        for seed in (1, 2))
    assert "winner's curse" in out


def test_confirm_with_variants_trains_the_paper_s_plans_beside_the_winners(searched, tmp_path,
                                                                          capsys):
    spec, url = _copy(searched, tmp_path)
    variants = tmp_path / "paper.yaml"
    variants.write_text(yaml.safe_dump({"variants": {"vanilla": {"mode": "vanilla"}, **PAPER}}))
    assert main(["confirm", spec, "--storage", url, "--top", "1", "--seeds", "2", "--variants",
                 str(variants), "--name", "tiny-paper", "--threads", "1", "--no-progress"]) == 0
    out = capsys.readouterr().out
    confirm = optuna.load_study(study_name="tiny-paper", storage=make_storage(url))
    record = confirm.user_attrs["confirm"]
    assert record["choice"] == "--top 1 --variants identity,sparse --seeds 2"
    plan = record["plans"][1]
    assert [e["name"] for e in record["plans"]] == ["vanilla", plan["name"], "identity",
                                                    "sparse"]
    assert plan["name"].startswith("#") and plan["reference"] == 0
    done = [TrialRecord.from_trial(t) for t in confirm.trials]
    assert all(t.state == TrialState.COMPLETE for t in done) and len(done) == 4 * 2
    n_layer = plan["config"]["model"]["n_layer"]
    for t in done:  # each at the plan's shape; sparse on its last 3/8 of layers, at least one
        assert t.config["model"] == plan["config"]["model"]
        if t.variant == "sparse":
            k = max(1, math.floor(0.375 * n_layer + 0.5))
            assert t.config["value_residual"]["layers"] == list(range(n_layer - k, n_layer))
    assert "minus each named variant's at its shape and budget" in out
    against_named = [line for line in out.splitlines() if re.match(
        rf"\| {re.escape(plan['label'])} \| \S+ \S+ \| (identity|sparse) "
        r"\(\d\.\d{4}\)( best)? \| [+-]\d\.\d{4} \[[+-]\d\.\d{4}, [+-]\d\.\d{4}\] "
        r"\(n=2\) warning", line)]
    assert len(against_named) == 2 and sum(" best |" in r for r in against_named) == 1, out
    html = tmp_path / "report.html"
    assert main(["report", spec, "--storage", url, "--out", str(html)]) == 0
    assert "minus each named variant's" in capsys.readouterr().out
    assert escape("minus each named variant's") in html.read_text()


def test_a_confirmation_killed_half_way_is_finished_by_the_same_command(searched, tmp_path):
    spec, url = _copy(searched, tmp_path)
    command = ["confirm", spec, "--storage", url, "--top", "1", "--seeds", "3", "--threads",
               "1", "--no-progress"]
    log = tmp_path / "a.log"
    worker = start(*command, log=log)

    def states():
        return [t.state for t in trials(url, "tiny-confirm")]

    wait_for(lambda: TrialState.COMPLETE in states() and TrialState.RUNNING in states(),
             worker, log, "a confirmation trial running after a finished one")
    worker.send_signal(signal.SIGKILL)
    assert worker.wait(timeout=60) == -9
    kept = {t.number: (t.params, t.values) for t in trials(url, "tiny-confirm")
            if t.state == TrialState.COMPLETE}
    killed = [t.number for t in trials(url, "tiny-confirm") if t.state == TrialState.RUNNING]

    again = run_cli(*command)
    assert again.returncode == 0, again.stdout + again.stderr
    confirm = optuna.load_study(study_name="tiny-confirm", storage=make_storage(url))
    queued = len(confirm.user_attrs["confirm"]["plans"]) * 3
    complete = [t for t in confirm.trials if t.state == TrialState.COMPLETE]
    # every queued trial once, whatever the kill cut short; nothing left running or queued
    assert len(complete) == queued
    assert len({tuple(sorted(t.params.items())) for t in complete}) == queued
    assert {t.state for t in confirm.trials} <= {TrialState.COMPLETE, TrialState.FAIL}
    failed = [t for t in confirm.trials if t.state == TrialState.FAIL]
    assert [t.number for t in failed] == killed
    assert failed[0].user_attrs["failure"].startswith("lost: its worker")
    for t in complete:
        if t.number in kept:
            assert kept.pop(t.number) == (t.params, t.values)
    assert not kept, "a finished trial changed or vanished"
    assert "| #" in again.stdout and "Traceback" not in log.read_text() + again.stderr


def test_two_workers_on_one_confirmation_run_every_queued_trial_once(searched, tmp_path):
    spec, url = _copy(searched, tmp_path)
    command = ["confirm", spec, "--storage", url, "--pareto", "--seeds", "2", "--threads", "1",
               "--no-progress"]
    workers = [start(*command, log=tmp_path / f"{name}.log") for name in "ab"]
    for worker, name in zip(workers, "ab", strict=True):
        assert worker.wait(timeout=900) == 0, (tmp_path / f"{name}.log").read_text()
    confirm = optuna.load_study(study_name="tiny-confirm", storage=make_storage(url))
    queued = len(confirm.user_attrs["confirm"]["plans"]) * 2
    complete = [t for t in confirm.trials if t.state == TrialState.COMPLETE]
    assert len(complete) == queued
    assert len({tuple(sorted(t.params.items())) for t in complete}) == queued
    # a race for the last queued trial ends as a surplus trial, never as a second run
    assert all(t.user_attrs["failure"].startswith("surplus") for t in confirm.trials
               if t.state == TrialState.FAIL)
    assert {t.state for t in confirm.trials} <= {TrialState.COMPLETE, TrialState.FAIL}



def test_copies_of_a_queued_trial_run_once_and_every_queued_trial_runs(searched, tmp_path):
    """Two workers can both find a trial missing and queue it (CI caught one such race): here
    every trial is queued twice, interleaved, as that race leaves it. Each copy after the first
    is surplus, and the copies hold no slot, so every queued trial still runs."""
    from nas.confirm import prepare

    spec, url = _copy(searched, tmp_path)
    derived = prepare(load_spec(spec), url, pareto=True, seeds=2)
    listed, derived.queue = derived.queue, []
    study = open_study(derived, url)  # created as a worker creates it, with nothing queued
    derived.queue = listed
    for params in listed:
        for _ in range(2):
            study.enqueue_trial(params, skip_if_exists=False)
    quiet(derived, threads=1)
    trials = study.get_trials()
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert sorted(tuple(sorted(t.params.items())) for t in complete) == sorted(
        tuple(sorted(p.items())) for p in listed)
    copies = [t for t in trials if t.state == TrialState.FAIL]
    assert [t.number for t in copies] == list(range(1, 2 * len(listed), 2))
    assert [t.user_attrs["failure"] for t in copies] == [
        f"surplus: a second copy of trial {n - 1} (two workers queued it at once)"
        for n in range(1, 2 * len(listed), 2)]

# -- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("args", "message"), [
    (["--top", "1", "--seeds", "1"], "--seeds: must be at least 2"),
    (["--top", "1", "--seeds", "2", "--first-seed", "0"],
     "--first-seed: seeds 0..1 overlap the study's own (0)"),
    (["--top", "99", "--seeds", "2"], "--top: must be in 1.."),
    (["--trials", "99", "--seeds", "2"], "--trials: no trial 99 in study 'tiny' (trials 0..4)"),
    (["--trials", "1,x", "--seeds", "2"], "--trials: expected trial numbers separated by "
                                          "commas"),
    (["--seeds", "2"], "choose the plans with exactly one of --top K, --pareto and --trials"),
    (["--top", "1", "--pareto", "--seeds", "2"], "choose the plans with exactly one of"),
    (["--top", "1", "--seeds", "2", "--name", "tiny"], "--name: must be"),
    (["--top", "1", "--seeds", "2", "--threads", "0"], "--threads: must be > 0"),
    (["--top", "1", "--seeds", "2", "--rates", "0.001,0.004"],
     "--rates: neighbouring rates must be at most sqrt(2) apart"),
    (["--top", "1", "--seeds", "2", "--variants", "nope.yaml"],
     "--variants: nope.yaml: no such file"),
], ids=["one-seed", "overlap", "top-beyond", "no-such-trial", "not-a-number", "no-choice",
        "two-choices", "own-name", "threads", "rates-too-far-apart", "no-variants-file"])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(searched, tmp_path, capsys, args,
                                                         message):
    spec, url = _copy(searched, tmp_path)
    before = _studies(url)
    assert main(["confirm", spec, "--storage", url, *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("nas confirm: error: ") and "\n" not in err
    assert message in err
    assert _studies(url) == before


def test_an_unfinished_trial_and_a_study_without_a_vanilla_rate_are_refused(tmp_path, capsys):
    corpus = tmp_path / "c.txt"
    corpus.write_text("a few words of text for a tiny model to read. " * 200)
    # train.lr searched, vanilla never offered: a plan has no vanilla rate to compare with
    spec = _spec(tmp_path, corpus, baselines=False, space={
        "model": {"n_layer": 2}, "train": {"lr": [1e-3, 3e-3]},
        "value_residual": {"mode": "learnable"}})
    url = f"sqlite:///{tmp_path / 's.db'}"
    study = open_study(load_spec(spec), url, echo=lambda *_: None)
    assert main(["confirm", str(spec), "--storage", url, "--top", "1", "--seeds", "2"]) == 2
    assert "study 'tiny' has no completed trials; nothing to confirm" in capsys.readouterr().err
    cfg = tiny("learnable", n_layer=2, d_model=32, n_head=2, lr=3e-3).to_dict()
    study.add_trial(create_trial(values=[4.0, 1000.0], user_attrs={
        "config": cfg, "mode": "learnable", "val_loss": 4.0, "n_params": 1000,
        "n_params_non_embedding": 900, "receiving_layers": [1]}))
    study.enqueue_trial({})
    before = _studies(url)
    assert main(["confirm", str(spec), "--storage", url, "--trials", "1", "--seeds", "2"]) == 2
    assert "--trials: trial 1 is WAITING; only a completed trial" in capsys.readouterr().err
    assert main(["confirm", str(spec), "--storage", url, "--top", "1", "--seeds", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "trial 0 (learnable[1], 2L d32, 20 steps): no vanilla comparison " \
        "possible: study 'tiny' searches train.lr" in err
    assert _studies(url) == before

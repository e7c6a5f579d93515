"""`nas confirm`: a study's chosen plans, and vanilla at their shapes and budgets, trained again
on fresh seeds, as a study of its own in the same storage.

A search ranks single noisy runs, so its best plans are optimistic (the winner's curse). This
module chooses the plans (`--top K`, `--pareto`, `--trials N,M`: each the arm of its trial,
nas.reading.arms) and the seeds (the S smallest above every seed the study declares or ran, or from
`--first-seed`; any overlap is refused), and derives the confirmation's spec: named variants
(one per plan, `#N variant` after the trial that stands for it, and `vanilla`), the model, train
and data keys as the plans ran them, and a queue (`StudySpec.queue`) that lists every trial.
`nas.search.worker.run_search` runs it like any study (resumable, several workers, leases). The
plans and what the study measured of them are stored with it (the user attribute `confirm`) for
`nas.reading.confirmation` to read.

`--variants FILE` adds the named variants of a space file (e.g. the paper's identity, learnable
and sparse) at each reference's shape, budget and rates, so that the search's winners meet the
hand-made plans on the same fresh seeds; a layer pattern (`last_k` with a share) is resolved at
each shape's n_layer.

Rates, by the study's own rule:
- a plan retrains at the rate its arm chose in the study (a plan that ran one rate, at that one);
- vanilla at a plan's shape and budget at the rate of the study's best vanilla arm there, or, in
  a study that fixes train.lr and ran no vanilla there, at that rate; a study that searched the
  rate without a vanilla run at that shape and budget has no rate to give it, and is refused;
- a learning-rate sweep (`nas.search.lr_sweep.is_sweep`) instead gives every plan and vanilla an
  all_seeds sweep on the fresh seeds, over the space's grid and any rate its arm added beyond
  it, so that each chooses its rate on the fresh seeds as the study chose;
- `--rates` gives every plan and vanilla an all_seeds sweep over those rates, whatever the
  study did: in a search that fixed or searched the rate, the baseline then gets the same
  tuning as the plans.

Knows nothing of torch.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from nas.config import ValueResidualConfig, from_dict
from nas.errors import ConfigError, excerpt
from nas.modes import BASELINE_MODE
from nas.old_records import LATE_TRAIN_KEYS
from nas.parsing import parse, read_yaml
from nas.reading.arms import Arm, budget_key, choose_arms, plan_key
from nas.reading.confirmation import CONFIRM_ATTR
from nas.reading.export import choose_trials
from nas.search import lr_sweep
from nas.search.replicates import replicate_seeds
from nas.search.space import check_space, fixed_plan
from nas.search.spec import NAME, StudySpec
from nas.search.study import open_existing, resolve_storage
from nas.search.trials import TrialRecord, completed, front_indices

MIN_SEEDS = 2  # an interval over seeds needs two
VANILLA = {"mode": BASELINE_MODE}


def confirmation_name(study_name: str) -> str:
    return f"{study_name}-confirm"


def fresh_seeds(used: set[int], n: int, first: int | None = None) -> list[int]:
    """`n` seeds the study never used: the smallest above all of `used`, or from `first`."""
    if n < MIN_SEEDS:
        raise ConfigError(f"--seeds: must be at least {MIN_SEEDS} (an interval over seeds needs "
                          f"two), got {n}")
    if first is not None and first < 0:
        raise ConfigError(f"--first-seed: must be >= 0, got {first}")
    start = max(used, default=-1) + 1 if first is None else first
    seeds = list(range(start, start + n))
    if seeds[-1] >= 2**32:
        raise ConfigError(f"--first-seed: seeds must be below 2**32, got up to {seeds[-1]}")
    overlap = sorted(used & set(seeds))
    if overlap:
        raise ConfigError(f"--first-seed: seeds {_span(seeds)} overlap the study's own "
                          f"({', '.join(map(str, overlap))}); confirmation seeds must be fresh: "
                          f"leave --first-seed out, or choose {max(used) + 1} or above")
    return seeds


def _span(seeds: Sequence[int]) -> str:
    return f"{seeds[0]}..{seeds[-1]}" if len(seeds) > 1 else str(seeds[0])


def study_seeds(study: optuna.Study, space: dict, replicates: int = 1) -> set[int]:
    """Every seed the study's space declares (a list, a range, a number) or any trial ran or
    is queued to run, each with the seeds after it that its replicates train on
    (`replicates`, the study's; nas.search.replicates)."""
    declared = space.get("train", {}).get("seed", 0)
    if isinstance(declared, dict):
        used = set(range(declared["low"], declared["high"] + 1, declared.get("step", 1)))
    else:
        used = set(declared) if isinstance(declared, list) else {declared}
    for t in study.get_trials(deepcopy=False):
        for params in (t.params, t.system_attrs.get("fixed_params") or {}):
            if "train.seed" in params:
                used.add(int(params["train.seed"]))
        if (r := TrialRecord.from_trial(t)).config:
            used.add(r.seed)
    # each seed a trial starts from, and those its replicates train after it
    return {seed for first in used for seed in replicate_seeds(first, replicates)}


def parse_trials(text: str) -> list[int]:
    """`--trials 3,7,12` as trial numbers."""
    try:
        numbers = [int(part) for part in text.split(",")]
    except ValueError:
        raise ConfigError(f"--trials: expected trial numbers separated by commas, e.g. 3,7,12; "
                          f"got {text!r}") from None
    return list(dict.fromkeys(numbers))


def _arm_of(arms: list[Arm], r: TrialRecord) -> Arm:
    key = (r.arm_name, plan_key(r.config))
    return next(a for a in arms if (a.variant, plan_key(a.first.config)) == key)


def _best_run(arm: Arm) -> TrialRecord:
    return min(arm.trials, key=lambda r: (r.val_loss, r.number))


def choose_plans(study: optuna.Study, arms: list[Arm], top: int | None, pareto: bool,
                 trials: list[int] | None) -> list[tuple[int, Arm]]:
    """The chosen plans as (the trial that stands for it, its arm), in the order chosen."""
    if [top is not None, pareto, trials is not None].count(True) != 1:
        raise ConfigError("choose the plans with exactly one of --top K, --pareto and "
                          "--trials N,M,...")
    if top is not None:
        ranked = sorted((a for a in arms if a.first.mode != BASELINE_MODE),
                        key=lambda a: (a.val, a.n_params, _best_run(a).number))
        if not 1 <= top <= len(ranked):
            raise ConfigError(f"--top: must be in 1..{len(ranked)}, the plans (vanilla aside) "
                              f"with completed trials in study {study.study_name!r}; got {top}")
        return [(_best_run(a).number, a) for a in ranked[:top]]
    if pareto:
        chosen = [_arm_of(arms, r) for r in choose_trials(study, pareto=True)]
        return list({id(a): (_best_run(a).number, a) for a in chosen}.values())
    by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
    out = []
    for n in trials or []:
        if n not in by_number:
            raise ConfigError(f"--trials: no trial {n} in study {study.study_name!r} (trials "
                              f"0..{len(by_number) - 1})")
        r = TrialRecord.from_trial(by_number[n])
        if r.state != TrialState.COMPLETE or not r.measured:
            raise ConfigError(f"--trials: trial {n} is {r.state.name}; only a completed trial "
                              "has a plan and a validation loss to confirm")
        out.append((n, _arm_of(arms, r)))
    return out


def _entry(name: str, config: dict, rates: list[float], arm: Arm | None, trial: int | None,
           front: set[int]) -> dict[str, Any]:
    """One plan of the confirmation as stored: its variant's name and its label, what it runs
    and what the study measured of it."""
    label = name if trial is None or name == BASELINE_MODE else f"#{trial} {arm.first.label}"
    return {"name": name, "label": label, "trial": trial, "config": config, "rates": rates,
            "search_val": None if arm is None else arm.val,
            "search_seeds": 0 if arm is None else sum(len(r.trained_seeds) for r in arm.trials),
            "on_front": arm is not None and id(arm) in front, "reference": None}


def _with(config: dict, plan: dict | None = None, lr: float | None = None) -> dict:
    """`config` (with another value_residual plan, another rate) as a run config records it
    today."""
    raw = json.loads(json.dumps(config))
    if plan is not None:
        raw["value_residual"] = plan
    if lr is not None:
        raw["train"]["lr"] = lr
    return from_dict(raw, where="confirm").to_dict()


def load_variants(path: str) -> dict[str, dict]:
    """`--variants FILE`: the `variants` mapping of a space file (its other sections are not
    read), each one fixed plan; vanilla's is left out, every plan's reference already."""
    where = f"--variants: {path}"
    raw = read_yaml(path) if Path(path).is_file() else None
    if raw is None:
        raise ConfigError(f"{where}: no such file; expected a space file with a `variants` "
                          "mapping, e.g. search_spaces/paper_variants.yaml")
    check_space(raw, where)
    if not raw.get("variants"):
        raise ConfigError(f"{where}: no `variants` mapping of names to value_residual plans")
    out = {}
    for name, body in raw["variants"].items():
        try:
            plan = fixed_plan(body, n_layer=2)  # any depth: only its choices are looked for
        except ConfigError as exc:
            raise ConfigError(f"{where}: variants.{name}.{exc}") from None
        # the plan's own keys here; its layers against each shape's n_layer in plan_entries
        parse(ValueResidualConfig, plan, f"{where}: variants.{name}.value_residual")
        if plan["mode"] != BASELINE_MODE:
            out[name] = body
        elif name != BASELINE_MODE:
            raise ConfigError(f"{where}: variants.{name}: is vanilla, which every plan is "
                              "compared with already; leave it out or name it vanilla")
    if not out:
        raise ConfigError(f"{where}: holds no variant but vanilla, every plan's reference "
                          "already")
    if clash := next((n for n in out if n == BASELINE_MODE or n.startswith("#")), None):
        raise ConfigError(f"{where}: variants.{clash}: a name the confirmation gives its own "
                          "plans; rename it")
    return out


def parse_rates(text: str) -> list[float]:
    """`--rates R1,R2,...`: two or more positive rates, at most sqrt(2) apart, ascending."""
    try:
        rates = sorted(float(part) for part in text.split(","))
    except ValueError:
        rates = []
    if len(rates) < 2 or not all(math.isfinite(r) and r > 0 for r in rates):
        raise ConfigError(f"--rates: expected two or more positive learning rates separated by "
                          f"commas, e.g. 0.006,0.0085,0.012; got {excerpt(text)}")
    if problem := lr_sweep.check_grid(rates, lr_sweep.Sweep(protocol="all_seeds")):
        raise ConfigError(f"--rates: {problem}")
    return rates


def plan_entries(spec: StudySpec, arms: list[Arm], chosen: list[tuple[int, Arm]],
                 sweep_rates: list[float] | None = None,
                 variants: dict[str, dict] | None = None) -> list[dict[str, Any]]:
    """The chosen plans and their vanilla references (see the module docstring for the rates;
    `sweep_rates`: `--rates`), each once, then the named `variants` (`--variants`) at each
    reference's shape, budget and rates; a plan's `reference` is its reference's index."""
    space = spec.merged_space
    sweep = sweep_rates is not None or lr_sweep.is_sweep(space)
    grid = sweep_rates or (space["train"]["lr"] if sweep else [])
    # the rates an arm of the study added to its grid, where the study's own sweep is rerun
    added = (lambda arm: set()) if sweep_rates is not None else (lambda arm: set(arm.grid))
    lr_fixed = not isinstance(space.get("train", {}).get("lr"), (list, dict))
    front_arms = nondominated_arms(arms)
    entries: list[dict[str, Any]] = []

    def add(entry: dict[str, Any]) -> int:
        for i, e in enumerate(entries):
            if e["name"] == entry["name"] and plan_key(e["config"]) == plan_key(entry["config"]):
                return i
        entries.append(entry)
        return len(entries) - 1

    for number, arm in chosen:
        config = _with(_best_run(arm).config)
        rates = sorted(set(grid) | added(arm)) if sweep else [arm.lr]
        level = (arm.first.shape_key, budget_key(arm.first))
        vanillas = [a for a in arms if a.first.mode == BASELINE_MODE
                    and (a.first.shape_key, budget_key(a.first)) == level]
        best = min(vanillas, key=lambda a: a.val) if vanillas else None
        if best is None and not (sweep or lr_fixed):
            raise ConfigError(
                f"trial {number} ({arm.first.label}, {arm.shape}, {arm.budget}): no vanilla "
                f"comparison possible: study {spec.name!r} searches train.lr and completed no "
                "vanilla trial at this shape and budget to take vanilla's rate from")
        ref_rates = (sorted(set(grid) | (added(best) if best else set())) if sweep
                     else [best.lr if best else arm.lr])
        ref_config = _with(config, plan=VANILLA, lr=ref_rates[0])
        # the study's vanilla arm speaks for the reference only where it ran the same config
        speaks = best is not None and plan_key(_with(_best_run(best).config)) == plan_key(
            ref_config)
        ref = add(_entry(BASELINE_MODE, ref_config, ref_rates, best if speaks else None,
                         _best_run(best).number if speaks else None, front_arms))
        if plan_key(config) == plan_key(ref_config) and rates == ref_rates:
            continue  # a chosen vanilla plan that is its own reference
        mine = add(_entry(f"#{number} {arm.variant}", _with(config, lr=rates[0]), rates,
                          arm, number, front_arms))
        entries[mine]["reference"] = ref
    if variants and not (sweep or lr_fixed):
        raise ConfigError(f"--variants: study {spec.name!r} searched train.lr, which gives the "
                          "named variants no rate of their own: pass --rates R1,R2,... so that "
                          "they, vanilla and the plans are tuned alike")
    for ref in sorted({e["reference"] for e in entries if e["reference"] is not None}):
        base = entries[ref]
        for name, body in (variants or {}).items():
            n_layer = base["config"]["model"]["n_layer"]
            try:  # e.g. layers: [5, 6] at 4 layers
                config = _with(base["config"], plan=fixed_plan(body, n_layer))
            except ConfigError as exc:
                raise ConfigError(f"--variants: {name} at {n_layer} layers: {exc}") from None
            named = add({**_entry(name, config, base["rates"], None, None, front_arms),
                         "variant": body})
            entries[named]["reference"] = ref
    return entries


def nondominated_arms(arms: list[Arm]) -> set[int]:
    """The ids of the arms on the study's (validation loss, n_params) front."""
    return {id(arms[i]) for i in front_indices([(a.val, a.first.n_params) for a in arms])}


def _filled(config: dict, section: str, key: str) -> Any:
    """A key a config leaves out: a budget it was not given (None), or a later key at its
    default (`RunConfig.to_dict` leaves those out)."""
    return config[section].get(key, LATE_TRAIN_KEYS.get(key) if section == "train" else None)


def derived_space(entries: list[dict[str, Any]], seeds: list[int]) -> dict[str, Any]:
    """Named variants, one per plan (vanilla one for every reference, each `--variants` one
    for all its sizes), and each model, train
    and data key fixed where every plan has one value, else a list of their values."""
    # a named variant (`--variants`) keeps its layer pattern: each trial resolves it at its
    # own n_layer, as the plan's entry did
    space: dict[str, Any] = {"variants": {e["name"]: e.get("variant", e["config"]["value_residual"])
                                          for e in entries}}
    for section in ("model", "train", "data"):
        keys = dict.fromkeys(k for e in entries for k in e["config"][section])
        space[section] = {}
        for key in keys:
            values = list(dict.fromkeys(
                json.dumps(r) for e in entries
                for r in (e["rates"] if (section, key) == ("train", "lr")
                          else [_filled(e["config"], section, key)])))
            values = [json.loads(v) for v in values]
            space[section][key] = values[0] if len(values) == 1 else values
    space["train"]["seed"] = seeds
    return space


def queue(space: dict[str, Any], entries: list[dict[str, Any]], seeds: list[int]
          ) -> list[dict[str, Any]]:
    """Every trial's params: each plan at each of its rates on each seed, seed by seed (a
    confirmation stopped early holds whole seeds of every plan)."""
    listed = [(s, k) for s in ("model", "train", "data") for k, v in space[s].items()
              if isinstance(v, list) and (s, k) not in (("train", "seed"), ("train", "lr"))]
    out = []
    for seed in seeds:
        for e in entries:
            for lr in e["rates"]:
                params = {"variant": e["name"],
                          **{f"{s}.{k}": _filled(e["config"], s, k) for s, k in listed},
                          "train.seed": seed}
                if isinstance(space["train"]["lr"], list):
                    params["train.lr"] = lr
                out.append(params)
    return out


def confirmation_spec(spec: StudySpec, storage: str, name: str, entries: list[dict[str, Any]],
                      seeds: list[int], choice: str) -> StudySpec:
    """The confirmation as a study spec derived from the study's: its plans as named
    variants, every trial queued, nothing pruned, sampled or added."""
    space = derived_space(entries, seeds)
    listed = queue(space, entries, seeds)
    derived = StudySpec(name=name, space=space, objectives=spec.objectives,
                        n_trials=len(listed), sampler={"type": "random"},
                        pruner={"type": "none"}, baselines=False, seed=spec.seed,
                        storage=storage, artifacts=spec.artifacts, heartbeat=spec.heartbeat)
    derived.path = spec.path
    derived.queue = listed
    derived.attrs = {CONFIRM_ATTR: {"study": spec.name, "choice": choice, "seeds": seeds,
                                    "plans": entries}}
    return derived


def check_resume(storage: optuna.storages.BaseStorage, derived: StudySpec) -> None:
    """Refuse a confirmation that exists with other plans or seeds (a new one needs --name)."""
    stored = next((s for s in storage.get_all_studies() if s.study_name == derived.name), None)
    if stored is None:
        return
    mine = derived.attrs[CONFIRM_ATTR]
    theirs = stored.user_attrs.get(CONFIRM_ATTR)
    if theirs is None:
        if stored.user_attrs.get("fingerprint") is not None:
            raise ConfigError(f"--name: study {derived.name!r} exists and is not a "
                              "confirmation; pass --name NEW")
        return  # created a moment ago by another worker: open_study waits for it

    def what(record: dict) -> str:
        names = ", ".join(e["label"] for e in record["plans"] if e["reference"] is not None)
        return f"{names or BASELINE_MODE} on seeds {_span(record['seeds'])} ({record['choice']})"

    def same(record: dict) -> tuple:
        return (record["study"], record["seeds"],
                [(e["name"], plan_key(e["config"]), e["rates"]) for e in record["plans"]])

    if same(json.loads(json.dumps(theirs))) != same(json.loads(json.dumps(mine))):
        raise ConfigError(f"study {derived.name!r} confirms {what(theirs)}; this command "
                          f"chooses {what(mine)}: run the first command again to resume it, or "
                          "pass --name NEW for a new confirmation")


def prepare(spec: StudySpec, storage_url: str | None = None, *, top: int | None = None,
            pareto: bool = False, trials: str | None = None, seeds: int = 0,
            first_seed: int | None = None, name: str | None = None,
            rates: str | None = None, variants: str | None = None) -> StudySpec:
    """Check everything and derive the confirmation's spec; nothing is written."""
    numbers = parse_trials(trials) if trials is not None else None
    sweep_rates = parse_rates(rates) if rates is not None else None
    named = load_variants(variants) if variants is not None else None
    fresh_seeds(set(), seeds, first_seed)  # the flags alone, before the study is read
    name = name or confirmation_name(spec.name)
    if not NAME.fullmatch(name) or ".." in name or name == spec.name:
        raise ConfigError(f"--name: must be letters, digits, '_', '-' and '.' (starting with a "
                          f"letter or digit), other than the study's own name; got {name!r}")
    study = open_existing(spec, storage_url)
    done = [r for r in completed(study) if r.config]
    if not done:
        raise ConfigError(f"study {spec.name!r} has no completed trials; nothing to confirm")
    arms = choose_arms(done, lr_sweep.stored_protocol(study))
    chosen = choose_plans(study, arms, top, pareto, numbers)
    fresh = fresh_seeds(study_seeds(study, spec.merged_space, spec.replicates), seeds,
                        first_seed)
    entries = plan_entries(spec, arms, chosen, sweep_rates, named)
    choice = (f"--top {top}" if top is not None else "--pareto" if pareto
              else f"--trials {','.join(map(str, numbers or []))}")
    if sweep_rates is not None:
        choice += f" --rates {','.join(f'{r:g}' for r in sweep_rates)}"
    if named:
        choice += f" --variants {','.join(named)}"
    derived = confirmation_spec(spec, resolve_storage(spec, storage_url), name, entries, fresh,
                                f"{choice} --seeds {seeds}")
    check_resume(study._storage, derived)
    return derived


def run_confirm(derived: StudySpec, *, threads: int | None = None, progress: bool = True,
                echo: Callable[[str], None] = print) -> optuna.Study:
    """Run (or resume, or join) the confirmation until every queued trial is finished."""
    from nas.search.worker import run_search

    return run_search(derived, progress=progress, echo=echo, threads=threads)

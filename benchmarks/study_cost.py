"""What a study costs before it runs: training FLOPs from its run configs, and accelerator hours
at a stated peak throughput and model FLOP utilisation (MFU).

    python benchmarks/study_cost.py studies/resformer_scaling_gpu.yaml              # H100 bf16
    python benchmarks/study_cost.py studies/resformer_scaling.yaml --peak-tflops 0.1 --mfu 1

Every trial of the spec's grid is built from its space (the categorical choices of `variant`
and of the model and train sections, `nas.search.lr_sweep.grid`; a study that samples its
space: `n_trials` random draws from it); with `lr_sweep: first_seed` the
other seeds run once per arm, at whichever rate the sweep picks (the cost does not depend on
which). A sweep with `lr_sweep.extend` may add up to that many rates beyond an edge of an arm's
grid, on every seed that chooses: a last row gives the cost if every arm extended one side to
the limit (the bound; an arm whose optimum is interior adds nothing). FLOPs per token follow
Kaplan et al. (2020): 6 x N (N: non-embedding parameters, the
untied output head included) for the forward and backward pass, plus 6 x n_layer x seq_len x
d_model for attention over the context (no discount for the causal mask); evaluation is
not counted. Prints a table per model shape and the total.
"""

from __future__ import annotations

import argparse

from optuna.trial import FixedTrial

from nas.config import RunConfig, from_dict
from nas.errors import ConfigError
from nas.params import vanilla_non_embedding_params
from nas.search import lr_sweep
from nas.search import space as spaces
from nas.search.spec import draw_configs, load_spec


def train_flops(cfg: RunConfig) -> float:
    m = cfg.model
    per_token = 6 * vanilla_non_embedding_params(m) + 6 * m.n_layer * m.seq_len * m.d_model
    return float(per_token * cfg.train.steps * cfg.tokens_per_step)


def trial_configs(path: str) -> tuple[list[RunConfig], float]:
    """The configs of the grid's trials, and the share of them an extension could add; for a
    study that samples its space, or walks a grid of plans too, `n_trials` random draws from
    it (the FLOPs depend on the shapes and budgets drawn, not on the plans)."""
    spec = load_spec(path)
    space = spec.merged_space
    if not spec.queue_driven and spec.sampler.type != "bruteforce":
        return draw_configs(spec, path, draws=spec.n_trials), 0.0
    grid = lr_sweep.grid(space)
    seeds = space.get("train", {}).get("seed")
    bound = 0.0
    if spec.queue_driven and spec.lr_sweep.extend:
        bound = spec.lr_sweep.extend / len(space["train"]["lr"])
    if spec.lr_sweep.protocol == "first_seed":
        # the sweep, plus each arm's other seeds once (the first rate stands in for the chosen)
        grid = [p for p in grid if p["train.seed"] == seeds[0]] + [
            p for p in grid if p["train.seed"] != seeds[0]
            and p["train.lr"] == space["train"]["lr"][0]]
    try:
        return [from_dict(spaces.sample(space, FixedTrial(p)), where=path) for p in grid], bound
    except ConfigError:
        raise
    except ValueError:  # FixedTrial: a choice of plan the grid of variants, sizes, rates leaves
        return draw_configs(spec, path, draws=spec.n_trials), 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study")
    parser.add_argument("--peak-tflops", type=float, default=989.0,
                        help="peak dense throughput (default: H100 SXM bf16, 989 TFLOP/s)")
    parser.add_argument("--mfu", type=float, default=0.4, help="model FLOP utilisation (0.4)")
    args = parser.parse_args()
    configs, bound = trial_configs(args.study)
    rate = args.peak_tflops * 1e12 * args.mfu
    rows: dict[str, list[float]] = {}
    for cfg in configs:
        m = cfg.model
        key = f"{m.n_layer}L d{m.d_model} ({vanilla_non_embedding_params(m):,})"
        row = rows.setdefault(key, [0, 0.0, 0.0, cfg.train.steps * cfg.tokens_per_step])
        row[0] += 1
        row[1] += train_flops(cfg)
    print(f"{args.study}: {len(configs)} trials; {args.peak_tflops:g} TFLOP/s peak at "
          f"{args.mfu:.0%} MFU\n")
    print("| size (non-embedding params) | trials | tokens per trial | FLOPs | hours |")
    print("|---|---:|---:|---:|---:|")
    for key, (n, flops, _, tokens) in rows.items():
        print(f"| {key} | {n} | {tokens:,.0f} | {flops:.3g} | {flops / rate / 3600:.2f} |")
    total = sum(r[1] for r in rows.values())
    print(f"| **total** | {len(configs)} | | {total:.3g} | **{total / rate / 3600:.1f}** |")
    if bound:
        print(f"| with every arm extended to the limit (bound) | {len(configs) * (1 + bound):.0f}"
              f" | | {total * (1 + bound):.3g} | {total * (1 + bound) / rate / 3600:.1f} |")


if __name__ == "__main__":
    main()

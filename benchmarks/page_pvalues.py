"""Every p-value docs/RESULTS.md quotes, recomputed from the committed databases and
Holm-adjusted across the whole page (no training).

    python benchmarks/page_pvalues.py

The page's two pre-registered tests, in fixed sequence (identity minus vanilla in studies/
resformer_primary.yaml; then the search's top plan minus identity in its confirmation,
FIXED_SEQUENCE), are left out of the family, as the page states before they ran. Every other
p-value on the page is one member of one family: each report's differences table (every cell's
exact sign-flip test, and each variant's pooled test over its cells,
`nas.reading.summary.difference_tests`), the seeds-that-did-not-choose test per variant
(`benchmarks/first_seed_split.py`), and the tests of a confirmation that the page quotes, as
it stated before the confirmation ran (each plan and named variant against vanilla, each
searched plan against the best named variant; `nas confirm`), for the studies in FAMILIES.
Printed: one row per test with its exact p, the Holm-adjusted p within its own table (what
`nas report` or `nas confirm` prints) and the Holm-adjusted p across the page (what the page
quotes), sorted by the page-wide p.
"""

from __future__ import annotations

from first_seed_split import split_rows

from nas.reading.arms import best_arms
from nas.reading.confirmation import load_confirmations
from nas.reading.stats import holm
from nas.reading.summary import difference_tests, several_budgets
from nas.search.lr_sweep import stored_protocol
from nas.search.spec import load_spec
from nas.search.study import open_existing
from nas.search.trials import completed

# (study spec, which of its tests the page quotes): "table" is the report's differences table,
# "other seeds" the first-seed split, "confirmation" its confirmations' tests against vanilla
# and against the best named variant.
FAMILIES = (
    ("studies/resformer_scaling.yaml", ("table", "other seeds")),
    ("studies/resformer_tokens.yaml", ("table",)),
    ("studies/resformer_prose.yaml", ("table",)),
    ("studies/resformer_depth.yaml", ("table",)),
    ("studies/resformer_fixed_data.yaml", ("table",)),
    ("studies/resformer_search.yaml", ("confirmation",)),
)
# The second pre-registered test (docs/RESULTS.md): (confirmation, the searched plan's trial,
# the named variant) of the contrast tested in fixed sequence after the primary one.
FIXED_SEQUENCE = ("resformer_search-confirm", 52, "identity")


def tests_of(spec_path: str, kinds: tuple[str, ...]) -> list[tuple[str, str, float, float]]:
    """(study, test, exact p, Holm p within its own table) for one study's quoted tests."""
    study = open_existing(load_spec(spec_path), None)
    arms = best_arms(completed(study), stored_protocol(study))
    out = []
    if "table" in kinds:
        tests = difference_tests(arms, several_budgets(arms))
        within = holm(list(tests.values()))
        for (key, p), p_table in zip(tests.items(), within, strict=True):
            name = key if isinstance(key, str) else f"{key[0]} at {key[1]}"
            out.append((study.study_name, name if isinstance(key, tuple)
                        else f"{name}, pooled", p, p_table))
    if "other seeds" in kinds:
        rows = split_rows(arms)
        within = holm([row[-1] for row in rows])
        out += [(study.study_name, f"{row[0]}, seeds that did not choose", row[-1], p_table)
                for row, p_table in zip(rows, within, strict=True)]
    if "confirmation" in kinds:
        for c in load_confirmations(study):
            out += [(c.name, f"{p.label} - vanilla", p.p, p.p_holm) for p in c.chosen]
            out += [(c.name, f"{r.plan.label} - {r.named.label}", r.p, r.p_holm)
                    for r in c.rivalries
                    if r.best and (c.name, r.plan.trial, r.named.name) != FIXED_SEQUENCE]
    return out


def main() -> None:
    tests = [t for spec, kinds in FAMILIES for t in tests_of(spec, kinds)]
    page = holm([p for _, _, p, _ in tests])
    print(f"{len(tests)} p-values, Holm-adjusted across the page (the two pre-registered tests "
          "aside)\n")
    print("| study | test | exact p | Holm p, its table | Holm p, the page |")
    print("|---|---|---:|---:|---:|")
    for (study, name, p, p_table), p_page in sorted(zip(tests, page, strict=True),
                                                     key=lambda t: (t[1], t[0][2])):
        print(f"| {study} | {name} | {p:.2g} | {p_table:.2g} | {p_page:.2g} |")


if __name__ == "__main__":
    main()

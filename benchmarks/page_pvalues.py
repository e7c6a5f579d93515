"""Every p-value docs/RESULTS.md quotes, recomputed from the committed databases and
Holm-adjusted across the whole page (no training).

    python benchmarks/page_pvalues.py

The page's one pre-registered primary test (identity minus vanilla in studies/resformer_primary.
yaml) is left out of the family, as the page states before it ran. Every other p-value on the
page is one member of one family: each report's differences table (every cell's exact sign-flip
test, and each variant's pooled test over its cells, `nas.reading.summary.difference_tests`)
and the seeds-that-did-not-choose test per variant (`benchmarks/first_seed_split.py`), for the
studies in FAMILIES. Printed: one row per test with its exact p, the Holm-adjusted p within its
own table (what `nas report` prints) and the Holm-adjusted p across the page (what the page
quotes), sorted by the page-wide p.
"""

from __future__ import annotations

from first_seed_split import split_rows

from nas.reading.arms import best_arms
from nas.reading.stats import holm
from nas.reading.summary import difference_tests, several_budgets
from nas.search.lr_sweep import stored_protocol
from nas.search.spec import load_spec
from nas.search.study import open_existing
from nas.search.trials import completed

# (study spec, which of its tests the page quotes): "table" is the report's differences table,
# "other seeds" the first-seed split.
FAMILIES = (
    ("studies/resformer_scaling.yaml", ("table", "other seeds")),
    ("studies/resformer_tokens.yaml", ("table",)),
    ("studies/resformer_prose.yaml", ("table",)),
    ("studies/resformer_depth.yaml", ("table",)),
)


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
    return out


def main() -> None:
    tests = [t for spec, kinds in FAMILIES for t in tests_of(spec, kinds)]
    page = holm([p for _, _, p, _ in tests])
    print(f"{len(tests)} p-values, Holm-adjusted across the page (the primary test aside)\n")
    print("| study | test | exact p | Holm p, its table | Holm p, the page |")
    print("|---|---|---:|---:|---:|")
    for (study, name, p, p_table), p_page in sorted(zip(tests, page, strict=True),
                                                     key=lambda t: (t[1], t[0][2])):
        print(f"| {study} | {name} | {p:.2g} | {p_table:.2g} | {p_page:.2g} |")


if __name__ == "__main__":
    main()

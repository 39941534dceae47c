"""SPQR's effect in every population comparison, one row per setting, in one table and figure.

``effects.md`` / ``effects.png`` (this folder) cover the early single-agent and offline
runs. The longer online comparisons came later, as populations (issue 19), each in its
own folder with its own tables; this script puts them side by side. One row per setting
(environment, precision of the critics' products, SPQR pairs) at its largest budget, with
every seed that reached it: SPQR (beta 1) minus its beta 0 twin, paired by seed, for the
final evaluation at the budget and the best up to it (each run read up to the budget with
the analysis layer's ``until``), 95% Student-t intervals, and both arms' acceptance rates.

Left out, because another row holds the same setting at a larger budget or with more
seeds: ``hopper_population_15k`` (the 50k rows' setting at 15k), ``hopper_bf16_kernel_30k``
and ``..._seeds3to5`` (the 75k row's setting at 30k), and the 30k-100k readings of the
75k and 200k runs (their folders' ``budgets.txt``). ``hopper_bf16_50k`` has no SPQR arm
(float32 against bfloat16 at beta 0). The Hopper 75k row's seeds 0-2 are the 200k row's
agents read at 75k.

    python benchmarks/learning/population_effects.py   # writes effects_population.{md,png}
"""

from __future__ import annotations

import sys
from pathlib import Path

from torchrl_spqr.analysis import effects_table, paired_effects
from torchrl_spqr.analysis.figures import plot_effects

HERE = Path(__file__).resolve().parent
OUT = HERE / "effects_population"
ARMS = ("beta0.0_N10", "beta1.0_N10")  # every population folder's arm prefixes

# (label, budget in environment steps, [(folder holding <arm>_seed<s>, seeds)]);
# for the 50k three-arm population the beta 0 arm lives in each pairs' folder.
SETTINGS: list[tuple[str, int, list[tuple[str, tuple[int, ...]]]]] = [
    (
        "Hopper-v5, fp32, next_policy pairs, 50k",
        50_000,
        [("hopper_population_50k/next_policy", (0, 1, 2))],
    ),
    ("Hopper-v5, fp32, data pairs, 50k", 50_000, [("hopper_population_50k/data", (0, 1, 2))]),
    ("Hopper-v5, fp32, data pairs, 25k", 25_000, [("hopper_fp32_25k_seeds6to8/arms", (6, 7, 8))]),
    (
        "Hopper-v5, bf16, data pairs, 75k",
        75_000,
        [
            ("hopper_bf16_100k/arms", (0, 1, 2)),
            ("hopper_bf16_100k_seeds9to11/arms", (9, 10, 11)),
            ("hopper_bf16_75k_seeds12to14/arms", (12, 13, 14)),
            ("hopper_bf16_75k_seeds15to17/arms", (15, 16, 17)),
            ("hopper_bf16_75k_seeds18to20/arms", (18, 19, 20)),
        ],
    ),
    ("Hopper-v5, bf16, data pairs, 200k", 200_000, [("hopper_bf16_long/arms", (0, 1, 2))]),
    ("Walker2d-v5, bf16, data pairs, 75k", 75_000, [("walker2d_bf16_75k/arms", (0, 1, 2))]),
    (
        "HalfCheetah-v5, bf16, data pairs, 60k",
        60_000,
        [
            ("halfcheetah_bf16_60k/arms", (0, 1, 2)),
            ("halfcheetah_bf16_60k_seeds3to5/arms", (3, 4, 5)),
        ],
    ),
]

# population folders with SPQR arms that no row reads, and why (a test checks that every
# population folder is in SETTINGS or here)
LEFT_OUT = {
    "hopper_population_15k": "the 50k rows' setting (same seeds) at 15k",
    "hopper_bf16_kernel_30k": "the bf16 75k row's setting at 30k",
    "hopper_bf16_kernel_30k_seeds3to5": "the bf16 75k row's setting at 30k",
}


def setting_groups(sources: list[tuple[str, tuple[int, ...]]], root: Path = HERE) -> dict:
    """Arm (``beta0.0_N10``, ``beta1.0_N10``) -> its run folders in a setting's ``sources``."""
    return {
        arm: [root / f / f"{arm}_seed{s}" for f, seeds in sources for s in seeds] for arm in ARMS
    }


def setting_rows(root: Path = HERE) -> list[dict]:
    """:func:`~torchrl_spqr.analysis.paired_effects` of every setting at its budget."""
    rows = []
    for label, budget, sources in SETTINGS:
        groups = {  # "<label>/beta0.0": paired_effects labels the comparison <label>
            f"{label}/{arm.split('_')[0]}": runs
            for arm, runs in setting_groups(sources, root).items()
        }
        missing = [str(r) for runs in groups.values() for r in runs if not r.is_dir()]
        if missing:
            raise FileNotFoundError(f"{label}: no run folder {missing}")
        (row,) = paired_effects(groups, until=budget)
        want = sorted(s for _, seeds in sources for s in seeds)
        if row["seeds"] != want:
            raise ValueError(f"{label}: paired seeds {row['seeds']}, expected {want}")
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    """The Markdown written to ``effects_population.md``: the command, then the table (its
    footer names the step each row's runs were read up to)."""
    return (
        "Written by `python benchmarks/learning/population_effects.py` (SPQR at beta 1 against "
        "beta 0, SAC-Ens N = 10, UTD 1; one row per setting at its largest budget).\n\n"
        + effects_table(rows)
        + "\n"
    )


def main() -> None:
    rows = setting_rows()
    text = table(rows)
    OUT.with_suffix(".md").write_text(text)
    paths = plot_effects(rows, OUT)
    print(text)
    print("written:", OUT.with_suffix(".md"), *paths, file=sys.stderr)


if __name__ == "__main__":
    main()

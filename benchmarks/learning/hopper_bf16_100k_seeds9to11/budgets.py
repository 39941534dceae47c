"""Seeds 9-11 at 30k, 50k, 75k and 100k steps, alone and pooled with seeds 0-2 (and 3-5).

Hopper-v5 SAC-Ens (N = 10, UTD 1), bfloat16 products, beta 0 against beta 1 on dataset
pairs. This folder's runs (seeds 9-11, ``arms/``) have the configuration of seeds 0-2
(``../hopper_bf16_100k``) except the seeds; seeds 3-5 (``../hopper_bf16_kernel_30k_seeds3to5``)
ran the same configuration to 30k. The tables are those of ``../hopper_bf16_100k/budgets.py``
(its ``report``): per arm the final evaluation at the budget, the best up to it and the mean
of the last four evaluations, mean +- sd over seeds, then SPQR's effect paired by seed with
its 95% Student-t interval. The primary figure (fixed in this folder's README before the
runs were read) is the final at the largest budget that all runs reached by the plan's stopping
time (75k), seeds 0-2 and 9-11 pooled.

    python benchmarks/learning/hopper_bf16_100k_seeds9to11/budgets.py
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
LEARNING = HERE.parent
SEED_FOLDERS = {  # seeds -> the folder holding their runs
    (0, 1, 2): LEARNING / "hopper_bf16_100k" / "arms",
    (3, 4, 5): LEARNING / "hopper_bf16_kernel_30k_seeds3to5" / "arms",
    (9, 10, 11): HERE / "arms",
}
BUDGETS = (30_000, 50_000, 75_000)  # the runs stopped after 75k (the plan's clock rule)


sys.path.insert(0, str(LEARNING))  # the sibling folders import as namespace packages
from hopper_bf16_100k import budgets as SHARED  # noqa: E402  (its report and seed_groups)

ARMS = SHARED.ARMS
groups = functools.partial(SHARED.seed_groups, SEED_FOLDERS)  # arm -> the runs of seed sets


def main(budgets: tuple[int, ...] = BUDGETS) -> None:
    SHARED.report_seed_sets(
        SEED_FOLDERS,
        [([(9, 10, 11)], step, "seeds 9-11") for step in budgets]
        + [([(0, 1, 2), (3, 4, 5), (9, 10, 11)], 30_000, "seeds 0-5 and 9-11")]
        + [([(0, 1, 2), (9, 10, 11)], step, "seeds 0-2 and 9-11") for step in budgets[1:]],
    )


if __name__ == "__main__":
    main(tuple(int(b) for b in sys.argv[1:]) or BUDGETS)

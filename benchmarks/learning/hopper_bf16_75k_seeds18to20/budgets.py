"""Seeds 18-20 at 30k, 50k and 75k steps, alone and pooled with the earlier seeds.

Hopper-v5 SAC-Ens (N = 10, UTD 1), bfloat16 products, beta 0 against beta 1 on dataset
pairs. This folder's runs (seeds 18-20, ``arms/``) have the configuration of seeds 12-17
(``../hopper_bf16_75k_seeds15to17``) except the seeds. The tables are those of
``../hopper_bf16_100k/budgets.py`` (its ``report``): per arm the final evaluation at the
budget, the best up to it and the mean of the last four evaluations, mean +- sd over
seeds, then SPQR's effect paired by seed with its 95% Student-t interval. The primary
figure (fixed in this folder's README before the runs started) is the final at 75k, seeds
0-2 and 9-20 pooled (fifteen seeds).

    python benchmarks/learning/hopper_bf16_75k_seeds18to20/budgets.py [BUDGET ...]
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
LEARNING = HERE.parent
BUDGETS = (30_000, 50_000, 75_000)
FIFTEEN = [(0, 1, 2), (9, 10, 11), (12, 13, 14), (15, 16, 17), (18, 19, 20)]  # run to 75k

sys.path.insert(0, str(LEARNING))  # the sibling folders import as namespace packages
from hopper_bf16_75k_seeds15to17 import budgets as EARLIER  # noqa: E402  (seeds 0-17)

SHARED, ARMS = EARLIER.SHARED, EARLIER.ARMS  # ../hopper_bf16_100k/budgets.py: report, arms
SEED_FOLDERS = {**EARLIER.SEED_FOLDERS, (18, 19, 20): HERE / "arms"}  # seeds -> their runs
groups = functools.partial(SHARED.seed_groups, SEED_FOLDERS)  # arm -> the runs of seed sets


def main(budgets: tuple[int, ...] = BUDGETS) -> None:
    SHARED.report_seed_sets(
        SEED_FOLDERS,
        [([(18, 19, 20)], step, "seeds 18-20") for step in budgets]
        + [([(0, 1, 2), (3, 4, 5), *FIFTEEN[1:]], 30_000, "seeds 0-5 and 9-20")]
        + [(FIFTEEN, step, "seeds 0-2 and 9-20") for step in budgets[1:]],
    )


if __name__ == "__main__":
    main(tuple(int(b) for b in sys.argv[1:]) or BUDGETS)

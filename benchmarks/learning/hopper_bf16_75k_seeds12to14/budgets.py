"""Seeds 12-14 at 30k, 50k and 75k steps, alone and pooled with the earlier seeds.

Hopper-v5 SAC-Ens (N = 10, UTD 1), bfloat16 products, beta 0 against beta 1 on dataset
pairs. This folder's runs (seeds 12-14, ``arms/``) have the configuration of seeds 0-2
(``../hopper_bf16_100k``) and 9-11 (``../hopper_bf16_100k_seeds9to11``) except the seeds
and ``collector.total_frames`` (75k here), which only sets where training stops; seeds 3-5
(``../hopper_bf16_kernel_30k_seeds3to5``) ran the same configuration to 30k. The tables are
those of ``../hopper_bf16_100k/budgets.py`` (its ``report``): per arm the final evaluation
at the budget, the best up to it and the mean of the last four evaluations, mean +- sd over
seeds, then SPQR's effect paired by seed with its 95% Student-t interval. The primary
figure (fixed in this folder's README before the runs started) is the final at 75k, seeds
0-2, 9-11 and 12-14 pooled.

    python benchmarks/learning/hopper_bf16_75k_seeds12to14/budgets.py
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
LEARNING = HERE.parent
BUDGETS = (30_000, 50_000, 75_000)
NINE = [(0, 1, 2), (9, 10, 11), (12, 13, 14)]  # every seed that reached 75k

sys.path.insert(0, str(LEARNING))  # the sibling folders import as namespace packages
from hopper_bf16_100k_seeds9to11 import budgets as EARLIER  # noqa: E402  (seeds 0-11)

SHARED, ARMS = EARLIER.SHARED, EARLIER.ARMS  # ../hopper_bf16_100k/budgets.py: report, arms
SEED_FOLDERS = {**EARLIER.SEED_FOLDERS, (12, 13, 14): HERE / "arms"}  # seeds -> their runs
groups = functools.partial(SHARED.seed_groups, SEED_FOLDERS)  # arm -> the runs of seed sets


def main(budgets: tuple[int, ...] = BUDGETS) -> None:
    SHARED.report_seed_sets(
        SEED_FOLDERS,
        [([(12, 13, 14)], step, "seeds 12-14") for step in budgets]
        + [([(0, 1, 2), (3, 4, 5), *NINE[1:]], 30_000, "seeds 0-5 and 9-14")]
        + [(NINE, step, "seeds 0-2 and 9-14") for step in budgets[1:]],
    )


if __name__ == "__main__":
    main(tuple(int(b) for b in sys.argv[1:]) or BUDGETS)

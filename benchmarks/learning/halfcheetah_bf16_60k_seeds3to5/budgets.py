"""HalfCheetah-v5 seeds 3-5 at 20k, 40k and 60k steps, alone and pooled with seeds 0-2.

This folder's runs (seeds 3-5, ``arms/``) have the configuration of seeds 0-2
(``../halfcheetah_bf16_60k``) except the seeds: SAC-Ens (N = 10, UTD 1), bfloat16
products, beta 0 against beta 1 on dataset pairs. The tables are those of
``../hopper_bf16_100k/budgets.py`` (its ``report``). The primary figure (fixed in this
folder's README before the runs started) is the final at 60k, seeds 0-5 pooled.

    python benchmarks/learning/halfcheetah_bf16_60k_seeds3to5/budgets.py [BUDGET ...]
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
LEARNING = HERE.parent
BUDGETS = (20_000, 40_000, 60_000)

sys.path.insert(0, str(LEARNING))  # the sibling folders import as namespace packages
from hopper_bf16_100k import budgets as SHARED  # noqa: E402  (report_seed_sets, arms)

ARMS = SHARED.ARMS  # arm folder prefix -> its name
SEED_FOLDERS = {(0, 1, 2): LEARNING / "halfcheetah_bf16_60k" / "arms", (3, 4, 5): HERE / "arms"}
groups = functools.partial(SHARED.seed_groups, SEED_FOLDERS)  # arm -> the runs of seed sets


def main(budgets: tuple[int, ...] = BUDGETS) -> None:
    SHARED.report_seed_sets(
        SEED_FOLDERS,
        [([(3, 4, 5)], step, "seeds 3-5") for step in budgets]
        + [([(0, 1, 2), (3, 4, 5)], step, "seeds 0-5") for step in budgets],
        env="HalfCheetah-v5",
    )


if __name__ == "__main__":
    main(tuple(int(b) for b in sys.argv[1:]) or BUDGETS)

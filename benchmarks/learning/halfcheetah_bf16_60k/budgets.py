"""HalfCheetah-v5 seeds 0-2 at 20k, 40k and 60k steps (or the budgets given).

HalfCheetah-v5 SAC-Ens (N = 10, UTD 1), bfloat16 products, beta 0 against beta 1 on dataset
pairs (this folder's ``arms/``). The tables are those of ``../hopper_bf16_100k/budgets.py``
(its ``report``): per arm the final evaluation at the budget, the best up to it and the
mean of the last four evaluations, mean +- sd over seeds, then SPQR's effect paired by
seed with its 95% Student-t interval. The primary figure (fixed in this folder's README
before the runs started) is the final at 60k.

    python benchmarks/learning/halfcheetah_bf16_60k/budgets.py [BUDGET ...]
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BUDGETS = (20_000, 40_000, 60_000)

sys.path.insert(0, str(HERE.parent))  # the sibling folders import as namespace packages
from hopper_bf16_100k import budgets as SHARED  # noqa: E402  (report, arms)

ARMS = SHARED.ARMS  # arm folder prefix -> its name


def main(budgets: tuple[int, ...] = BUDGETS) -> None:
    print(
        "HalfCheetah-v5 SAC-Ens N = 10, bfloat16 products; beta 0 against beta 1 on dataset pairs"
    )
    print("mean +- sd over seeds; final: the evaluation at the budget (5 episodes)")
    groups = SHARED.seed_groups({(0, 1, 2): HERE / "arms"}, [(0, 1, 2)])
    for step in budgets:
        SHARED.report(groups, step, "seeds 0-2")


if __name__ == "__main__":
    main(tuple(int(b) for b in sys.argv[1:]) or BUDGETS)

"""Walker2d-v5 seeds 0-2 at 30k, 50k and 75k steps (or the budgets given).

The runs of this folder's ``arms/`` (beta 0 against beta 1 on dataset pairs, bfloat16
products), in the tables of ``../hopper_bf16_100k/budgets.py`` (its
``report_environment``). The primary figure (fixed in this folder's README before the
runs started) is the final at 75k.

    python benchmarks/learning/walker2d_bf16_75k/budgets.py [BUDGET ...]
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BUDGETS = (30_000, 50_000, 75_000)

sys.path.insert(0, str(HERE.parent))  # the sibling folders import as namespace packages
from hopper_bf16_100k import budgets as SHARED  # noqa: E402  (report_environment, arms)

ARMS = SHARED.ARMS  # arm folder prefix -> its name


def main(budgets: tuple[int, ...] = BUDGETS) -> None:
    SHARED.report_environment("Walker2d-v5", HERE / "arms", budgets)


if __name__ == "__main__":
    main(tuple(int(b) for b in sys.argv[1:]) or BUDGETS)

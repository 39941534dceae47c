"""Seeds 6-8 at 25k steps with float32 products, alone and pooled with seeds 0-5.

Hopper-v5 SAC-Ens (N = 10, UTD 1), beta 0 against beta 1 on dataset pairs. This
folder's runs (seeds 6-8) computed the critics' products in float32 (the default,
``network.matmul_dtype=null``); seeds 0-2 (``../hopper_bf16_100k``) and seeds 3-5
(``../hopper_bf16_kernel_30k_seeds3to5``), read up to 25k, used bfloat16 products, with
otherwise the same configuration (the resolved configs in ``hydra/`` differ from
seeds 3-5's in the seeds and ``network.matmul_dtype`` only; the runs were planned for
30k steps and stopped at 25k). The tables are those of
``../hopper_bf16_100k/budgets.py`` (its ``report``): per arm the final evaluation at
25k, the best up to 25k and the mean of the last four evaluations, mean +- sd over
seeds, then SPQR's effect paired by seed with its 95% Student-t interval.

    python benchmarks/learning/hopper_fp32_25k_seeds6to8/pooled_at_25k.py
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
LEARNING = HERE.parent
STEP = 25_000
SEED_FOLDERS = {  # seeds -> the folder holding their runs
    (0, 1, 2): LEARNING / "hopper_bf16_100k" / "arms",
    (3, 4, 5): LEARNING / "hopper_bf16_kernel_30k_seeds3to5" / "arms",
    (6, 7, 8): HERE / "arms",
}


sys.path.insert(0, str(LEARNING))  # the sibling folders import as namespace packages
from hopper_bf16_100k import budgets as SHARED  # noqa: E402  (its report and seed_groups)

groups = functools.partial(SHARED.seed_groups, SEED_FOLDERS)  # arm -> the runs of seed sets


def main() -> None:
    report = SHARED.report
    print("Hopper-v5 SAC-Ens N = 10; beta 0 against beta 1 on dataset pairs, at 25k steps")
    print("mean +- sd over seeds; final: the evaluation at 25k (5 episodes)")
    report(groups([(6, 7, 8)]), STEP, "seeds 6-8, float32 products")
    report(groups([(0, 1, 2), (3, 4, 5)]), STEP, "seeds 0-5, bfloat16 products")
    report(
        groups([(0, 1, 2), (3, 4, 5), (6, 7, 8)]),
        STEP,
        "seeds 0-8 (0-5 bfloat16 products, 6-8 float32)",
    )


if __name__ == "__main__":
    main()

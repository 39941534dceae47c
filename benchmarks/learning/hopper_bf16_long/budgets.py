"""The 100k run of ``../hopper_bf16_100k`` continued: SPQR's effect from 100k to 200k steps.

Hopper-v5 SAC-Ens (N = 10, UTD 1), bfloat16 products, beta 0 against beta 1 on
dataset pairs, seeds 0-2 (this folder's ``arms/``, each run's ``metrics.csv`` up to
:data:`END` steps). First it checks that every run's rows up to 100k are, byte for
byte, those of the same run in ``../hopper_bf16_100k/arms`` (the continuation
resumed from that run's 100k checkpoint). Then, at each budget, the table and the
paired effects of ``../hopper_bf16_100k/budgets.py`` (whose ``report`` it calls):
per arm the evaluation at the budget ("final"), the best up to it, the mean of the
last four evaluations, mean +- sd over seeds, and beta 1 minus beta 0 paired by
seed with its 95% Student-t interval. Every run is read up to the budget with the
analysis layer's ``until``.

    python benchmarks/learning/hopper_bf16_long/budgets.py
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

HERE = Path(__file__).resolve().parent
FIRST = HERE.parent / "hopper_bf16_100k"
END = 200_000
BUDGETS = (100_000, 125_000, 150_000, 175_000, 200_000)


def first_part():
    """``../hopper_bf16_100k/budgets.py`` as a module (its ``ARMS`` and ``report``)."""
    spec = importlib.util.spec_from_file_location("budgets_100k", FIRST / "budgets.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_FIRST_PART = first_part()
ARMS = _FIRST_PART.ARMS  # run-name prefix -> arm label, those of the 100k run


def check_prefix(run: Path) -> int:
    """Lines of ``run``'s ``metrics.csv`` equal to those of its 100k run (all of them);
    raises if they differ."""
    first = (FIRST / "arms" / run.name / "metrics.csv").read_text().splitlines()
    here = (run / "metrics.csv").read_text().splitlines()
    if here[: len(first)] != first:
        raise ValueError(f"{run}: its first {len(first)} lines differ from {FIRST.name}'s")
    return len(first)


def main() -> None:
    print("Hopper-v5 SAC-Ens N = 10, bfloat16 products; beta 0 against beta 1 on dataset pairs")
    print("mean +- sd over seeds; final: the evaluation at the budget (5 episodes)")
    groups = {g: [HERE / "arms" / f"{g}_seed{s}" for s in range(3)] for g in ARMS}
    runs = [run for g in groups.values() for run in g]
    lines = {check_prefix(run) for run in runs}
    print(
        f"\nThe {len(runs)} runs' metrics.csv up to 100,000 steps ({', '.join(map(str, lines))} "
        f"lines with the header) are those of ../{FIRST.name}/arms, byte for byte."
    )
    for step in BUDGETS:
        _FIRST_PART.report(groups, step, "seeds 0-2")


if __name__ == "__main__":
    main()

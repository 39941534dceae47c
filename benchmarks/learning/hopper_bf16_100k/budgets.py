"""SPQR's effect at 30k, 50k, 75k and 100k steps: one 100k run read at four budgets.

Hopper-v5 SAC-Ens (N = 10, UTD 1), bfloat16 products, beta 0 against beta 1 on
dataset pairs, seeds 0-2 (this folder's ``arms/``). At each budget it prints, per
arm, the evaluation return at that step ("final"), the best evaluation up to it
("best"), and the mean of the last four evaluations up to it ("last 4": the
evaluations at step - 7,500 to step, a less noisy final), mean +- sd over seeds; then SPQR's
effect, beta 1 minus beta 0 paired by seed, with its 95% Student-t interval.
Every run is read up to the budget with the analysis layer's ``until`` (the same
as ``python -m torchrl_spqr.analysis arms --until STEP``).

At 30k it also pools seeds 3-5 of ``../hopper_bf16_kernel_30k_seeds3to5``: the same
code path and configuration, except ``collector.total_frames`` (30k there), which
only sets where training stops.

    python benchmarks/learning/hopper_bf16_100k/budgets.py
"""

from __future__ import annotations

import statistics
from pathlib import Path

from torchrl_spqr.analysis import mean_ci, paired_effects, read_metrics, summary_rows
from torchrl_spqr.analysis.runs import series

HERE = Path(__file__).resolve().parent
SEEDS_3_TO_5 = HERE.parent / "hopper_bf16_kernel_30k_seeds3to5" / "arms"
BUDGETS = (30_000, 50_000, 75_000, 100_000)
LAST = 4  # evaluations averaged for "last 4" (evaluation every 2,500 steps)
ARMS = {"beta0.0_N10": "beta 0", "beta1.0_N10": "beta 1 (data pairs)"}


def seed_groups(
    seed_folders: dict[tuple[int, ...], Path], seed_sets: list[tuple[int, ...]]
) -> dict[str, list[Path]]:
    """Arm -> its runs (``<folder>/<arm>_seed<s>``) of the listed seed sets, each set's runs
    in the folder ``seed_folders`` gives it (for the scripts that pool later seeds)."""
    return {
        g: [seed_folders[seeds] / f"{g}_seed{s}" for seeds in seed_sets for s in seeds]
        for g in ARMS
    }


def last_mean(run: Path, step: int) -> float:
    """Mean of the run's last :data:`LAST` evaluations up to ``step``."""
    steps, values = series(read_metrics(run, step), "eval_return")
    if len(values) < LAST or steps[-1] != step:
        raise ValueError(f"{run}: fewer than {LAST} evaluations up to {step}, or none at {step}")
    return statistics.mean(values[-LAST:])


def ci_text(diffs: list[float]) -> str:
    """Mean of ``diffs`` and its 95% Student-t interval."""
    m, lo, hi = (float(x[0]) for x in mean_ci(diffs))
    return f"{m:+.1f} [{lo:+.1f}, {hi:+.1f}]"


def sd_text(values: list[float]) -> str:
    return f"{statistics.mean(values):.1f} +- {statistics.stdev(values):.1f}"


def report(groups: dict[str, list[Path]], step: int, label: str) -> None:
    """The table and the paired effects of ``groups`` at ``step``."""
    rows = {r["group"]: r for r in summary_rows(groups, until=step)}
    short = {g: r["steps"] for g, r in rows.items() if r["steps"] != [step] * len(groups[g])}
    if set(rows) != set(ARMS) or short:
        raise ValueError(f"every run must evaluate at {step}; last evaluations: {short}")
    lasts = {g: [last_mean(run, step) for run in runs] for g, runs in groups.items()}
    print(f"\n## {step:,} steps, {label}\n")
    print(
        "| arm | seeds | final | best up to here | mean of the last 4 evaluations | per seed, final |"
    )
    print("|---|---|---|---|---|---|")
    for g, name in ARMS.items():
        r = rows[g]
        print(
            f"| {name} | {r['seeds']} | {sd_text(r['final'])} | {sd_text(r['best'])} "
            f"| {sd_text(lasts[g])} | {', '.join(f'{v:.1f}' for v in r['final'])} |"
        )
    (eff,) = paired_effects(groups, until=step)  # runs paired by seed: for the acceptance
    print(f"\nSPQR's effect, beta 1 minus beta 0, paired by seed {eff['seeds']} (mean, 95% t):")
    for name, per_arm in (
        ("final", {g: r["final"] for g, r in rows.items()}),
        ("best", {g: r["best"] for g, r in rows.items()}),
        ("last 4", lasts),
    ):
        diffs = [w - b for w, b in zip(per_arm["beta1.0_N10"], per_arm["beta0.0_N10"])]
        print(f"  {name}: {', '.join(f'{v:+.1f}' for v in diffs)}; {ci_text(diffs)}")
    print(
        f"  acceptance rate up to here: {eff['accept_base']:.3f} (beta 0) / "
        f"{eff['accept_spqr']:.3f} (beta 1)"
    )


def print_header(env: str = "Hopper-v5", products: str = "bfloat16 products") -> None:
    print(f"{env} SAC-Ens N = 10, {products}; beta 0 against beta 1 on dataset pairs")
    print("mean +- sd over seeds; final: the evaluation at the budget (5 episodes)")


def report_seed_sets(
    seed_folders: dict[tuple[int, ...], Path],
    reports: list[tuple[list[tuple[int, ...]], int, str]],
    env: str = "Hopper-v5",
    products: str = "bfloat16 products",
) -> None:
    """The header, then :func:`report` of each ``(seed sets, budget, label)`` in ``reports``
    (the runs in the folders ``seed_folders`` gives each seed set: :func:`seed_groups`)."""
    print_header(env, products)
    for seed_sets, step, label in reports:
        report(seed_groups(seed_folders, seed_sets), step, label)


def report_environment(env: str, arms: Path, budgets: tuple[int, ...]) -> None:
    """The header, then :func:`report` of seeds 0-2 in ``arms`` at each budget: the runs of
    another environment with this configuration (``../walker2d_bf16_75k``,
    ``../halfcheetah_bf16_60k``)."""
    report_seed_sets({(0, 1, 2): arms}, [([(0, 1, 2)], step, "seeds 0-2") for step in budgets], env)


def main() -> None:
    print_header()
    groups = {g: [HERE / "arms" / f"{g}_seed{s}" for s in range(3)] for g in ARMS}
    for step in BUDGETS:
        report(groups, step, "seeds 0-2")
    pooled = {
        g: runs + [SEEDS_3_TO_5 / f"{g}_seed{s}" for s in range(3, 6)] for g, runs in groups.items()
    }
    report(pooled, 30_000, "seeds 0-2 of this run and 3-5 of ../hopper_bf16_kernel_30k_seeds3to5")


if __name__ == "__main__":
    main()

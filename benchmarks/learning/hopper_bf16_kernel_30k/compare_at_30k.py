"""This folder's runs against the committed runs of the same settings, all read at 30k steps.

Prints, per arm, the evaluation return at 30k steps ("final at 30k") and the
best evaluation up to 30k, mean +- sd over seeds 0-2; the training speed of
each process (steps/s over its logged intervals); and the per-seed
differences of the final return against each reference. The reference runs
went to 50k; only their rows up to 30k are read.

    python benchmarks/learning/hopper_bf16_kernel_30k/compare_at_30k.py
"""

from __future__ import annotations

import statistics
from pathlib import Path

from torchrl_spqr.analysis import mean_ci, read_metrics
from torchrl_spqr.analysis.runs import series

HERE = Path(__file__).resolve().parent
LEARNING = HERE.parent
STEP = 30_000
ARMS = {  # name -> folder pattern with {s} for the seed
    "bf16, this kernel, beta 0": HERE / "arms" / "beta0.0_N10_seed{s}",
    "bf16, this kernel, beta 1 (data pairs)": HERE / "arms" / "beta1.0_N10_seed{s}",
    "bf16, section 10's kernel, beta 0": LEARNING / "hopper_bf16_50k/bf16/beta0.0_N10_seed{s}",
    "float32, beta 0": LEARNING / "hopper_bf16_50k/fp32/beta0.0_N10_seed{s}",
    "float32, beta 1 (data pairs), older code": LEARNING
    / "hopper_population_50k/data/beta1.0_N10_seed{s}",
}
SPEED = {  # name -> seed-0 folder of each process (its metrics.csv carries the process's wall time)
    "this kernel, beta 0": HERE / "arms" / "beta0.0_N10_seed0",
    "this kernel, beta 1": HERE / "arms" / "beta1.0_N10_seed0",
    "section 10's kernel (bf16)": LEARNING / "hopper_bf16_50k/bf16/beta0.0_N10_seed0",
    "float32": LEARNING / "hopper_bf16_50k/fp32/beta0.0_N10_seed0",
}
PAIRS = [  # (arm, reference): per-seed differences of the final return
    ("bf16, this kernel, beta 0", "bf16, section 10's kernel, beta 0"),
    ("bf16, this kernel, beta 0", "float32, beta 0"),
    ("bf16, this kernel, beta 1 (data pairs)", "float32, beta 1 (data pairs), older code"),
    ("bf16, this kernel, beta 1 (data pairs)", "bf16, this kernel, beta 0"),
]


def read(folder: Path) -> tuple[float, float]:
    """(eval return at STEP, best eval return up to STEP) of one run."""
    evals = [(s, v) for s, v in zip(*series(read_metrics(folder), "eval_return")) if s <= STEP]
    last_step, last = max(evals)
    if last_step != STEP:
        raise ValueError(f"{folder}: no evaluation at {STEP} steps (last at {last_step})")
    return last, max(v for _, v in evals)


def interval_rates(folder: Path) -> list[float]:
    """Steps per second of each logged interval between 5k steps (updates start) and STEP."""
    steps, times = series(read_metrics(folder), "time_s")
    pts = [(s, t) for s, t in zip(steps, times) if 5_000 <= s <= STEP]
    return [(s1 - s0) / (t1 - t0) for (s0, t0), (s1, t1) in zip(pts, pts[1:])]


def paired_line(label: str, diffs: list[float]) -> str:
    """``label``, the per-seed differences, their mean and its 95% Student-t interval."""
    m, lo, hi = (float(x[0]) for x in mean_ci(diffs))
    return (
        f"  {label}: {', '.join(f'{v:+.1f}' for v in diffs)}; "
        f"mean {m:+.1f}, 95% t interval [{lo:.1f}, {hi:.1f}]"
    )


def main() -> None:
    res = {name: [read(Path(str(p).format(s=s))) for s in range(3)] for name, p in ARMS.items()}
    print(f"Hopper-v5 SAC-Ens N = 10, seeds 0-2, at {STEP} steps (mean +- sd over seeds)")
    print("| arm | final at 30k | best up to 30k | per seed, final |")
    print("|---|---|---|---|")
    for name, rows in res.items():
        final, best = [r[0] for r in rows], [r[1] for r in rows]
        print(
            f"| {name} | {statistics.mean(final):.1f} +- {statistics.stdev(final):.1f} "
            f"| {statistics.mean(best):.1f} +- {statistics.stdev(best):.1f} "
            f"| {', '.join(f'{v:.1f}' for v in final)} |"
        )
    print(
        "\nTraining speed (environment steps and evaluations included; each process shared "
        "the machine with another, and with other work at times): steps/s per logged "
        "interval, 5k to 30k steps"
    )
    for name, folder in SPEED.items():
        rates = interval_rates(folder)
        print(f"  {name}: fastest {max(rates):.2f}, median {statistics.median(rates):.2f}")
    print("\nPer-seed differences of the final return at 30k:")
    for a, b in PAIRS:
        print(paired_line(f"{a}  minus  {b}", [x[0] - y[0] for x, y in zip(res[a], res[b])]))


if __name__ == "__main__":
    main()

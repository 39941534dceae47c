"""Tables and plot of the SAC anchor (run.sh): both arms' evaluation returns over seeds.

    python summarize.py RUNS_DIR [--frames 20000] [--out FOLDER]

``RUNS_DIR`` holds ``torchrl_sac/seedS/eval_reward.csv`` and
``spqr_sac_ens_N2_beta0/seedS/eval_reward.csv`` (``frames,eval_return`` rows, no
header: TorchRL's CSV logger format, which run.sh also writes for our arm). Writes
into ``--out``: ``curves/<arm>_seed<S>.csv`` (``frames,eval_return``), ``summary.csv``
(arm, seed, final and best evaluation return, and the mean of the last three
evaluations, less noisy than the final one), ``stats.csv`` (per arm and metric: n,
mean, std with ddof 1, 95% Student-t interval of the mean), ``difference.csv`` (ours
minus TorchRL's mean, Welch's 95% interval and p-value) and ``hopper_sac_anchor.png``.
Only finished runs (a row at ``--frames``) are counted; the table is also printed.
"""

from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path

import numpy as np
from scipy import stats

#: folder name under RUNS_DIR -> label
ARMS = {
    "torchrl_sac": "TorchRL SAC (sota-implementations/sac)",
    "spqr_sac_ens_N2_beta0": "ours: SAC-Ens N=2, beta=0",
}


def read_curve(path: Path) -> list[tuple[int, float]]:
    """``(frames, eval_return)`` rows of a header-less two-column CSV, sorted by frames."""
    rows = []
    with path.open() as f:
        for rec in csv.reader(f):
            if len(rec) >= 2 and rec[0].strip():
                rows.append((int(float(rec[0])), float(rec[1])))
    return sorted(rows)


def t_interval(x: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Student-t interval of the mean of ``x`` (``nan`` for fewer than two values)."""
    if len(x) < 2:
        return math.nan, math.nan
    half = stats.t.ppf(0.5 + level / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x))
    return float(x.mean() - half), float(x.mean() + half)


def welch(a: np.ndarray, b: np.ndarray, level: float = 0.95) -> tuple[float, float, float, float]:
    """``mean(a) - mean(b)``, Welch's ``level`` interval of it and the two-sided p-value."""
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    diff = float(a.mean() - b.mean())
    dof = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    half = stats.t.ppf(0.5 + level / 2, dof) * math.sqrt(va + vb)
    p = float(stats.ttest_ind(a, b, equal_var=False).pvalue)
    return diff, diff - half, diff + half, p


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path)
    parser.add_argument("--frames", type=int, default=20_000, help="budget of a finished run")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = parser.parse_args()

    curves_dir = args.out / "curves"
    curves_dir.mkdir(parents=True, exist_ok=True)
    curves: dict[str, dict[int, list[tuple[int, float]]]] = {arm: {} for arm in ARMS}
    for arm in ARMS:
        for seed_dir in sorted((args.runs / arm).glob("seed*")):
            path = seed_dir / "eval_reward.csv"
            if not path.is_file():
                continue
            rows = read_curve(path)
            if not rows or rows[-1][0] < args.frames:
                print(f"{seed_dir}: unfinished (last row at {rows[-1][0] if rows else 0} frames)")
                continue
            seed = int(seed_dir.name.removeprefix("seed"))
            curves[arm][seed] = rows
            with (curves_dir / f"{arm}_seed{seed}.csv").open("w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["frames", "eval_return"])
                w.writerows(rows)

    summary, stat_rows = [], []
    per_arm: dict[str, dict[str, np.ndarray]] = {}
    for arm, by_seed in curves.items():
        finals = {s: rows[-1][1] for s, rows in by_seed.items()}
        bests = {s: max(r for _, r in rows) for s, rows in by_seed.items()}
        last3 = {s: float(np.mean([r for _, r in rows[-3:]])) for s, rows in by_seed.items()}
        for s in sorted(by_seed):
            summary.append([arm, s, f"{finals[s]:.1f}", f"{bests[s]:.1f}", f"{last3[s]:.1f}"])
        per_arm[arm] = {
            "final": np.array([finals[s] for s in sorted(by_seed)]),
            "best": np.array([bests[s] for s in sorted(by_seed)]),
            "last3": np.array([last3[s] for s in sorted(by_seed)]),
        }
        for metric, x in per_arm[arm].items():
            if len(x) == 0:
                continue
            lo, hi = t_interval(x)
            sd = x.std(ddof=1) if len(x) > 1 else math.nan
            stat_rows.append([arm, metric, len(x), x.mean(), sd, lo, hi])
    with (args.out / "summary.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["arm", "seed", "final_eval_return", "best_eval_return", "last3_eval_return"])
        w.writerows(summary)

    a, b = per_arm["spqr_sac_ens_N2_beta0"], per_arm["torchrl_sac"]
    diffs = []
    for metric in ("final", "best", "last3"):
        if len(a[metric]) > 1 and len(b[metric]) > 1:
            diffs.append([metric, *welch(a[metric], b[metric])])
    with (args.out / "stats.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["arm", "metric", "n", "mean", "std", "ci95_low", "ci95_high"])
        for r in stat_rows:
            w.writerow([*r[:3], *(f"{v:.1f}" for v in r[3:])])
    with (args.out / "difference.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["metric", "ours_minus_torchrl", "welch_ci95_low", "welch_ci95_high", "p"])
        for d in diffs:
            w.writerow([d[0], *(f"{v:.1f}" for v in d[1:4]), f"{d[4]:.3f}"])

    print("arm | metric | n | mean | std | 95% t-interval")
    for r in stat_rows:
        print(f"{r[0]} | {r[1]} | {r[2]} | {r[3]:.1f} | {r[4]:.1f} | [{r[5]:.1f}, {r[6]:.1f}]")
    for d in diffs:
        print(
            f"ours - torchrl, {d[0]}: {d[1]:.1f} (Welch 95% [{d[2]:.1f}, {d[3]:.1f}], p={d[4]:.3f})"
        )
    plot(curves, args.out / "hopper_sac_anchor.png")


def plot(curves: dict[str, dict[int, list[tuple[int, float]]]], path: Path) -> None:
    """Mean +- std band over seeds per arm, each seed as a thin line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for (arm, by_seed), color in zip(curves.items(), ("tab:blue", "tab:orange")):
        if not by_seed:
            continue
        for rows in by_seed.values():
            ax.plot(*zip(*rows), color=color, lw=0.7, alpha=0.45)
        frames = sorted(set.intersection(*(set(f for f, _ in rows) for rows in by_seed.values())))
        y = np.array([[dict(rows)[f] for f in frames] for rows in by_seed.values()])
        mean = y.mean(0)
        sd = y.std(0, ddof=1) if len(y) > 1 else np.zeros_like(mean)
        ax.plot(frames, mean, color=color, lw=2, label=f"{ARMS[arm]} ({len(y)} seeds)")
        ax.fill_between(frames, mean - sd, mean + sd, color=color, alpha=0.18)
    ax.set_xlabel("environment frames")
    ax.set_ylabel("evaluation return (1 deterministic episode)")
    ax.set_title("Hopper-v5: TorchRL SAC vs our SAC-Ens (N=2, beta=0); band: mean +- std")
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()

"""Plots of a run folder's ``metrics.csv``: learning curve and SPQR diagnostics.

python -m torchrl_spqr.plot RUN_DIR [RUN_DIR ...]
"""

from __future__ import annotations

import argparse
import csv
import re
from pathlib import Path

__all__ = ["read_metrics", "plot_run", "group_name", "plot_groups", "summary_table"]

_DIAG = [
    ("spqr_kl", "SPQR KL"),
    ("spqr_spike", "spike (max |eigenvalue|)"),
    ("spqr_accept_rate", "acceptance rate (level 0.05)"),
    ("spqr_mp_ratio", "residual top eigenvalue / MP edge"),
    ("spqr_ensemble_std", "ensemble std of Q"),
]


def read_metrics(run_dir: str | Path) -> list[dict[str, float]]:
    """Rows of ``metrics.csv`` with numeric values (empty cells dropped)."""
    rows = []
    with (Path(run_dir) / "metrics.csv").open(newline="") as f:
        for r in csv.DictReader(f):
            rows.append({k: float(v) for k, v in r.items() if v not in ("", None)})
    return rows


def _step_key(rows) -> str:
    return "frames" if any(r.get("frames", 0) > 0 for r in rows) else "updates"


def _series(rows, key):
    step = _step_key(rows)
    pts = [(r[step], r[key]) for r in rows if key in r]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_run(run_dir: str | Path, formats: tuple[str, ...] = ("png",)) -> list[Path]:
    """Write ``learning_curve.<fmt>`` (evaluation and training return, diagnostics) in ``run_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    fig, axes = plt.subplots(2, 3, figsize=(14, 7.5))
    ax = axes[0, 0]
    x, y = _series(rows, "eval_return")
    ax.plot(x, y, "o-", label="evaluation (deterministic, mean over episodes)")
    x, y = _series(rows, "train_return")
    ax.plot(x, y, ".", alpha=0.5, label="training episodes")
    xlabel = "environment steps" if _step_key(rows) == "frames" else "gradient updates"
    if any("normalized_score" in r for r in rows):
        x, y = _series(rows, "normalized_score")
        ax2 = ax.twinx()
        ax2.plot(x, y, "s--", color="tab:green", label="normalised score")
        ax2.set_ylabel("normalised score (100 = reference expert)")
        ax2.legend(fontsize=8, loc="lower right")
    ax.set(xlabel=xlabel, ylabel="return", title=run_dir.name)
    ax.legend(fontsize=8)
    for ax, (key, label) in zip(axes.flat[1:], _DIAG):
        x, y = _series(rows, key)
        ax.plot(x, y)
        ax.set(xlabel=xlabel, ylabel=label, title=label)
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out = []
    for fmt in formats:
        p = run_dir / f"learning_curve.{fmt}"
        fig.savefig(p, dpi=110)
        out.append(p)
    plt.close(fig)
    return out


def group_name(run_dir: str | Path) -> str:
    """Runs that differ only by seed share a group: the folder name without ``seed<k>``."""
    name = Path(run_dir).name
    return re.sub(r"_?seed\d+", "", name) or name


def _by_group(run_dirs) -> dict[str, list[list[dict[str, float]]]]:
    groups: dict[str, list[list[dict[str, float]]]] = {}
    for d in run_dirs:
        groups.setdefault(group_name(d), []).append(read_metrics(d))
    return groups


def plot_groups(
    run_dirs,
    out: str | Path,
    keys: tuple[str, ...] = ("eval_return", "spqr_kl", "spqr_accept_rate"),
    formats: tuple[str, ...] = ("png",),
) -> list[Path]:
    """Mean and min-max band over seeds for each group, one panel per metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    groups = _by_group(run_dirs)
    fig, axes = plt.subplots(1, len(keys), figsize=(5.2 * len(keys), 4.2))
    axes = np.atleast_1d(axes)
    xlabel = "steps"
    for ax, key in zip(axes, keys):
        for gname, runs in sorted(groups.items()):
            series = [_series(rows, key) for rows in runs]
            series = [s for s in series if s[0]]
            if not series:
                continue
            xlabel = "environment steps" if _step_key(runs[0]) == "frames" else "gradient updates"
            steps = sorted(set.intersection(*(set(x) for x, _ in series)))
            vals = np.array([[dict(zip(x, y))[t] for t in steps] for x, y in series])
            line = ax.plot(steps, vals.mean(0), label=f"{gname} ({len(series)} seeds)")[0]
            if len(series) > 1:
                ax.fill_between(steps, vals.min(0), vals.max(0), alpha=0.2, color=line.get_color())
        ax.set(xlabel=xlabel, ylabel=key, title=f"{key}\n(mean; band: min-max over seeds)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    out = Path(out)
    paths = []
    for fmt in formats:
        path = out.with_suffix("." + fmt)
        fig.savefig(path, dpi=110)
        paths.append(path)
    plt.close(fig)
    return paths


def summary_table(run_dirs, key: str = "eval_return") -> str:
    """Markdown table per group: final and best evaluation (mean +- std over seeds)."""
    import statistics

    def fmt(v: list[float]) -> str:
        sd = statistics.stdev(v) if len(v) > 1 else 0.0
        return f"{statistics.mean(v):.1f} +- {sd:.1f}"

    lines = [f"| group | seeds | final {key} | best {key} |", "|---|---|---|---|"]
    for gname, runs in sorted(_by_group(run_dirs).items()):
        finals, bests = [], []
        for rows in runs:
            vals = [r[key] for r in rows if key in r]
            if vals:
                finals.append(vals[-1])
                bests.append(max(vals))
        if finals:
            lines.append(f"| {gname} | {len(finals)} | {fmt(finals)} | {fmt(bests)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("run_dirs", nargs="+")
    p.add_argument("--svg", action="store_true", help="also write SVG")
    p.add_argument(
        "--compare",
        metavar="OUT",
        help="also plot the runs grouped by folder name minus seed into OUT.png, print a table",
    )
    p.add_argument("--key", default="eval_return", help="metric of the grouped plot and table")
    args = p.parse_args(argv)
    fmts = ("png", "svg") if args.svg else ("png",)
    for d in args.run_dirs:
        for path in plot_run(d, fmts):
            print(path)
    if args.compare:
        keys = (args.key, "spqr_kl", "spqr_accept_rate", "spqr_spike")
        for path in plot_groups(args.run_dirs, args.compare, keys=keys, formats=fmts):
            print(path)
        print(summary_table(args.run_dirs, args.key))


if __name__ == "__main__":
    main()

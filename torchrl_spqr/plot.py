"""Plots of a run folder's ``metrics.csv``: learning curve and SPQR diagnostics.

python -m torchrl_spqr.plot RUN_DIR [RUN_DIR ...]
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

__all__ = ["read_metrics", "plot_run"]

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


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("run_dirs", nargs="+")
    p.add_argument("--svg", action="store_true", help="also write SVG")
    args = p.parse_args(argv)
    for d in args.run_dirs:
        for path in plot_run(d, ("png", "svg") if args.svg else ("png",)):
            print(path)


if __name__ == "__main__":
    main()

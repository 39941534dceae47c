"""Experiment 3 (toy part): ensemble size N in {3, 6, 10, 21} with and without SPQR.

The bandit and chain problems of experiment 2 (``toy_problems.py``), SAC-N style
(squared error summed over members, min over the target ensemble on the chain),
``beta = 0`` against ``beta`` in ``--betas`` (default 1 and 10; paper density for
N <= 10; for N = 21 the corrected density, and the paper's at the largest beta). The question: does SPQR with a small N reach what a larger N reaches
without it (bias of the min over members, greedy regret)?

    python experiments/ensemble_size.py --seeds 0 1 2 --jobs 2     # ~30 min on 2 busy cores
    python experiments/ensemble_size.py --tiny --out /tmp/size      # seconds

Runs already done by ``beta_sweep.py`` with the same settings (N = 10) are re-used
from the shared cache ``<out>/.cache/toy_runs.jsonl``. Writes ``ensemble_size.csv``
and ``ensemble_size.png``; the Hopper part is ``ensemble_size_hopper.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from beta_sweep import EVAL, STEPS, run_one  # noqa: E402
from exp_common import base_parser, group_mean_std, pyplot, toy_sweep  # noqa: E402

SIZES = (3, 6, 10, 21)


def make_tasks(args) -> list[dict]:
    tasks = []
    for problem in args.problems:
        for n in args.sizes:
            if n >= 15:  # corrected density (recommended), and the paper's at the largest beta
                arms = [(0.0, "corrected")] + [(b, "corrected") for b in args.betas]
                arms += [(max(args.betas), "paper")]
            else:
                arms = [(0.0, "paper")] + [(b, "paper") for b in args.betas]
            for beta, density in arms:
                for seed in args.seeds:
                    tasks.append(
                        {
                            "problem": problem,
                            "N": n,
                            "beta": beta,
                            "density": density,
                            "seed": seed,
                            "steps": 60 if args.tiny else STEPS[problem],
                            "batch_size": 32 if args.tiny else 256,
                            "hidden": [16] if args.tiny else [64, 64],
                        }
                    )
    return tasks


PANELS = (
    ("bias_min", "bias of min over members"),
    ("spread", "ensemble std"),
    ("err_corr", "error correlation (vs truth)"),
    ("spike", "spike (mean max |eig|)"),
    ("accept", "acceptance rate"),
)


def arm_label(r: dict) -> str:
    """SAC-N, or SPQR with its beta; the paper density at N >= 15 is marked (not the default)."""
    if r["beta"] == 0:
        return "SAC-N"
    if r["density"] == "paper" and r["N"] >= 15:
        return f"SPQR beta={r['beta']:g}, paper density"
    return f"SPQR beta={r['beta']:g}"


def _arm_order(arm: str) -> tuple:
    if arm == "SAC-N":
        return (0, 0.0, "")
    beta = float(arm.split("=")[1].split(",")[0])
    return (1, beta, arm)


def plot(rows: list[dict], path: Path) -> None:
    plt = pyplot()
    problems = list(dict.fromkeys(r["problem"] for r in rows))
    cols = len(PANELS) + 1
    fig, axes = plt.subplots(
        len(problems), cols, figsize=(2.6 * cols, 2.7 * len(problems)), squeeze=False
    )
    for i, p in enumerate(problems):
        ev = EVAL[p]
        prs = [r for r in rows if r["problem"] == p]
        keys = [f"{ev}_{m}" for m, _ in PANELS] + ["greedy_regret"]
        agg = group_mean_std(prs, ["beta", "density", "N"], keys)
        for r in agg:
            r["arm"] = arm_label(r)
        arms = sorted({r["arm"] for r in agg}, key=_arm_order)
        for j, (m, label) in enumerate([*PANELS, ("greedy_regret", "greedy regret (min)")]):
            key = m if m == "greedy_regret" else f"{ev}_{m}"
            ax = axes[i, j]
            for k, arm in enumerate(arms):
                rs = sorted((r for r in agg if r["arm"] == arm), key=lambda r: r["N"])
                ax.errorbar(
                    [r["N"] * (1 + 0.04 * (k - 1)) for r in rs],
                    [r[key] for r in rs],
                    yerr=[r[key + "_std"] for r in rs],
                    marker="o" if "paper density" not in arm else "x",
                    ms=3 if "paper density" not in arm else 5,
                    capsize=2,
                    color=f"C{k}",
                    label=arm,
                    ls="-" if arm == "SAC-N" else "--",
                )
            ax.set_xscale("log")
            sizes = sorted({r["N"] for r in agg})
            ax.set_xticks(sizes)
            ax.set_xticklabels([str(s) for s in sizes])
            ax.minorticks_off()
            ax.set_xlabel("ensemble size N")
            ax.set_title(label, fontsize=8)
            if m == "accept":
                ax.axhline(0.95, color="grey", ls=":", lw=0.8)
            if j == 0:
                ax.set_ylabel(f"{p} ({ev} pairs)")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8)
    seeds = len({r["seed"] for r in rows})
    fig.suptitle(
        f"Experiment 3: ensemble size with and without SPQR (mean +- std, {seeds} seeds; "
        "SPQR density: paper for N <= 10, corrected for N = 21 unless marked)",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> Path:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--problems", nargs="+", default=["bandit", "chain"])
    p.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    p.add_argument("--betas", type=float, nargs="+", default=[1.0, 10.0])
    p.add_argument("--plot-only", action="store_true", help="redraw the PNG from the CSV")
    args = p.parse_args(argv)
    return toy_sweep(
        args, "ensemble_size", run_one, [] if args.plot_only else make_tasks(args), plot
    )


if __name__ == "__main__":
    main()

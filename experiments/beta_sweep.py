"""Experiment 2: how beta acts on a bandit (no bootstrapping) and a chain MDP (shared targets).

An N = 10 critic ensemble (2x64 MLPs, one :class:`~torchrl_spqr.QEnsemble`) is trained
with the squared error summed over members plus ``beta * spqr_kl`` (paper mode), for
beta in {0, 0.1, 1, 10, 100}. Reported on held-out pairs with known true Q: bias of
the min over members, ensemble spread, the members' error correlation (with the
truth) and residual correlation (without), the spike statistic, the acceptance rate
of the independence test, the SPQR KL, and the regret of acting greedily on the
ensemble's min.

    python experiments/beta_sweep.py --seeds 0 1 2 --jobs 2      # ~15 min on 2 busy cores
    python experiments/beta_sweep.py --tiny --out /tmp/beta       # seconds

Writes ``beta_sweep.csv`` (one row per problem, beta, seed) and ``beta_sweep.png``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from exp_common import base_parser, group_mean_std, pyplot, toy_sweep  # noqa: E402
from toy_problems import TrainConfig, make_problem, train_ensemble  # noqa: E402

BETAS = (0.0, 0.1, 1.0, 10.0, 100.0)
STEPS = {"bandit": 1500, "chain": 1500}
EVAL = {"bandit": "uniform", "chain": "grid"}  # the eval set shown in the figure


def run_one(task: dict) -> dict:
    problem = make_problem(task["problem"], task["seed"])
    cfg = TrainConfig(
        num_members=task["N"],
        beta=task["beta"],
        density=task["density"],
        steps=task["steps"],
        batch_size=task["batch_size"],
        hidden=tuple(task["hidden"]),
    )
    return {
        **{k: v for k, v in task.items() if k != "hidden"},
        **train_ensemble(problem, cfg, task["seed"]),
    }


def make_tasks(args) -> list[dict]:
    tasks = []
    for problem in args.problems:
        for beta in args.betas:
            for seed in args.seeds:
                tasks.append(
                    {
                        "problem": problem,
                        "N": args.N,
                        "beta": beta,
                        "density": args.density,
                        "seed": seed,
                        "steps": 60 if args.tiny else (args.steps or STEPS[problem]),
                        "batch_size": 32 if args.tiny else 256,
                        "hidden": [16] if args.tiny else [64, 64],
                    }
                )
    return tasks


PLOT_METRICS = [
    ("bias_min", "bias of min over members"),
    ("spread", "ensemble std"),
    ("err_corr", "error correlation (vs truth)"),
    ("resid_corr", "residual correlation"),
    ("spike", "spike (mean max |eig|)"),
    ("accept", "acceptance rate (level 0.05)"),
    ("spqr_kl", "SPQR KL"),
]


def plot(rows: list[dict], path: Path) -> None:
    plt = pyplot()
    problems = list(dict.fromkeys(r["problem"] for r in rows))
    cols = len(PLOT_METRICS) + 1
    fig, axes = plt.subplots(
        len(problems), cols, figsize=(2.3 * cols, 2.4 * len(problems)), squeeze=False
    )
    for i, p in enumerate(problems):
        ev = EVAL.get(p, "grid")
        prs = [r for r in rows if r["problem"] == p]
        agg = group_mean_std(
            prs, ["beta"], [f"{ev}_{m}" for m, _ in PLOT_METRICS] + ["greedy_regret"]
        )
        agg.sort(key=lambda r: r["beta"])
        x = [max(r["beta"], 0.01) for r in agg]
        for j, (m, label) in enumerate([*PLOT_METRICS, ("greedy_regret", "greedy regret (min)")]):
            key = m if m == "greedy_regret" else f"{ev}_{m}"
            ax = axes[i, j]
            y = [r[key] for r in agg]
            e = [r[key + "_std"] for r in agg]
            ax.errorbar(x, y, yerr=e, marker="o", ms=3, capsize=2)
            ax.set_xscale("log")
            ax.set_xticks([0.01, 0.1, 1, 10, 100])
            ax.set_xticklabels(["0", "0.1", "1", "10", "100"])
            ax.set_xlabel("beta")
            ax.set_title(label, fontsize=8)
            if m == "resid_corr":
                n = prs[0]["N"]
                ax.axhline(-1 / (n - 1), color="grey", ls="--", lw=0.8, label="null -1/(N-1)")
                ax.legend(loc="best")
            if m == "accept":
                ax.axhline(0.95, color="grey", ls="--", lw=0.8, label="null 0.95")
                ax.legend(loc="best")
            if j == 0:
                ax.set_ylabel(f"{p} ({ev} pairs)")
    n = rows[0]["N"]
    seeds = len({r["seed"] for r in rows})
    fig.suptitle(f"Experiment 2: beta sweep, N = {n}, mean +- std over {seeds} seeds", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> Path:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--problems", nargs="+", default=["bandit", "chain"])
    p.add_argument("--betas", type=float, nargs="+", default=list(BETAS))
    p.add_argument("--N", type=int, default=10)
    p.add_argument("--density", default="paper")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--plot-only", action="store_true", help="redraw the PNG from the CSV")
    args = p.parse_args(argv)
    return toy_sweep(args, "beta_sweep", run_one, [] if args.plot_only else make_tasks(args), plot)


if __name__ == "__main__":
    main()

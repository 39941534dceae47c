"""Experiment 3 (Hopper part): offline SAC-N with N in {3, 6, 10, 21}, with and without SPQR.

Runs ``sota_scripts/sac_n_spqr`` (its Hydra config, composed with overrides, and the
script's own ``train``, exactly what its ``main`` calls) on a locally built Minari dataset, then collects every
run's ``metrics.csv`` into one table and one figure.

Budget (2 busy CPU cores): 2x256 critics and actor, batch 256, ``--updates`` gradient
updates (default 1,500: about 0.05% of the papers' 3M), one seed, evaluation of 5
deterministic episodes at the middle and the end. SPQR arm: ``--beta`` (default 10)
on ``Q_k(s', a'~pi)``, paper density for N <= 10 and the corrected density for
N = 21 (the package's recommendation for N >= 15).

    export MINARI_DATASETS_PATH=$PWD/runs/minari
    python -m torchrl_spqr.data build --env Hopper-v5 --kind random --steps 50000 --id local/hopper/random-v0
    python experiments/ensemble_size_hopper.py --seeds 0 --jobs 1      # ~1-1.5 h on 2 busy cores
    python experiments/ensemble_size_hopper.py --collect-only          # table + figure from the run folders

Runs live in ``--runs`` (default ``runs/exp_hopper``, not committed); a run whose
``metrics.csv`` already holds its final evaluation is not run again. Writes
``ensemble_size_hopper.csv`` (one row per run), ``ensemble_size_hopper_curves.csv``
(the logged rows of every run) and ``ensemble_size_hopper.png``.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from exp_common import base_parser, pyplot, read_csv, run_tasks, write_csv  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCRIPT_DIR = ROOT / "sota_scripts" / "sac_n_spqr"
SIZES = (3, 6, 10, 21)
CURVE_FIELDS = (
    "updates",
    "eval_return",
    "normalized_score",
    "loss_qvalue",
    "q_mean",
    "target_value",
    "alpha",
    "spqr_kl",
    "spqr_spike",
    "spqr_accept_rate",
    "spqr_mp_ratio",
    "spqr_mean_pairwise_corr",
    "spqr_ensemble_std",
    "updates_per_s",
)
MEANS = (
    "q_mean",
    "loss_qvalue",
    "spqr_kl",
    "spqr_spike",
    "spqr_accept_rate",
    "spqr_mp_ratio",
    "spqr_mean_pairwise_corr",
    "spqr_ensemble_std",
    "updates_per_s",
)


def run_name(t: dict) -> str:
    return f"N{t['N']}_beta{t['beta']:g}_{t['density']}_seed{t['seed']}"


def overrides(t: dict) -> list[str]:
    u = t["updates"]
    hidden = ",".join(str(h) for h in t["hidden"])
    return [
        "dataset=local_hopper_random",
        f"dataset.id={t['dataset']}",
        f"network.ensemble_size={t['N']}",
        f"network.hidden_sizes=[{hidden}]",
        f"spqr.beta={t['beta']}",
        f"spqr.density={t['density']}",
        f"seed={t['seed']}",
        f"optim.num_updates={u}",
        f"optim.batch_size={t['batch_size']}",
        f"logger.log_interval={t['log_interval']}",
        f"logger.eval_interval={max(u // 2, 1)}",
        f"logger.eval_episodes={t['eval_episodes']}",
        "logger.progress=false",
        f"env.max_episode_steps={t['max_episode_steps']}",
        f"checkpoint.interval={10 * u}",
        "threads=1",
    ]


def _finished(run_dir: Path, updates: int) -> bool:
    path = run_dir / "metrics.csv"
    if not path.exists():
        return False
    rows = read_csv(path)
    return any(r.get("updates") == updates and r.get("eval_return") not in ("", None) for r in rows)


def _script_train():
    """``train`` of ``sota_scripts/sac_n_spqr/sac_n_spqr.py`` (the script's loop; its ``utils``)."""
    import importlib.util
    import sys

    if str(SCRIPT_DIR) not in sys.path:
        sys.path.insert(0, str(SCRIPT_DIR))
    spec = importlib.util.spec_from_file_location("sac_n_spqr", SCRIPT_DIR / "sac_n_spqr.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.train


def run_one(t: dict) -> dict:
    """Train one configuration (unless its folder already holds the finished run)."""
    run_dir = Path(t["runs"]) / run_name(t)
    if not _finished(run_dir, t["updates"]):
        from hydra import compose, initialize_config_dir

        train = _script_train()
        with initialize_config_dir(config_dir=str(SCRIPT_DIR), version_base="1.3"):
            cfg = compose(config_name="config", overrides=overrides(t))
        try:
            train(cfg, run_dir)
        except Exception:
            # the run's own plot at the end is not needed here; the metrics are
            if not _finished(run_dir, t["updates"]):
                raise
    return {"run": run_name(t)}


def summarise(t: dict) -> tuple[dict, list[dict]]:
    run_dir = Path(t["runs"]) / run_name(t)
    rows = read_csv(run_dir / "metrics.csv")
    evals = [r for r in rows if r.get("eval_return") not in ("", None)]
    logs = [r for r in rows if r.get("spqr_kl") not in ("", None)]
    half = [r for r in logs if r["updates"] > t["updates"] // 2] or logs
    out = {
        "N": t["N"],
        "beta": t["beta"],
        "density": t["density"],
        "seed": t["seed"],
        "updates": t["updates"],
        "hidden": "x".join(str(h) for h in t["hidden"]),
        "final_return": evals[-1]["eval_return"] if evals else math.nan,
        "final_normalized_score": evals[-1].get("normalized_score", math.nan)
        if evals
        else math.nan,
        "mid_return": evals[0]["eval_return"] if len(evals) > 1 else math.nan,
        "time_s": rows[-1]["time_s"] if rows else math.nan,
    }
    for m in MEANS:
        vals = [float(r[m]) for r in half if r.get(m) not in ("", None)]
        out[f"{m}_2nd_half"] = sum(vals) / len(vals) if vals else math.nan
    out["final_q_mean"] = logs[-1]["q_mean"] if logs else math.nan
    curve = [
        {
            "run": run_name(t),
            "N": t["N"],
            "beta": t["beta"],
            **{k: r.get(k, "") for k in CURVE_FIELDS},
        }
        for r in rows
    ]
    return out, curve


def null_kl(num_members: int, density: str, samples: int = 20_000) -> float:
    """Mean SPQR KL of ``num_members`` i.i.d. Gaussian members (the independence level)."""
    import torch

    from torchrl_spqr import spqr_kl

    g = torch.Generator().manual_seed(0)
    return float(spqr_kl(torch.randn(num_members, samples, generator=g), density=density))


def plot(summary: list[dict], curves: list[dict], path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    sizes = sorted({r["N"] for r in summary})
    arms = sorted({(r["beta"] > 0) for r in summary})
    width = 0.38
    ax = axes[0]
    for j, spqr in enumerate(arms):
        xs = [i + (j - 0.5) * width for i in range(len(sizes))]
        vals, pts = [], []
        for x, n in zip(xs, sizes):
            rs = [r for r in summary if r["N"] == n and (r["beta"] > 0) == spqr]
            v = [float(r["final_normalized_score"]) for r in rs]
            vals.append(sum(v) / len(v) if v else math.nan)
            pts += [(x, y) for y in v]
        beta = next((r["beta"] for r in summary if (r["beta"] > 0) == spqr), 0)
        ax.bar(
            xs,
            vals,
            width,
            color=f"C{j}",
            alpha=0.6,
            label=f"SPQR-SAC-N (beta = {beta:g})" if spqr else "SAC-N (beta = 0)",
        )
        ax.scatter([x for x, _ in pts], [y for _, y in pts], color="k", s=8, zorder=3)
    ax.set_xticks(range(len(sizes)))
    ax.set_xticklabels([f"N = {n}" for n in sizes])
    ax.set_ylabel("final normalised score (bar: mean, dots: seeds)")
    ax.set_title("evaluation at the last update (5 episodes)")
    ax.legend(loc="lower right")
    nulls = {n: null_kl(n, "corrected" if n >= 15 else "paper") for n in sizes}
    for ax, key, label in (
        (axes[1], "q_mean", "mean Q(s, a) on the batch"),
        (axes[2], "spqr_kl", "SPQR KL on Q(s', a'~pi) minus its i.i.d. null mean"),
        (axes[3], "spqr_accept_rate", "acceptance rate (level 0.05)"),
    ):
        for i, n in enumerate(sizes):
            for spqr, ls in ((False, "-"), (True, "--")):
                rs = [
                    r
                    for r in curves
                    if r["N"] == n and (r["beta"] > 0) == spqr and r.get(key) not in ("", None)
                ]
                for k, seed in enumerate(sorted({r["run"] for r in rs})):
                    rr = [r for r in rs if r["run"] == seed]
                    shift = nulls[n] if key == "spqr_kl" else 0.0
                    ax.plot(
                        [r["updates"] for r in rr],
                        [float(r[key]) - shift for r in rr],
                        ls,
                        color=f"C{i}",
                        lw=1,
                        label=f"N = {n}{', SPQR' if spqr else ''}" if k == 0 else None,
                    )
        ax.set_xlabel("gradient updates")
        ax.set_ylabel(key + (" - null" if key == "spqr_kl" else ""))
        ax.set_title(label, fontsize=9)
    axes[2].axhline(0, color="grey", lw=0.6, ls=":")
    axes[1].legend(loc="best", fontsize=7, ncol=2)
    if any(r.get("spqr_accept_rate") not in ("", None) for r in curves):
        axes[3].axhline(0.95, color="grey", lw=0.6, ls=":")
    u = summary[0]["updates"] if summary else 0
    seeds = sorted({r["seed"] for r in summary})
    fig.suptitle(
        f"Experiment 3: offline SAC-N on a local Hopper-v5 random dataset, {u} updates, "
        f"seeds {seeds} (solid: beta = 0, dashed: SPQR)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def make_tasks(args) -> list[dict]:
    tasks = []
    for seed in args.seeds:
        for beta in (0.0, args.beta):
            for n in args.sizes:
                density = "corrected" if n >= 15 else "paper"
                tasks.append(
                    {
                        "N": n,
                        "beta": beta,
                        "density": density,
                        "seed": seed,
                        "updates": args.updates,
                        "hidden": args.hidden,
                        "batch_size": args.batch_size,
                        "log_interval": args.log_interval,
                        "eval_episodes": args.eval_episodes,
                        "max_episode_steps": args.max_episode_steps,
                        "dataset": args.dataset,
                        "runs": str(args.runs),
                    }
                )
    # baselines first (they do not depend on the SPQR beta), largest N first
    tasks.sort(key=lambda t: (t["beta"], -t["N"]))
    return tasks


def main(argv=None) -> Path:
    p = base_parser(__doc__.splitlines()[0])
    p.set_defaults(seeds=[0])
    p.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    p.add_argument("--beta", type=float, default=10.0)
    p.add_argument("--updates", type=int, default=1500)
    p.add_argument("--hidden", type=int, nargs="+", default=[256, 256])
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--log-interval", type=int, default=100)
    p.add_argument("--eval-episodes", type=int, default=5)
    p.add_argument("--max-episode-steps", type=int, default=1000)
    p.add_argument("--dataset", default="local/hopper/random-v0")
    p.add_argument("--runs", type=Path, default=ROOT / "runs" / "exp_hopper")
    p.add_argument("--collect-only", action="store_true", help="only build the table and figure")
    args = p.parse_args(argv)
    if args.tiny:
        args.updates, args.hidden, args.batch_size = 20, [16], 16
        args.log_interval, args.eval_episodes, args.max_episode_steps = 10, 1, 50
    if "MINARI_DATASETS_PATH" not in os.environ:
        os.environ["MINARI_DATASETS_PATH"] = str(ROOT / "runs" / "minari")
    tasks = make_tasks(args)
    if not args.collect_only:
        run_tasks(run_one, tasks, args.jobs)
    summary, curves = [], []
    for t in sorted(tasks, key=lambda t: (t["N"], t["beta"], t["seed"])):
        if (Path(t["runs"]) / run_name(t) / "metrics.csv").exists():
            s, c = summarise(t)
            summary.append(s)
            curves += c
    csv_path = write_csv(summary, args.out / "ensemble_size_hopper.csv")
    write_csv(curves, args.out / "ensemble_size_hopper_curves.csv")
    plot(summary, curves, args.out / "ensemble_size_hopper.png")
    print(f"wrote {csv_path}")
    return csv_path


if __name__ == "__main__":
    main()

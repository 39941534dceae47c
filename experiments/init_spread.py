"""Initial spread of an ensemble of critics under each weight init (issue 18, item 4).

For Hopper-sized inputs (11-dim observations, 3-dim actions) and N = 10 and 200 members
(SAC-N sizes) of 256x256x256 critics, built exactly as the scripts build them
(``builders.make_critics`` / ``make_actor`` / ``make_loss_module``, algorithm ``sac_n``),
this measures before any update:

- ``q_std``: std across members of Q(s, a) at random states (N(0, 1)) and actions
  (U[-1, 1]), averaged over the batch; ``q_abs_mean``: mean |Q|;
- ``accept_rate``: ``spqr_accept_rate`` of ``SPQRLoss``'s diagnostics at step 0
  (independence test of the members' values, level 0.05; near 1: the members read as
  independent).

Run: ``python experiments/init_spread.py`` (a minute on one CPU core); writes
``experiments/init_spread.csv`` and ``experiments/init_spread.png``.
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
import warnings
from pathlib import Path

import torch
from omegaconf import OmegaConf
from tensordict import TensorDict
from torchrl.data import Bounded, Composite

from torchrl_spqr.training import builders as B

HERE = Path(__file__).resolve().parent
N_OBS, N_ACT = 11, 3
INITS = ("default", "edac", "redq")


class _HopperSpecs:
    observation_spec = Composite(observation=Bounded(-1e9, 1e9, (N_OBS,)))
    action_spec = Bounded(-1.0, 1.0, (N_ACT,))


def _batch(b: int, g: torch.Generator) -> TensorDict:
    return TensorDict(
        {
            "observation": torch.randn(b, N_OBS, generator=g),
            "action": torch.rand(b, N_ACT, generator=g) * 2 - 1,
            "next": {
                "observation": torch.randn(b, N_OBS, generator=g),
                "reward": torch.randn(b, 1, generator=g),
                "done": torch.zeros(b, 1, dtype=torch.bool),
                "terminated": torch.zeros(b, 1, dtype=torch.bool),
            },
        },
        [b],
    )


def measure(n: int, init: str, seed: int, batch: int) -> dict:
    torch.manual_seed(seed)
    cfg = OmegaConf.create(
        {
            "algorithm": "sac_n",
            "network": {
                "ensemble_size": n,
                "hidden_sizes": [256, 256, 256],
                "init": init,
                "actor_init": init,
            },
            "optim": {"gamma": 0.99},
            "env": {"target_entropy": "auto"},
            "spqr": {"beta": 1.0},
        }
    )
    env = _HopperSpecs()
    actor = B.make_actor(cfg, env)
    critics = B.make_critics(cfg, env)
    loss, _ = B.make_loss_module(cfg, actor, critics, action_spec=env.action_spec)
    g = torch.Generator().manual_seed(10_000 + seed)
    td = _batch(batch, g)
    with torch.no_grad():
        q = critics(td.select("observation", "action").clone())["state_action_value"]
    q = q.squeeze(-1)  # [N, batch]
    out = loss(td.clone())
    return {
        "N": n,
        "init": init,
        "seed": seed,
        "q_std": q.std(0).mean().item(),
        "q_abs_mean": q.abs().mean().item(),
        "accept_rate": float(out["spqr_accept_rate"]),
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[10, 200])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--out", type=Path, default=HERE / "init_spread.csv")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    rows = [
        measure(n, init, s, args.batch) for n in args.sizes for init in INITS for s in args.seeds
    ]
    summary = []
    for n in args.sizes:
        for init in INITS:
            sel = [r for r in rows if r["N"] == n and r["init"] == init]
            agg = {"N": n, "init": init, "seeds": len(sel)}
            for k in ("q_std", "q_abs_mean", "accept_rate"):
                vals = [r[k] for r in sel]
                agg[k] = statistics.fmean(vals)
                agg[k + "_sd"] = statistics.stdev(vals) if len(vals) > 1 else math.nan
            summary.append(agg)
    fields = list(summary[0])
    with open(args.out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(summary)
    print(f"{'N':>4} {'init':>8} {'q_std':>10} {'|Q| mean':>10} {'accept_rate':>12}  default/this")
    for r in summary:
        base = next(x for x in summary if x["N"] == r["N"] and x["init"] == "default")
        print(
            f"{r['N']:>4} {r['init']:>8} {r['q_std']:>10.4g} {r['q_abs_mean']:>10.4g} "
            f"{r['accept_rate']:>12.3f}  {base['q_std'] / r['q_std']:.1f}"
        )
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(8, 3))
    for ax, key, label in (
        (axes[0], "q_std", "std of Q across members"),
        (axes[1], "accept_rate", "spqr_accept_rate, step 0"),
    ):
        for k, init in enumerate(INITS):
            xs = [i + (k - 1) * 0.25 for i in range(len(args.sizes))]
            ys = [
                next(r[key] for r in summary if r["N"] == n and r["init"] == init)
                for n in args.sizes
            ]
            ax.bar(xs, ys, width=0.25, label=init)
        ax.set_xticks(range(len(args.sizes)), [f"N={n}" for n in args.sizes])
        ax.set_title(label, fontsize=9)
        if key == "q_std":
            ax.set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out.with_suffix(".png"), dpi=100)


if __name__ == "__main__":
    main()

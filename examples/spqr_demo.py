"""SPQR-SAC-Ens in one readable file: a short online training run on CPU.

SAC with an ensemble of N = 10 independently initialised critics (min over all
members for the target and the actor), plus the SPQR regulariser on the
critics (``SPQRLoss`` wrapping TorchRL's ``SACLoss``, as ``EnsembleSACLoss``). Everything is a stock
TorchRL piece: ``GymEnv``, ``Collector``, ``TensorDictReplayBuffer``,
``SoftUpdate``, ``CSVLogger``-style output.

The default budget (Pendulum-v1, 3,000 frames) runs in a few minutes on 2 CPU
cores and leaves ``metrics.csv`` (training and evaluation metrics, SPQR
diagnostics) and ``learning_curve.png`` in the run folder, whose path it prints.

    python examples/spqr_demo.py                       # defaults
    python examples/spqr_demo.py --beta 0              # the SAC-Ens baseline, same code
    python examples/spqr_demo.py --env Hopper-v5 --frames 20000 --ensemble 10
"""

from __future__ import annotations

import argparse
import csv
import math
import time
from pathlib import Path

import torch
from tensordict.nn import NormalParamExtractor, TensorDictModule
from torch import nn
from torchrl.collectors import Collector
from torchrl.data import LazyTensorStorage, TensorDictReplayBuffer
from torchrl.envs import DoubleToFloat, GymEnv, TransformedEnv
from torchrl.envs.utils import ExplorationType, set_exploration_type
from torchrl.modules import MLP, ProbabilisticActor, TanhNormal
from torchrl.objectives import SoftUpdate

from torchrl_spqr import QEnsemble, SPQRLoss, make_q_member
from torchrl_spqr.objectives import EnsembleSACLoss


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--env", default="Pendulum-v1")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--frames", type=int, default=3_000, help="environment steps")
    p.add_argument("--random-frames", type=int, default=500, help="uniform-random warm-up steps")
    p.add_argument("--ensemble", type=int, default=10, help="number of critics N (>= 3)")
    p.add_argument("--beta", type=float, default=1.0, help="SPQR weight (0 = SAC-Ens baseline)")
    p.add_argument("--utd", type=int, default=1, help="gradient updates per environment step")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--eval-episodes", type=int, default=3)
    p.add_argument("--out", default="runs", help="parent folder of the run folder")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    return p.parse_args()


def make_env(name: str, seed: int) -> TransformedEnv:
    env = TransformedEnv(GymEnv(name), DoubleToFloat())
    env.set_seed(seed)
    return env


def make_actor(env, hidden: int) -> ProbabilisticActor:
    n_obs = env.observation_spec["observation"].shape[-1]
    n_act = env.action_spec.shape[-1]
    net = nn.Sequential(
        MLP(in_features=n_obs, out_features=2 * n_act, num_cells=[hidden, hidden]),
        NormalParamExtractor(scale_mapping="biased_softplus_1.0", scale_lb=1e-4),
    )
    return ProbabilisticActor(
        TensorDictModule(net, in_keys=["observation"], out_keys=["loc", "scale"]),
        in_keys=["loc", "scale"],
        spec=env.action_spec,
        distribution_class=TanhNormal,
        distribution_kwargs={"low": env.action_spec.space.low, "high": env.action_spec.space.high},
        return_log_prob=True,
    )


def evaluate(env, actor, episodes: int) -> float:
    returns = []
    with torch.no_grad(), set_exploration_type(ExplorationType.DETERMINISTIC):
        for _ in range(episodes):
            td = env.rollout(10_000, actor, break_when_any_done=True)
            returns.append(td["next", "reward"].sum().item())
    return sum(returns) / len(returns)


def plot(csv_path: Path, png_path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(csv.DictReader(csv_path.open()))
    ev = [r for r in rows if r["eval_return"]]
    tr = [r for r in rows if r["spqr_kl"]]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot([int(r["frames"]) for r in ev], [float(r["eval_return"]) for r in ev], "o-")
    axes[0].set(xlabel="environment steps", ylabel="evaluation return (deterministic)", title=title)
    axes[1].plot([int(r["frames"]) for r in tr], [float(r["spqr_kl"]) for r in tr])
    axes[1].set(xlabel="environment steps", ylabel="SPQR KL", title="spectral KL (mean over batch)")
    axes[2].plot([int(r["frames"]) for r in tr], [float(r["spqr_accept_rate"]) for r in tr])
    axes[2].set(
        xlabel="environment steps", ylabel="acceptance rate", title="independence test, level 0.05"
    )
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    run_dir = (
        Path(args.out)
        / f"spqr_sac_ens_{args.env}_N{args.ensemble}_beta{args.beta:g}_seed{args.seed}"
    )
    run_dir.mkdir(parents=True, exist_ok=True)

    env = make_env(args.env, args.seed)
    eval_env = make_env(args.env, args.seed + 1000)
    actor = make_actor(env, args.hidden)
    n_in = env.observation_spec["observation"].shape[-1] + env.action_spec.shape[-1]
    critics = QEnsemble(
        lambda: make_q_member(n_in, num_cells=(args.hidden, args.hidden)), args.ensemble
    )
    # SAC-Ens: TorchRL's SACLoss takes min over all N critics for target and actor;
    # EnsembleSACLoss is that loss, handing its per-member Q-values to SPQR (no extra pass).
    sac = EnsembleSACLoss(
        actor,
        critics.members(),
        num_qvalue_nets=args.ensemble,
        loss_function="l2",
        action_spec=env.action_spec,
    )
    sac.make_value_estimator(gamma=0.99)
    loss = SPQRLoss(sac, beta=args.beta)  # default: Q_k(s', a'~pi) as the authors
    updater = SoftUpdate(loss, tau=0.005)  # the wrapped loss's target critics
    optim = torch.optim.Adam(loss.parameters(), lr=3e-4)

    collector = Collector(
        env,
        actor,
        frames_per_batch=1,
        total_frames=args.frames,
        init_random_frames=args.random_frames,
        auto_register_policy_transforms=False,
    )
    buffer = TensorDictReplayBuffer(
        storage=LazyTensorStorage(args.frames), batch_size=args.batch_size
    )
    fields = [
        "frames",
        "updates",
        "train_return",
        "eval_return",
        "loss_qvalue",
        "loss_actor",
        "loss_spqr",
        "alpha",
        "spqr_kl",
        "spqr_spike",
        "spqr_accept_rate",
        "spqr_mp_ratio",
        "spqr_ensemble_std",
        "updates_per_s",
    ]
    csv_path = run_dir / "metrics.csv"
    f = csv_path.open("w", newline="")
    writer = csv.DictWriter(f, fieldnames=fields)
    writer.writeheader()

    frames, updates, ep_ret, last_train_ret = 0, 0, 0.0, math.nan
    t_upd, n_upd_window = 0.0, 0
    try:
        for data in collector:
            buffer.extend(data.reshape(-1))
            frames += data.numel()
            ep_ret += data["next", "reward"].sum().item()
            if data["next", "done"].any():
                last_train_ret, ep_ret = ep_ret, 0.0
            if frames < args.random_frames:
                continue
            out = None
            t0 = time.perf_counter()
            for _ in range(args.utd):
                out = loss(buffer.sample())
                total = sum(v for k, v in out.items() if k.startswith("loss_"))
                optim.zero_grad()
                total.backward()
                optim.step()
                updater.step()
                updates += 1
            t_upd += time.perf_counter() - t0
            n_upd_window += args.utd
            row = {}
            if updates % 250 == 0:
                row.update({k: out[k].detach().item() for k in fields if k in out.keys()})
                row["updates_per_s"] = n_upd_window / max(t_upd, 1e-9)
                t_upd, n_upd_window = 0.0, 0
            if frames % args.eval_every == 0 or frames == args.frames:
                row["eval_return"] = evaluate(eval_env, actor, args.eval_episodes)
                print(
                    f"frames {frames:>7d}  eval return {row['eval_return']:9.2f}  "
                    f"SPQR KL {float(out['spqr_kl']):.4f}  accept {float(out['spqr_accept_rate']):.2f}"
                )
            if row:
                row.update(frames=frames, updates=updates, train_return=last_train_ret)
                writer.writerow(row)
                f.flush()
    finally:  # keep what was logged, also on Ctrl-C
        f.close()
        collector.shutdown()
        torch.save(
            {"actor": actor.state_dict(), "loss": loss.state_dict()}, run_dir / "checkpoint.pt"
        )
    png = run_dir / "learning_curve.png"
    plot(csv_path, png, f"SPQR-SAC-Ens {args.env} (N={args.ensemble}, beta={args.beta:g})")
    print(f"metrics: {csv_path}\nplot:    {png}\ncheckpoint: {run_dir / 'checkpoint.pt'}")


if __name__ == "__main__":
    main()

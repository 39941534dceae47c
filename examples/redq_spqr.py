"""SPQR-REDQ in one readable file: a short online training run on CPU.

REDQ (Chen et al., ICLR 2021) is SAC with many critics and many gradient
updates per environment step:

- an ensemble of N independently initialised critics (``--ensemble``, paper: 10);
- the soft TD target takes the min over a random subset of M *target* critics,
  drawn afresh at every update (``--subset``, paper: 2);
- G gradient updates per environment step, the update-to-data ratio
  (``--utd``, paper: 20); the policy and the entropy temperature are updated
  once every G updates (``policy_update_delay = G``, as the reference code);
- the actor maximises the *mean* over all N online critics; the entropy
  target is MBPO's (-1 for Hopper).

SPQR (Lee et al., NeurIPS 2023) adds ``beta * KL`` to the critic loss
(``--beta``, paper: 1.0): the N Q-values at each (s', a' ~ pi) pair are laid
out in a small symmetric random matrix, and the KL divergence between its
eigenvalue distribution and Wigner's semicircle pushes the critics towards
independence. ``beta = 0`` runs plain REDQ through the same code (the SPQR
diagnostics are still logged).

Everything is a stock TorchRL piece (``GymEnv``, ``Collector``,
``TensorDictReplayBuffer``, ``SoftUpdate``) plus the package's ``ReferenceREDQLoss``
(which follows the reference code: squared error, policy delay, critic-only
calls), ``QEnsemble`` and ``SPQRLoss``.

The default budget is tiny (Hopper-v5, 1,000 random + 150 training steps =
3,000 gradient updates, about 3-4 minutes on 2 CPU cores): it shows the pipeline
works, not that REDQ learns Hopper. The run folder (printed at the end) holds
``metrics.csv`` (one row per log interval / evaluation, flushed as it goes),
``learning_curve.png`` and ``checkpoint.pt`` (state dicts only).

    python examples/redq_spqr.py                          # defaults: a short smoke run
    python examples/redq_spqr.py --beta 0                 # the REDQ baseline, same code
    python examples/redq_spqr.py --frames 300000 --random-frames 5000 \\
        --eval-every 5000 --eval-episodes 10 --log-every 1000   # paper-scale run (days on CPU)
    python examples/redq_spqr.py --env Walker2d-v5 --ensemble 5 --utd 5 --frames 20000
"""

from __future__ import annotations

import argparse
import csv
import math
import time
from collections import defaultdict
from pathlib import Path

import torch
from tensordict.nn import NormalParamExtractor, TensorDictModule
from torch import nn
from torchrl.collectors import Collector
from torchrl.data import LazyTensorStorage, TensorDictReplayBuffer
from torchrl.envs import Compose, DoubleToFloat, GymEnv, RewardSum, TransformedEnv
from torchrl.envs.utils import ExplorationType, set_exploration_type
from torchrl.modules import MLP, ProbabilisticActor, TanhNormal
from torchrl.objectives import SoftUpdate

from torchrl_spqr import QEnsemble, SPQRLoss, make_q_member
from torchrl_spqr.objectives import ReferenceREDQLoss, mbpo_target_entropy

LR, GAMMA, TAU = 3e-4, 0.99, 0.005  # the paper's values, shared by actor, critics and alpha

# Columns of metrics.csv. Losses and diagnostics are means over the log window;
# the actor / alpha entries average only the updates that trained the policy.
CRITIC_KEYS = (
    "loss_qvalue",
    "loss_spqr",
    "q_mean",
    "spqr_kl",
    "spqr_spike",
    "spqr_accept_rate",
    "spqr_mp_ratio",
    "spqr_ensemble_std",
)
ACTOR_KEYS = ("loss_actor", "loss_alpha", "alpha", "entropy")
FIELDS = [
    "frames",
    "updates",
    "train_return",
    "eval_return",
    *CRITIC_KEYS,
    *ACTOR_KEYS,
    "updates_per_s",
]


# ----------------------------------------------------------------------------- arguments
def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--env", default="Hopper-v5", help="Gymnasium id")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--frames", type=int, default=1_150, help="total environment steps")
    p.add_argument(
        "--random-frames", type=int, default=1_000, help="uniform-random warm-up steps (no updates)"
    )
    p.add_argument("--beta", type=float, default=1.0, help="SPQR weight (0 = REDQ baseline)")
    p.add_argument("--ensemble", type=int, default=10, help="number of critics N")
    p.add_argument("--subset", type=int, default=2, help="target subset size M")
    p.add_argument(
        "--utd", type=int, default=20, help="updates per env step G (also the policy delay)"
    )
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--hidden", type=int, default=256, help="width of the two hidden layers")
    p.add_argument("--eval-every", type=int, default=50, help="evaluate every this many frames")
    p.add_argument("--eval-episodes", type=int, default=3)
    p.add_argument(
        "--log-every", type=int, default=10, help="write training metrics every this many frames"
    )
    p.add_argument("--out", default="runs", help="parent folder of the run folder")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = p.parse_args()

    if args.beta < 0 or not math.isfinite(args.beta):
        p.error(f"--beta must be a finite number >= 0, got {args.beta}")
    if args.beta > 0 and args.ensemble < 3:
        p.error(f"SPQR (--beta > 0) needs --ensemble >= 3 critics, got {args.ensemble}")
    if args.ensemble < 2:
        p.error(f"REDQ needs --ensemble >= 2 critics, got {args.ensemble}")
    if not 1 <= args.subset <= args.ensemble:
        p.error(f"--subset must be in [1, --ensemble={args.ensemble}], got {args.subset}")
    if args.utd < 1:
        p.error(f"--utd must be >= 1, got {args.utd}")
    if args.random_frames < 0 or args.frames <= args.random_frames:
        p.error(f"need 0 <= --random-frames < --frames, got {args.random_frames} and {args.frames}")
    for name in ("batch_size", "hidden", "eval_every", "eval_episodes", "log_every", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


# ----------------------------------------------------------------------------- pieces
def make_env(name: str, seed: int) -> TransformedEnv:
    # float64 MuJoCo observations -> float32; RewardSum tracks "episode_reward".
    env = TransformedEnv(GymEnv(name), Compose(DoubleToFloat(), RewardSum()))
    env.set_seed(seed)
    return env


def make_actor(env, hidden: int) -> ProbabilisticActor:
    """Tanh-Gaussian policy: observation -> (loc, scale) -> squashed action."""
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
    """Mean return of the deterministic policy (tanh of the mean action)."""
    returns = []
    with torch.no_grad(), set_exploration_type(ExplorationType.DETERMINISTIC):
        for _ in range(episodes):
            td = env.rollout(
                10_000, actor, break_when_any_done=True
            )  # the env's time limit ends it
            returns.append(td["next", "reward"].sum().item())
    return sum(returns) / len(returns)


def plot(csv_path: Path, png_path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(csv.DictReader(csv_path.open()))

    def series(key: str) -> tuple[list[int], list[float]]:
        pts = [(int(r["frames"]), float(r[key])) for r in rows if r.get(key) not in ("", None)]
        pts = [(x, y) for x, y in pts if math.isfinite(y)]
        return [x for x, _ in pts], [y for _, y in pts]

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    axes[0].plot(
        *series("train_return"), color="0.6", lw=1, label="last training episode (stochastic)"
    )
    axes[0].plot(*series("eval_return"), "o-", color="C0", label="evaluation (deterministic)")
    axes[0].set(xlabel="environment steps", ylabel="episode return", title=title)
    axes[1].plot(*series("spqr_kl"), color="C1", label="this run (mean over log window)")
    axes[1].set(xlabel="environment steps", ylabel="SPQR KL to the semicircle", title="spectral KL")
    axes[2].plot(*series("spqr_accept_rate"), color="C2", label="this run")
    axes[2].axhline(0.95, color="k", ls="--", lw=1, label="independent critics (0.95)")
    axes[2].set(
        xlabel="environment steps",
        ylabel="acceptance rate",
        ylim=(-0.03, 1.03),
        title="independence test, level 0.05",
    )
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="best", fontsize=8, framealpha=0.8)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- training
def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    run_dir = Path(args.out) / (
        f"redq_spqr_{args.env}_N{args.ensemble}_M{args.subset}_G{args.utd}"
        f"_beta{args.beta:g}_seed{args.seed}"
    )
    run_dir.mkdir(parents=True, exist_ok=True)

    env = make_env(args.env, args.seed)
    eval_env = make_env(args.env, args.seed + 1000)
    actor = make_actor(env, args.hidden)
    n_in = env.observation_spec["observation"].shape[-1] + env.action_spec.shape[-1]
    # N critics, each with its own initialisation, evaluated in one vmapped call.
    critics = QEnsemble(
        lambda: make_q_member(n_in, num_cells=(args.hidden, args.hidden)), args.ensemble
    )
    try:
        target_entropy = mbpo_target_entropy(args.env)
    except KeyError:  # not a MuJoCo family MBPO tuned: SAC's -dim(A)
        target_entropy = -float(env.action_spec.shape[-1])

    redq = ReferenceREDQLoss(
        actor,
        critics,
        sub_sample_len=args.subset,  # M
        policy_update_delay=args.utd,  # the policy trains on the last of the G updates
        gamma=GAMMA,
        target_entropy=target_entropy,
        action_spec=env.action_spec,
    )
    # SPQR wraps REDQ: its output is REDQ's plus loss_spqr and the spqr_* diagnostics.
    # (SPQRLoss refuses N < 3 even at beta = 0, so a 2-critic baseline runs bare REDQ.)
    loss = SPQRLoss(redq, beta=args.beta) if args.ensemble >= 3 else redq
    updater = SoftUpdate(redq, tau=TAU)  # the target critics live in the wrapped loss

    # One optimiser per group. On critic-only updates the actor and alpha have no
    # gradient; zero_grad(set_to_none=True) leaves it None and Adam skips them.
    optims = [
        torch.optim.Adam(redq.actor_network_params.values(True, True), lr=LR),
        torch.optim.Adam(redq.qvalue_network_params.values(True, True), lr=LR),
        torch.optim.Adam([redq.log_alpha], lr=LR),
    ]

    collector = Collector(
        env,
        actor,
        frames_per_batch=1,
        total_frames=args.frames,
        init_random_frames=args.random_frames,  # uniform actions before that
        auto_register_policy_transforms=False,  # an MLP policy needs no recurrent-state transforms
    )
    buffer = TensorDictReplayBuffer(
        storage=LazyTensorStorage(min(args.frames, 1_000_000)), batch_size=args.batch_size
    )

    print(
        f"SPQR-REDQ on {args.env}: N={args.ensemble} critics, target subset M={args.subset}, "
        f"UTD G={args.utd}, beta={args.beta:g}, target entropy {target_entropy:g}\n"
        f"{args.frames} frames ({args.random_frames} random) -> "
        f"{(args.frames - args.random_frames) * args.utd} gradient updates; run folder {run_dir}"
    )
    csv_path = run_dir / "metrics.csv"
    ckpt_path = run_dir / "checkpoint.pt"
    f = csv_path.open("w", newline="")
    writer = csv.DictWriter(f, fieldnames=FIELDS)
    writer.writeheader()

    frames, updates, train_return = 0, 0, math.nan
    sums, counts = defaultdict(float), defaultdict(int)  # running means over the log window
    t_window, n_window = 0.0, 0
    last = {}  # the latest training-metrics row, for the printout
    finished = False
    try:
        for data in collector:  # one environment step per iteration
            buffer.extend(data.reshape(-1))
            frames += data.numel()
            done = data["next", "done"]
            if done.any():
                train_return = data["next", "episode_reward"][done].mean().item()

            if frames > args.random_frames:
                t0 = time.perf_counter()
                for _ in range(args.utd):
                    out = loss(buffer.sample())
                    total = sum(v for k, v in out.items() if k.startswith("loss_"))
                    for opt in optims:
                        opt.zero_grad(set_to_none=True)
                    total.backward()
                    for opt in optims:
                        opt.step()
                    updater.step()
                    updates += 1
                    keys = CRITIC_KEYS + (ACTOR_KEYS if out["actor_updated"] else ())
                    for k in keys:
                        if k in out.keys():
                            sums[k] += out[k].item()
                            counts[k] += 1
                t_window += time.perf_counter() - t0
                n_window += args.utd

            row = {}
            trained = frames - args.random_frames
            if trained > 0 and (trained % args.log_every == 0 or frames == args.frames):
                row.update({k: sums[k] / counts[k] for k in sums})
                row["updates_per_s"] = n_window / max(t_window, 1e-9)
                sums.clear()
                counts.clear()
                t_window, n_window = 0.0, 0
                last = dict(row)
            if trained >= 0 and (frames % args.eval_every == 0 or frames == args.frames):
                row["eval_return"] = evaluate(eval_env, actor, args.eval_episodes)
                kl, acc = last.get("spqr_kl", math.nan), last.get("spqr_accept_rate", math.nan)
                print(
                    f"frames {frames:>7d}  updates {updates:>7d}  "
                    f"eval return {row['eval_return']:8.1f}  train return {train_return:8.1f}  "
                    f"SPQR KL {kl:.4f}  accept {acc:.2f}  "
                    f"updates/s {last.get('updates_per_s', math.nan):.1f}"
                )
            if row:
                row.update(frames=frames, updates=updates, train_return=train_return)
                writer.writerow(row)
                f.flush()
        finished = True
    except KeyboardInterrupt:
        print(f"\ninterrupted at frame {frames}: keeping what was logged")
    finally:  # the CSV and a checkpoint survive Ctrl-C and errors
        f.close()
        collector.shutdown()
        torch.save(
            {
                "actor": actor.state_dict(),
                "loss": loss.state_dict(),  # critics, target critics, log_alpha, counters
                "optim_actor": optims[0].state_dict(),
                "optim_critic": optims[1].state_dict(),
                "optim_alpha": optims[2].state_dict(),
                "frames": frames,
                "updates": updates,
                "args": vars(args),
            },
            ckpt_path,
        )
    png = run_dir / "learning_curve.png"
    plot(
        csv_path,
        png,
        f"SPQR-REDQ {args.env} (N={args.ensemble}, M={args.subset}, beta={args.beta:g})",
    )
    status = "done" if finished else "stopped early"
    print(
        f"{status}: {frames} frames, {updates} updates\n"
        f"metrics:    {csv_path}\nplot:       {png}\ncheckpoint: {ckpt_path}"
    )
    if not finished:
        raise SystemExit(130)  # the usual exit status after Ctrl-C


if __name__ == "__main__":
    main()

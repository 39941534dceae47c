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
``learning_curve.png`` and ``checkpoint.pt``.

Stopping and resuming. ``checkpoint.pt`` (state dicts, optimisers, counters, RNG
state and the replay buffer; tensors only, read back with ``weights_only=True``)
is written at the start, at every evaluation and at the end, each time to a
temporary file that replaces the old one only once complete: a kill at any
instant leaves the previous checkpoint whole. Ctrl-C (or SIGTERM) stops at the
next environment step (an update is never cut in half), saves the checkpoint,
draws the plot and exits with status 130 (143 for SIGTERM); a second Ctrl-C
quits at once, keeping the last checkpoint. ``--resume`` continues the run in
the run folder from its checkpoint (the same arguments are required; ``--frames``
may grow) and appends to ``metrics.csv``: rows logged after the checkpoint are
dropped and logged again, so no logged step is lost or repeated. The resumed
run starts a fresh training episode. Without ``--resume``, a run folder that
already holds a run is refused (exit status 2) unless ``--overwrite`` is given.

    python examples/redq_spqr.py                          # defaults: a short smoke run
    python examples/redq_spqr.py --resume                 # continue it after Ctrl-C / a kill
    python examples/redq_spqr.py --overwrite              # start it again from scratch
    python examples/redq_spqr.py --beta 0                 # the REDQ baseline, same code
    python examples/redq_spqr.py --frames 300000 --random-frames 5000 \\
        --eval-every 5000 --eval-episodes 10 --log-every 1000   # paper-scale run (days on CPU)
    python examples/redq_spqr.py --env Walker2d-v5 --ensemble 5 --utd 5 --frames 20000
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import signal
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from tensordict import TensorDict
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
MAX_BUFFER = 1_000_000

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
RUN_FILES = ("metrics.csv", "checkpoint.pt", "learning_curve.png")
# Arguments a resumed run must share with its checkpoint (--frames may grow; --threads is free).
RUN_ARGS = (
    "env",
    "seed",
    "random_frames",
    "beta",
    "ensemble",
    "subset",
    "utd",
    "batch_size",
    "hidden",
    "eval_every",
    "eval_episodes",
    "log_every",
)


# ----------------------------------------------------------------------------- arguments
def run_dir_of(args: argparse.Namespace) -> Path:
    return Path(args.out) / (
        f"redq_spqr_{args.env}_N{args.ensemble}_M{args.subset}_G{args.utd}"
        f"_beta{args.beta:g}_seed{args.seed}"
    )


def check_env(p: argparse.ArgumentParser, env_id: str) -> None:
    """--env must name a Gymnasium environment with flat Box observations and bounded Box actions."""
    import gymnasium as gym
    import numpy as np

    try:
        gym.spec(env_id)
    except gym.error.Error as e:
        p.error(f"--env {env_id!r} is not a known Gymnasium environment id: {e}")
    try:
        e = gym.make(env_id)
    except Exception as err:  # a missing dependency (mujoco, box2d, ...)
        p.error(f"--env {env_id!r} cannot be created: {type(err).__name__}: {err}")
    obs, act = e.observation_space, e.action_space
    e.close()
    if not (isinstance(obs, gym.spaces.Box) and len(obs.shape) == 1):
        p.error(f"--env {env_id!r} has observation space {obs}: a flat Box is needed")
    if not (isinstance(act, gym.spaces.Box) and len(act.shape) == 1):
        p.error(f"--env {env_id!r} has action space {act}: continuous (Box) actions are needed")
    if not (np.isfinite(act.low).all() and np.isfinite(act.high).all()):
        p.error(f"--env {env_id!r} has unbounded actions {act}: the tanh policy needs bounds")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--env", default="Hopper-v5", help="Gymnasium id")
    p.add_argument("--seed", type=int, default=0, help="in [0, 2**31)")
    p.add_argument("--frames", type=int, default=1_150, help="total environment steps")
    p.add_argument(
        "--random-frames", type=int, default=1_000, help="uniform-random warm-up steps (no updates)"
    )
    p.add_argument("--beta", type=float, default=1.0, help="SPQR weight (0 = REDQ baseline)")
    p.add_argument(
        "--ensemble", type=int, default=10, help="number of critics N (>= 3; >= 2 at --beta 0)"
    )
    p.add_argument("--subset", type=int, default=2, help="target subset size M")
    p.add_argument(
        "--utd", type=int, default=20, help="updates per env step G (also the policy delay)"
    )
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--hidden", type=int, default=256, help="width of the two hidden layers")
    p.add_argument(
        "--eval-every",
        type=int,
        default=50,
        help="evaluate (and save checkpoint.pt) every this many frames",
    )
    p.add_argument("--eval-episodes", type=int, default=3)
    p.add_argument(
        "--log-every", type=int, default=10, help="write training metrics every this many frames"
    )
    p.add_argument("--out", default="runs", help="parent folder of the run folder")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in the run folder from its checkpoint.pt, appending to metrics.csv "
        "(a folder without a checkpoint starts a new run)",
    )
    mode.add_argument(
        "--overwrite",
        action="store_true",
        help="start again in a run folder that already holds a run, replacing its files",
    )
    args = p.parse_args(argv)

    if not 0 <= args.seed < 2**31:
        p.error(f"--seed must be in [0, 2**31), got {args.seed}")
    if args.frames < 1:
        p.error(f"--frames must be >= 1, got {args.frames}")
    if not 0 <= args.random_frames < args.frames:
        p.error(
            f"--random-frames must be in [0, --frames={args.frames}) so that some steps train, "
            f"got {args.random_frames}"
        )
    if args.beta < 0 or not math.isfinite(args.beta):
        p.error(f"--beta must be a finite number >= 0, got {args.beta}")
    if args.beta > 0 and args.ensemble < 3:
        p.error(f"SPQR (--beta > 0) needs --ensemble >= 3 critics, got {args.ensemble}")
    if args.ensemble < 2:
        p.error(f"REDQ needs --ensemble >= 2 critics, got {args.ensemble}")
    if not 1 <= args.subset <= args.ensemble:
        p.error(f"--subset must be in [1, --ensemble={args.ensemble}], got {args.subset}")
    for name in (
        "utd",
        "batch_size",
        "hidden",
        "eval_every",
        "eval_episodes",
        "log_every",
        "threads",
    ):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    check_env(p, args.env)

    run_dir = run_dir_of(args)
    parent = next(d for d in (run_dir, *run_dir.parents) if d.exists())
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        p.error(
            f"--out {args.out!r}: cannot write the run folder {run_dir} "
            f"({parent} is not a writable folder)"
        )
    existing = [n for n in RUN_FILES if (run_dir / n).exists()]
    if existing and not (args.resume or args.overwrite):
        p.error(
            f"the run folder {run_dir} already holds a run ({', '.join(existing)}): pass --resume "
            "to continue it, --overwrite to start it again, or another --out or --seed"
        )
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


# ----------------------------------------------------------------------------- safe files
def write_atomic(path: Path, write) -> None:
    """write(file) into path.tmp in the same folder, fsync, then os.replace onto path: a kill at
    any instant leaves either the old complete file or the new one, never a partial one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        write(fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)  # make the rename itself durable
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fail(msg: str) -> None:
    sys.exit(f"{Path(sys.argv[0]).name}: error: {msg}")  # exit status 1


def load_checkpoint(path: Path, args: argparse.Namespace) -> dict:
    """Read checkpoint.pt (tensors and plain containers only) and check it belongs to this run."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        fail(
            f"cannot read {path} ({type(e).__name__}: {e}); pass --overwrite to start the run again"
        )
    keys = ckpt.keys() if isinstance(ckpt, dict) else ()
    missing = [k for k in ("format", "args", "frames", "replay_buffer") if k not in keys]
    if missing:
        fail(
            f"{path} lacks {missing}: it was not written by this version of "
            f"{Path(__file__).name}; pass --overwrite to start the run again"
        )
    for k in RUN_ARGS:
        was, now = ckpt["args"].get(k), getattr(args, k)
        if was != now:
            fail(
                f"--{k.replace('_', '-')} is {now!r} but the run in {path.parent} used "
                f"{was!r}: resume with the run's value, or pass --overwrite to start again"
            )
    if args.frames < ckpt["frames"]:
        fail(
            f"--frames {args.frames} is below the {ckpt['frames']} frames the run in "
            f"{path.parent} has already done"
        )
    return ckpt


def replay_state(buffer: TensorDictReplayBuffer, frames: int) -> dict:
    """The stored transitions, oldest first (one write per frame), as a dict of tensors."""
    n, cap = len(buffer), buffer.storage.max_size
    idx = torch.arange(n) if frames <= cap else (frames + torch.arange(cap)) % cap
    return buffer.storage[idx].exclude("index").to_dict() if n else {}


def open_metrics(csv_path: Path, resume_frames: int | None):
    """metrics.csv for appending. A new run writes the header; a resumed one keeps the rows up to
    its checkpoint's frame (later rows are logged again) and drops a row cut short by a kill."""
    header = ",".join(FIELDS) + "\r\n"
    if resume_frames is None:
        write_atomic(csv_path, lambda fh: fh.write(header.encode()))
    else:
        if not csv_path.exists():
            fail(f"{csv_path} is missing; pass --overwrite to start the run again")
        lines = csv_path.read_text().splitlines(keepends=True)
        if lines and not lines[-1].endswith("\n"):
            lines.pop()  # a row cut short by a kill
        if not lines or next(csv.reader(lines[:1])) != FIELDS:
            fail(f"{csv_path} does not have this script's columns; pass --overwrite")
        keep = [ln for ln in lines[1:] if int(next(csv.reader([ln]))[0]) <= resume_frames]
        write_atomic(csv_path, lambda fh: fh.write("".join(lines[:1] + keep).encode()))
    f = csv_path.open("a", newline="")
    return f, csv.DictWriter(f, fieldnames=FIELDS)


class StopRequest:
    """Ctrl-C (SIGINT) and SIGTERM set a flag that the loop reads between environment steps, so
    that an update is never cut in half (a KeyboardInterrupt inside the loss's functional-call
    module swap leaves the networks in a broken state). A second signal quits at once: the last
    checkpoint and every row written so far are complete on disk."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            print("\nstopping now; the run folder keeps its last checkpoint", flush=True)
            os._exit(128 + signum)
        self.signum = signum
        print(
            f"\n{signal.Signals(signum).name}: stopping after the current step "
            "(press Ctrl-C again to quit at once)",
            flush=True,
        )

    def restore(self) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)


# ----------------------------------------------------------------------------- training
def main() -> None:
    args = parse_args()
    stop = StopRequest()  # from here on, Ctrl-C stops cleanly
    run_dir = run_dir_of(args)
    csv_path, ckpt_path = run_dir / "metrics.csv", run_dir / "checkpoint.pt"
    ckpt = None
    if args.resume and ckpt_path.exists():
        ckpt = load_checkpoint(ckpt_path, args)
    elif args.resume:
        print(f"--resume: no checkpoint in {run_dir}, starting a new run")
    run_dir.mkdir(parents=True, exist_ok=True)
    start = ckpt["frames"] if ckpt else 0
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    # A resumed run starts fresh episodes from seeds of its own (the simulator state is not saved).
    env = make_env(args.env, args.seed + start)
    eval_env = make_env(args.env, args.seed + 1000 + start)
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
    optims = {
        "optim_actor": torch.optim.Adam(redq.actor_network_params.values(True, True), lr=LR),
        "optim_critic": torch.optim.Adam(redq.qvalue_network_params.values(True, True), lr=LR),
        "optim_alpha": torch.optim.Adam([redq.log_alpha], lr=LR),
    }
    buffer = TensorDictReplayBuffer(
        storage=LazyTensorStorage(min(args.frames, MAX_BUFFER)), batch_size=args.batch_size
    )

    frames, updates, train_return = 0, 0, math.nan
    sums, counts = defaultdict(float), defaultdict(int)  # running means over the log window
    t_window, n_window = 0.0, 0
    last = {}  # the latest training-metrics row, for the printout
    if ckpt:  # continue exactly where the checkpoint stopped
        actor.load_state_dict(ckpt["actor"])
        loss.load_state_dict(ckpt["loss"])  # critics, target critics, log_alpha, counters
        for name, opt in optims.items():
            opt.load_state_dict(ckpt[name])
        if ckpt["replay_buffer"]:
            buffer.extend(TensorDict(ckpt["replay_buffer"], batch_size=[]).auto_batch_size_(1))
        frames, updates, train_return = ckpt["frames"], ckpt["updates"], ckpt["train_return"]
        sums.update(ckpt["window_sums"])
        counts.update(ckpt["window_counts"])
        t_window, n_window, last = ckpt["window_time"], ckpt["window_updates"], ckpt["last"]
        torch.set_rng_state(ckpt["rng_torch"])

    def save_checkpoint() -> None:
        state = {
            "format": 1,
            "actor": actor.state_dict(),
            "loss": loss.state_dict(),
            **{name: opt.state_dict() for name, opt in optims.items()},
            "frames": frames,
            "updates": updates,
            "train_return": train_return,
            "window_sums": dict(sums),
            "window_counts": dict(counts),
            "window_time": t_window,
            "window_updates": n_window,
            "last": last,
            "rng_torch": torch.get_rng_state(),
            "replay_buffer": replay_state(buffer, frames),
            "args": {k: v for k, v in vars(args).items() if k not in ("resume", "overwrite")},
        }
        write_atomic(ckpt_path, lambda fh: torch.save(state, fh))

    print(
        f"SPQR-REDQ on {args.env}: N={args.ensemble} critics, target subset M={args.subset}, "
        f"UTD G={args.utd}, beta={args.beta:g}, target entropy {target_entropy:g}\n"
        f"{args.frames} frames ({args.random_frames} random) -> "
        f"{(args.frames - args.random_frames) * args.utd} gradient updates; run folder {run_dir}"
        + (f"\nresuming at frame {frames} ({updates} updates done)" if ckpt else "")
    )
    if not ckpt:  # a new run (or --overwrite): drop what a previous run left
        (run_dir / "learning_curve.png").unlink(missing_ok=True)
    f, writer = open_metrics(csv_path, frames if ckpt else None)
    if not ckpt:
        save_checkpoint()  # a complete checkpoint exists from the start

    collector = None
    if frames < args.frames and stop.signum is None:
        collector = Collector(
            env,
            actor,
            frames_per_batch=1,
            total_frames=args.frames - frames,
            init_random_frames=max(0, args.random_frames - frames),  # uniform actions before
            auto_register_policy_transforms=False,  # an MLP policy needs no recurrent-state transforms
        )
    try:
        for data in collector or ():  # one environment step per iteration
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
                    for opt in optims.values():
                        opt.zero_grad(set_to_none=True)
                    total.backward()
                    for opt in optims.values():
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
            evaluated = trained >= 0 and (frames % args.eval_every == 0 or frames == args.frames)
            if evaluated:
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
                os.fsync(f.fileno())  # on disk before any checkpoint that counts it
            if stop.signum is not None:
                break
            if evaluated and frames < args.frames:
                save_checkpoint()
        save_checkpoint()  # the end, or a requested stop: the state after the last full step
    finally:  # an error keeps the last checkpoint and every row written
        f.close()
        if collector is not None:
            collector.shutdown()
    stop.restore()  # the files are complete: Ctrl-C may now interrupt the plot
    png = run_dir / "learning_curve.png"
    plot(
        csv_path,
        png,
        f"SPQR-REDQ {args.env} (N={args.ensemble}, M={args.subset}, beta={args.beta:g})",
    )
    if stop.signum is not None:
        status = f"stopped at frame {frames} of {args.frames} (--resume continues it)"
    else:
        status = "done" if not ckpt or start < args.frames else "already complete"
    print(
        f"{status}: {frames} frames, {updates} updates\n"
        f"metrics:    {csv_path}\nplot:       {png}\ncheckpoint: {ckpt_path}"
    )
    if stop.signum is not None:
        raise SystemExit(128 + stop.signum)  # 130 after Ctrl-C, 143 after SIGTERM


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # before training or while plotting: nothing unsaved is lost
        print("\ninterrupted", file=sys.stderr)
        raise SystemExit(130) from None

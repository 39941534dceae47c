"""SPQR-SAC-Ens in one readable file: a short online training run on CPU.

SAC with an ensemble of N = 10 independently initialised critics (min over all
members for the target and the actor), plus the SPQR regulariser on the
critics (``SPQRLoss`` wrapping TorchRL's ``SACLoss``, as ``EnsembleSACLoss``). Everything is a stock
TorchRL piece: ``GymEnv``, ``Collector``, ``TensorDictReplayBuffer``,
``SoftUpdate``, ``CSVLogger``-style output.

The default budget (Pendulum-v1, 3,000 frames) runs in a few minutes on 2 CPU
cores and leaves ``metrics.csv`` (training and evaluation metrics, SPQR
diagnostics), ``learning_curve.png`` and ``checkpoint.pt`` in the run folder,
whose path it prints.

Stopping and resuming, as ``redq_spqr.py``: ``checkpoint.pt`` (state dicts,
optimiser, counters, RNG state and the replay buffer; tensors only, read back with
``weights_only=True``) is written at the start, at every evaluation and at the
end, each time atomically (a temporary file, then a rename), so a kill at any
instant leaves the previous checkpoint whole. Ctrl-C (or SIGTERM) stops after
the current environment step, saves, plots and exits with status 130 (143 for
SIGTERM); a second Ctrl-C quits at once. ``--resume`` continues the run from its
checkpoint (same arguments; ``--frames`` may grow), appending to ``metrics.csv``
without losing or repeating a logged step, in a fresh training episode. Without
``--resume`` a run folder that already holds a run is refused (exit status 2)
unless ``--overwrite`` is given.

    python examples/spqr_demo.py                       # defaults
    python examples/spqr_demo.py --resume              # continue it after Ctrl-C / a kill
    python examples/spqr_demo.py --beta 0              # the SAC-Ens baseline, same code
    python examples/spqr_demo.py --env Hopper-v5 --frames 20000 --ensemble 10
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import signal
import sys
import time
from pathlib import Path

import torch
from tensordict import TensorDict
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

MAX_BUFFER = 1_000_000
FIELDS = [
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
RUN_FILES = ("metrics.csv", "checkpoint.pt", "learning_curve.png")
# Arguments a resumed run must share with its checkpoint (--frames may grow; --threads is free).
RUN_ARGS = (
    "env",
    "seed",
    "random_frames",
    "ensemble",
    "beta",
    "utd",
    "batch_size",
    "hidden",
    "eval_every",
    "eval_episodes",
    "log_every",
)


def run_dir_of(args: argparse.Namespace) -> Path:
    return (
        Path(args.out)
        / f"spqr_sac_ens_{args.env}_N{args.ensemble}_beta{args.beta:g}_seed{args.seed}"
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
    p.add_argument("--env", default="Pendulum-v1", help="Gymnasium id")
    p.add_argument("--seed", type=int, default=0, help="in [0, 2**31)")
    p.add_argument("--frames", type=int, default=3_000, help="environment steps")
    p.add_argument("--random-frames", type=int, default=500, help="uniform-random warm-up steps")
    p.add_argument(
        "--ensemble", type=int, default=10, help="number of critics N (>= 3; >= 2 at --beta 0)"
    )
    p.add_argument("--beta", type=float, default=1.0, help="SPQR weight (0 = SAC-Ens baseline)")
    p.add_argument("--utd", type=int, default=1, help="gradient updates per environment step")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument(
        "--eval-every",
        type=int,
        default=500,
        help="evaluate (and save checkpoint.pt) every ... frames",
    )
    p.add_argument("--eval-episodes", type=int, default=3)
    p.add_argument(
        "--log-every",
        type=int,
        default=250,
        help="write training metrics every this many training steps",
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
        p.error(f"SAC-Ens needs --ensemble >= 2 critics, got {args.ensemble}")
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
    _ = sac.target_entropy  # registered lazily otherwise: the checkpoint holds it from the start
    # default: Q_k(s', a'~pi) as the authors; SPQRLoss needs N >= 3, so N = 2 (beta 0) runs bare SAC
    loss = SPQRLoss(sac, beta=args.beta) if args.ensemble >= 3 else sac
    updater = SoftUpdate(loss, tau=0.005)  # the wrapped loss's target critics
    optim = torch.optim.Adam(loss.parameters(), lr=3e-4)
    buffer = TensorDictReplayBuffer(
        storage=LazyTensorStorage(min(args.frames, MAX_BUFFER)), batch_size=args.batch_size
    )

    frames, updates, ep_ret, last_train_ret = 0, 0, 0.0, math.nan
    t_upd, n_upd_window = 0.0, 0
    if ckpt:  # continue where the checkpoint stopped (in a new training episode)
        actor.load_state_dict(ckpt["actor"])
        loss.load_state_dict(ckpt["loss"])
        optim.load_state_dict(ckpt["optim"])
        if ckpt["replay_buffer"]:
            buffer.extend(TensorDict(ckpt["replay_buffer"], batch_size=[]).auto_batch_size_(1))
        frames, updates, last_train_ret = ckpt["frames"], ckpt["updates"], ckpt["train_return"]
        t_upd, n_upd_window = ckpt["window_time"], ckpt["window_updates"]
        torch.set_rng_state(ckpt["rng_torch"])

    def save_checkpoint() -> None:
        state = {
            "format": 1,
            "actor": actor.state_dict(),
            "loss": loss.state_dict(),
            "optim": optim.state_dict(),
            "frames": frames,
            "updates": updates,
            "train_return": last_train_ret,
            "window_time": t_upd,
            "window_updates": n_upd_window,
            "rng_torch": torch.get_rng_state(),
            "replay_buffer": replay_state(buffer, frames),
            "args": {k: v for k, v in vars(args).items() if k not in ("resume", "overwrite")},
        }
        write_atomic(ckpt_path, lambda fh: torch.save(state, fh))

    print(
        f"SPQR-SAC-Ens on {args.env}: N={args.ensemble}, beta={args.beta:g}, "
        f"{args.frames} frames; run folder {run_dir}"
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
            init_random_frames=max(0, args.random_frames - frames),
            auto_register_policy_transforms=False,
        )
    try:
        for data in collector or ():
            buffer.extend(data.reshape(-1))
            frames += data.numel()
            ep_ret += data["next", "reward"].sum().item()
            if data["next", "done"].any():
                last_train_ret, ep_ret = ep_ret, 0.0
            if frames < args.random_frames:
                if stop.signum is not None:
                    break
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
            trained = frames - args.random_frames + 1  # steps that trained so far
            if trained % args.log_every == 0 or frames == args.frames:
                row.update({k: out[k].detach().item() for k in FIELDS if k in out.keys()})
                row["updates_per_s"] = n_upd_window / max(t_upd, 1e-9)
                t_upd, n_upd_window = 0.0, 0
            evaluated = frames % args.eval_every == 0 or frames == args.frames
            if evaluated:
                row["eval_return"] = evaluate(eval_env, actor, args.eval_episodes)
                kl = float(out["spqr_kl"]) if "spqr_kl" in out.keys() else math.nan
                acc = float(out["spqr_accept_rate"]) if "spqr_kl" in out.keys() else math.nan
                print(
                    f"frames {frames:>7d}  eval return {row['eval_return']:9.2f}  "
                    f"SPQR KL {kl:.4f}  accept {acc:.2f}"
                )
            if row:
                row.update(frames=frames, updates=updates, train_return=last_train_ret)
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
    plot(csv_path, png, f"SPQR-SAC-Ens {args.env} (N={args.ensemble}, beta={args.beta:g})")
    if stop.signum is not None:
        print(f"stopped at frame {frames} of {args.frames} (--resume continues it)")
    elif ckpt and start == args.frames:
        print(f"already complete: {frames} frames")
    print(f"metrics: {csv_path}\nplot:    {png}\ncheckpoint: {ckpt_path}")
    if stop.signum is not None:
        raise SystemExit(128 + stop.signum)  # 130 after Ctrl-C, 143 after SIGTERM


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # before training or while plotting: nothing unsaved is lost
        print("\ninterrupted", file=sys.stderr)
        raise SystemExit(130) from None

"""The online training loop shared by ``sota_scripts/sac_ens_spqr`` and ``sota_scripts/redq_spqr``.

Collect one step (``collector.frames_per_batch``), store it, run
``optim.utd_ratio`` gradient updates per collected frame, evaluate the
deterministic policy every ``logger.eval_interval`` frames, log training and
SPQR metrics every ``logger.log_interval`` frames, checkpoint every
``checkpoint.interval`` frames and at exit (Ctrl-C included).

``resume=true`` restores the networks, optimisers, temperature, replay buffer,
RNG states and counters from the run folder's checkpoint, truncates the logs
to the checkpoint's frame count (nothing logged after it is kept twice) and
continues. The episode that was running at the interruption restarts from a
reset.
"""

from __future__ import annotations

import csv
import math
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tensordict import TensorDictBase
from torchrl.envs.utils import ExplorationType, set_exploration_type

from torchrl_spqr.training import builders as B
from torchrl_spqr.training.checkpoint import (
    capture_rng,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
    truncate_csv,
)

__all__ = ["METRIC_FIELDS", "train_online", "evaluate_policy", "seed_everything"]

#: Columns of ``metrics.csv`` (one row per log or evaluation event).
METRIC_FIELDS = [
    "frames",
    "updates",
    "episodes",
    "time_s",
    "train_return",
    "eval_return",
    "eval_return_std",
    "best_eval_return",
    "loss_qvalue",
    "loss_actor",
    "loss_alpha",
    "loss_spqr",
    "loss_cql",
    "loss_diversity",
    "alpha",
    "entropy",
    "q_mean",
    "target_value",
    "spqr_beta",
    "spqr_kl",
    "spqr_spike",
    "spqr_accept_rate",
    "spqr_mp_ratio",
    "spqr_mean_pairwise_corr",
    "spqr_ensemble_std",
    "fps",
    "updates_per_s",
]


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))
    random.seed(seed)


def evaluate_policy(env, actor, episodes: int, max_steps: int = 1_000_000) -> tuple[float, float]:
    """Mean and std of the deterministic policy's return over ``episodes`` episodes."""
    returns = []
    with torch.no_grad(), set_exploration_type(ExplorationType.DETERMINISTIC):
        for _ in range(episodes):
            td = env.rollout(max_steps, actor, break_when_any_done=True, auto_cast_to_device=True)
            returns.append(float(td["next", "reward"].sum()))
    t = torch.tensor(returns)
    return float(t.mean()), float(t.std(unbiased=False)) if len(returns) > 1 else 0.0


class _MetricsWriter:
    """Wide CSV, one row per event, flushed at each row (nothing logged is lost)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        new = not path.exists() or path.stat().st_size == 0
        self.f = path.open("a", newline="")
        self.w = csv.DictWriter(self.f, fieldnames=METRIC_FIELDS, extrasaction="ignore")
        if new:
            self.w.writeheader()
            self.f.flush()

    def write(self, row: dict[str, Any]) -> None:
        self.w.writerow(row)
        self.f.flush()

    def close(self) -> None:
        self.f.close()


def _scalar_metrics(out: TensorDictBase) -> dict[str, float]:
    res = {}
    for k in METRIC_FIELDS:
        if k in out.keys():
            v = out.get(k)
            if isinstance(v, torch.Tensor) and v.numel() == 1:
                res[k] = float(v.detach())
    return res


def _make_logger(cfg, run_dir: Path):
    backend = str(B._get(cfg, "logger.backend", "csv") or "")
    if backend in ("", "none"):
        return None
    from torchrl.record.loggers import get_logger

    if backend == "wandb":
        os.environ.setdefault("WANDB_MODE", str(B._get(cfg, "logger.wandb_mode", "offline")))
        return get_logger(
            "wandb",
            logger_name=str(run_dir),
            experiment_name=run_dir.name,
            wandb_kwargs={"dir": str(run_dir), "project": "torchrl_spqr"},
        )
    if backend in ("csv", "tensorboard"):
        return get_logger(backend, logger_name=str(run_dir / "logs"), experiment_name=backend)
    raise B.ConfigError(f"logger.backend={backend!r}: expected csv, tensorboard, wandb or none.")


def _truncate_torchrl_logs(run_dir: Path, frames: int) -> None:
    for p in (run_dir / "logs").rglob("scalars/*.csv"):
        truncate_csv(p, frames, step_field=0, header=False)


def train_online(cfg, run_dir: str | Path) -> dict[str, float]:
    """Train per ``cfg`` in ``run_dir``; returns final metrics (final and best evaluation)."""
    B.validate_config(cfg, online=True)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(int(B._get(cfg, "threads", 1)))
    seed = int(B._get(cfg, "seed", 0))
    seed_everything(seed)
    device = B.get_device(str(B._get(cfg, "device", "auto")))

    env = B.make_environment(cfg, seed)
    eval_env = B.make_environment(cfg, seed + 10_000)
    actor = B.make_actor(cfg, env)
    critics = B.make_critics(cfg, env)
    loss, base = B.make_loss_module(cfg, actor, critics, env.action_spec)
    loss.to(device)
    if bool(B._get(cfg, "compile.cudagraphs", False)) and device.type != "cuda":
        raise B.ConfigError("compile.cudagraphs=true needs a CUDA device.")
    loss_fn = torch.compile(loss) if bool(B._get(cfg, "compile.compile", False)) else loss
    optims = B.make_optimizers(cfg, base)
    updater = B.make_target_updater(cfg, base)
    buffer = B.make_replay_buffer(cfg, run_dir)

    total = int(B._get(cfg, "collector.total_frames"))
    init_random = int(B._get(cfg, "collector.init_random_frames", 0))
    utd = int(B._get(cfg, "optim.utd_ratio", 1))
    log_every = int(B._get(cfg, "logger.log_interval", 1000))
    eval_every = int(B._get(cfg, "logger.eval_interval", 5000))
    eval_eps = int(B._get(cfg, "logger.eval_episodes", 5))
    ckpt_every = int(B._get(cfg, "checkpoint.interval", 10_000))

    st = {
        "frames": 0,
        "updates": 0,
        "episodes": 0,
        "best_eval": -math.inf,
        "last_eval": math.nan,
        "time_s": 0.0,
    }
    metrics_path = run_dir / "metrics.csv"
    if bool(B._get(cfg, "resume", False)) and (run_dir / "checkpoint").exists():
        ck = load_checkpoint(run_dir, buffer)
        loss.load_state_dict(ck["loss"])
        for k, o in optims.items():
            o.load_state_dict(ck["optim"][k])
        st.update(ck["counters"])
        restore_rng(ck["rng"])
        truncate_csv(metrics_path, st["frames"], step_field="frames")
        _truncate_torchrl_logs(run_dir, st["frames"])
        print(f"resumed from {run_dir / 'checkpoint'} at frame {st['frames']}")
    elif metrics_path.exists():
        metrics_path.unlink()  # a fresh run does not append to an old one
    writer = _MetricsWriter(metrics_path)
    logger = _make_logger(cfg, run_dir)

    def checkpoint() -> None:
        st_save = dict(st)
        save_checkpoint(
            run_dir,
            {
                "loss": loss.state_dict(),
                "optim": {k: o.state_dict() for k, o in optims.items()},
                "counters": st_save,
                "rng": capture_rng(),
                "config": _plain(cfg),
            },
            buffer,
        )

    def log(row: dict[str, Any]) -> None:
        row = {
            **row,
            "frames": st["frames"],
            "updates": st["updates"],
            "episodes": st["episodes"],
            "time_s": st["time_s"],
        }
        writer.write(row)
        if logger is not None:
            for k, v in row.items():
                if k != "frames" and isinstance(v, (int, float)) and math.isfinite(v):
                    logger.log_scalar(k, v, step=st["frames"])

    remaining = total - st["frames"]
    pbar = _progress(total, st["frames"], bool(B._get(cfg, "logger.progress", True)))
    recent_returns: list[float] = []
    t_upd, n_upd, t_start_window, f_window = 0.0, 0, time.perf_counter(), 0
    last_out = None
    try:
        if remaining > 0:
            collector = B.make_collector(
                cfg,
                env,
                actor,
                total_frames=remaining,
                init_random_frames=max(0, init_random - st["frames"]),
            )
            t_prev = time.perf_counter()
            for data in collector:
                data = data.reshape(-1)
                buffer.extend(data)
                n = data.numel()
                st["frames"] += n
                f_window += n
                done = data["next", "done"].squeeze(-1)
                if done.any():
                    ep_ret = data["next", "episode_reward"][done].squeeze(-1).tolist()
                    recent_returns.extend(ep_ret)
                    st["episodes"] += len(ep_ret)
                if st["frames"] >= init_random:
                    t0 = time.perf_counter()
                    for _ in range(utd * n):
                        last_out = _update(loss_fn, buffer, optims, updater, device)
                        st["updates"] += 1
                    t_upd += time.perf_counter() - t0
                    n_upd += utd * n
                now = time.perf_counter()
                st["time_s"] += now - t_prev
                t_prev = now
                row: dict[str, Any] = {}
                if st["frames"] % log_every < n:
                    row.update(_scalar_metrics(last_out) if last_out is not None else {})
                    if recent_returns:
                        row["train_return"] = sum(recent_returns) / len(recent_returns)
                        recent_returns.clear()
                    row["fps"] = f_window / max(now - t_start_window, 1e-9)
                    row["updates_per_s"] = n_upd / t_upd if t_upd > 0 else 0.0
                    t_upd, n_upd, t_start_window, f_window = 0.0, 0, now, 0
                if st["frames"] % eval_every < n or st["frames"] >= total:
                    mean, std = evaluate_policy(eval_env, actor, eval_eps)
                    st["last_eval"] = mean
                    st["best_eval"] = max(st["best_eval"], mean)
                    row.update(
                        eval_return=mean, eval_return_std=std, best_eval_return=st["best_eval"]
                    )
                if row:  # one row per logged frame count
                    log(row)
                if st["frames"] % ckpt_every < n:
                    checkpoint()
                if pbar is not None:
                    pbar.update(n)
                    pbar.set_postfix(
                        ret=st["last_eval"], ups=f"{(n_upd / t_upd) if t_upd else 0:.1f}"
                    )
            collector.shutdown()
    finally:  # Ctrl-C or an error: keep what was logged and checkpoint the state
        writer.close()
        if pbar is not None:
            pbar.close()
        checkpoint()
    _plot(run_dir)
    return {
        "frames": st["frames"],
        "updates": st["updates"],
        "final_eval_return": st["last_eval"],
        "best_eval_return": st["best_eval"],
    }


def _update(loss, buffer, optims, updater, device) -> TensorDictBase:
    batch = buffer.sample().to(device)
    out = loss(batch)
    total = sum(v for k, v in out.items() if k.startswith("loss_"))
    for o in optims.values():
        o.zero_grad(set_to_none=True)
    total.backward()
    for o in optims.values():
        o.step()
    updater.step()
    return out.detach()


def _progress(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=total, initial=initial, unit="frame", dynamic_ncols=True, mininterval=2.0)


def _plain(cfg) -> Any:
    try:
        from omegaconf import OmegaConf

        if OmegaConf.is_config(cfg):
            return OmegaConf.to_container(cfg, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    return cfg if isinstance(cfg, dict) else {}


def _plot(run_dir: Path) -> None:
    try:
        from torchrl_spqr.plot import plot_run
    except ImportError:  # matplotlib missing: the CSV is the result
        return
    plot_run(run_dir)

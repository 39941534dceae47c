"""The online training loop shared by ``sota_scripts/sac_ens_spqr`` and ``sota_scripts/redq_spqr``.

Collect a batch of ``collector.frames_per_batch`` frames (one step by default;
from several worker processes or Ray actors with ``collector.backend``
``multi_sync`` / ``multi_async`` / ``ray``), store it, run ``optim.utd_ratio``
gradient updates per collected frame once ``collector.init_random_frames``
frames are stored, push the new policy weights to the workers, evaluate the
deterministic policy every ``logger.eval_interval`` frames, log training and
SPQR metrics every ``logger.log_interval`` frames, checkpoint every
``checkpoint.interval`` frames and at exit (Ctrl-C included). The collector's
workers are shut down on every exit path.

``resume=true`` restores the networks, optimisers, temperature, replay buffer,
RNG states and counters from the run folder's newest complete checkpoint,
truncates the logs to the checkpoint's frame count (nothing logged after it is
kept twice), writes the row that was due when the run was interrupted if it
was not written (its evaluation is run then: Ctrl-C during an evaluation loses
no row) and continues. The episode that was running at the interruption
restarts from a reset. Invariant: ``metrics.csv`` holds one row per logging
step (a multiple of ``logger.log_interval`` or ``logger.eval_interval`` frames,
and the last frame), steps strictly increasing, whatever the interruptions
(Ctrl-C or a kill at any instant) and resumes.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torchrl.collectors import Collector

from torchrl_spqr.training import builders as B
from torchrl_spqr.training.checkpoint import restore_rng  # noqa: F401  (re-exported for tests)
from torchrl_spqr.training.common import (
    METRIC_FIELDS,  # noqa: F401
    RunContext,
    _plot,
    _progress,
    _scalar_metrics,
    _update,
    evaluate_policy,
    prepare_run,
)

__all__ = ["train_online"]


def train_online(cfg, run_dir: str | Path) -> dict[str, float]:
    """Train per ``cfg`` in ``run_dir``; returns final metrics (final and best evaluation)."""
    run_dir, seed, device = prepare_run(cfg, run_dir, online=True)

    env = B.make_environment(cfg, seed)
    eval_env = B.make_environment(cfg, seed + 10_000)
    actor, loss, base, optims, updater = B.make_agent(cfg, env, device)
    loss_fn = torch.compile(loss) if bool(B._get(cfg, "compile.compile", False)) else loss
    buffer = B.make_replay_buffer(cfg, run_dir)

    total = int(B._get(cfg, "collector.total_frames"))
    init_random = int(B._get(cfg, "collector.init_random_frames", 0))
    utd = int(B._get(cfg, "optim.utd_ratio", 1))
    log_every = int(B._get(cfg, "logger.log_interval", 1000))
    eval_every = int(B._get(cfg, "logger.eval_interval", 5000))
    eval_eps = int(B._get(cfg, "logger.eval_episodes", 5))
    ckpt_every = int(B._get(cfg, "checkpoint.interval", 10_000))

    run = RunContext(cfg, run_dir, loss, optims, step_field="frames", buffer=buffer)
    st = run.state
    if run.maybe_resume():
        print(f"resumed from {run_dir / 'checkpoint'} at frame {st['frames']}")
    checkpoint = run.checkpoint

    remaining = total - st["frames"]
    pbar = _progress(total, st["frames"], bool(B._get(cfg, "logger.progress", True)))
    recent_returns: list[float] = []
    t_upd, n_upd, t_start_window, f_window = 0.0, 0, time.perf_counter(), 0
    last_out = None
    collector = None

    def train_part() -> dict[str, float]:
        """The training metrics of a log row (and a new fps / updates-per-s window)."""
        nonlocal t_upd, n_upd, t_start_window, f_window
        now = time.perf_counter()
        row = _scalar_metrics(last_out) if last_out is not None else {}
        if recent_returns:
            row["train_return"] = sum(recent_returns) / len(recent_returns)
            recent_returns.clear()
        row["fps"] = f_window / max(now - t_start_window, 1e-9)
        row["updates_per_s"] = n_upd / t_upd if t_upd > 0 else 0.0
        t_upd, n_upd, t_start_window, f_window = 0.0, 0, now, 0
        return row

    def eval_part(row: dict[str, Any]) -> None:
        mean, std = evaluate_policy(eval_env, actor, eval_eps)
        st["last_eval"] = mean
        st["best_eval"] = max(st["best_eval"], mean)
        row.update(eval_return=mean, eval_return_std=std, best_eval_return=st["best_eval"])

    try:
        if run.owed is not None:  # the row due when the run was interrupted
            run.write_owed(eval_part)
        if remaining > 0:
            collector = B.make_collector(
                cfg,
                env,
                actor,
                total_frames=remaining,
                init_random_frames=max(0, init_random - st["frames"]),
                seed=seed,
            )
            remote_policy = type(collector) is not Collector  # workers hold a copy
            t_prev = t_start_window = time.perf_counter()  # worker start-up is not fps
            for data in collector:
                data = data.reshape(-1)  # (workers, steps) -> frames
                buffer.extend(data)
                n = data.numel()
                st["frames"] += n
                due_log = st["frames"] % log_every < n
                due_eval = st["frames"] % eval_every < n or st["frames"] >= total
                # one row per logged frame count; owed from here on (see RunContext.owe)
                row = run.owe(evaluate=due_eval, train=due_log) if due_log or due_eval else None
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
                    if remote_policy:
                        collector.update_policy_weights_()
                    t_upd += time.perf_counter() - t0
                    n_upd += utd * n
                now = time.perf_counter()
                st["time_s"] += now - t_prev
                t_prev = now
                if row is not None:
                    run.write_owed(eval_part, train_part)
                if st["frames"] % ckpt_every < n:
                    checkpoint()
                if pbar is not None:
                    pbar.update(n)
                    pbar.set_postfix(
                        ret=st["last_eval"], ups=f"{(n_upd / t_upd) if t_upd else 0:.1f}"
                    )
                if st["frames"] >= total:  # asynchronous workers may still be running
                    break
    finally:  # Ctrl-C or an error: stop the workers, keep what was logged, checkpoint
        run.keep_owed_train(train_part)  # the owed row keeps its training metrics
        B.shutdown_collector(collector)
        if pbar is not None:
            pbar.close()
        run.close()
    _plot(run_dir)
    return {
        "frames": st["frames"],
        "updates": st["updates"],
        "final_eval_return": st["last_eval"],
        "best_eval_return": st["best_eval"],
    }

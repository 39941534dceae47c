"""The offline training loop shared by ``sota_scripts/{sac_n,edac,cql}_spqr``.

Sample a batch from the dataset (``OfflineData.buffer``), update, and every
``logger.eval_interval`` updates evaluate the deterministic policy in the
dataset's Gymnasium environment, logging the return and the normalised score
(``100 * (R - ref_min) / (ref_max - ref_min)``, the D4RL convention, with the
dataset's reference values). Final and best evaluations are both logged and
returned. Checkpoint and resume as online (the dataset itself is not copied
into the checkpoint): ``metrics.csv`` holds one row per logging step (a
multiple of ``logger.log_interval`` or ``logger.eval_interval`` updates, and
the last update), whatever the interruptions and resumes.

``dataset.reward_scale`` / ``dataset.reward_shift`` (``r' = scale * r + shift``) transform
the stored rewards once, at load; the run folder's ``dataset_transform.json`` records them.
They change the training targets only: evaluation returns and normalised scores are in the
environment's own reward.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from torchrl_spqr.training import builders as B
from torchrl_spqr.training.common import (
    RunContext,
    _plot,
    _progress,
    _scalar_metrics,
    _update,
    evaluate_policy,
    prepare_run,
)

__all__ = ["train_offline", "make_offline_data"]


def make_offline_data(cfg):
    """Load ``dataset.id`` through TorchRL's Minari / D4RL replay classes."""
    from torchrl_spqr.datasets import load_offline_dataset

    return load_offline_dataset(
        str(B._get(cfg, "dataset.id")),
        batch_size=int(B._get(cfg, "optim.batch_size")),
        source=str(B._get(cfg, "dataset.source", "minari")),
        root=B._get(cfg, "dataset.root"),
        download=bool(B._get(cfg, "dataset.download", True)),
        reward_scale=float(B._get(cfg, "dataset.reward_scale", 1.0)),
        reward_shift=float(B._get(cfg, "dataset.reward_shift", 0.0)),
    )


def _record_transform(run_dir: Path, data) -> None:
    """``dataset_transform.json``: the reward transform this run trained with."""
    info = {
        "dataset_id": data.dataset_id,
        "source": data.source,
        "reward_scale": data.reward_scale,
        "reward_shift": data.reward_shift,
        "formula": "r' = reward_scale * r + reward_shift",
        "applied": "once, to the stored rewards at load (training targets only)",
        "evaluation": "environment's own reward (untransformed)",
    }
    tmp = run_dir / "dataset_transform.json.tmp"
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    tmp.replace(run_dir / "dataset_transform.json")


def train_offline(cfg, run_dir: str | Path) -> dict[str, float]:
    """Train per ``cfg`` on a fixed dataset in ``run_dir``; returns final and best evaluation."""
    run_dir, seed, device = prepare_run(cfg, run_dir, online=False)
    data = make_offline_data(cfg)
    _record_transform(run_dir, data)
    env_name = B._get(cfg, "env.name") or data.env_id
    eval_cfg = {
        "env": {"name": env_name, "max_episode_steps": B._get(cfg, "env.max_episode_steps")}
    }
    eval_env = B.make_environment(
        eval_cfg, seed + 10_000, env_kwargs=getattr(data, "env_kwargs", None)
    )
    actor, loss, base, optims, updater = B.make_agent(cfg, eval_env, device)

    total = int(B._get(cfg, "optim.num_updates"))
    log_every = int(B._get(cfg, "logger.log_interval", 1000))
    eval_every = int(B._get(cfg, "logger.eval_interval", 10_000))
    eval_eps = int(B._get(cfg, "logger.eval_episodes", 10))
    ckpt_every = int(B._get(cfg, "checkpoint.interval", 50_000))
    ref_min, ref_max = data.ref_min_score, data.ref_max_score

    run = RunContext(cfg, run_dir, loss, optims, step_field="updates")
    st = run.state
    st.setdefault("best_score", -math.inf)
    st.setdefault("last_score", math.nan)
    if run.maybe_resume():
        print(f"resumed from {run_dir / 'checkpoint'} at update {st['updates']}")

    pbar = _progress(total, st["updates"], bool(B._get(cfg, "logger.progress", True)))
    t_window, n_window = time.perf_counter(), 0
    last_out = None

    def train_part() -> dict[str, float]:
        nonlocal t_window, n_window
        row = _scalar_metrics(last_out) if last_out is not None else {}
        now = time.perf_counter()
        row["updates_per_s"] = n_window / max(now - t_window, 1e-9)
        t_window, n_window = now, 0
        return row

    def eval_part(row: dict[str, Any]) -> None:
        mean, std = evaluate_policy(eval_env, actor, eval_eps)
        st["last_eval"] = mean
        st["best_eval"] = max(st["best_eval"], mean)
        row.update(eval_return=mean, eval_return_std=std, best_eval_return=st["best_eval"])
        if ref_min is not None and ref_max is not None:
            from torchrl_spqr.datasets import normalized_score

            score = normalized_score(mean, ref_min, ref_max)
            st["last_score"] = score
            st["best_score"] = max(st["best_score"], score)
            row.update(normalized_score=score, best_normalized_score=st["best_score"])

    try:
        if run.owed is not None:  # the row due when the run was interrupted
            run.write_owed(eval_part)
        while st["updates"] < total:
            t0 = time.perf_counter()
            last_out = _update(loss, data.buffer, optims, updater, device)
            st["updates"] += 1
            due_log = st["updates"] % log_every == 0
            due_eval = st["updates"] % eval_every == 0 or st["updates"] == total
            # owed from here on (see RunContext.owe)
            row = run.owe(evaluate=due_eval, train=due_log) if due_log or due_eval else None
            n_window += 1
            st["time_s"] += time.perf_counter() - t0
            if row is not None:
                run.write_owed(eval_part, train_part)
            if st["updates"] % ckpt_every == 0:
                run.checkpoint()
            if pbar is not None:
                pbar.update(1)
                if row is not None:
                    pbar.set_postfix(score=st["last_score"], ret=st["last_eval"])
    finally:
        run.keep_owed_train(train_part)  # the owed row keeps its training metrics
        if pbar is not None:
            pbar.close()
        run.close()
    _plot(run_dir)
    return {
        "updates": st["updates"],
        "final_eval_return": st["last_eval"],
        "best_eval_return": st["best_eval"],
        "final_normalized_score": st["last_score"],
        "best_normalized_score": st["best_score"],
    }

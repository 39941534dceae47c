"""Bookkeeping shared by the online and offline loops: metrics, logging, checkpoints, resume."""

from __future__ import annotations

import csv
import math
import os
import random
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tensordict import TensorDictBase
from torchrl.envs.utils import ExplorationType, set_exploration_type

from torchrl_spqr.training import builders as B
from torchrl_spqr.training.checkpoint import (
    capture_rng,
    has_checkpoint,
    load_buffer,
    load_checkpoint_data,
    restore_rng,
    save_checkpoint,
    truncate_csv,
)

__all__ = ["METRIC_FIELDS", "RunContext", "evaluate_policy", "prepare_run", "seed_everything"]

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
    "normalized_score",
    "best_normalized_score",
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


def prepare_run(cfg, run_dir: str | Path, *, online: bool) -> tuple[Path, int, torch.device]:
    """Validate the config, create the run folder, set threads and seeds; returns (dir, seed, device)."""
    B.validate_config(cfg, online=online)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(int(B._get(cfg, "threads", 1)))
    seed = int(B._get(cfg, "seed", 0))
    seed_everything(seed)
    return run_dir, seed, B.get_device(str(B._get(cfg, "device", "auto")))


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


class RunContext:
    """Counters, the metrics CSV, the TorchRL logger, checkpoints and resume of one run.

    ``step_field`` is the counter used as the logging step (``"frames"`` online,
    ``"updates"`` offline); on resume, logs are truncated to its checkpointed value.
    """

    def __init__(self, cfg, run_dir: Path, loss, optims, *, step_field: str, buffer=None) -> None:
        self.cfg, self.run_dir, self.loss, self.optims = cfg, Path(run_dir), loss, optims
        self.step_field, self.buffer = step_field, buffer
        self.state: dict[str, Any] = {
            "frames": 0,
            "updates": 0,
            "episodes": 0,
            "best_eval": -math.inf,
            "last_eval": math.nan,
            "time_s": 0.0,
        }
        self.metrics_path = self.run_dir / "metrics.csv"
        self.writer: _MetricsWriter | None = None
        self.logger = None
        self.owed: dict[str, Any] | None = None

    def maybe_resume(self) -> bool:
        """Restore from the run folder's newest complete checkpoint when ``resume=true``.

        Refuses (``ConfigError`` naming the field) a checkpoint saved with a config whose
        shape-determining fields differ from this run's, and any checkpoint that fails
        verification (``CheckpointError`` naming the file) rather than starting over.
        Then opens the logs.
        """
        resumed = False
        if bool(B._get(self.cfg, "resume", False)) and has_checkpoint(self.run_dir):
            state, data, folder = load_checkpoint_data(self.run_dir, buffer=self.buffer is not None)
            saved_cfg, now_cfg = state.get("config") or {}, _plain(self.cfg)
            check_resume_config(saved_cfg, now_cfg, folder)
            try:
                self.loss.load_state_dict(state["loss"])
                for k, o in self.optims.items():
                    o.load_state_dict(state["optim"][k])
                if self.buffer is not None and "buffer_meta" in state:
                    load_buffer(self.buffer, folder / "buffer", state["buffer_meta"], data=data)
            except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as err:
                raise _mismatch_error(saved_cfg, now_cfg, folder, err) from err
            self.state.update(state["counters"])
            restore_rng(state["rng"])
            step = self.state[self.step_field]
            last = truncate_csv(self.metrics_path, step, step_field=self.step_field)
            for p in (self.run_dir / "logs").rglob("scalars/*.csv"):
                truncate_csv(p, step, step_field=0, header=False)
            owed = state.get("owed_row")
            # a row due at the checkpoint's step and not written yet (e.g. Ctrl-C during its
            # evaluation): the loop completes and writes it first (unless it got written)
            self.owed = owed if owed and (last is None or last < step) else None
            resumed = True
        else:
            # a fresh run (also one killed before its first checkpoint, then restarted)
            # does not append to an old one: neither to metrics.csv nor to TorchRL's CSV
            # scalar logs, which would otherwise repeat the steps logged before the kill
            if self.metrics_path.exists():
                self.metrics_path.unlink()
            for p in (self.run_dir / "logs").rglob("scalars/*.csv"):
                truncate_csv(p, -math.inf, step_field=0, header=False)
        self.writer = _MetricsWriter(self.metrics_path)
        self.logger = _make_logger(self.cfg, self.run_dir)
        return resumed

    def owe(self, *, evaluate: bool, train: bool) -> dict[str, Any]:
        """Record that a row is due at the current step; returns the row to fill.

        Until :meth:`log` writes it, a checkpoint (the one at exit on Ctrl-C) stores it
        with what is left to do (``evaluate``: the evaluation; ``train``: the training
        metrics), so that ``resume=true`` completes and writes it: an interruption
        loses no logged row.
        """
        self.owed = {"row": {}, "eval": bool(evaluate), "train": bool(train)}
        return self.owed["row"]

    def checkpoint(self) -> None:
        state = {
            "loss": self.loss.state_dict(),
            "optim": {k: o.state_dict() for k, o in self.optims.items()},
            "counters": dict(self.state),
            "rng": capture_rng(),
            "config": _plain(self.cfg),
        }
        if self.owed is not None:
            state["owed_row"] = {
                "row": {k: v for k, v in self.owed["row"].items() if isinstance(v, (int, float))},
                "eval": bool(self.owed["eval"]),
                "train": bool(self.owed.get("train", False)),
            }
        save_checkpoint(self.run_dir, state, self.buffer)

    def write_owed(
        self,
        eval_part: Callable[[dict[str, Any]], None],
        train_part: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        """Complete the owed row (its training metrics, then its evaluation) and write it.

        Without ``train_part`` (on resume, where the interrupted run stored them already)
        only the evaluation still owed is run.
        """
        owed = self.owed
        if train_part is not None and owed["train"]:
            owed["row"].update(train_part())
            owed["train"] = False
        if owed["eval"]:
            eval_part(owed["row"])
            owed["eval"] = False
        self.log(owed["row"])

    def keep_owed_train(self, train_part: Callable[[], dict[str, Any]]) -> None:
        """On interruption: the owed row keeps the training metrics of the last update."""
        if self.owed is not None and self.owed.get("train"):
            self.owed["row"].update(train_part())
            self.owed["train"] = False

    def log(self, row: dict[str, Any]) -> None:
        st = self.state
        row = {
            **row,
            "frames": st["frames"],
            "updates": st["updates"],
            "episodes": st["episodes"],
            "time_s": st["time_s"],
        }
        self.writer.write(row)
        self.owed = None
        if self.logger is not None:
            for k, v in row.items():
                if k != self.step_field and isinstance(v, (int, float)) and math.isfinite(v):
                    self.logger.log_scalar(k, v, step=st[self.step_field])

    def close(self) -> None:
        """Close the CSV and write a final checkpoint (also on Ctrl-C)."""
        if self.writer is not None:
            self.writer.close()
        self.checkpoint()


#: Config fields (or sections) that fix the shapes of what a checkpoint holds.
SHAPE_FIELDS = (
    "algorithm",
    "env.name",
    "env.scenario_name",
    "env.scenario",
    "env.continuous_actions",
    "dataset.id",
    "network",
    "replay_buffer.size",
)
#: Fields that may change between a run and its resume without a word.
_RESUME_FREE = (
    "resume",
    "logger",
    "checkpoint",
    "collector.total_frames",
    "optim.num_updates",
    "device",
    "threads",
    "hydra",
    "compile",
)


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d} if prefix else {}
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key))
        else:
            out[key] = v
    return out


def _under(key: str, fields: tuple[str, ...]) -> bool:
    return any(key == f or key.startswith(f + ".") for f in fields)


def config_differences(saved: Any, now: Any) -> dict[str, tuple[Any, Any]]:
    """``{field: (saved, now)}`` for the fields both configs set to different values."""
    a, b = _flatten(saved or {}), _flatten(now or {})
    return {k: (a[k], b[k]) for k in sorted(a.keys() & b.keys()) if a[k] != b[k]}


def _describe(diffs: dict[str, tuple[Any, Any]]) -> str:
    return "; ".join(f"{k}: saved {v[0]!r}, now {v[1]!r}" for k, v in diffs.items())


def check_resume_config(saved: Any, now: Any, folder: Path) -> None:
    """Refuse to resume with a config whose shape-determining fields changed; warn on others."""
    diffs = {k: v for k, v in config_differences(saved, now).items() if not _under(k, _RESUME_FREE)}
    shape = {k: v for k, v in diffs.items() if _under(k, SHAPE_FIELDS)}
    if shape:
        raise B.ConfigError(
            f"resume=true: the checkpoint {folder} was saved with a different "
            f"{', '.join(shape)} ({_describe(shape)}). Resume with the saved value(s), or "
            "start a new run in another folder (resume=false)."
        )
    if diffs:
        warnings.warn(
            f"resume=true: the config differs from the checkpoint's ({_describe(diffs)}); "
            "continuing with this run's values.",
            UserWarning,
            stacklevel=3,
        )


def _mismatch_error(saved: Any, now: Any, folder: Path, err: Exception) -> Exception:
    diffs = {k: v for k, v in config_differences(saved, now).items() if not _under(k, _RESUME_FREE)}
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if diffs:
        return B.ConfigError(
            f"resume=true: the checkpoint {folder} does not fit this run's networks or buffer "
            f"({first}); the config differs in {', '.join(diffs)} ({_describe(diffs)}). "
            "Resume with the saved value(s), or start a new run in another folder."
        )
    return B.ConfigError(
        f"resume=true: the checkpoint {folder} does not fit this run's networks or buffer "
        f"({first}), although the saved config matches: it was written by another version "
        "of the code. Start a new run in another folder (resume=false)."
    )


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

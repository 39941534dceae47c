"""The run protocol every training script shares: counters, logs, checkpoints, resume.

A script in ``sota_scripts/<algo>/`` builds its agent and writes its own loop; what keeps
a run safe lives here, in :class:`RunContext`, so that each loop stays short:

- **Logs.** One row per logging step (a multiple of ``logger.log_interval`` or
  ``logger.eval_interval`` steps, and the last step) goes through TorchRL's ``Logger``
  API (``log_metrics``) to :class:`MetricsCSVLogger` (the wide ``metrics.csv``, flushed
  row by row) and to the logger named by ``logger.backend`` (TorchRL's CSV, TensorBoard or
  W&B logger). Every scalar the loss returns is logged (its ``loss_*`` and ``spqr_*``
  entries and its metadata, e.g. CQL's ``alpha_prime`` and ``cql_gap``): ``metrics.csv``
  starts with :data:`METRIC_FIELDS` and appends a column for any other name.
- **Owed rows.** From the moment the step counter reaches a logging step until its row
  is written (after that step's updates and evaluation), the row is owed: a checkpoint
  taken meanwhile (the one at exit on Ctrl-C) stores it with what is left to do, and
  ``resume=true`` completes and writes it first. An interruption loses no row.
- **Checkpoints** every ``checkpoint.interval`` steps and at every exit (the end, an
  error, Ctrl-C): the loss's and optimisers' states, the replay buffer, the RNG states,
  the counters and the config (:mod:`torchrl_spqr.training.checkpoint`). With
  ``checkpoint.history=true``, each checkpoint's networks are also kept in
  ``history/<step>/`` (:func:`save_history`).
- **Stops.** Under the scripts' :func:`~torchrl_spqr.training.cli.run_script`, Ctrl-C and
  SIGTERM inside ``with run:`` wait for the end of the step (:mod:`~torchrl_spqr.training.stop`):
  ``end_step`` raises :class:`~torchrl_spqr.training.stop.StopRequested` after the step's
  updates, row and checkpoint, so no update is cut in half, and the exit checkpoint
  follows. A second signal quits at once, keeping the last checkpoint.
- **Resume.** ``resume=true`` restores the newest complete checkpoint, refusing one
  saved with a config whose shape-determining fields differ (:data:`SHAPE_FIELDS`), and
  cuts ``metrics.csv`` and TorchRL's CSV scalar logs back to its step; a fresh run
  empties them. Invariant: ``metrics.csv`` holds one row per logging step, steps strictly
  increasing, whatever the interruptions (Ctrl-C or a kill at any instant) and resumes.

The counters (``run.counters``): ``frames``, ``updates``, ``episodes``, ``time_s``
(seconds of the loop: collection, updates, evaluations and checkpoints, start-up not
counted) and the last and best evaluation (``last_eval``, ``best_eval``; with reference
scores also ``last_score``, ``best_score``). Throughput columns: ``fps`` (collected
frames per second of the loop since the previous training row) and ``updates_per_s``
(updates per second spent sampling and updating).
"""

from __future__ import annotations

import math
import random
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tensordict import TensorDictBase
from tensordict.nn import CudaGraphModule
from torchrl.envs.utils import ExplorationType, set_exploration_type
from torchrl.record.loggers import Logger

from torchrl_spqr.training.builders import get_device
from torchrl_spqr.training.checkpoint import (
    capture_rng,
    has_checkpoint,
    load_buffer,
    load_checkpoint_data,
    restore_rng,
    save_checkpoint,
    truncate_csv,
)
from torchrl_spqr.training.config import resolve_config
from torchrl_spqr.training.loggers import MetricsCSVLogger, make_logger
from torchrl_spqr.training.malloc import retain_freed_memory
from torchrl_spqr.training.resume import (  # noqa: F401  (re-exported: their old location)
    SHAPE_FIELDS,
    _mismatch_error,
    check_resume_config,
    config_differences,
)
from torchrl_spqr.training.stop import check_stop, steps_running, take_checkpoint_request
from torchrl_spqr.training.typecheck import to_plain

if TYPE_CHECKING:  # pragma: no cover
    from omegaconf import DictConfig

__all__ = [
    "SHAPE_FIELDS",
    "RunContext",
    "check_resume_config",
    "config_differences",
    "cuda_graph_update",
    "episode_returns",
    "evaluate_policy",
    "prepare_run",
    "scalar_metrics",
    "seed_everything",
]


def prepare_run(cfg, run_dir: str | Path, *, kind: str) -> tuple[DictConfig, Path, torch.device]:
    """Check and complete the config, create the run folder, set threads and seeds.

    Returns the resolved config (:func:`~torchrl_spqr.training.config.resolve_config` for
    ``kind``: ``"online"`` or ``"offline"``; typed, defaults filled, read by attribute), the
    run folder and the device. A bad config raises ``ConfigError`` naming the field before
    anything is written (not even the folder).
    """
    return open_run_folder(resolve_config(cfg, kind), run_dir)


def open_run_folder(cfg, run_dir: str | Path) -> tuple[DictConfig, Path, torch.device]:
    """For a config already checked: create the run folder, set threads, glibc's malloc
    (``retain_freed_memory``: :func:`~torchrl_spqr.training.malloc.retain_freed_memory`)
    and seeds.

    Shared by :func:`prepare_run`, the population scripts' ``prepare_population_run`` and
    the MASAC script.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.threads)
    if cfg.retain_freed_memory:
        retain_freed_memory()
    seed_everything(cfg.seed)
    return cfg, run_dir, get_device(cfg.device)


def seed_everything(seed: int) -> None:
    """Seed torch, numpy and Python's ``random``."""
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))
    random.seed(seed)


def episode_returns(env, actor, episodes: int, max_steps: int = 1_000_000) -> list[float]:
    """The deterministic policy's return in each of ``episodes`` episodes, one after another
    (each ends at the environment's own end or after ``max_steps`` steps)."""
    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}.")
    returns = []
    with torch.no_grad(), set_exploration_type(ExplorationType.DETERMINISTIC):
        for _ in range(episodes):
            td = env.rollout(max_steps, actor, break_when_any_done=True, auto_cast_to_device=True)
            returns.append(float(td["next", "reward"].sum()))
    return returns


def evaluate_policy(env, actor, episodes: int, max_steps: int = 1_000_000) -> tuple[float, float]:
    """Mean and std of the deterministic policy's return over ``episodes`` episodes."""
    return return_stats(episode_returns(env, actor, episodes, max_steps))


def return_stats(returns: list[float]) -> tuple[float, float]:
    """Mean and (population) standard deviation of episode returns; sd 0 for one episode."""
    t = torch.tensor(returns)
    return float(t.mean()), float(t.std(unbiased=False)) if len(returns) > 1 else 0.0


def cuda_graph_update(
    update: Callable[[TensorDictBase], TensorDictBase],
    optimizers: dict[str, torch.optim.Optimizer],
    *,
    warmup: int = 5,
) -> CudaGraphModule:
    """``update`` captured as a CUDA graph and replayed (tensordict's ``CudaGraphModule``,
    as TorchRL's sota-implementations do for ``compile.cudagraphs``).

    An optimiser step inside a CUDA graph needs a capturable optimiser: each group is made
    capturable and its step counters moved to its parameters' device. Call it after a
    resume has loaded the optimisers' states (a state saved without CUDA graphs is not
    capturable). Python-side schedules inside the loss (REDQ's policy delay, CQL's
    behaviour-cloning steps, SPQR's beta and ``diagnostics_interval``) are read from host
    copies during the capture (the losses make no host read of a device value then) and
    replay as captured: a warning says so (TorchRL calls CUDA graphs experimental too).
    """
    warnings.warn(
        "compile.cudagraphs: the update is captured once and replayed; Python-side schedules "
        "inside the loss (REDQ's policy delay, CQL's behaviour-cloning steps, SPQR's beta "
        "schedule and diagnostics_interval) replay as captured. Experimental, as in TorchRL.",
        UserWarning,
        stacklevel=2,
    )
    for optimizer in optimizers.values():
        for group in optimizer.param_groups:
            group["capturable"] = True
            for p in group["params"]:
                state = optimizer.state.get(p, {})
                if torch.is_tensor(state.get("step")):
                    state["step"] = state["step"].to(device=p.device, dtype=torch.float32)
    return CudaGraphModule(update, in_keys=[], out_keys=[], warmup=warmup)


def scalar_metrics(out: TensorDictBase) -> dict[str, float]:
    """Every one-element tensor entry of a loss output, as floats (no whitelist).

    The ``loss_*`` terms, SPQR's ``spqr_*`` diagnostics and whatever scalar metadata the
    loss adds (``alpha``, ``entropy``, CQL's ``alpha_prime``, ``cql_gap``, ...).
    """
    res = {}
    for k, v in out.items():
        if isinstance(k, str) and isinstance(v, torch.Tensor) and v.numel() == 1:
            res[k] = float(v.detach())
    return res


class RunContext:
    """The safety protocol of one run: counters, logs, owed rows, checkpoints, resume.

    The loop reports what happened; the context decides what is due::

        run = RunContext(cfg, run_dir, loss_module, optimizers, step_field="frames",
                         total=total_frames, evaluate=evaluate, buffer=replay_buffer)
        if run.start():  # resume=true and a checkpoint: restored
            print("resumed at frame", run.counters["frames"])
        with run:  # writes a row an interrupted run owed; at exit (Ctrl-C, SIGTERM): checkpoint
            for data in collector:
                run.collected(data)  # frames, episodes, returns; a row due here is owed
                for _ in range(num_updates):
                    run.updated(update(replay_buffer.sample()))
                run.end_step()  # the owed row (evaluating if due), checkpoint if due; stop if asked

    Args:
        cfg: the run's config (``logger.*``, ``checkpoint.interval``, ``resume``).
        run_dir: the run folder.
        loss_module: the loss whose state (networks, temperatures, targets) is saved.
        optimizers: name -> optimiser, saved with it.
        step_field: the counter that schedules logs, evaluations and checkpoints:
            ``"frames"`` (advanced by :meth:`collected`) or ``"updates"`` (by
            :meth:`updated`).
        total: the value of ``step_field`` at which the run ends (a row is due there).
        evaluate: returns the mean and std of the deterministic policy's return.
        buffer: the replay buffer to checkpoint with the run (``None``: a fixed dataset).
        score: maps an evaluation return to the normalised score logged with it (offline:
            the dataset's ``normalized_score``, ``100 (R - ref_min) / (ref_max - ref_min)``).
    """

    #: Whether this context holds stop signals until its steps end (an agent of a population
    #: leaves that to the population's run).
    _owns_stops = True

    def __init__(
        self,
        cfg,
        run_dir: str | Path,
        loss_module,
        optimizers: dict[str, torch.optim.Optimizer],
        *,
        step_field: str,
        total: int,
        evaluate: Callable[[], tuple[float, float]],
        buffer=None,
        score: Callable[[float], float] | None = None,
    ) -> None:
        if step_field not in ("frames", "updates"):
            raise ValueError(f"step_field={step_field!r}: expected 'frames' or 'updates'.")
        self.cfg, self.run_dir = resolve_config(cfg, "any", check=False), Path(run_dir)
        self.loss_module, self.optimizers, self.buffer = loss_module, optimizers, buffer
        self.step_field, self.total, self.evaluate = step_field, int(total), evaluate
        self.score = score
        self.counters: dict[str, Any] = {
            "frames": 0,
            "updates": 0,
            "episodes": 0,
            "best_eval": -math.inf,
            "last_eval": math.nan,
            "time_s": 0.0,
        }
        if score is not None:
            self.counters.update(best_score=-math.inf, last_score=math.nan)
        self.log_every = self.cfg.logger.log_interval
        self.eval_every = self.cfg.logger.eval_interval
        self.checkpoint_every = self.cfg.checkpoint.interval
        self.metrics_csv = MetricsCSVLogger(self.run_dir, step_field=step_field)
        self.logger: Logger | None = None
        self.owed: dict[str, Any] | None = None
        self._started = False
        self._steps = steps_running()
        self._pbar = None
        # training metrics of the next row: last update's loss output, episode returns,
        # frames and updates (and the time spent in updates) since the previous row
        self._last_out: TensorDictBase | None = None
        self._returns: list[float] = []
        self._win_frames, self._win_start = 0, time.perf_counter()
        self._upd_n, self._upd_s = 0, 0.0
        self._t_prev = self._t_mark = time.perf_counter()
        self._last_step = 0
        self._last_ups = 0.0

    # ------------------------------------------------------------------ start, stop
    def start(self) -> bool:
        """Resume (``resume=true`` and a checkpoint in the run folder) or start fresh; open
        the logs. Returns whether the run was resumed.

        Refuses (``ConfigError`` naming the field) a checkpoint saved with a config whose
        shape-determining fields differ from this run's, and any checkpoint that fails
        verification (``CheckpointError`` naming the file) rather than starting over.
        """
        resumed = False
        if self.cfg.resume and has_checkpoint(self.run_dir):
            state, data, folder = load_checkpoint_data(self.run_dir, buffer=self.buffer is not None)
            saved_cfg, now_cfg = state.get("config") or {}, to_plain(self.cfg)
            check_resume_config(saved_cfg, now_cfg, folder)
            try:
                self.loss_module.load_state_dict(state["loss"])
                for k, o in self.optimizers.items():
                    o.load_state_dict(state["optim"][k])
                if self.buffer is not None and "buffer_meta" in state:
                    load_buffer(self.buffer, folder / "buffer", state["buffer_meta"], data=data)
            except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as err:
                raise _mismatch_error(saved_cfg, now_cfg, folder, err) from err
            self.counters.update(state["counters"])
            restore_rng(state["rng"])
            step = self.counters[self.step_field]
            last = self.metrics_csv.truncate(step)
            for p in (self.run_dir / "logs").rglob("scalars/*.csv"):
                truncate_csv(p, step, step_field=0, header=False)
            owed = state.get("owed_row")
            # a row due at the checkpoint's step and not written yet (e.g. Ctrl-C during its
            # evaluation): written first by __enter__ (unless it got written)
            self.owed = owed if owed and (last is None or last < step) else None
            if self.cfg.checkpoint.get("history", False):
                # the resumed checkpoint's copy, (re)written: a kill between a checkpoint
                # and its copy leaves none, and this run may have turned history on
                save_history(self.run_dir, state, step)
            resumed = True
        else:
            # a fresh run (also one killed before its first checkpoint, then restarted)
            # does not append to an old one: neither to metrics.csv nor to TorchRL's CSV
            # scalar logs, which would otherwise repeat the steps logged before the kill
            self.metrics_csv.clear()
            for p in (self.run_dir / "logs").rglob("scalars/*.csv"):
                truncate_csv(p, -math.inf, step_field=0, header=False)
        self.logger = make_logger(self.cfg, self.run_dir)
        self._last_step = self.counters[self.step_field]
        if self.cfg.logger.progress:
            self._pbar = _progress(self.total, self._last_step, unit=self.step_field[:-1])
        self._started = True
        return resumed

    def __enter__(self) -> RunContext:
        """Start (if :meth:`start` was not called), hold stop signals until a step ends, write
        the row an interrupted run owed (running its evaluation), then start the clocks."""
        if not self._started:
            self.start()
        if self._owns_stops:
            self._steps.open()
        if self.owed is not None:
            try:
                self._write_owed(train=False)  # its training metrics were saved with it
            except BaseException:  # e.g. Ctrl-C during its evaluation: __exit__ will not run
                self.close()
                raise
        self._t_prev = self._t_mark = self._win_start = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Keep the owed row's training metrics, close the logs, write a checkpoint, then let
        stop signals act where they land again.

        Runs at every exit of ``with run:`` (the end, an error, Ctrl-C, SIGTERM).
        """
        if self.owed is not None and self.owed.get("train"):
            self.owed["row"].update(self._train_metrics())
            self.owed["train"] = False
        if self._pbar is not None:
            self._pbar.close()
        self.metrics_csv.shutdown()
        if self.logger is not None:
            self.logger.flush()
        self.checkpoint()
        self._steps.close()

    # ------------------------------------------------------------------ what the loop reports
    def collected(self, data: TensorDictBase) -> int:
        """Count a batch of collected frames (``[frames]``-shaped, with TorchRL's
        ``("next", "done")`` and ``("next", "episode_reward")``); returns its size.

        With ``step_field="frames"`` a row due at the new frame count is owed from here.
        """
        n = data.numel()
        self.counters["frames"] += n
        self._win_frames += n
        done = data["next", "done"].squeeze(-1)
        if done.any():
            returns = data["next", "episode_reward"][done].squeeze(-1).tolist()
            self._returns.extend(returns)
            self.counters["episodes"] += len(returns)
        if self.step_field == "frames":
            self._owe_if_due()
        self._t_mark = time.perf_counter()
        return n

    def updated(self, loss_out: TensorDictBase) -> None:
        """Count one update; ``loss_out`` (the loss's output) feeds the next training row.

        With ``step_field="updates"`` a row due at the new update count is owed from here.
        """
        now = time.perf_counter()
        self._upd_s += now - self._t_mark
        self._upd_n += 1
        self._t_mark = now
        self._last_out = loss_out
        self.counters["updates"] += 1
        if self.step_field == "updates":
            self._owe_if_due()

    def end_step(self) -> None:
        """After a step's updates: write the owed row (evaluating if due), checkpoint if due
        (or if asked for: SIGTERM in a submitit job).

        Then, if a stop signal arrived (:func:`~torchrl_spqr.training.stop.stop_signals`),
        raise :class:`~torchrl_spqr.training.stop.StopRequested`: the step is complete.
        """
        st = self.counters
        now = time.perf_counter()
        st["time_s"] += now - self._t_prev
        self._t_prev = now
        step = st[self.step_field]
        n, self._last_step = step - self._last_step, step
        wrote = self.owed is not None
        if wrote:
            self._write_owed(train=True)
        asked = self._owns_stops and take_checkpoint_request()  # SIGTERM in a submitit job
        if asked or (n > 0 and step % self.checkpoint_every < n):
            self.checkpoint()
        if self._pbar is not None:
            self._pbar.update(n)
            if wrote:
                shown = {"ret": st["last_eval"], "ups": f"{self._last_ups:.1f}"}
                if self.score is not None:
                    shown["score"] = st["last_score"]
                self._pbar.set_postfix(shown)
        self._t_mark = time.perf_counter()
        if self._owns_stops:
            check_stop()

    def summary(self) -> dict[str, float]:
        """Counts and the final and best evaluation (and normalised score)."""
        st = self.counters
        out = {
            "frames": st["frames"],
            "updates": st["updates"],
            "final_eval_return": st["last_eval"],
            "best_eval_return": st["best_eval"],
        }
        if self.score is not None:
            out.update(
                final_normalized_score=st["last_score"], best_normalized_score=st["best_score"]
            )
        return out

    # ------------------------------------------------------------------ rows and checkpoints
    def _owe_if_due(self) -> None:
        step = self.counters[self.step_field]
        n = step - self._last_step
        due_log = step % self.log_every < n
        due_eval = step % self.eval_every < n or step >= self.total
        if due_log or due_eval:
            # owed from here on: a checkpoint before it is written stores what is left to do
            self.owed = {"row": {}, "eval": due_eval, "train": due_log}

    def _train_metrics(self) -> dict[str, float]:
        """The training part of a row (and new fps / updates-per-second windows)."""
        now = time.perf_counter()
        row = scalar_metrics(self._last_out) if self._last_out is not None else {}
        if self._returns:
            row["train_return"] = sum(self._returns) / len(self._returns)
            self._returns.clear()
        if self.step_field == "frames":
            row["fps"] = self._win_frames / max(now - self._win_start, 1e-9)
        row["updates_per_s"] = self._upd_n / self._upd_s if self._upd_s > 0 else 0.0
        self._last_ups = row["updates_per_s"]
        self._win_frames, self._win_start, self._upd_n, self._upd_s = 0, now, 0, 0.0
        return row

    def _write_owed(self, *, train: bool) -> None:
        owed = self.owed
        if train and owed["train"]:
            owed["row"].update(self._train_metrics())
            owed["train"] = False
        if owed["eval"]:
            self._evaluate_into(owed["row"])
            owed["eval"] = False
        self.log(owed["row"])

    def _evaluate_into(self, row: dict[str, Any]) -> None:
        st = self.counters
        mean, std = self.evaluate()
        st["last_eval"] = mean
        st["best_eval"] = max(st["best_eval"], mean)
        row.update(eval_return=mean, eval_return_std=std, best_eval_return=st["best_eval"])
        if self.score is not None:
            score = self.score(mean)
            st["last_score"] = score
            st["best_score"] = max(st["best_score"], score)
            row.update(normalized_score=score, best_normalized_score=st["best_score"])

    def log(self, row: dict[str, Any]) -> None:
        """Write ``row`` with the counters to ``metrics.csv`` and the TorchRL logger.

        The TorchRL logger gets the finite numbers, at the step ``counters[step_field]``.
        """
        st = self.counters
        row = {
            **row,
            "frames": st["frames"],
            "updates": st["updates"],
            "episodes": st["episodes"],
            "time_s": st["time_s"],
        }
        step = st[self.step_field]
        self.metrics_csv.log_metrics(row, step=step)
        self.owed = None
        if self.logger is not None:
            self.logger.log_metrics(
                {
                    k: v
                    for k, v in row.items()
                    if k != self.step_field and isinstance(v, (int, float)) and math.isfinite(v)
                },
                step=step,
            )

    def checkpoint(self) -> None:
        """Save the run's state (and the owed row, if any) atomically into ``checkpoint/``."""
        state = {
            "loss": self.loss_module.state_dict(),
            "optim": {k: o.state_dict() for k, o in self.optimizers.items()},
            "counters": dict(self.counters),
            "rng": capture_rng(),
            "config": to_plain(self.cfg),
        }
        if self.owed is not None:
            state["owed_row"] = {
                "row": {k: v for k, v in self.owed["row"].items() if isinstance(v, (int, float))},
                "eval": bool(self.owed["eval"]),
                "train": bool(self.owed.get("train", False)),
            }
        save_checkpoint(self.run_dir, state, self.buffer)
        if self.cfg.checkpoint.get("history", False):
            save_history(self.run_dir, state, self.counters[self.step_field])


def save_history(folder: Path, state: dict[str, Any], step: int) -> Path:
    """Keep the networks of a checkpoint (``checkpoint.history=true``): its loss state,
    counters and config, without optimisers or buffer, atomically in
    ``folder/history/<step>/checkpoint``; ``load_agent(folder / "history" / str(step))``
    rebuilds the agent as it was then."""
    keep = {k: state[k] for k in ("loss", "counters", "config") if k in state}
    return save_checkpoint(Path(folder) / "history" / str(int(step)), {**keep, "optim": {}})


def _progress(total: int, initial: int, unit: str):
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=total, initial=initial, unit=unit, dynamic_ncols=True, mininterval=2.0)

"""``metrics.csv`` as a TorchRL logger, and the TorchRL logger a run's config names.

Every row a run logs goes through TorchRL's ``Logger.log_metrics`` to both: the
:class:`MetricsCSVLogger` (one wide row per logged step, read by the plot tools) and the
logger of ``logger.backend`` (TorchRL's CSV, TensorBoard or W&B logger: one series per
metric).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tensordict import TensorDictBase
from torchrl.record.loggers import Logger

from torchrl_spqr.training.checkpoint import truncate_csv
from torchrl_spqr.training.config import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from omegaconf import DictConfig

__all__ = ["METRIC_FIELDS", "MetricsCSVLogger", "make_logger"]

#: The leading columns of ``metrics.csv``, in this order (the committed run folders and the
#: plot tools read them); any other metric logged gets a column after them.
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


class MetricsCSVLogger(Logger):
    """``metrics.csv``: a TorchRL logger writing one wide row per logged step.

    The columns are :data:`METRIC_FIELDS` followed by any other metric name, in the order
    they first appear (a new name rewrites the file with the wider header, atomically).
    Each row is flushed when written: nothing logged is lost to a crash. Counters in the
    metrics (``frames``, ``updates``, ...) are columns like the rest; ``step``, when given,
    fills the ``step_field`` column unless the metrics hold it.

    Args:
        run_dir: the folder of ``metrics.csv``.
        step_field: the column holding the logging step (``"frames"`` or ``"updates"``),
            by which :meth:`truncate` cuts the file on resume.
    """

    def __init__(self, run_dir: str | Path, *, step_field: str = "frames") -> None:
        self.path = Path(run_dir) / "metrics.csv"
        self.step_field = step_field
        self._file = None
        self._writer: csv.DictWriter | None = None
        self._columns: list[str] = []
        super().__init__(exp_name="metrics", log_dir=str(run_dir))

    def _create_experiment(self) -> None:
        return None  # the experiment is the file, opened at the first row

    def clear(self) -> None:
        """Start a fresh file (a fresh run does not append to an old one)."""
        self._close_file()
        if self.path.exists():
            self.path.unlink()

    def truncate(self, step: float) -> float | None:
        """Drop the rows logged after ``step`` (and a row cut off mid-write); returns the
        step of the last row kept (``None`` if none)."""
        self._close_file()
        return truncate_csv(self.path, step, step_field=self.step_field)

    def _open(self) -> None:
        header: list[str] = []
        if self.path.exists() and self.path.stat().st_size > 0:
            with self.path.open(newline="") as f:
                header = next(csv.reader(f), [])
        self._columns = header or list(METRIC_FIELDS)
        self._file = self.path.open("a", newline="")
        self._writer = csv.DictWriter(self._file, fieldnames=self._columns)
        if not header:
            self._writer.writeheader()
            self._file.flush()

    def _widen(self, names: list[str]) -> None:
        """Add columns: rewrite the file (old rows padded) under a temporary name, then swap."""
        self._close_file()
        columns = self._columns + names
        with self.path.open(newline="") as f:
            rows = list(csv.DictReader(f))
        tmp = self.path.with_suffix(".csv.tmp")
        with tmp.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=columns)
            w.writeheader()
            w.writerows(rows)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(self.path)
        self._open()

    def log_metrics(
        self,
        metrics: Mapping[str, Any] | TensorDictBase,
        step: int | None = None,
        *,
        keys_sep: str = "/",
    ) -> dict[str, Any]:
        """Write ``metrics`` as one row (tensors become Python numbers)."""
        if isinstance(metrics, TensorDictBase):
            metrics = metrics.flatten_keys(keys_sep).to_dict()
        row = {
            str(k): (v.item() if isinstance(v, torch.Tensor) and v.numel() == 1 else v)
            for k, v in metrics.items()
        }
        if step is not None:
            row.setdefault(self.step_field, step)
        if self._writer is None:
            self._open()
        new = [k for k in row if k not in self._columns]
        if new:
            self._widen(new)
        self._writer.writerow(row)
        self._file.flush()
        return row

    def log_scalar(self, name: str, value: float, step: int | None = None) -> None:
        """One row holding ``name`` (and the step)."""
        self.log_metrics({name: value}, step)

    def log_video(self, name: str, video: torch.Tensor, step: int | None = None, **kwargs) -> None:
        raise NotImplementedError(
            f"{self!r} holds scalars only: log the video {name!r} with a TorchRL logger "
            "that stores videos (logger.backend=csv, tensorboard or wandb)."
        )

    def log_hparams(self, cfg) -> None:
        raise NotImplementedError(
            f"{self!r} holds scalars only: the run's config is saved in its checkpoint "
            "(and by Hydra in .hydra/config.yaml)."
        )

    def log_histogram(self, name: str, data: Sequence, **kwargs) -> None:
        raise NotImplementedError(
            f"{self!r} holds scalars only: log the histogram {name!r} with "
            "logger.backend=tensorboard or wandb."
        )

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.close()
        self._file, self._writer = None, None

    def flush(self, timeout: float | None = None) -> None:
        if self._file is not None:
            self._file.flush()

    def shutdown(self, timeout: float | None = None) -> None:
        self._close_file()
        self._service_shutdown = True

    def __repr__(self) -> str:
        return f"MetricsCSVLogger(path={str(self.path)!r}, step_field={self.step_field!r})"


def make_logger(cfg: DictConfig, run_dir: Path) -> Logger | None:
    """The TorchRL logger named by ``logger.backend`` (``csv``, ``tensorboard``, ``wandb``
    (offline by default), or ``none``), writing into the run folder."""
    backend = cfg.logger.backend or ""
    if backend in ("", "none"):
        return None
    from torchrl.record.loggers import get_logger

    if backend == "wandb":
        os.environ.setdefault("WANDB_MODE", cfg.logger.wandb_mode)
        return get_logger(
            "wandb",
            logger_name=str(run_dir),
            experiment_name=run_dir.name,
            wandb_kwargs={"dir": str(run_dir), "project": "torchrl_spqr"},
        )
    if backend in ("csv", "tensorboard"):
        return get_logger(backend, logger_name=str(run_dir / "logs"), experiment_name=backend)
    raise ConfigError(f"logger.backend={backend!r}: expected csv, tensorboard, wandb or none.")

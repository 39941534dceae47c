"""Which config changes a resume accepts: the checks behind ``resume=true``.

A checkpoint holds networks, optimiser states and a replay buffer whose shapes follow
from some config fields (:data:`SHAPE_FIELDS`); resuming with other values there is
refused by name. Budgets, logging, devices and the like (:data:`_RESUME_FREE`) may change
without a word; any other difference is allowed with a warning. Used by
:class:`~torchrl_spqr.training.common.RunContext` and the population's run (re-exported
by :mod:`torchrl_spqr.training.common`).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from torchrl_spqr.training.config import ConfigError

__all__ = ["SHAPE_FIELDS", "check_resume_config", "config_differences"]


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
    "population.parallel_envs",
    "population.batched_eval",
    "optim.num_updates",
    "device",
    "threads",
    "retain_freed_memory",
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
        raise ConfigError(
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
        return ConfigError(
            f"resume=true: the checkpoint {folder} does not fit this run's networks or buffer "
            f"({first}); the config differs in {', '.join(diffs)} ({_describe(diffs)}). "
            "Resume with the saved value(s), or start a new run in another folder."
        )
    return ConfigError(
        f"resume=true: the checkpoint {folder} does not fit this run's networks or buffer "
        f"({first}), although the saved config matches: it was written by another version "
        "of the code. Start a new run in another folder (resume=false)."
    )

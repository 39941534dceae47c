"""Online runs as sources of datasets: what the builder reads from a run folder, and how.

:func:`~torchrl_spqr.data.builder.build_dataset` takes a policy as a callable
(``obs -> action``). It also accepts run folders (``policy``, ``source_run``,
``expert_run``) when it is given a :class:`RunReader`: the data layer does not know how a
training run saves its checkpoint, so the reader is passed in.
:class:`torchrl_spqr.training.restore.RunFolders` reads the folders the package's scripts
write; the command line (``python -m torchrl_spqr.data build --policy-run RUN_DIR ...``)
passes it. A folder that is missing or unreadable gives an error naming the flag, the
folder and what to pass instead.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from torchrl_spqr.data.episodes import Episode

__all__ = ["RunReader"]


@runtime_checkable
class RunReader(Protocol):
    """Reads what the dataset builder needs from an online run's folder."""

    def policy(self, run_dir: str | os.PathLike) -> Callable[[np.ndarray], np.ndarray]:
        """The run's deterministic actor as ``obs -> action`` (float32 actions)."""
        ...

    def config(self, run_dir: str | os.PathLike) -> dict[str, Any]:
        """The run's saved config (the builder reads ``env.name`` and ``env.max_episode_steps``)."""
        ...

    def episodes(self, run_dir: str | os.PathLike, steps: int | None = None) -> list[Episode]:
        """The run's replay buffer as chronological episodes (its first ``steps`` transitions)."""
        ...


def _check_reader(runs: Any, name: str, flag: str, value: Any) -> None:
    """``runs`` can read the run folder ``value`` given as ``name`` (``flag``), or raise."""
    if runs is None:
        raise ValueError(
            f"{name}={str(value)!r} ({flag}) is a run folder: pass "
            "runs=torchrl_spqr.training.restore.RunFolders() to read it"
            + (
                ", or a callable obs -> action (e.g. "
                "torchrl_spqr.training.restore.load_policy_from_run(folder))."
                if name == "policy"
                else "."
            )
        )
    if not isinstance(runs, RunReader):
        raise ValueError(
            f"runs={runs!r}: expected a RunReader (policy, config and episodes methods), "
            "e.g. torchrl_spqr.training.restore.RunFolders()."
        )


def _check_run_dir(run: Any, flag: str) -> Path:
    path = Path(os.fspath(run)).expanduser()
    if not path.is_dir():
        raise ValueError(
            f"{flag} {str(run)!r}: no such folder. Pass the folder of an online run (the "
            "output folder of sota_scripts/sac_ens_spqr, holding checkpoint/state.pt)."
        )
    return path


def _run_error(flag: str, run: Any, err: BaseException, what: str) -> Exception:
    """``err`` with the flag, the folder and what to pass instead.

    The package's own errors (a damaged or unsafe checkpoint: ``CheckpointError``,
    ``safe_io`` errors) keep their class; others become a ValueError.
    """
    detail = str(err).rstrip(". ")
    msg = (
        f"{flag} {str(run)!r}: {what}: {type(err).__name__}: {detail}. Pass the folder of an "
        "online run that saved a checkpoint (sota_scripts/sac_ens_spqr output; the replay "
        "kinds also need the replay buffer saved with it, checkpoint/buffer)."
    )
    if _own_error(err) and not isinstance(err, ValueError):
        with contextlib.suppress(Exception):
            return type(err)(msg)
    return ValueError(msg)


def _own_error(err: BaseException) -> bool:
    return type(err).__module__.split(".")[0] == "torchrl_spqr"

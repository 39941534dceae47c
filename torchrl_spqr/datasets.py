"""Deprecated location: the offline-data code moved to the package :mod:`torchrl_spqr.data`.

``from torchrl_spqr.datasets import load_offline_dataset`` (and every other public name)
still works for one release and emits a ``FutureWarning`` naming the new location: loading
and scores in :mod:`torchrl_spqr.data`, the command line in :mod:`torchrl_spqr.data.cli`,
``load_policy_from_run`` in :mod:`torchrl_spqr.training.restore`. ``build_dataset`` reads
run folders (``policy``, ``source_run``, ``expert_run`` given as folders) only when passed
``runs=torchrl_spqr.training.restore.RunFolders()``; the command line passes it.

``python -m torchrl_spqr.datasets build|list|info`` keeps working, without a warning: it
runs the new command line, ``python -m torchrl_spqr.data``.
"""

from __future__ import annotations

import sys
import warnings
from typing import Any

#: old public name -> the module it moved to (the name is the same there)
_MOVED: dict[str, str] = {
    "D4RL_ENV_IDS": "torchrl_spqr.data",
    "D4RL_REF_SCORES": "torchrl_spqr.data",
    "DOWNLOAD_TIMEOUT_S": "torchrl_spqr.data",
    "DatasetCorruptedError": "torchrl_spqr.data",
    "DatasetUnavailableError": "torchrl_spqr.data",
    "KINDS": "torchrl_spqr.data",
    "OfflineData": "torchrl_spqr.data",
    "build_dataset": "torchrl_spqr.data",
    "d4rl_env_id": "torchrl_spqr.data",
    "d4rl_env_kwargs": "torchrl_spqr.data",
    "d4rl_ref_scores": "torchrl_spqr.data",
    "load_offline_dataset": "torchrl_spqr.data",
    "load_policy_from_run": "torchrl_spqr.training.restore",
    "main": "torchrl_spqr.data.cli",
    "minari_datasets_path": "torchrl_spqr.data",
    "normalized_score": "torchrl_spqr.data",
    "parse_d4rl_id": "torchrl_spqr.data",
}

__all__ = sorted(_MOVED)


def _moved(name: str) -> Any:
    """The object ``name`` at its new location (imported only when asked for)."""
    if name == "load_policy_from_run":
        from torchrl_spqr.training.restore import load_policy_from_run

        return load_policy_from_run
    if name == "main":
        from torchrl_spqr.data.cli import main

        return main
    from torchrl_spqr import data

    return getattr(data, name)


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        warnings.warn(
            f"torchrl_spqr.datasets.{name} moved to {_MOVED[name]}.{name}; the old location "
            "will be removed in the next release",
            FutureWarning,
            stacklevel=2,
        )
        return _moved(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return list(__all__)


if __name__ == "__main__":
    from torchrl_spqr.data.cli import main as _main

    sys.exit(_main(prog="python -m torchrl_spqr.datasets"))

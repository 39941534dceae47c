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

from torchrl_spqr._deprecation import moved_names

#: old public name -> the module it moved to (the name is the same there)
_MOVED = {
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

__all__, __getattr__, __dir__ = moved_names(__name__, _MOVED)


if __name__ == "__main__":
    import sys

    from torchrl_spqr.data.cli import main as _main

    sys.exit(_main(prog="python -m torchrl_spqr.datasets"))

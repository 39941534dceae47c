"""Offline RL data: loading through TorchRL, D4RL's reference scores, building datasets.

- :mod:`~torchrl_spqr.data.offline`: :func:`load_offline_dataset` (Minari and D4RL data
  through TorchRL's ``MinariExperienceReplay`` / ``D4RLExperienceReplay``) and
  :class:`OfflineData`;
- :mod:`~torchrl_spqr.data.scores`: D4RL's reference scores, ids and
  :func:`normalized_score`;
- :mod:`~torchrl_spqr.data.builder`: :func:`build_dataset` (D4RL's recipes, written as
  local Minari datasets), fed by :mod:`~torchrl_spqr.data.episodes` and reading online
  runs through a :class:`~torchrl_spqr.data.runs.RunReader`;
- :mod:`~torchrl_spqr.data.store`: the local Minari store (ids, safe swaps, checks);
- :mod:`~torchrl_spqr.data.cli`: ``python -m torchrl_spqr.data build|list|info``.
"""

from torchrl_spqr.data.builder import build_dataset
from torchrl_spqr.data.episodes import Episode, episodes_from_replay
from torchrl_spqr.data.errors import DatasetCorruptedError, DatasetUnavailableError
from torchrl_spqr.data.offline import DOWNLOAD_TIMEOUT_S, OfflineData, load_offline_dataset
from torchrl_spqr.data.runs import RunReader
from torchrl_spqr.data.scores import (
    D4RL_ENV_IDS,
    D4RL_REF_SCORES,
    KINDS,
    d4rl_env_id,
    d4rl_env_kwargs,
    d4rl_ref_scores,
    normalized_score,
    parse_d4rl_id,
)
from torchrl_spqr.data.store import minari_datasets_path

__all__ = [
    "D4RL_ENV_IDS",
    "D4RL_REF_SCORES",
    "DOWNLOAD_TIMEOUT_S",
    "DatasetCorruptedError",
    "DatasetUnavailableError",
    "Episode",
    "KINDS",
    "OfflineData",
    "RunReader",
    "build_dataset",
    "d4rl_env_id",
    "d4rl_env_kwargs",
    "d4rl_ref_scores",
    "episodes_from_replay",
    "load_offline_dataset",
    "minari_datasets_path",
    "normalized_score",
    "parse_d4rl_id",
]

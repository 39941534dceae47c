"""The offline scripts' data (``sota_scripts/{sac_n,edac,cql}_spqr``): the dataset and its record.

:func:`make_offline_data` loads ``dataset.id`` (a Minari or D4RL dataset through TorchRL's
replay classes) with its reference scores, evaluation environment id and reward transform;
:func:`record_dataset_transform` writes the transform into the run folder. The training
loop is in each script.

``dataset.reward_scale`` / ``dataset.reward_shift`` (``r' = scale * r + shift``) transform
the stored rewards once, at load; the run folder's ``dataset_transform.json`` records them.
They change the training targets only: evaluation returns and normalised scores are in the
environment's own reward.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from torchrl_spqr.data import OfflineData, load_offline_dataset

if TYPE_CHECKING:  # pragma: no cover
    from omegaconf import DictConfig

__all__ = ["make_offline_data", "record_dataset_transform"]


def make_offline_data(cfg: DictConfig) -> OfflineData:
    """Load ``dataset.id`` through TorchRL's Minari / D4RL replay classes (``cfg`` resolved:
    :func:`~torchrl_spqr.training.config.resolve_config`), with the reward transform applied."""
    ds = cfg.dataset
    return load_offline_dataset(
        ds.id,
        batch_size=cfg.optim.batch_size,
        source=ds.source,
        root=ds.root,
        download=ds.download,
        reward_scale=ds.reward_scale,
        reward_shift=ds.reward_shift,
    )


def record_dataset_transform(run_dir: Path, data: OfflineData) -> None:
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

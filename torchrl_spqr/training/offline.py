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

from torchrl_spqr.training import builders as B

__all__ = ["make_offline_data", "record_dataset_transform"]


def make_offline_data(cfg):
    """Load ``dataset.id`` through TorchRL's Minari / D4RL replay classes."""
    from torchrl_spqr.data import load_offline_dataset

    return load_offline_dataset(
        str(B._get(cfg, "dataset.id")),
        batch_size=int(B._get(cfg, "optim.batch_size")),
        source=str(B._get(cfg, "dataset.source", "minari")),
        root=B._get(cfg, "dataset.root"),
        download=bool(B._get(cfg, "dataset.download", True)),
        reward_scale=float(B._get(cfg, "dataset.reward_scale", 1.0)),
        reward_shift=float(B._get(cfg, "dataset.reward_shift", 0.0)),
    )


def record_dataset_transform(run_dir: Path, data) -> None:
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

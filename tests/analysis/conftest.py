"""Fixtures shared by the analysis tests."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def sota_run(tmp_path_factory) -> Path:
    """A tiny real sac_ens_spqr run (N=6, so d=3) with its checkpoint and replay buffer."""
    pytest.importorskip("hydra")
    from _helpers import load_script
    from hydra import compose, initialize_config_dir

    overrides = [
        "env=pendulum",
        "collector.total_frames=60",
        "collector.init_random_frames=40",
        "optim.batch_size=16",
        "replay_buffer.size=500",
        "network.hidden_sizes=[16,16]",
        "network.ensemble_size=6",
        "logger.log_interval=20",
        "logger.eval_interval=60",
        "logger.eval_episodes=1",
        "logger.progress=false",
        "logger.backend=none",
        "checkpoint.interval=1000",
    ]
    with initialize_config_dir(
        config_dir=str(ROOT / "sota_scripts/sac_ens_spqr"), version_base="1.3"
    ):
        cfg = compose(config_name="config", overrides=overrides)
    run = tmp_path_factory.mktemp("sota") / "beta1.0_N6_seed0"
    load_script("sac_ens_spqr").train(cfg, run)
    return run

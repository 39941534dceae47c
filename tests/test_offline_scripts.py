"""Offline scripts (SAC-N, EDAC, CQL-N) on a tiny locally built Minari dataset."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("hydra")
pytest.importorskip("minari")
from hydra import compose, initialize_config_dir  # noqa: E402

from torchrl_spqr.datasets import (  # noqa: E402
    DatasetUnavailableError,
    build_dataset,
    load_offline_dataset,
    normalized_score,
)
from torchrl_spqr.training.offline import train_offline  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ALGOS = ("sac_n_spqr", "edac_spqr", "cql_spqr")
DATASET = "local/test/hopper-random-v0"

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

TINY = [
    "dataset=local_hopper_random",
    f"dataset.id={DATASET}",
    "network.ensemble_size=3",
    "network.hidden_sizes=[16,16]",
    "optim.num_updates=60",
    "optim.batch_size=16",
    "logger.log_interval=20",
    "logger.eval_interval=30",
    "logger.eval_episodes=1",
    "logger.progress=false",
    "env.max_episode_steps=50",
    "checkpoint.interval=30",
]


@pytest.fixture(scope="module")
def minari_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("minari")
    old = os.environ.get("MINARI_DATASETS_PATH")
    os.environ["MINARI_DATASETS_PATH"] = str(root)
    build_dataset(
        DATASET,
        "Hopper-v5",
        "random",
        steps=800,
        seed=0,
        max_episode_steps=50,
        ref_max_score=1000.0,
    )
    yield root
    if old is None:
        os.environ.pop("MINARI_DATASETS_PATH", None)
    else:
        os.environ["MINARI_DATASETS_PATH"] = old


def _cfg(algo: str, *overrides: str):
    extra = ["optim.num_random=2", "optim.bc_steps=10"] if algo == "cql_spqr" else []
    with initialize_config_dir(config_dir=str(ROOT / "sota_scripts" / algo), version_base="1.3"):
        return compose(config_name="config", overrides=[*TINY, *extra, *overrides])


def _rows(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "metrics.csv").open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("algo", ALGOS)
def test_offline_script_runs_and_scores(algo, minari_root, tmp_path):
    res = train_offline(_cfg(algo), tmp_path / "run")
    run = tmp_path / "run"
    assert res["updates"] == 60
    for name in ("metrics.csv", "learning_curve.png", "checkpoint/state.pt"):
        assert (run / name).exists(), name
    rows = _rows(run)
    assert [int(r["updates"]) for r in rows] == [20, 30, 40, 60]
    evals = [r for r in rows if r["eval_return"]]
    assert [int(r["updates"]) for r in evals] == [30, 60]
    data = load_offline_dataset(DATASET, batch_size=4, download=False)
    for r in evals:  # normalised score by hand: 100 (R - min) / (max - min)
        expected = (
            100 * (float(r["eval_return"]) - data.ref_min_score) / (1000.0 - data.ref_min_score)
        )
        assert float(r["normalized_score"]) == pytest.approx(expected, rel=1e-6)
    assert float(evals[-1]["best_normalized_score"]) == pytest.approx(
        max(float(r["normalized_score"]) for r in evals)
    )
    assert res["final_normalized_score"] == pytest.approx(float(evals[-1]["normalized_score"]))
    assert rows[-1]["spqr_kl"] != ""
    if algo == "cql_spqr":
        assert rows[-1]["loss_cql"] != ""
    if algo == "edac_spqr":
        assert rows[-1]["loss_diversity"] != ""


def test_normalized_score_formula():
    assert normalized_score(50.0, 0.0, 100.0) == pytest.approx(50.0)
    assert normalized_score(-20.0, -20.0, 3234.3) == pytest.approx(0.0)


def test_offline_resume(minari_root, tmp_path):
    run = tmp_path / "run"
    train_offline(_cfg("sac_n_spqr", "optim.num_updates=30"), run)
    res = train_offline(_cfg("sac_n_spqr", "resume=true"), run)
    assert res["updates"] == 60
    assert [int(r["updates"]) for r in _rows(run)] == [20, 30, 40, 60]


def test_missing_dataset_message(minari_root, tmp_path):
    with pytest.raises(DatasetUnavailableError, match="local/test/nope-v0"):
        train_offline(
            _cfg("sac_n_spqr", "dataset.id=local/test/nope-v0", "dataset.download=false"),
            tmp_path / "r",
        )


def test_offline_script_subprocess(minari_root, tmp_path):
    run = tmp_path / "sub"
    cmd = [
        sys.executable,
        str(ROOT / "sota_scripts/edac_spqr/edac_spqr.py"),
        *TINY,
        f"hydra.run.dir={run}",
    ]
    env = {**os.environ, "MINARI_DATASETS_PATH": str(minari_root)}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "normalised" in res.stdout
    assert (run / "metrics.csv").exists()


@pytest.mark.parametrize(
    "algo,dataset,expected",
    [
        ("sac_n_spqr", "hopper_medium", {"network.ensemble_size": 500}),
        ("edac_spqr", "halfcheetah_medium_expert", {"network.ensemble_size": 10, "optim.eta": 5.0}),
        ("edac_spqr", "hopper_medium_replay", {"network.ensemble_size": 50, "optim.eta": 1.0}),
        (
            "cql_spqr",
            "kitchen_mixed",
            {
                "network.ensemble_size": 6,
                "spqr.beta": 2.0,
                "optim.lagrange_thresh": 5.0,
                "optim.min_q_weight": 5.0,
                "optim.actor_lr": 1e-4,
                "optim.critic_lr": 3e-4,
            },
        ),
    ],
)
def test_per_dataset_configs_override_defaults(algo, dataset, expected):
    """Per-dataset files win over the script's defaults (``_self_`` comes first)."""
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(ROOT / "sota_scripts" / algo), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"dataset={dataset}"])
    for key, value in expected.items():
        assert OmegaConf.select(cfg, key) == value, key

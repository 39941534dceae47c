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
from _helpers import load_script  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

import torchrl_spqr.training  # noqa: E402, F401  (registers the scripts' config schemas with Hydra)
from torchrl_spqr.data import (  # noqa: E402
    DatasetUnavailableError,
    build_dataset,
    load_offline_dataset,
    normalized_score,
)

ROOT = Path(__file__).resolve().parents[2]
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


def train_offline(cfg, run_dir: Path) -> dict[str, float]:
    """The training of the script ``cfg.algorithm`` stands for (its own loop)."""
    return load_script(f"{cfg.algorithm}_spqr").train(cfg, run_dir)


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
        assert rows[-1]["loss_cql"] != "" and rows[-1]["cql_gap"] != ""
    if algo == "edac_spqr":
        assert rows[-1]["loss_diversity"] != ""


def test_every_scalar_of_the_loss_reaches_every_logger(minari_root, tmp_path):
    """No whitelist: CQL's Lagrange terms (``loss_alpha_prime``, ``alpha_prime``) and its
    ``cql_gap`` get their columns in metrics.csv (after the standard ones, which keep their
    order) and their series in TorchRL's CSV logger."""
    from torchrl_spqr.training.loggers import METRIC_FIELDS

    run = tmp_path / "run"
    cfg = _cfg(
        "cql_spqr", "optim.lagrange_thresh=5", "optim.num_updates=20", "logger.eval_interval=20"
    )
    train_offline(cfg, run)
    with (run / "metrics.csv").open(newline="") as f:
        header = next(csv.reader(f))
    assert header[: len(METRIC_FIELDS)] == METRIC_FIELDS
    rows = _rows(run)
    assert [int(r["updates"]) for r in rows] == [20]
    for name in ("loss_alpha_prime", "alpha_prime", "cql_gap", "loss_cql", "spqr_kl"):
        assert rows[-1][name] != "", name
        logged = (run / "logs/csv/scalars" / f"{name}.csv").read_text().splitlines()
        assert [line.split(",")[0] for line in logged] == ["20"], name
        assert float(logged[0].split(",")[1]) == pytest.approx(float(rows[-1][name])), name


def test_evaluate_gives_an_offline_run_its_normalised_scores(minari_root, tmp_path):
    """``--evaluate`` on an offline run: each episode's normalised score from the dataset's
    reference scores, per run and per arm, and SPQR's paired effect on it (the same saved
    agent under beta 0 and beta 1 names: exactly 0)."""
    import shutil

    from torchrl_spqr.analysis import cli
    from torchrl_spqr.analysis.evaluation import CSV_FIELDS, checkpoint_return

    run = tmp_path / "trained"
    train_offline(_cfg("sac_n_spqr", "optim.num_updates=30"), run)
    est = checkpoint_return(run, episodes=2, seed=1)
    data = load_offline_dataset(DATASET, batch_size=4, download=False)
    assert est.scores == pytest.approx(
        [normalized_score(r, data.ref_min_score, 1000.0) for r in est.returns]
    )
    assert est.mean_score == pytest.approx(sum(est.scores) / 2)
    runs = tmp_path / "runs"
    for beta in (0, 1):
        shutil.copytree(run, runs / f"beta{beta}.0_N3_seed0")
    out = tmp_path / "out"
    cli.main([str(runs), "--evaluate", "2", "--evaluate-seed", "1", "--out", str(out)])
    text = (out / "evaluation.md").read_text()
    assert "normalised score, mean +- sd over runs" in text
    assert f"| beta0.0_N3 | 1 | {est.mean_return:.1f} | {est.mean_score:.1f} | 2 |" in text
    assert (
        "| N3 (beta 1), normalised score | 1 |" in text and "| +0.0 [+0.0, +0.0] | +0.0 |" in text
    )
    with (out / "evaluation.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == CSV_FIELDS
    assert [float(x) for x in rows[0]["scores"].split(";")] == pytest.approx(est.scores)


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


# --- issue 18: the reward transform for offline data and the per-dataset configs' sources ---


def test_reward_transform_trains_on_transformed_rewards_and_evaluates_in_env_reward(
    minari_root, tmp_path
):
    """A huge shift (1000 a step) shows in the buffer, never in the evaluation return."""
    import json

    from torchrl_spqr.data.offline import _storage_td

    run = tmp_path / "shifted"
    res = train_offline(
        _cfg("sac_n_spqr", "dataset.reward_scale=0.5", "dataset.reward_shift=1000"), run
    )
    info = json.loads((run / "dataset_transform.json").read_text())
    assert info["reward_scale"] == 0.5 and info["reward_shift"] == 1000.0
    assert info["dataset_id"] == DATASET
    evals = [r for r in _rows(run) if r["eval_return"]]
    # Hopper, at most 50 steps: the environment's own return is far below one shifted step
    assert all(float(r["eval_return"]) < 500 for r in evals)
    assert res["final_eval_return"] == pytest.approx(float(evals[-1]["eval_return"]))
    plain = load_offline_dataset(DATASET, batch_size=4, download=False)
    shifted = load_offline_dataset(
        DATASET, batch_size=4, download=False, reward_scale=0.5, reward_shift=1000.0
    )
    r0 = _storage_td(plain.buffer)["next", "reward"]
    r1 = _storage_td(shifted.buffer)["next", "reward"]
    assert (r1 == (r0.double() * 0.5 + 1000.0).to(r0.dtype)).all()
    assert (shifted.buffer.sample()["next", "reward"] > 900).all()


@pytest.mark.parametrize(
    "override,field",
    [
        ("dataset.reward_scale=nan", "dataset.reward_scale"),
        ("dataset.reward_scale=inf", "dataset.reward_scale"),
        ("dataset.reward_scale=0", "dataset.reward_scale"),
        ("dataset.reward_scale=abc", "dataset.reward_scale"),
        ("dataset.reward_shift=nan", "dataset.reward_shift"),
        ("dataset.reward_shift=-inf", "dataset.reward_shift"),
    ],
)
def test_bad_reward_transform_is_a_config_error(override, field):
    from torchrl_spqr.training.builders import ConfigError, validate_config

    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        validate_config(_cfg("cql_spqr", override), online=False)


def test_the_reward_transform_defaults_and_the_configs_that_set_it():
    from omegaconf import OmegaConf

    def get(algo, dataset, key):
        with initialize_config_dir(
            config_dir=str(ROOT / "sota_scripts" / algo), version_base="1.3"
        ):
            return OmegaConf.select(compose("config", overrides=[f"dataset={dataset}"]), key)

    for algo in ALGOS:  # today's behaviour by default
        assert get(algo, "hopper_medium", "dataset.reward_scale") == 1.0
        assert get(algo, "hopper_medium", "dataset.reward_shift") == 0.0
    for kitchen in ("kitchen_mixed", "kitchen_partial", "kitchen_complete"):  # authors: r - 0.5
        assert get("cql_spqr", kitchen, "dataset.reward_shift") == -0.5
        assert get("cql_spqr", kitchen, "optim.num_updates") == 3_000_000
        assert get("cql_spqr", kitchen, "optim.alpha_lr") == 1e-4
    for maze in ("antmaze_umaze", "antmaze_medium_diverse"):  # CORL's CQL AntMaze configs
        assert get("cql_spqr", maze, "dataset.reward_scale") == 10.0
        assert get("cql_spqr", maze, "dataset.reward_shift") == -5.0
        assert get("cql_spqr", maze, "optim.max_q_backup") is True
        assert get("cql_spqr", maze, "optim.lagrange_thresh") == 0.8
    assert get("cql_spqr", "hopper_medium", "optim.num_updates") == 3_000_000
    assert get("cql_spqr", "hopper_medium", "optim.alpha_lr") == 1e-4


def test_every_dataset_config_line_names_its_source():
    """Each ``key: value`` line of each dataset/*.yaml carries a ``#`` comment (its source).

    Structural lines (``dataset:``, ``optim:``, ...) and the ``spqr:`` group (documented by
    the lines above each of its entries) are exempt.
    """
    files = sorted((ROOT / "sota_scripts").glob("*/dataset/*.yaml"))
    assert len(files) >= 70
    missing = []
    for path in files:
        in_spqr = False
        for no, line in enumerate(path.read_text().splitlines(), 1):
            stripped = line.strip()
            if not stripped or stripped.startswith("#"):
                continue
            if not line.startswith(" "):
                in_spqr = stripped.startswith("spqr:")
            if in_spqr or stripped.endswith(":"):
                continue
            if " #" not in line:
                missing.append(f"{path.relative_to(ROOT)}:{no}: {stripped}")
    assert not missing, "\n".join(missing)


def test_sac_n_and_edac_per_dataset_sizes():
    from omegaconf import OmegaConf

    def get(algo, dataset, key):
        with initialize_config_dir(
            config_dir=str(ROOT / "sota_scripts" / algo), version_base="1.3"
        ):
            return OmegaConf.select(compose("config", overrides=[f"dataset={dataset}"]), key)

    for kind in ("medium", "medium_expert", "medium_replay"):  # CORL sac_n walker2d: 20
        assert get("sac_n_spqr", f"walker2d_{kind}", "network.ensemble_size") == 20
    # the EDAC paper's table as OfflineRL-Lib reproduces it (docs/fidelity.md): random,
    # expert, full-replay
    for env, sizes in (
        ("halfcheetah", (10, 10, 10)),
        ("hopper", (500, 500, 200)),
        ("walker2d", (20, 100, 20)),
    ):
        for kind, n in zip(("random", "expert", "full_replay"), sizes):
            assert get("sac_n_spqr", f"{env}_{kind}", "network.ensemble_size") == n, (env, kind)
    for env in ("halfcheetah", "hopper", "walker2d"):  # EDAC: every D4RL Gym dataset
        for kind in ("random", "medium", "expert", "medium_expert", "medium_replay", "full_replay"):
            assert (ROOT / f"sota_scripts/edac_spqr/dataset/{env}_{kind}.yaml").exists()
    assert get("edac_spqr", "walker2d_medium_expert", "optim.eta") == 5.0

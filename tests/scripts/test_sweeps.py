"""Hydra multirun sweeps: every script sweeps into one run folder per job, the launcher
presets (``hydra/launcher=local``: joblib processes; ``slurm``: submitit) compose, and a
2-process joblib sweep runs end to end."""

from __future__ import annotations

import csv
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("hydra")
from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

import torchrl_spqr.training  # noqa: E402, F401  (registers the scripts' config schemas with Hydra)

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ["sac_ens_spqr", "redq_spqr", "sac_n_spqr", "edac_spqr", "cql_spqr"]
ONLINE_TINY = [
    "env=pendulum",
    "collector.total_frames=40",
    "collector.init_random_frames=20",
    "optim.batch_size=8",
    "replay_buffer.size=100",
    "network.hidden_sizes=[8]",
    "network.ensemble_size=3",
    "logger.log_interval=20",
    "logger.eval_interval=40",
    "logger.eval_episodes=1",
    "logger.progress=false",
]

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
needs = {
    "joblib": pytest.mark.skipif(
        importlib.util.find_spec("hydra_plugins.hydra_joblib_launcher") is None,
        reason="sweeps extra (hydra-joblib-launcher) not installed",
    ),
    "submitit": pytest.mark.skipif(
        importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is None,
        reason="sweeps extra (hydra-submitit-launcher) not installed",
    ),
}


def _compose(script: str, *overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "sota_scripts" / script), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=True)


def _rows(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "metrics.csv").open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_sweeps_into_one_folder_per_job(script):
    """Jobs that differ in seed or beta get different run folders under one sweep folder."""
    subdirs = set()
    for seed in (0, 1, 2):
        for beta in (0, 1):
            cfg = _compose(script, f"seed={seed}", f"spqr.beta={beta}")
            sub = OmegaConf.select(cfg, "hydra.sweep.subdir")
            assert f"seed{seed}" in sub and f"beta{beta}" in sub
            subdirs.add(sub)
            assert "multirun" in OmegaConf.select(cfg, "hydra.sweep.dir")
    assert len(subdirs) == 6


@needs["joblib"]
@needs["submitit"]
@pytest.mark.parametrize("script", SCRIPTS)
def test_launcher_presets_compose(script):
    local = _compose(script, "hydra/launcher=local").hydra.launcher
    assert local._target_.endswith("JoblibLauncher")
    assert local.backend == "loky" and local.n_jobs == -1
    cfg = _compose(script, "hydra/launcher=slurm", "hydra.launcher.partition=cpu")
    slurm = cfg.hydra.launcher
    assert slurm._target_.endswith("SlurmLauncher")
    assert slurm.partition == "cpu" and slurm.cpus_per_task >= 1 and slurm.max_num_timeout > 0
    # submitit's job logs sit next to the run folders of the sweep
    assert slurm.submitit_folder == f"{cfg.hydra.sweep.dir}/.submitit/%j"


def _run_sweep(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        str(ROOT / "sota_scripts/sac_ens_spqr/sac_ens_spqr.py"),
        "-m",
        *ONLINE_TINY,
        f"hydra.sweep.dir={tmp_path}",
        *overrides,
    ]
    env = {**os.environ, "RL_WARNINGS": "False"}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


@needs["joblib"]
@pytest.mark.slow  # default suite under 15 min on a slow 2-core host; make test-slow runs it
def test_joblib_sweep_two_processes(tmp_path):
    """3 seeds would be the same: 2 seeds x 2 arms, 2 jobs at a time, one folder each."""
    sweep = tmp_path / "sweep"
    _run_sweep(
        sweep, "hydra/launcher=local", "hydra.launcher.n_jobs=2", "seed=0,1", "spqr.beta=0,1"
    )
    runs = sorted(p.parent for p in sweep.rglob("metrics.csv"))
    assert [r.name for r in runs] == [f"beta{b}_N3_seed{s}" for b in (0, 1) for s in (0, 1)]
    assert (sweep / "multirun.yaml").exists()
    finals = {}
    for run in runs:
        beta, seed = int(run.name[4]), int(run.name[-1])
        job = OmegaConf.load(run / ".hydra/config.yaml")
        assert (job.seed, job.spqr.beta) == (seed, beta)
        launcher = OmegaConf.load(run / ".hydra/hydra.yaml").hydra.launcher
        assert launcher._target_.endswith("JoblibLauncher") and launcher.n_jobs == 2
        rows = _rows(run)
        assert [int(r["frames"]) for r in rows] == [20, 40]
        assert int(rows[-1]["updates"]) == 40 - 20 + 1
        assert float(rows[-1]["spqr_beta"]) == beta
        assert (run / "checkpoint/state.pt").exists()
        finals[run.name] = rows[-1]["loss_qvalue"]
    # different seeds: different data and networks
    assert finals["beta0_N3_seed0"] != finals["beta0_N3_seed1"]


@needs["submitit"]
@pytest.mark.slow
def test_submitit_local_sweep(tmp_path):
    """Hydra's submitit launcher (the SLURM preset's engine) with its local executor."""
    sweep = tmp_path / "sweep"
    _run_sweep(sweep, "hydra/launcher=submitit_local", "seed=3")
    rows = _rows(sweep / "beta1.0_N3_seed3")
    assert [int(r["frames"]) for r in rows] == [20, 40]
    assert list((sweep / ".submitit").rglob("*_result.pkl"))


def _submitit_tasks(folder: Path) -> list[int]:
    """The pids of the running submitit task processes whose job folder is under ``folder``."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        args = [a.decode(errors="replace") for a in cmd]
        if "submitit.core._submit" in args and any(str(folder) in a for a in args):
            pids.append(int(proc.name))
    return pids


@needs["submitit"]
@pytest.mark.slow  # a submitit job run twice: about a minute on 2 busy cores
def test_submitit_requeue_signal_stops_after_a_step_and_the_requeued_job_resumes(tmp_path):
    """What SLURM does before a time limit, with submitit's local executor: USR2 to the job's
    task mid-run. The run stops after its step with the exit checkpoint, submitit requeues the
    job, and the requeued job (``resume=true``) writes every remaining row once."""
    import signal
    import time

    sweep = tmp_path / "sweep"
    cmd = [
        sys.executable,
        str(ROOT / "sota_scripts/sac_ens_spqr/sac_ens_spqr.py"),
        "-m",
        *ONLINE_TINY,
        "collector.total_frames=600",
        "logger.eval_interval=300",
        "checkpoint.interval=300",
        f"hydra.sweep.dir={sweep}",
        "hydra/launcher=submitit_local",
        "resume=true",
        "seed=3",
    ]
    env = {**os.environ, "RL_WARNINGS": "False"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    run = sweep / "beta1.0_N3_seed3"
    try:
        deadline = time.monotonic() + 300
        while not (run / "metrics.csv").exists() or len(_rows(run)) < 3:
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.2)
        (task,) = _submitit_tasks(sweep / ".submitit")
        os.kill(task, signal.SIGUSR2)
        out, err = proc.communicate(timeout=600)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-3000:]
    logs = "".join(p.read_text() for p in (sweep / ".submitit").rglob("*_log.*"))
    assert "SIGUSR2 (the job scheduler's preemption/timeout signal): stopping after" in logs
    assert "the job scheduler's handler requeues the job" in logs
    assert "Requeued job" in logs
    assert "Traceback" not in logs
    # every row once: the stopped job's rows, then the requeued job's from its checkpoint
    assert [int(r["frames"]) for r in _rows(run)] == list(range(20, 601, 20))
    assert int(_rows(run)[-1]["updates"]) == 600 - 20 + 1  # ONLINE_TINY: 20 random frames

"""The SOTA-style online scripts: end to end on a tiny budget, resume, seeding, config validation."""

from __future__ import annotations

import csv
import importlib.util
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("hydra")
from _helpers import load_script, signal_on_call  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

from torchrl_spqr.training.builders import ConfigError, validate_config  # noqa: E402
from torchrl_spqr.training.checkpoint import load_checkpoint, restore_rng  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = {
    "sac_ens_spqr": ROOT / "sota_scripts/sac_ens_spqr",
    "redq_spqr": ROOT / "sota_scripts/redq_spqr",
}

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

TINY = [
    "env=pendulum",
    "collector.init_random_frames=40",
    "optim.batch_size=16",
    "replay_buffer.size=500",
    "network.hidden_sizes=[16,16]",
    "network.ensemble_size=3",
    "logger.log_interval=20",
    "logger.eval_interval=60",
    "logger.eval_episodes=1",
    "logger.progress=false",
    "checkpoint.interval=40",
]


def _cfg(script: str, *overrides: str):
    with initialize_config_dir(config_dir=str(SCRIPTS[script]), version_base="1.3"):
        return compose(config_name="config", overrides=[*TINY, *overrides])


def _rows(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "metrics.csv").open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_script_end_to_end_subprocess(script, tmp_path):
    """The script as a user runs it: CSV, PNG and checkpoint appear in the run folder."""
    run_dir = tmp_path / "run"
    utd = ["optim.utd_ratio=2", "optim.policy_update_delay=2"] if script == "redq_spqr" else []
    cmd = [
        sys.executable,
        str(SCRIPTS[script] / f"{script}.py"),
        *TINY,
        *utd,
        "collector.total_frames=80",
        f"hydra.run.dir={run_dir}",
    ]
    env = {**os.environ, "RL_WARNINGS": "False"}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "best eval return" in res.stdout
    for name in ("metrics.csv", "learning_curve.png", "checkpoint/state.pt"):
        assert (run_dir / name).exists(), name
    rows = _rows(run_dir)
    assert [int(r["frames"]) for r in rows] == [20, 40, 60, 80]
    assert rows[-1]["eval_return"] != "" and rows[-1]["spqr_kl"] != ""
    assert int(rows[-1]["updates"]) == (80 - 40 + 1) * (2 if script == "redq_spqr" else 1)
    # TorchRL's CSV logger got the same scalars
    assert (run_dir / "logs/csv/scalars/spqr_kl.csv").exists()


def test_same_seed_same_metrics(tmp_path):
    sac = load_script("sac_ens_spqr")
    a = sac.train(_cfg("sac_ens_spqr", "collector.total_frames=60"), tmp_path / "a")
    b = sac.train(_cfg("sac_ens_spqr", "collector.total_frames=60"), tmp_path / "b")
    assert a["final_eval_return"] == b["final_eval_return"]
    skip = {"time_s", "fps", "updates_per_s"}
    ra, rb = _rows(tmp_path / "a"), _rows(tmp_path / "b")
    assert len(ra) == len(rb) > 0
    for x, y in zip(ra, rb):
        assert {k: v for k, v in x.items() if k not in skip} == {
            k: v for k, v in y.items() if k not in skip
        }
    c = sac.train(_cfg("sac_ens_spqr", "collector.total_frames=60", "seed=1"), tmp_path / "c")
    assert c["final_eval_return"] != a["final_eval_return"]


def test_interrupt_and_resume(tmp_path, monkeypatch):
    sac = load_script("sac_ens_spqr")
    run = tmp_path / "run"
    cfg = _cfg("sac_ens_spqr", "collector.total_frames=100")
    calls = {"n": 0}
    real_update = sac.update

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 35:  # Ctrl-C in the middle of training (frame 74)
            raise KeyboardInterrupt
        return real_update(*args, **kwargs)

    monkeypatch.setattr(sac, "update", interrupted)
    with pytest.raises(KeyboardInterrupt):
        sac.train(cfg, run)
    monkeypatch.setattr(sac, "update", real_update)
    ck = load_checkpoint(run)
    assert ck["counters"]["frames"] == 74 and ck["counters"]["updates"] == 34
    rows = _rows(run)
    assert [int(r["frames"]) for r in rows] == [20, 40, 60]  # logged before the interruption
    res = sac.train(_cfg("sac_ens_spqr", "collector.total_frames=100", "resume=true"), run)
    assert res["frames"] == 100
    frames = [int(r["frames"]) for r in _rows(run)]
    assert frames == [20, 40, 60, 80, 100]  # nothing lost, nothing duplicated
    assert int(_rows(run)[-1]["updates"]) == 34 + (100 - 74)


def test_ctrl_c_again_while_resuming_an_owed_row(tmp_path, monkeypatch):
    """Ctrl-C during the evaluation of a logged step, then again during that evaluation on
    resume (before the loop): that exit checkpoints too, still owing the row; the next
    resume writes it."""
    sac = load_script("sac_ens_spqr")
    run = tmp_path / "run"
    real = sac.evaluate_policy

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(sac, "evaluate_policy", interrupted)
    with pytest.raises(KeyboardInterrupt):
        sac.train(_cfg("sac_ens_spqr", "collector.total_frames=80"), run)
    assert load_checkpoint(run)["owed_row"]["eval"]
    from torchrl_spqr.training import common

    saves = []
    real_save = common.save_checkpoint
    monkeypatch.setattr(common, "save_checkpoint", lambda *a, **k: saves.append(real_save(*a, **k)))
    with pytest.raises(KeyboardInterrupt):
        sac.train(_cfg("sac_ens_spqr", "collector.total_frames=80", "resume=true"), run)
    assert len(saves) == 1  # every exit checkpoints, this one (before the loop) too
    ck = load_checkpoint(run)
    assert ck["counters"]["frames"] == 60 and ck["owed_row"]["eval"]
    assert "loss_qvalue" in ck["owed_row"]["row"]
    assert [int(r["frames"]) for r in _rows(run)] == [20, 40]
    monkeypatch.setattr(sac, "evaluate_policy", real)
    sac.train(_cfg("sac_ens_spqr", "collector.total_frames=80", "resume=true"), run)
    rows = _rows(run)
    assert [int(r["frames"]) for r in rows] == [20, 40, 60, 80]
    assert rows[2]["eval_return"] != "" and rows[2]["loss_qvalue"] != ""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_signal_in_an_update_ends_the_run_after_that_step(signum, tmp_path, monkeypatch):
    """SIGTERM (or Ctrl-C) during an update: the update and its step complete, then the
    run stops with the exit checkpoint, its learning curve and 128 + signum; resume loses
    no update."""
    from torchrl_spqr.training.cli import run_script

    sac = load_script("sac_ens_spqr")
    run = tmp_path / "run"
    calls = {"n": 0}
    real_update = sac.update
    # during the 35th update, that of frame 74
    monkeypatch.setattr(sac, "update", signal_on_call(real_update, 35, signum, calls))
    with pytest.raises(SystemExit) as exc:
        run_script(sac.train, _cfg("sac_ens_spqr", "collector.total_frames=100"), run)
    assert exc.value.code == 128 + signum
    assert calls["n"] == 35  # no update after the signal's step
    ck = load_checkpoint(run)
    # the interrupted update completed (KeyboardInterrupt in it would leave 34)
    assert ck["counters"]["frames"] == 74 and ck["counters"]["updates"] == 35
    assert "owed_row" not in ck
    assert [int(r["frames"]) for r in _rows(run)] == [20, 40, 60]
    assert (run / "learning_curve.png").exists()  # drawn at the stop, as at the end
    monkeypatch.setattr(sac, "update", real_update)
    res = sac.train(_cfg("sac_ens_spqr", "collector.total_frames=100", "resume=true"), run)
    assert res["frames"] == 100 and res["updates"] == 100 - 40 + 1  # an uninterrupted run's
    assert [int(r["frames"]) for r in _rows(run)] == [20, 40, 60, 80, 100]


def test_in_a_submitit_job_its_requeue_signal_is_forwarded_after_the_step(
    tmp_path, monkeypatch, capsys
):
    """Under Hydra's submitit launcher (``slurm``): SLURM's USR2 before the time limit, during
    an update, reaches submitit's requeue handler only after that step and the exit
    checkpoint; the requeued job (``resume=true``) then loses no update. A SIGTERM before
    it reaches submitit's handler (which ignores it) and adds a checkpoint after its step."""
    from torchrl_spqr.training import common
    from torchrl_spqr.training.cli import run_script

    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    monkeypatch.delenv("SUBMITIT_PREEMPT_SIGNAL", raising=False)
    sac = load_script("sac_ens_spqr")
    run = tmp_path / "run"
    seen = []

    def requeue(signum, frame):  # submitit's: checkpoint the callable, requeue, sys.exit(-1)
        ck = load_checkpoint(run)["counters"]
        seen.append((signum, ck["frames"], ck["updates"]))
        raise SystemExit(-1)

    old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR2)}
    signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
    signal.signal(signal.SIGUSR2, requeue)
    saved = []
    real_save = common.save_checkpoint

    def save(run_dir, state, buffer):
        saved.append(state["counters"]["frames"])
        return real_save(run_dir, state, buffer)

    monkeypatch.setattr(common, "save_checkpoint", save)
    try:
        calls = {"n": 0}
        real_update = sac.update
        # SIGTERM during update 20 (frame 59), USR2 during update 35 (frame 74)
        term = signal_on_call(real_update, 20, signal.SIGTERM, {"n": 0})
        monkeypatch.setattr(sac, "update", signal_on_call(term, 35, signal.SIGUSR2, calls))
        with pytest.raises(SystemExit) as exc:
            run_script(sac.train, _cfg("sac_ens_spqr", "collector.total_frames=100"), run)
    finally:
        for s_, h in old.items():
            signal.signal(s_, h)
    assert exc.value.code == -1  # submitit's exit after its requeue
    assert seen == [signal.SIGTERM, (signal.SIGUSR2, 74, 35)] and calls["n"] == 35
    assert saved == [40, 59, 74]  # periodic, asked for by SIGTERM, the exit checkpoint
    assert "the job scheduler's handler requeues the job" in capsys.readouterr().err
    monkeypatch.setattr(sac, "update", real_update)
    res = sac.train(_cfg("sac_ens_spqr", "collector.total_frames=100", "resume=true"), run)
    assert res["frames"] == 100 and res["updates"] == 100 - 40 + 1  # an uninterrupted run's
    assert [int(r["frames"]) for r in _rows(run)] == [20, 40, 60, 80, 100]


def test_a_stop_signal_during_an_evaluation_writes_its_row_first(tmp_path, monkeypatch):
    """SIGTERM while a logged step is being evaluated: the row is written, then the run stops
    at that step's checkpoint, owing nothing."""
    from torchrl_spqr.training.cli import run_script

    sac = load_script("sac_ens_spqr")
    run = tmp_path / "run"
    # during the first evaluation, at frame 60
    evaluate = signal_on_call(sac.evaluate_policy, 1, signal.SIGTERM, {"n": 0})
    monkeypatch.setattr(sac, "evaluate_policy", evaluate)
    with pytest.raises(SystemExit) as exc:
        run_script(sac.train, _cfg("sac_ens_spqr", "collector.total_frames=100"), run)
    assert exc.value.code == 128 + signal.SIGTERM
    ck = load_checkpoint(run)
    assert ck["counters"]["frames"] == 60 and "owed_row" not in ck
    rows = _rows(run)
    assert [int(r["frames"]) for r in rows] == [20, 40, 60] and rows[2]["eval_return"] != ""


@pytest.mark.slow  # worker or script processes: about a minute on 2 busy cores
@pytest.mark.parametrize("script", ["sac_ens_spqr"])
def test_sigterm_subprocess_stops_cleanly_and_resume_completes(script, tmp_path):
    """The script as a scheduler stops it: SIGTERM mid-run, exit 143 with one line and the
    exit checkpoint; resume=true writes every remaining row once."""
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable,
        str(SCRIPTS[script] / f"{script}.py"),
        *TINY,
        "collector.total_frames=600",
        "logger.eval_interval=300",
        "checkpoint.interval=300",
        f"hydra.run.dir={run_dir}",
    ]
    env = {**os.environ, "RL_WARNINGS": "False"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 300
        while not (run_dir / "metrics.csv").exists() or len(_rows(run_dir)) < 3:
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143, err[-3000:]
    assert "SIGTERM: stopping after the current step" in err
    assert (
        f"interrupted (SIGTERM): the rows and the checkpoint are saved; continue with "
        f"resume=true hydra.run.dir={run_dir}" in err
    )
    assert "Traceback" not in err
    stopped = load_checkpoint(run_dir)["counters"]["frames"]
    assert 60 <= stopped < 300  # the exit checkpoint (the first periodic one is at 300)
    logged = [int(r["frames"]) for r in _rows(run_dir)]
    assert logged == list(range(20, stopped + 1, 20))  # every row up to the stop
    res = subprocess.run(
        [*cmd, "resume=true"], capture_output=True, text=True, timeout=600, env=env
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert [int(r["frames"]) for r in _rows(run_dir)] == list(range(20, 601, 20))


def test_checkpoint_history_keeps_every_checkpoints_networks(tmp_path):
    """checkpoint.history=true: history/<frames>/ at every checkpoint (the periodic ones and
    the one at exit), each rebuilt by load_agent as the agent was then, without the
    optimisers or the buffer; off by default."""
    from torchrl_spqr.training.checkpoint import load_checkpoint_data
    from torchrl_spqr.training.restore import load_agent

    sac = load_script("sac_ens_spqr")
    sac.train(_cfg("sac_ens_spqr", "collector.total_frames=100"), tmp_path / "off")
    assert not (tmp_path / "off" / "history").exists()
    run = tmp_path / "run"
    sac.train(_cfg("sac_ens_spqr", "collector.total_frames=100", "checkpoint.history=true"), run)
    kept = sorted(int(p.name) for p in (run / "history").iterdir())
    assert kept == [40, 80, 100]  # checkpoint.interval=40, and the exit
    state, buffer, _ = load_checkpoint_data(run / "history" / "80", buffer=True)
    assert buffer is None and state["optim"] == {} and state["counters"]["frames"] == 80
    last = load_checkpoint_data(run)[0]["loss"]
    with load_agent(run / "history" / "100") as agent:
        assert agent.counters == {"frames": 100, "updates": 61}
        for k, v in agent.loss.state_dict().items():
            torch.testing.assert_close(v, last[k])  # the final networks
    with load_agent(run / "history" / "40") as agent:
        assert agent.counters["frames"] == 40
        early = agent.loss.state_dict()
    assert any(not torch.equal(early[k], last[k]) for k in last)


def test_checkpoint_history_is_written_again_on_resume(tmp_path):
    """A kill between a checkpoint and its copy in history/ leaves the copy missing: the
    resumed run writes it (from the checkpoint it resumed), then goes on keeping copies."""
    from torchrl_spqr.training.checkpoint import load_checkpoint_data
    from torchrl_spqr.training.restore import load_agent

    sac = load_script("sac_ens_spqr")
    run = tmp_path / "run"
    sac.train(_cfg("sac_ens_spqr", "collector.total_frames=100", "checkpoint.history=true"), run)
    shutil.rmtree(run / "history" / "100")
    resumed = load_checkpoint_data(run)[0]["loss"]
    sac.train(
        _cfg(
            "sac_ens_spqr", "collector.total_frames=140", "checkpoint.history=true", "resume=true"
        ),
        run,
    )
    assert sorted(int(p.name) for p in (run / "history").iterdir()) == [40, 80, 100, 120, 140]
    with load_agent(run / "history" / "100") as agent:
        assert agent.counters["frames"] == 100
        for k, v in agent.loss.state_dict().items():
            torch.testing.assert_close(v, resumed[k])


def test_checkpoint_restores_exact_state(tmp_path):
    """A checkpoint holds everything needed: params, optimisers, buffer, RNG, counters."""
    run = tmp_path / "run"
    load_script("sac_ens_spqr").train(_cfg("sac_ens_spqr", "collector.total_frames=60"), run)
    ck = load_checkpoint(run)
    # rebuild from the config and load: identical parameters and buffer
    from torchrl_spqr.training import builders as B

    cfg = _cfg("sac_ens_spqr", "collector.total_frames=60")
    env = B.make_environment(cfg, 0)
    loss, base = B.make_loss_module(
        cfg, B.make_actor(cfg, env), B.make_critics(cfg, env), env.action_spec
    )
    loss.load_state_dict(ck["loss"])
    buf = B.make_replay_buffer(cfg)
    ck2 = load_checkpoint(run, buf)
    assert len(buf) == 60 and ck2["buffer_meta"]["len"] == 60
    for k, v in ck["loss"].items():
        assert torch.equal(loss.state_dict()[k], v), k
    # two updates from the restored state are reproducible
    outs = []
    for _ in range(2):
        loss.load_state_dict(ck["loss"])
        restore_rng(ck["rng"])
        outs.append(loss(buf.sample())["loss_qvalue"].detach())
    assert torch.equal(outs[0], outs[1])


def test_resume_without_checkpoint_starts_fresh(tmp_path):
    res = load_script("sac_ens_spqr").train(
        _cfg("sac_ens_spqr", "collector.total_frames=40", "resume=true"), tmp_path / "r"
    )
    assert res["frames"] == 40


@pytest.mark.parametrize(
    "override,field",
    [
        ("env.name=NoSuchEnv-v9", "env.name"),
        ("spqr.beta=-1", "spqr.beta"),
        ("network.ensemble_size=2", "network.ensemble_size"),
        ("optim.utd_ratio=0", "optim.utd_ratio"),
        ("optim.batch_size=1000", "optim.batch_size"),
        ("algorithm=ppo", "algorithm"),
        ("optim.tau=2.0", "optim.tau"),
    ],
)
def test_config_validation_names_field(override, field):
    cfg = _cfg("sac_ens_spqr", override)
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        validate_config(cfg)


#: (override, text the error must hold: the field and the value as given)
BAD_ONLINE = [
    ("logger.eval_interval=0", "logger.eval_interval=0"),
    ("logger.log_interval=0", "logger.log_interval=0"),
    ("checkpoint.interval=0", "checkpoint.interval=0"),
    ("optim.batch_size=0", "optim.batch_size=0"),
    ("spqr.beta=abc", "spqr.beta='abc'"),
    ("spqr.beta=nan", "spqr.beta=nan"),
    ("device=cuda", "device='cuda'"),
    ("device=tpu9", "device='tpu9'"),
    ("threads=0", "threads=0"),
    ("threads=1.5", "threads=1.5"),
    ("logger.eval_episodes=0", "logger.eval_episodes=0"),
    ("collector.init_random_frames=200", "collector.init_random_frames=200"),
    ("collector.init_random_frames=-1", "collector.init_random_frames=-1"),
    ("collector.total_frames=-80", "collector.total_frames=-80"),
    ("collector.frames_per_batch=-1", "collector.frames_per_batch=-1"),
    ("replay_buffer.size=-5", "replay_buffer.size=-5"),
    ("optim.lr=-0.001", "optim.lr=-0.001"),
    ("optim.alpha_init=0", "optim.alpha_init=0"),
    ("optim.utd_ratio=-2", "optim.utd_ratio=-2"),
    ("network.ensemble_size=3.5", "network.ensemble_size=3.5"),
    ("network.ensemble_size=-3", "network.ensemble_size=-3"),
    ("network.hidden_sizes=[16,0]", "network.hidden_sizes=[16, 0]"),
    ("network.dropout=1.0", "network.dropout=1.0"),
    ("spqr.pairs=both", "spqr.pairs='both'"),
    ("spqr.filling=diagonal", "spqr.filling='diagonal'"),
    ("spqr.density=exact", "spqr.density='exact'"),
    ("spqr.diagnostics_interval=-1", "spqr.diagnostics_interval=-1"),
    ("compile.cudagraphs=true", "compile.cudagraphs=true"),
    ("resume=maybe", "resume='maybe'"),
    ("seed=abc", "seed='abc'"),
    ("logger.backend=mlflow", "logger.backend='mlflow'"),
    ("replay_buffer.storage=disk", "replay_buffer.storage='disk'"),
    ("env.max_episode_steps=-1", "env.max_episode_steps=-1"),
    ("network.sub_sample_len=4", "network.sub_sample_len=4"),  # REDQ's M > N = 3
]

_ADVICE = re.compile(r"\b(set|use|choose|lower|raise|give)\b")


def _needs_no_gpu(override: str) -> None:
    if override in ("device=cuda", "compile.cudagraphs=true") and torch.cuda.is_available():
        pytest.skip("the case is an error only on a machine without CUDA")


@pytest.mark.parametrize("override,shown", BAD_ONLINE, ids=[o for o, _ in BAD_ONLINE])
def test_bad_config_stops_script_before_training(override, shown, tmp_path, monkeypatch):
    """Each bad value stops the run before any environment is built, naming field, value, fix."""
    _needs_no_gpu(override)
    redq = load_script("redq_spqr")

    def no_env(*args, **kwargs):
        raise AssertionError("an environment was built before the config was checked")

    monkeypatch.setattr(redq, "make_environment", no_env)
    cfg = _cfg("redq_spqr", "collector.total_frames=80", override)
    with pytest.raises(ConfigError) as err:
        redq.train(cfg, tmp_path / "bad")
    msg = str(err.value)
    assert shown in msg, msg
    assert _ADVICE.search(msg), msg  # says what to do
    assert not (tmp_path / "bad").exists()  # nothing written: not even the run folder


@pytest.mark.parametrize(
    "override,shown",
    [("spqr.beta=-0.5", "spqr.beta=-0.5"), ("logger.eval_interval=0", "logger.eval_interval=0")],
)
def test_bad_config_stops_script_subprocess(override, shown, tmp_path):
    cmd = [
        sys.executable,
        str(SCRIPTS["redq_spqr"] / "redq_spqr.py"),
        *TINY,
        override,
        f"hydra.run.dir={tmp_path / 'bad'}",
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode != 0
    assert shown in res.stderr
    assert "ConfigError" in res.stderr and "ZeroDivisionError" not in res.stderr
    assert not (tmp_path / "bad" / "metrics.csv").exists()


def test_init_random_frames_equal_to_total_is_accepted():
    """The update at the last frame runs (frames >= init_random_frames): not an error."""
    validate_config(_cfg("sac_ens_spqr", "collector.total_frames=40"))


def test_config_checks_accept_numbers_given_as_strings_or_whole_floats():
    from torchrl_spqr.training.builders import cfg_float, cfg_int

    cfg = {"a": "3", "b": 4.0, "c": "1e-3", "d": True}
    assert cfg_int(cfg, "a") == 3 and cfg_int(cfg, "b") == 4
    assert cfg_float(cfg, "c") == pytest.approx(1e-3)
    with pytest.raises(ConfigError, match="d=true"):
        cfg_int(cfg, "d")
    with pytest.raises(ConfigError, match="e is not set"):
        cfg_int(cfg, "e")


# ------------------------------------------------------------- offline and multi-agent scripts

OFFLINE_TINY = [
    "dataset=local_hopper_random",
    "network.ensemble_size=3",
    "network.hidden_sizes=[16,16]",
    "optim.num_updates=60",
    "optim.batch_size=16",
    "logger.progress=false",
]

BAD_OFFLINE = [
    ("edac_spqr", "logger.eval_interval=0", "logger.eval_interval=0"),
    ("sac_n_spqr", "logger.log_interval=0", "logger.log_interval=0"),
    ("cql_spqr", "checkpoint.interval=0", "checkpoint.interval=0"),
    ("sac_n_spqr", "optim.batch_size=0", "optim.batch_size=0"),
    ("cql_spqr", "spqr.beta=abc", "spqr.beta='abc'"),
    ("edac_spqr", "device=cuda", "device='cuda'"),
    ("sac_n_spqr", "threads=0", "threads=0"),
    ("sac_n_spqr", "logger.eval_episodes=0", "logger.eval_episodes=0"),
    ("edac_spqr", "optim.num_updates=-1", "optim.num_updates=-1"),
    ("sac_n_spqr", "network.ensemble_size=2.5", "network.ensemble_size=2.5"),
    ("cql_spqr", "spqr.filling=diagonal", "spqr.filling='diagonal'"),
    ("edac_spqr", "optim.eta=-1", "optim.eta=-1"),
    ("cql_spqr", "optim.num_random=0", "optim.num_random=0"),
    ("cql_spqr", "optim.temperature=0", "optim.temperature=0"),
    ("cql_spqr", "optim.bc_steps=-5", "optim.bc_steps=-5"),
    ("sac_n_spqr", "dataset.source=hf", "dataset.source='hf'"),
    ("sac_n_spqr", "dataset.id=''", "dataset.id=''"),
]


@pytest.mark.parametrize(
    "algo,override,shown", BAD_OFFLINE, ids=[f"{a}-{o}" for a, o, _ in BAD_OFFLINE]
)
def test_bad_offline_config_stops_before_loading_data(algo, override, shown, tmp_path, monkeypatch):
    _needs_no_gpu(override)
    script = load_script(algo)

    def no_data(*args, **kwargs):
        raise AssertionError("the dataset was loaded before the config was checked")

    monkeypatch.setattr(script, "make_offline_data", no_data)
    with initialize_config_dir(config_dir=str(ROOT / "sota_scripts" / algo), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*OFFLINE_TINY, override])
    with pytest.raises(ConfigError) as err:
        script.train(cfg, tmp_path / "bad")
    msg = str(err.value)
    assert shown in msg, msg
    assert _ADVICE.search(msg), msg
    assert not (tmp_path / "bad").exists()


MASAC_TINY = [
    "env.num_envs=4",
    "env.max_steps=10",
    "collector.frames_per_batch=40",
    "collector.total_frames=80",
    "replay_buffer.size=400",
    "optim.batch_size=16",
    "network.ensemble_size=3",
    "logger.progress=false",
]

BAD_MASAC = [
    ("logger.eval_interval=0", "logger.eval_interval=0"),
    ("checkpoint.interval=0", "checkpoint.interval=0"),
    ("optim.batch_size=0", "optim.batch_size=0"),
    ("spqr.beta=abc", "spqr.beta='abc'"),
    ("device=cuda", "device='cuda'"),
    ("threads=0", "threads=0"),
    ("logger.eval_episodes=0", "logger.eval_episodes=0"),
    ("collector.init_random_frames=80", "collector.init_random_frames=80"),
    ("collector.init_random_frames=-1", "collector.init_random_frames=-1"),
    ("network.ensemble_size=3.5", "network.ensemble_size=3.5"),
    ("spqr.pairs=both", "spqr.pairs='both'"),
    ("spqr.density=exact", "spqr.density='exact'"),
    ("env.num_envs=0", "env.num_envs=0"),
    ("optim.max_grad_norm=-1", "optim.max_grad_norm=-1"),
    ("optim.num_epochs=0.5", "optim.num_epochs=0.5"),
    ("env.scenario.n_agents=0", "env.scenario.n_agents=0"),
]


@pytest.mark.skipif(importlib.util.find_spec("vmas") is None, reason="the MASAC script needs vmas")
@pytest.mark.parametrize("override,shown", BAD_MASAC, ids=[o for o, _ in BAD_MASAC])
def test_bad_masac_config_stops_before_training(override, shown, tmp_path, monkeypatch):
    _needs_no_gpu(override)
    M = load_script("masac_spqr")

    def no_env(*args, **kwargs):
        raise AssertionError("an environment was built before the config was checked")

    monkeypatch.setattr(M, "make_environment", no_env)
    with initialize_config_dir(
        config_dir=str(ROOT / "sota_scripts/masac_spqr"), version_base="1.3"
    ):
        cfg = compose(config_name="config", overrides=[*MASAC_TINY, override])
    with pytest.raises(ConfigError) as err:
        M.train(cfg, tmp_path / "bad")
    msg = str(err.value)
    assert shown in msg, msg
    assert _ADVICE.search(msg), msg
    assert not (tmp_path / "bad").exists()


# ------------------------------------------------------------- compile and CUDA graphs


@pytest.mark.parametrize("script", ["sac_ens_spqr", "cql_spqr"])
def test_cudagraphs_refused_without_cuda(script, tmp_path):
    """compile.cudagraphs=true on a CPU run: a ConfigError saying why, before anything runs."""
    if torch.cuda.is_available():
        pytest.skip("the refusal is for a machine without CUDA")
    mod = load_script(script)
    overrides = ["compile.cudagraphs=true", "device=cpu"]
    if script == "cql_spqr":
        with initialize_config_dir(
            config_dir=str(ROOT / "sota_scripts/cql_spqr"), version_base="1.3"
        ):
            cfg = compose(config_name="config", overrides=[*OFFLINE_TINY, *overrides])
    else:
        cfg = _cfg(script, "collector.total_frames=60", *overrides)
    with pytest.raises(ConfigError) as err:
        mod.train(cfg, tmp_path / "run")
    msg = str(err.value)
    assert "compile.cudagraphs" in msg and "CUDA device" in msg and "cpu" in msg, msg
    assert not (tmp_path / "run").exists()


def test_compile_switch_compiles_the_update(tmp_path, monkeypatch):
    """compile.compile=true hands the script's update (bound to its loss, optimisers and
    target updater) to torch.compile, and the loop runs what torch.compile returns."""
    sac = load_script("sac_ens_spqr")
    compiled, calls = [], {"n": 0}

    def fake_compile(fn, **kwargs):
        compiled.append(fn)

        def run(batch):
            calls["n"] += 1
            return fn(batch)

        return run

    monkeypatch.setattr(torch, "compile", fake_compile)
    res = sac.train(
        _cfg("sac_ens_spqr", "collector.total_frames=42", "compile.compile=true"), tmp_path / "r"
    )
    (fn,) = compiled
    assert fn.func is sac.update and set(fn.keywords) == {
        "loss_module",
        "optimizers",
        "target_updater",
    }
    assert calls["n"] == res["updates"] == 3


@pytest.mark.slow
def test_compile_runs_updates_on_cpu(tmp_path):
    """The real torch.compile of the update on CPU: a few updates, finite losses logged."""
    sac = load_script("sac_ens_spqr")
    run = tmp_path / "r"
    res = sac.train(_cfg("sac_ens_spqr", "collector.total_frames=42", "compile.compile=true"), run)
    assert res["updates"] == 3
    rows = _rows(run)
    assert [int(r["frames"]) for r in rows] == [20, 40, 42]
    assert math.isfinite(float(rows[1]["loss_qvalue"]))  # the update at frame 40
    assert math.isfinite(float(rows[2]["eval_return"]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("resume_without_graphs", [False, True])
def test_cudagraphs_run_updates_on_cuda(tmp_path, resume_without_graphs):
    """compile.cudagraphs=true on a GPU: the update is captured and replayed (past its
    warm-up), losses stay finite; also when resuming a run saved without CUDA graphs (its
    optimiser states are made capturable after loading)."""
    sac = load_script("sac_ens_spqr")
    run = tmp_path / "r"
    graphs = ["compile.cudagraphs=true", "device=cuda"]
    if resume_without_graphs:
        sac.train(_cfg("sac_ens_spqr", "collector.total_frames=50", "device=cuda"), run)
        graphs.append("resume=true")
    with pytest.warns(UserWarning, match="compile.cudagraphs"):
        res = sac.train(_cfg("sac_ens_spqr", "collector.total_frames=60", *graphs), run)
    assert res["updates"] == 21  # frames 40..60; past 5 warm-up calls the graph is replayed
    rows = _rows(run)
    assert [int(r["frames"]) for r in rows] == (
        [20, 40, 50, 60] if resume_without_graphs else [20, 40, 60]
    )
    assert all(math.isfinite(float(rows[-1][k])) for k in ("loss_qvalue", "loss_actor"))


def test_metrics_csv_logger_widens_resumes_and_truncates(tmp_path):
    """metrics.csv as a TorchRL Logger: standard columns first, a new metric widens the
    file (earlier rows padded), a reopened file keeps its header, truncate() cuts back."""
    from torchrl.record.loggers import Logger

    from torchrl_spqr.training.loggers import METRIC_FIELDS, MetricsCSVLogger

    log = MetricsCSVLogger(tmp_path, step_field="updates")
    assert isinstance(log, Logger)
    log.log_metrics({"loss_qvalue": torch.tensor(1.5)}, step=10)
    log.log_metrics({"loss_qvalue": 1.0, "cql_gap": 0.25}, step=20)
    log.log_scalar("alpha_prime", 2.0, step=30)
    log.shutdown()
    with (tmp_path / "metrics.csv").open(newline="") as f:
        header = next(csv.reader(f))
    assert header == [*METRIC_FIELDS, "cql_gap", "alpha_prime"]
    rows = _rows(tmp_path)
    assert [(r["updates"], r["loss_qvalue"], r["cql_gap"]) for r in rows] == [
        ("10", "1.5", ""),
        ("20", "1.0", "0.25"),
        ("30", "", ""),
    ]
    with (tmp_path / "metrics.csv").open("a") as f:
        f.write("40,cut off mid-")  # a kill while writing a row
    again = MetricsCSVLogger(tmp_path, step_field="updates")
    assert again.truncate(20) == 20
    again.log_metrics({"cql_gap": 0.5}, step=30)
    again.shutdown()
    assert [(r["updates"], r["cql_gap"]) for r in _rows(tmp_path)] == [
        ("10", ""),
        ("20", "0.25"),
        ("30", "0.5"),
    ]
    again.clear()
    assert not (tmp_path / "metrics.csv").exists()
    with pytest.raises(NotImplementedError, match="scalars only"):
        again.log_video("rollout", torch.zeros(1, 3, 8, 8))

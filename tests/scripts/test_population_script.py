"""``sota_scripts/sac_ens_spqr/sac_ens_spqr_population.py``: a population as a user runs it.

One folder per agent, the same as a single run's (the analysis tools read it unchanged),
each agent starting exactly as its single run, and resume of the whole population after
Ctrl-C or SIGTERM with the rows an uninterrupted run writes.
"""

from __future__ import annotations

import csv
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("hydra")
from _helpers import load_script, signal_on_call  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

from torchrl_spqr.analysis.cli import main as analysis_main  # noqa: E402
from torchrl_spqr.training.checkpoint import load_checkpoint, load_checkpoint_data  # noqa: E402
from torchrl_spqr.training.config import ConfigError  # noqa: E402
from torchrl_spqr.training.loggers import METRIC_FIELDS  # noqa: E402
from torchrl_spqr.training.population.run import resolve_population_config  # noqa: E402
from torchrl_spqr.training.restore import load_agent  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
FOLDER = ROOT / "sota_scripts" / "sac_ens_spqr"
SCRIPT = FOLDER / "sac_ens_spqr_population.py"

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
    "population.seeds=[0,1]",
    "population.beta=[0,1]",
]
AGENTS = ["beta0.0_N3_seed0", "beta0.0_N3_seed1", "beta1.0_N3_seed0", "beta1.0_N3_seed1"]
CLOCK = {"time_s", "fps", "updates_per_s"}  # wall-clock columns


def _population_script():
    """The population script as a module (its folder's ``utils`` imported as the script does)."""
    key = "sota_sac_ens_spqr_population"
    if key in sys.modules:
        return sys.modules[key]
    load_script("sac_ens_spqr")  # the folder's utils, under its own name
    saved = sys.modules.pop("utils", None)
    sys.modules["utils"] = sys.modules["sac_ens_spqr_utils"]
    try:
        spec = importlib.util.spec_from_file_location(key, SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    finally:
        sys.modules.pop("utils", None)
        if saved is not None:
            sys.modules["utils"] = saved
    return module


def _cfg(*overrides: str, name: str = "population", tiny: list[str] = TINY):
    with initialize_config_dir(config_dir=str(FOLDER), version_base="1.3"):
        return compose(config_name=name, overrides=[*tiny, *overrides])


def _rows(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "metrics.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def _without_clock(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    return [{k: v for k, v in r.items() if k not in CLOCK} for r in rows]


def test_population_script_subprocess_and_analysis(tmp_path):
    """As a user runs it: 4 agents' folders like single runs'; the analysis reads them."""
    run_dir = tmp_path / "pop"
    cmd = [sys.executable, str(SCRIPT), *TINY, "collector.total_frames=60"]
    env = {**os.environ, "RL_WARNINGS": "False"}
    res = subprocess.run(
        [*cmd, f"hydra.run.dir={run_dir}"], capture_output=True, text=True, timeout=600, env=env
    )
    assert res.returncode == 0, res.stderr[-3000:]
    for name in AGENTS:
        assert f"{name}: frames 60, updates 21" in res.stdout
        folder = run_dir / name
        for f in ("metrics.csv", "learning_curve.png", "checkpoint/manifest.json"):
            assert (folder / f).exists(), f"{name}/{f}"
        rows = _rows(folder)
        assert list(rows[0])[: len(METRIC_FIELDS)] == METRIC_FIELDS  # a single run's columns
        assert [int(r["frames"]) for r in rows] == [20, 40, 60]
        assert [int(r["updates"]) for r in rows] == [0, 1, 21]
        last = rows[-1]
        assert last["eval_return"] != "" and last["spqr_kl"] != "" and last["loss_qvalue"] != ""
        assert float(last["spqr_beta"]) == (1.0 if name.startswith("beta1") else 0.0)
        if name.startswith("beta0"):
            assert float(last["loss_spqr"]) == 0.0
        assert (folder / "logs/csv/scalars/spqr_kl.csv").exists()
    assert (run_dir / "checkpoint" / "manifest.json").exists()  # the population's
    # the analysis tools, unchanged, on the population folder
    analysis_main(
        [str(run_dir), "--out", str(tmp_path / "plots"), "--effects", str(tmp_path / "e")]
    )
    assert (tmp_path / "plots" / "learning_curves.png").exists()
    summary = (tmp_path / "plots" / "summary.md").read_text()
    assert "beta0.0_N3" in summary and "beta1.0_N3" in summary
    effects = (tmp_path / "e.md").read_text()
    assert "N3" in effects and "| 1 |" in effects  # beta 1 against its beta 0 twin, by seed
    # each agent's checkpoint rebuilds its agent, as a single run's does
    agent = load_agent(run_dir / AGENTS[2])
    assert agent.beta == 1.0 and agent.algorithm == "sac_ens" and agent.buffer is None
    # with buffer=True: the agent's own transitions, its slice of the population's buffer
    # (agents in AGENTS' order: beta-major, then seed)
    _, pop_buffer, _ = load_checkpoint_data(run_dir)
    assert pop_buffer.shape == torch.Size([60, len(AGENTS)])
    first = {}
    for k, name in enumerate(AGENTS):
        with load_agent(run_dir / name, buffer=True) as a:
            assert a.buffer.shape == torch.Size([60]) and a.counters["frames"] == 60
            assert (a.buffer == pop_buffer[:, k]).all()
            first[name] = a.buffer["observation"][0]
    # the first state is the reset of the agent's own environment seed
    for seed in (0, 1):
        torch.testing.assert_close(first[f"beta0.0_N3_seed{seed}"], first[f"beta1.0_N3_seed{seed}"])
    assert not torch.equal(first["beta0.0_N3_seed0"], first["beta0.0_N3_seed1"])
    # the spectrum tool draws its batch from that buffer
    from torchrl_spqr.analysis import checkpoint_q_values

    batch = checkpoint_q_values(run_dir / AGENTS[2], batch_size=32)
    assert batch.source == "replay buffer of the checkpoint (60 transitions)"


def test_each_agent_starts_as_its_single_run(tmp_path, monkeypatch):
    """Agent (beta, seed) has the initial networks of ``sac_ens_spqr.py seed=s spqr.beta=b``."""
    pop, single = _population_script(), load_script("sac_ens_spqr")

    def stop(*args, **kwargs):
        raise KeyboardInterrupt  # at the first update: the checkpoints hold the initial state

    monkeypatch.setattr(pop, "update", stop)
    monkeypatch.setattr(single, "update", stop)
    with pytest.raises(KeyboardInterrupt):
        pop.train(_cfg("collector.total_frames=60"), tmp_path / "pop")
    with pytest.raises(KeyboardInterrupt):
        single.train(
            _cfg(
                "collector.total_frames=60", "seed=1", "spqr.beta=1", name="config", tiny=TINY[:-2]
            ),
            tmp_path / "single",
        )
    mine = load_checkpoint(tmp_path / "pop" / "beta1.0_N3_seed1")["loss"]
    theirs = load_checkpoint(tmp_path / "single")["loss"]
    assert set(mine) == set(theirs) and len(mine) > 10
    for key, value in theirs.items():
        assert torch.equal(mine[key], value), key
    other = load_checkpoint(tmp_path / "pop" / "beta1.0_N3_seed0")["loss"]
    assert any(not torch.equal(other[k], v) for k, v in theirs.items())  # seed 0 differs


def test_interrupt_and_resume_the_population(tmp_path, monkeypatch):
    """Ctrl-C mid-run, resume: every agent's rows are those of an uninterrupted run."""
    pop = _population_script()
    full = tmp_path / "full"
    pop.train(_cfg("collector.total_frames=100"), full)

    run = tmp_path / "run"
    calls = {"n": 0}
    real_update = pop.update

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 35:  # Ctrl-C in the middle of training (frame 74)
            raise KeyboardInterrupt
        return real_update(*args, **kwargs)

    monkeypatch.setattr(pop, "update", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pop.train(_cfg("collector.total_frames=100"), run)
    monkeypatch.setattr(pop, "update", real_update)
    state, data, _ = load_checkpoint_data(run)
    assert data.batch_size[:2] == torch.Size([74, 4])  # every agent's 74 transitions
    for name in AGENTS:
        assert state["agents"][name]["counters"]["frames"] == 74
        assert state["agents"][name]["counters"]["updates"] == 34
        rows = _rows(run / name)
        assert [int(r["frames"]) for r in rows] == [20, 40, 60]
        # before the interruption: the very rows of the uninterrupted run
        assert _without_clock(rows) == _without_clock(_rows(full / name))[:3]

    res = pop.train(_cfg("collector.total_frames=100", "resume=true"), run)
    for name in AGENTS:
        assert res[name]["frames"] == 100 and res[name]["updates"] == 61
        rows, ref = _rows(run / name), _rows(full / name)
        assert list(rows[0]) == list(ref[0])
        for key in ("frames", "updates"):  # nothing lost, nothing duplicated
            assert [r[key] for r in rows] == [r[key] for r in ref]
        assert _without_clock(rows[:3]) == _without_clock(ref[:3])
        assert rows[-1]["eval_return"] != ""


def test_sigterm_stops_the_population_after_the_step(tmp_path, monkeypatch):
    """SIGTERM during a population update: every agent's step completes (no agent stops
    earlier than the others), the exit checkpoint holds it, each agent's learning curve is
    drawn, and resume loses no update."""
    from torchrl_spqr.training.cli import run_script

    pop = _population_script()
    run = tmp_path / "run"
    calls = {"n": 0}
    real_update = pop.update
    # during the 35th update, that of frame 74
    monkeypatch.setattr(pop, "update", signal_on_call(real_update, 35, signal.SIGTERM, calls))
    with pytest.raises(SystemExit) as exc:
        run_script(pop.train, _cfg("collector.total_frames=100"), run)
    assert exc.value.code == 128 + signal.SIGTERM and calls["n"] == 35
    state, data, _ = load_checkpoint_data(run)
    assert data.batch_size[:2] == torch.Size([74, 4])
    for name in AGENTS:
        assert state["agents"][name]["counters"]["frames"] == 74
        assert state["agents"][name]["counters"]["updates"] == 35  # the signalled one included
        assert "owed_row" not in state["agents"][name]
        assert [int(r["frames"]) for r in _rows(run / name)] == [20, 40, 60]
        assert (run / name / "learning_curve.png").exists()  # drawn at the stop
    monkeypatch.setattr(pop, "update", real_update)
    res = pop.train(_cfg("collector.total_frames=100", "resume=true"), run)
    for name in AGENTS:
        assert res[name]["frames"] == 100 and res[name]["updates"] == 61  # uninterrupted: 61
        assert [int(r["frames"]) for r in _rows(run / name)] == [20, 40, 60, 80, 100]


def test_checkpoint_history_keeps_each_agents_networks(tmp_path):
    """checkpoint.history=true in a population: <agent>/history/<frames>/ per checkpoint,
    each an agent load_agent rebuilds (what analysis --bias and bias_over_training.py read)."""
    from torchrl_spqr.training.restore import load_agent

    run = tmp_path / "run"
    _population_script().train(_cfg("collector.total_frames=100", "checkpoint.history=true"), run)
    for name in AGENTS:
        assert sorted(int(p.name) for p in (run / name / "history").iterdir()) == [40, 80, 100]
    with load_agent(run / AGENTS[2] / "history" / "80") as agent:
        assert agent.counters["frames"] == 80 and agent.beta == 1.0
    # benchmarks/learning/bias_over_training.py: one row per agent and kept checkpoint
    spec = importlib.util.spec_from_file_location(
        "bias_over_training", ROOT / "benchmarks/learning/bias_over_training.py"
    )
    bot = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bot)
    out = tmp_path / "bias.csv"
    bot.measure(run, out, states=50)
    bot.measure(run, out, states=50)  # again: nothing measured twice
    with out.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted((r["agent"], int(r["frames"])) for r in rows) == sorted(
        (name, step) for name in AGENTS for step in (40, 80, 100)
    )
    assert {r["arm"] for r in rows} == {"beta0.0_N3", "beta1.0_N3"}
    bot.plot(out, tmp_path / "bias.png")
    assert (tmp_path / "bias.png").stat().st_size > 0


def test_resume_rewrites_the_agents_folders_and_their_history(tmp_path):
    """A kill between the population's checkpoint and its agents' folders leaves those a
    checkpoint behind and their history copies missing: resume rewrites them from the
    population's checkpoint."""
    from torchrl_spqr.training.restore import load_agent

    pop = _population_script()
    run = tmp_path / "run"
    pop.train(_cfg("collector.total_frames=100", "checkpoint.history=true"), run)
    for name in AGENTS:
        shutil.rmtree(run / name / "history" / "100")
        shutil.rmtree(run / name / "checkpoint")
    pop.train(_cfg("collector.total_frames=140", "checkpoint.history=true", "resume=true"), run)
    for name in AGENTS:
        kept = sorted(int(p.name) for p in (run / name / "history").iterdir())
        assert kept == [40, 80, 100, 120, 140]
        with load_agent(run / name / "history" / "100") as agent:
            assert agent.counters["frames"] == 100


def test_in_a_submitit_job_sigterm_checkpoints_the_population_and_it_goes_on(tmp_path, monkeypatch):
    """Under the submitit launcher, SIGTERM (a preemption or a cancel) does not stop the
    population (submitit ignores it) but adds a population checkpoint after its step."""
    from torchrl_spqr.training.cli import run_script
    from torchrl_spqr.training.population import run as population_run

    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    pop = _population_script()
    saved = []
    real_save = population_run.save_checkpoint

    def save(run_dir, state, *buffer):
        if "population" in state:
            saved.append({k: a["counters"]["frames"] for k, a in state["agents"].items()})
        return real_save(run_dir, state, *buffer)

    monkeypatch.setattr(population_run, "save_checkpoint", save)
    old = signal.signal(signal.SIGTERM, lambda signum, frame: None)  # submitit's: ignore it
    try:
        # during the 20th update, that of frame 59
        term = signal_on_call(pop.update, 20, signal.SIGTERM, {"n": 0})
        monkeypatch.setattr(pop, "update", term)
        res = run_script(pop.train, _cfg("collector.total_frames=100"), tmp_path / "run")
    finally:
        signal.signal(signal.SIGTERM, old)
    assert [set(f.values()) for f in saved] == [{40}, {59}, {80}, {100}]
    for name in AGENTS:
        assert res[name]["frames"] == 100 and res[name]["updates"] == 61


@pytest.mark.parametrize(
    "flags",
    [
        pytest.param(["population.parallel_envs=true"], marks=pytest.mark.slow),
        pytest.param(["population.batched_eval=true"], marks=pytest.mark.slow),
    ],
    ids=["parallel-envs", "batched-eval"],
)
def test_parallel_envs_and_batched_eval_write_the_rows_of_the_default(tmp_path, flags):
    """population.parallel_envs=true (a TorchRL ParallelEnv, one worker per agent): the
    same transitions, hence every agent's rows equal the in-process population's;
    population.batched_eval=true: the same rows, the evaluation returns up to the float
    round-off of the vmapped policy."""
    pop = _population_script()
    pop.train(_cfg("collector.total_frames=80"), tmp_path / "serial")
    res = pop.train(_cfg("collector.total_frames=80", *flags), tmp_path / "other")
    evals = {"eval_return", "eval_return_std", "best_eval_return"}
    for name in AGENTS:
        assert res[name]["frames"] == 80
        rows = _without_clock(_rows(tmp_path / "other" / name))
        ref = _without_clock(_rows(tmp_path / "serial" / name))
        assert [int(r["frames"]) for r in rows] == [20, 40, 60, 80]
        strip = [{k: v for k, v in r.items() if k not in evals} for r in (*rows, *ref)]
        assert strip[: len(rows)] == strip[len(rows) :]
        for r, e in zip(rows, ref):
            for key in evals & set(r):
                assert (r[key] == "") == (e[key] == "")
                if r[key]:
                    assert float(r[key]) == pytest.approx(float(e[key]), rel=1e-4, abs=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_population_script_on_cuda(tmp_path):
    """device=cuda with worker-process environments and the batched evaluation (the
    paper-scale script's settings): every agent reaches the budget with its evaluations."""
    pop = _population_script()
    flags = ["population.parallel_envs=true", "population.batched_eval=true"]
    res = pop.train(_cfg("collector.total_frames=80", "device=cuda", *flags), tmp_path / "gpu")
    for name in AGENTS:
        assert res[name]["frames"] == 80
        rows = _rows(tmp_path / "gpu" / name)
        assert [int(r["frames"]) for r in rows] == [20, 40, 60, 80]
        assert any(r["eval_return"] for r in rows)


def test_population_config_errors_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match=r"population.beta=\[\]"):
        resolve_population_config(_cfg("population.beta=[]"))
    with pytest.raises(ConfigError, match="population.seeds=.*repeated"):
        resolve_population_config(_cfg("population.seeds=[1,1]"))
    with pytest.raises(ConfigError, match="population.beta=.*>= 0"):
        resolve_population_config(_cfg("population.beta=[-1]"))
    with pytest.raises(ConfigError, match="optim.weight_decay"):
        resolve_population_config(_cfg("optim.weight_decay=0.1"))
    with pytest.raises(ConfigError, match="collector.backend"):
        resolve_population_config(_cfg("collector.backend=multi_sync"))
    with pytest.raises(ConfigError, match="optim.lr"):  # an agent's single-run check
        resolve_population_config(_cfg("optim.lr=-1"))
    with pytest.raises(Exception, match="population.seed"):  # Hydra refuses a misspelt field
        _cfg("population.seed=[0]")
    cfg = resolve_population_config(_cfg("population.pairs=data"))
    assert list(cfg.population.seeds) == [0, 1] and cfg.population.pairs == "data"


def test_resume_with_another_population_is_refused(tmp_path, monkeypatch):
    pop = _population_script()

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pop, "update", stop)
    with pytest.raises(KeyboardInterrupt):
        pop.train(_cfg("collector.total_frames=60"), tmp_path / "run")
    with pytest.raises(ConfigError, match=r"population.seeds=\[0, 1\].*\[0, 2\]"):
        pop.train(
            _cfg("collector.total_frames=60", "resume=true", "population.seeds=[0,2]"),
            tmp_path / "run",
        )


def test_ctrl_c_during_owed_evaluations_loses_no_row(tmp_path, monkeypatch):
    """Ctrl-C during the second agent's evaluation of a logged step, then again while the
    resume writes the owed rows (before the loop): each exit checkpoints the population,
    the rows already written stay, the rows still owed are written by the next resume."""
    pop = _population_script()
    run = tmp_path / "run"
    real = pop.evaluate_policy
    calls = {"n": 0}

    def second_interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(pop, "evaluate_policy", second_interrupted)
    with pytest.raises(KeyboardInterrupt):
        pop.train(_cfg("collector.total_frames=80"), run)
    agents = load_checkpoint_data(run, buffer=False)[0]["agents"]
    assert "owed_row" not in agents[AGENTS[0]]  # its row at frame 60 is written
    assert all(agents[name]["owed_row"]["eval"] for name in AGENTS[1:])
    assert [r["frames"] for r in _rows(run / AGENTS[0])] == ["20", "40", "60"]

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pop, "evaluate_policy", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pop.train(_cfg("collector.total_frames=80", "resume=true"), run)
    agents = load_checkpoint_data(run, buffer=False)[0]["agents"]
    for name in AGENTS[1:]:
        assert agents[name]["counters"]["frames"] == 60 and agents[name]["owed_row"]["eval"]
        assert "loss_qvalue" in agents[name]["owed_row"]["row"]
        assert [r["frames"] for r in _rows(run / name)] == ["20", "40"]

    monkeypatch.setattr(pop, "evaluate_policy", real)
    pop.train(_cfg("collector.total_frames=80", "resume=true"), run)
    for name in AGENTS:
        rows = _rows(run / name)
        assert [r["frames"] for r in rows] == ["20", "40", "60", "80"]
        assert rows[2]["eval_return"] != "" and rows[2]["loss_qvalue"] != ""


def _redq_population_script():
    """``sota_scripts/redq_spqr/redq_spqr_population.py`` as a module (with its folder's utils)."""
    key = "sota_redq_spqr_population"
    if key in sys.modules:
        return sys.modules[key]
    load_script("redq_spqr")
    saved = sys.modules.pop("utils", None)
    sys.modules["utils"] = sys.modules["redq_spqr_utils"]
    try:
        spec = importlib.util.spec_from_file_location(
            key, ROOT / "sota_scripts" / "redq_spqr" / "redq_spqr_population.py"
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    finally:
        sys.modules.pop("utils", None)
        if saved is not None:
            sys.modules["utils"] = saved
    return module


def test_redq_population_resumes_its_policy_update_schedule(tmp_path, monkeypatch):
    """REDQ (G = 2, policy every 2 updates): Ctrl-C after an odd number of updates, resume:
    the shared update counter (the policy-update schedule) continues where it stopped."""
    pop = _redq_population_script()
    redq = ["optim.utd_ratio=2", "optim.policy_update_delay=2", "population.seeds=[0]"]

    def cfg(*more):
        with initialize_config_dir(
            config_dir=str(ROOT / "sota_scripts/redq_spqr"), version_base="1.3"
        ):
            return compose(config_name="population", overrides=[*TINY, *redq, *more])

    calls = {"n": 0}
    real_update = pop.update

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 36:
            raise KeyboardInterrupt
        return real_update(*args, **kwargs)

    monkeypatch.setattr(pop, "update", interrupted)
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        pop.train(cfg("collector.total_frames=80"), run)
    monkeypatch.setattr(pop, "update", real_update)
    state = load_checkpoint_data(run, buffer=False)[0]
    assert int(state["population"]["shared_state.loss_module.update_count"]) == 35
    res = pop.train(cfg("collector.total_frames=80", "resume=true"), run)
    assert {r["updates"] for r in res.values()} == {2 * (80 - 40 + 1)}
    state = load_checkpoint_data(run, buffer=False)[0]
    assert int(state["population"]["shared_state.loss_module.update_count"]) == 2 * (80 - 40 + 1)
    rows = _rows(run / "beta1.0_N3_seed0")
    assert [r["frames"] for r in rows] == ["20", "40", "60", "80"]
    assert "actor_updated" in rows[0] and rows[-1]["spqr_kl"] != ""
    with pytest.raises(ConfigError, match="trains 'redq' agents"):
        resolve_population_config(cfg("algorithm=sac_ens"), "redq_population")

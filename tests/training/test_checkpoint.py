"""Checkpoints: buffer round trips, completeness (manifest), recovery after a kill at any
instant, refusal of damaged files and of a changed config, no lost row on Ctrl-C, and a
fault-injection test (SIGKILL at random instants, then resume)."""

from __future__ import annotations

import csv
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from _helpers import load_script
from tensordict import TensorDict
from torchrl.data import LazyMemmapStorage, LazyTensorStorage, ReplayBuffer

from torchrl_spqr.training import checkpoint as C
from torchrl_spqr.training.checkpoint import (
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
    truncate_csv,
)
from torchrl_spqr.training.config import ConfigError


@pytest.mark.parametrize("storage", ["tensor", "memmap"])
def test_buffer_round_trip(tmp_path, storage):
    def make(d):
        st = LazyTensorStorage(50) if storage == "tensor" else LazyMemmapStorage(50, scratch_dir=d)
        return ReplayBuffer(storage=st, batch_size=4)

    buf = make(tmp_path / "scratch")
    data = TensorDict({"obs": torch.randn(30, 3), "next": {"r": torch.randn(30, 1)}}, [30])
    buf.extend(data)
    save_checkpoint(tmp_path / "run", {"counters": {"frames": 30}}, buf)
    save_checkpoint(tmp_path / "run", {"counters": {"frames": 30}}, buf)  # overwrite is atomic too
    fresh = make(tmp_path / "scratch2")
    ck = load_checkpoint(tmp_path / "run", fresh)
    assert ck["counters"]["frames"] == 30
    assert len(fresh) == 30
    torch.testing.assert_close(fresh.storage[:30]["obs"], data["obs"])
    torch.testing.assert_close(fresh.storage[:30]["next", "r"], data["next", "r"])
    fresh.extend(data[:5])  # the write cursor continues where it was
    torch.testing.assert_close(fresh.storage[30:35]["obs"], data["obs"][:5])


def test_buffer_wraps_around_after_resume_with_writer_state(tmp_path):
    """The writer's TorchRL state (cursor and write count) survives, also past a wrap-around."""
    buf = ReplayBuffer(storage=LazyTensorStorage(20), batch_size=4)
    data = TensorDict({"obs": torch.arange(25.0).unsqueeze(-1)}, [25])
    buf.extend(data)  # 25 writes into 20 slots: cursor 5, write count 25
    save_checkpoint(tmp_path / "run", {}, buf)
    fresh = ReplayBuffer(storage=LazyTensorStorage(20), batch_size=4)
    ck = load_checkpoint(tmp_path / "run", fresh)
    assert ck["buffer_meta"]["writer"] == buf.writer.state_dict()
    assert fresh.writer.state_dict() == buf.writer.state_dict()
    assert fresh.write_count == 25
    fresh.extend(TensorDict({"obs": torch.full((2, 1), -1.0)}, [2]))
    assert fresh.storage[5:7]["obs"].eq(-1).all() and fresh.storage[4]["obs"].item() == 24


def test_buffer_meta_without_writer_state_loads(tmp_path):
    """A checkpoint from before the writer's state was saved (cursor only) still restores it."""
    buf = _buf(30)
    save_checkpoint(tmp_path / "run", {}, buf)
    state = torch.load(tmp_path / "run/checkpoint/state.pt", weights_only=True)
    meta = {k: v for k, v in state["buffer_meta"].items() if k != "writer"}
    fresh = ReplayBuffer(storage=LazyTensorStorage(50), batch_size=4)
    C.load_buffer(fresh, tmp_path / "run/checkpoint/buffer", meta)
    assert len(fresh) == 30 and fresh.writer.state_dict()["_cursor"] == 30


def test_rng_round_trip_and_older_layout():
    """GlobalRNGState's dict loads weights-only; the package's older RNG layout still restores."""
    import io

    import numpy as np

    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    buf = io.BytesIO()
    torch.save({"rng": C.capture_rng()}, buf)
    want = (torch.rand(3), np.random.rand(3), random.random())
    buf.seek(0)
    C.restore_rng(torch.load(buf, weights_only=True)["rng"])
    got = (torch.rand(3), np.random.rand(3), random.random())
    torch.testing.assert_close(got[0], want[0])
    assert (got[1] == want[1]).all() and got[2] == want[2]
    np_state = np.random.get_state()
    older = {  # what capture_rng saved before it used torchrl.checkpoint.GlobalRNGState
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": np_state[0],
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": [3, list(random.getstate()[1]), None],
    }
    want = (torch.rand(3), np.random.rand(3), random.random())
    C.restore_rng(older)
    got = (torch.rand(3), np.random.rand(3), random.random())
    torch.testing.assert_close(got[0], want[0])
    assert (got[1] == want[1]).all() and got[2] == want[2]


# ------------------------------------------------------- completeness and recovery
ROOT = Path(__file__).resolve().parents[2]


def _buf(n=30, fill=True):
    buf = ReplayBuffer(storage=LazyTensorStorage(50), batch_size=4)
    if fill:
        buf.extend(TensorDict({"obs": torch.arange(n * 3.0).reshape(n, 3)}, [n]))
    return buf


def _save(run, frames, n=30):
    return save_checkpoint(run, {"counters": {"frames": frames}}, _buf(n))


def _frames(run, **kw):
    return load_checkpoint(run, _buf(fill=False))["counters"]["frames"]


def test_manifest_lists_every_file(tmp_path):
    ck = _save(tmp_path / "run", 1)
    m = json.loads((ck / C.MANIFEST).read_text())
    assert set(m["files"]) == {"state.pt", "buffer/meta.json", "buffer/obs.memmap"}
    assert m["files"]["state.pt"]["size"] == (ck / "state.pt").stat().st_size
    assert C.verify_checkpoint(ck) is True
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoint"]


def test_crash_between_renames_only_old_left(tmp_path):
    """Killed after checkpoint/ -> checkpoint.old/ with checkpoint.tmp/ removed."""
    run = tmp_path / "run"
    _save(run, 10)
    os.replace(run / "checkpoint", run / "checkpoint.old")
    assert C.has_checkpoint(run)
    assert _frames(run) == 10
    _save(run, 20)  # the next save keeps the old one until the new one is complete
    assert _frames(run) == 20
    assert not (run / "checkpoint.old").exists()


class _Killed(BaseException):
    pass


def test_crash_between_renames_complete_tmp_is_newest(tmp_path, monkeypatch):
    """Killed after checkpoint/ -> checkpoint.old/, before checkpoint.tmp/ -> checkpoint/."""
    run = tmp_path / "run"
    _save(run, 10)
    real = os.replace

    def replace(src, dst):
        if Path(src).name == "checkpoint.tmp":
            raise _Killed
        return real(src, dst)

    monkeypatch.setattr(C.os, "replace", replace)
    with pytest.raises(_Killed):
        _save(run, 20)
    monkeypatch.setattr(C.os, "replace", real)
    assert {p.name for p in run.iterdir()} == {"checkpoint.old", "checkpoint.tmp"}
    assert _frames(run) == 20  # the newest complete one
    _save(run, 30)  # finishes the interrupted save first, then saves
    assert _frames(run) == 30
    assert {p.name for p in run.iterdir()} == {"checkpoint"}


@pytest.mark.parametrize("stage", ["buffer", "state", "manifest"])
def test_kill_while_writing_keeps_previous(tmp_path, monkeypatch, stage):
    run = tmp_path / "run"
    _save(run, 10)
    target = {"buffer": "save_buffer", "state": "torch", "manifest": "_write_manifest"}[stage]
    if stage == "state":
        monkeypatch.setattr(C.torch, "save", lambda *a, **k: (_ for _ in ()).throw(_Killed()))
    else:
        monkeypatch.setattr(C, target, lambda *a, **k: (_ for _ in ()).throw(_Killed()))
    with pytest.raises(_Killed):
        _save(run, 20)
    monkeypatch.undo()
    assert (run / "checkpoint.tmp").exists()
    assert _frames(run) == 10
    _save(run, 30)
    assert _frames(run) == 30 and {p.name for p in run.iterdir()} == {"checkpoint"}


def _truncate(path: Path, keep: int | None = None) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2 if keep is None else keep])


@pytest.mark.parametrize("name", ["buffer/obs.memmap", "state.pt", "buffer/meta.json"])
def test_truncated_file_is_refused_naming_it(tmp_path, name):
    run = tmp_path / "run"
    _save(run, 10)
    _truncate(run / "checkpoint" / name)
    fresh = _buf(fill=False)
    with pytest.raises(CheckpointError, match=name.split("/")[-1].replace(".", r"\.")):
        load_checkpoint(run, fresh)
    assert len(fresh) == 0


def test_altered_file_fails_checksum(tmp_path):
    run = tmp_path / "run"
    _save(run, 10)
    f = run / "checkpoint" / "buffer" / "obs.memmap"
    raw = bytearray(f.read_bytes())
    raw[0] ^= 0xFF
    f.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"obs\.memmap does not match its SHA-256"):
        load_checkpoint(run, _buf(fill=False))


def test_damaged_newest_falls_back_to_older_complete(tmp_path):
    run = tmp_path / "run"
    _save(run, 10)
    _save(run, 20)
    # newest: a complete-looking checkpoint.tmp/ with a truncated file; then checkpoint/ (20)
    shutil.copytree(run / "checkpoint", run / "checkpoint.tmp")
    _truncate(run / "checkpoint.tmp" / "buffer" / "obs.memmap")
    with pytest.warns(UserWarning, match=r"obs\.memmap.*older complete checkpoint"):
        assert _frames(run) == 20


def test_truncated_state_with_old_falls_back(tmp_path):
    run = tmp_path / "run"
    _save(run, 20)
    _save(tmp_path / "r2", 10)
    os.replace(tmp_path / "r2" / "checkpoint", run / "checkpoint.old")
    _truncate(run / "checkpoint" / "state.pt", keep=0)  # checkpoint/ (20) damaged
    with pytest.warns(UserWarning, match=r"state\.pt"):
        assert _frames(run) == 10


def test_legacy_checkpoint_loads_with_warning(tmp_path):
    run = tmp_path / "run"
    _save(run, 10)
    (run / "checkpoint" / C.MANIFEST).unlink()  # as written before the manifest existed
    with pytest.warns(UserWarning, match="cannot be verified"):
        assert _frames(run) == 10
    # still checked: a truncated memmap against its meta.json, a damaged state file
    _truncate(run / "checkpoint" / "buffer" / "obs.memmap")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(CheckpointError, match=r"obs\.memmap holds"):
            _frames(run)
    _save(tmp_path / "r3", 10)
    (tmp_path / "r3" / "checkpoint" / C.MANIFEST).unlink()
    (tmp_path / "r3" / "checkpoint" / "state.pt").write_bytes(b"")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(CheckpointError, match=r"state\.pt is empty"):
            _frames(tmp_path / "r3")


def test_no_complete_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
    run = tmp_path / "run"
    _save(run, 10)
    _truncate(run / "checkpoint" / "state.pt")
    assert C.has_checkpoint(run)
    with pytest.raises(CheckpointError, match=r"No complete checkpoint.*state\.pt"):
        load_checkpoint(run)


def test_buffer_larger_than_capacity_is_refused(tmp_path):
    run = tmp_path / "run"
    _save(run, 10, n=30)
    small = ReplayBuffer(storage=LazyTensorStorage(20), batch_size=4)
    with pytest.raises(CheckpointError, match="replay_buffer.size=20"):
        load_checkpoint(run, small)


def test_truncate_csv_drops_cut_rows(tmp_path):
    p = tmp_path / "m.csv"
    p.write_text("frames,x\n10,1\n20,2\n30,3\n4")  # killed while writing "40,4"
    assert truncate_csv(p, 100, step_field="frames") == 30
    assert p.read_text().splitlines() == ["frames,x", "10,1", "20,2", "30,3"]
    assert truncate_csv(p, 20, step_field="frames") == 20
    s = tmp_path / "s.csv"
    s.write_text("10,1.0\n20,2.0\n3")
    assert truncate_csv(s, 100, step_field=0, header=False) == 20
    assert s.read_text().splitlines() == ["10,1.0", "20,2.0"]


# ------------------------------------------------ the training loop: resume cases

TINY = [
    "env=pendulum",
    "collector.init_random_frames=20",
    "optim.batch_size=8",
    "replay_buffer.size=500",
    "network.hidden_sizes=[8,8]",
    "network.ensemble_size=3",
    "logger.log_interval=10",
    "logger.eval_interval=40",
    "logger.eval_episodes=1",
    "logger.progress=false",
    "checkpoint.interval=20",
]


def _cfg(*overrides):
    pytest.importorskip("hydra")
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(
        config_dir=str(ROOT / "sota_scripts/sac_ens_spqr"), version_base="1.3"
    ):
        return compose(config_name="config", overrides=[*TINY, *overrides])


def _rows(run):
    with (run / "metrics.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def _expected_frames(total, log_every=10):
    return [f for f in range(log_every, total + 1, log_every)] + (
        [total] if total % log_every else []
    )


def _check_rows(run, total, eval_every=40, updates_from=20):
    rows = _rows(run)
    frames = [int(r["frames"]) for r in rows]
    assert frames == _expected_frames(total), frames
    for r in rows:
        f = int(r["frames"])
        assert (r["eval_return"] != "") == (f % eval_every == 0 or f == total), r
    return rows


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_ctrl_c_during_evaluation_loses_no_row(tmp_path, monkeypatch):
    run = tmp_path / "run"
    sac = load_script("sac_ens_spqr")
    real = sac.evaluate_policy
    calls = {"n": 0}

    def interrupted(*a, **k):
        calls["n"] += 1
        if calls["n"] == 1:  # the evaluation at frame 40
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(sac, "evaluate_policy", interrupted)
    with pytest.raises(KeyboardInterrupt):
        load_script("sac_ens_spqr").train(_cfg("collector.total_frames=60"), run)
    assert [int(r["frames"]) for r in _rows(run)] == [10, 20, 30]
    ck = load_checkpoint(run)
    assert ck["counters"]["frames"] == 40 and ck["owed_row"]["eval"]
    assert "loss_qvalue" in ck["owed_row"]["row"]  # its training metrics are kept
    load_script("sac_ens_spqr").train(_cfg("collector.total_frames=60", "resume=true"), run)
    rows = _check_rows(run, 60)
    assert rows[3]["loss_qvalue"] != "" and rows[3]["eval_return"] != ""


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_ctrl_c_during_updates_of_a_logged_step_loses_no_row(tmp_path, monkeypatch):
    run = tmp_path / "run"
    sac = load_script("sac_ens_spqr")
    real = sac.update
    calls = {"n": 0}

    def interrupted(*a, **k):
        calls["n"] += 1
        if calls["n"] == 11:  # the update of frame 30 (updates start at frame 20)
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(sac, "update", interrupted)
    with pytest.raises(KeyboardInterrupt):
        load_script("sac_ens_spqr").train(_cfg("collector.total_frames=50"), run)
    assert load_checkpoint(run)["counters"]["frames"] == 30
    load_script("sac_ens_spqr").train(_cfg("collector.total_frames=50", "resume=true"), run)
    rows = _check_rows(run, 50)
    assert rows[2]["loss_qvalue"] != ""  # from the last update before the interruption


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_resume_after_crash_between_renames(tmp_path):
    run = tmp_path / "run"
    load_script("sac_ens_spqr").train(_cfg("collector.total_frames=40"), run)
    os.replace(run / "checkpoint", run / "checkpoint.old")  # the state a kill can leave
    res = load_script("sac_ens_spqr").train(_cfg("collector.total_frames=60", "resume=true"), run)
    assert res["frames"] == 60
    _check_rows(run, 60)
    assert not (run / "checkpoint.old").exists() and (run / "checkpoint" / C.MANIFEST).exists()


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_resume_with_damaged_checkpoint_refuses_and_keeps_it(tmp_path):
    run = tmp_path / "run"
    load_script("sac_ens_spqr").train(_cfg("collector.total_frames=40"), run)
    _truncate(run / "checkpoint" / "buffer" / "observation.memmap")
    before = (run / "metrics.csv").read_text()
    with pytest.raises(CheckpointError, match=r"observation\.memmap"):
        load_script("sac_ens_spqr").train(_cfg("collector.total_frames=60", "resume=true"), run)
    assert (run / "checkpoint").exists() and (run / "metrics.csv").read_text() == before


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize(
    "override,field",
    [
        ("network.hidden_sizes=[16,16]", "network.hidden_sizes"),
        ("network.ensemble_size=4", "network.ensemble_size"),
        ("env=hopper", "env.name"),
    ],
)
def test_resume_with_changed_config_names_the_field(tmp_path, override, field):
    run = tmp_path / "run"
    load_script("sac_ens_spqr").train(_cfg("collector.total_frames=20"), run)
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_script("sac_ens_spqr").train(
            _cfg("collector.total_frames=40", "resume=true", override), run
        )
    assert _frames(run) == 20  # the checkpoint is untouched


def test_state_mismatch_is_mapped_to_config_fields(tmp_path):
    from torchrl_spqr.training.common import _mismatch_error

    err = _mismatch_error(
        {"optim": {"lr": 1e-3}, "spqr": {"beta": 1.0}},
        {"optim": {"lr": 1e-3}, "spqr": {"beta": 2.0}},
        tmp_path,
        RuntimeError("size mismatch for x"),
    )
    assert isinstance(err, ConfigError) and "spqr.beta" in str(err)
    same = _mismatch_error({"a": 1}, {"a": 1}, tmp_path, KeyError("loss"))
    assert "another version" in str(same)


# ---------------------------------------------------------------- fault injection
#: Invariant checked after kills at random instants and resumes: metrics.csv holds
#: exactly the rows of an uninterrupted run's schedule (one per multiple of
#: logger.log_interval frames, plus the last frame), steps strictly increasing, the
#: evaluation columns filled exactly at multiples of logger.eval_interval and the last
#: frame, and the update count of each row equal to the uninterrupted run's (a kill
#: resumes from the last periodic checkpoint and redoes what followed it). TorchRL's
#: CSV logs hold each step at most once, increasing.
FI_ARGS = [
    "env=pendulum",
    "collector.init_random_frames=20",
    "optim.batch_size=8",
    "replay_buffer.size=1000",
    "network.hidden_sizes=[8,8]",
    "network.ensemble_size=3",
    "logger.log_interval=10",
    "logger.eval_interval=40",
    "logger.eval_episodes=1",
    "logger.progress=false",
    "logger.backend=csv",
    "checkpoint.interval=10",
    "collector.total_frames=120",
    "resume=true",
]


def _launch(run):
    cmd = [
        sys.executable,
        str(ROOT / "sota_scripts/sac_ens_spqr/sac_ens_spqr.py"),
        *FI_ARGS,
        f"hydra.run.dir={run}",
    ]
    env = {**os.environ, "RL_WARNINGS": "False"}
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)


def _rows_logged(run) -> int:
    path = run / "metrics.csv"
    try:
        return max(0, len(path.read_text().splitlines()) - 1)
    except FileNotFoundError:
        return 0


def _kill_at_random(run, rng, max_delay):
    """Start the run and SIGKILL it at a random point of its training.

    The point is drawn in training progress, not wall time, so that a fast machine
    (where the whole tiny run takes a few seconds) is hit as surely as a slow one: wait
    until a random number of new rows (1 to 9 of the run's 12) is logged, then a random
    fraction of ``max_delay`` / 40 seconds (inside an update, a save or an evaluation).
    """
    start_rows = _rows_logged(run)
    target = start_rows + rng.randint(1, 9)
    proc = _launch(run)
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if _rows_logged(run) >= target:
            break
        time.sleep(0.005)
    delay = rng.uniform(0, max_delay / 40)
    time.sleep(delay)
    finished = proc.poll() is not None
    proc.send_signal(signal.SIGKILL) if not finished else None
    proc.wait()
    proc.stderr.close()
    return delay, finished


def _fault_injection(run, seed, kills, max_delay):
    rng = random.Random(seed)
    log = []
    for _ in range(kills):
        log.append(_kill_at_random(run, rng, max_delay))
    assert any(not finished for _, finished in log), f"no kill landed before the end: {log}"
    proc = _launch(run)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, (log, err.decode()[-3000:])
    rows = _check_rows(run, 120)
    updates = [int(r["updates"]) for r in rows]
    assert updates == [max(0, f - 19) for f in _expected_frames(120)], (log, updates)
    for p in (run / "logs").rglob("scalars/*.csv"):
        steps = [float(line.split(",")[0]) for line in p.read_text().splitlines()]
        assert steps == sorted(set(steps)), (p.name, steps, log)
    assert {p.name for p in run.iterdir() if p.name.startswith("checkpoint")} == {"checkpoint"}
    return log


@pytest.mark.slow  # default suite under 15 min on a slow 2-core host; make test-slow runs it
def test_kill_at_a_random_instant_and_resume(tmp_path):
    """One SIGKILL during training (random instant), then resume: no row lost or duplicated."""
    _fault_injection(tmp_path / "run", seed=0, kills=1, max_delay=4.0)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_kill_repeatedly_at_random_instants(tmp_path, seed):
    """Three SIGKILLs per seed at random instants (saves and evaluations included)."""
    _fault_injection(tmp_path / "run", seed=seed, kills=3, max_delay=3.0)


# ---------------------------------------------------------------- offline loop
OFFLINE_ID = "local/test/ckpt-random-v0"


@pytest.fixture(scope="module")
def offline_root(tmp_path_factory):
    pytest.importorskip("minari")
    from torchrl_spqr.data import build_dataset

    root = tmp_path_factory.mktemp("minari_ck")
    mp = pytest.MonkeyPatch()
    mp.setenv("MINARI_DATASETS_PATH", str(root))
    build_dataset(
        OFFLINE_ID,
        "Hopper-v5",
        "random",
        steps=300,
        seed=0,
        max_episode_steps=50,
        ref_max_score=1000.0,
    )
    yield root
    mp.undo()


def _offline_cfg(*overrides):
    pytest.importorskip("hydra")
    from hydra import compose, initialize_config_dir

    tiny = [
        "dataset=local_hopper_random",
        f"dataset.id={OFFLINE_ID}",
        "network.ensemble_size=3",
        "network.hidden_sizes=[8,8]",
        "optim.num_updates=40",
        "optim.batch_size=8",
        "logger.log_interval=10",
        "logger.eval_interval=20",
        "logger.eval_episodes=1",
        "logger.progress=false",
        "env.max_episode_steps=20",
        "checkpoint.interval=20",
    ]
    with initialize_config_dir(
        config_dir=str(ROOT / "sota_scripts/sac_n_spqr"), version_base="1.3"
    ):
        return compose(config_name="config", overrides=[*tiny, *overrides])


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_offline_ctrl_c_during_evaluation_loses_no_row(offline_root, tmp_path, monkeypatch):
    sac_n = load_script("sac_n_spqr")
    run = tmp_path / "run"
    real = sac_n.evaluate_policy
    calls = {"n": 0}

    def interrupted(*a, **k):
        calls["n"] += 1
        if calls["n"] == 1:  # the evaluation at update 20
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(sac_n, "evaluate_policy", interrupted)
    with pytest.raises(KeyboardInterrupt):
        sac_n.train(_offline_cfg(), run)
    monkeypatch.setattr(sac_n, "evaluate_policy", real)
    assert [int(r["updates"]) for r in _rows(run)] == [10]
    sac_n.train(_offline_cfg("resume=true"), run)
    rows = _rows(run)
    assert [int(r["updates"]) for r in rows] == [10, 20, 30, 40]
    assert [r["normalized_score"] != "" for r in rows] == [False, True, False, True]
    assert rows[1]["loss_qvalue"] != ""

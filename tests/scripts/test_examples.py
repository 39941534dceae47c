"""The single-file examples (``examples/redq_spqr.py``, ``examples/spqr_demo.py``): arguments are
validated before anything runs, a run folder is never overwritten silently, Ctrl-C stops cleanly
with a readable checkpoint, a kill at any instant leaves the previous checkpoint whole, and
``--resume`` continues with ``metrics.csv`` holding every logged step exactly once.

Every run is a tiny one on Pendulum-v1 in a temporary folder (nothing depends on ``runs/``).
"""

from __future__ import annotations

import csv
import importlib.util
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]

TINY = {
    "redq_spqr": [
        "--env", "Pendulum-v1", "--frames", "400", "--random-frames", "50", "--ensemble", "3",
        "--utd", "2", "--batch-size", "32", "--hidden", "16", "--log-every", "10",
        "--eval-every", "25", "--eval-episodes", "1",
    ],
    "spqr_demo": [
        "--frames", "400", "--random-frames", "50", "--ensemble", "3", "--utd", "1",
        "--batch-size", "32", "--hidden", "16", "--log-every", "10", "--eval-every", "25",
        "--eval-episodes", "1",
    ],
}  # fmt: skip
RUN_NAME = {
    "redq_spqr": "redq_spqr_Pendulum-v1_N3_M2_G2_beta1_seed0",
    "spqr_demo": "spqr_sac_ens_Pendulum-v1_N3_beta1_seed0",
}
FRAMES, RANDOM, LOG, EVAL = 400, 50, 10, 25


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", ROOT / f"examples/{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _schedule(script: str, total: int = FRAMES) -> list[tuple[int, int]]:
    """(frames, updates) of every row the script logs in an uninterrupted run."""
    rows = []
    for f in range(1, total + 1):
        if script == "redq_spqr":  # updates after the random frames, G = 2 per step
            trained = f - RANDOM
            log = trained > 0 and (trained % LOG == 0 or f == total)
            ev = trained >= 0 and (f % EVAL == 0 or f == total)
            updates = 2 * max(trained, 0)
        else:  # the demo trains from the step that reaches the random frames, 1 update per step
            trained = f - RANDOM + 1
            log = trained > 0 and (trained % LOG == 0 or f == total)
            ev = trained > 0 and (f % EVAL == 0 or f == total)
            updates = max(trained, 0)
        if log or ev:
            rows.append((f, updates))
    return rows


def _rows(run: Path) -> list[tuple[int, int]]:
    with (run / "metrics.csv").open() as fh:
        return [(int(r["frames"]), int(r["updates"])) for r in csv.DictReader(fh)]


def _start(script: str, out: Path, *extra: str) -> subprocess.Popen:
    log = out / f"{script}.{time.monotonic_ns()}.log"
    cmd = [sys.executable, f"examples/{script}.py", *TINY[script], "--out", str(out), *extra]
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, text=True)
    proc.log = log
    return proc


def _output(proc: subprocess.Popen) -> str:
    return proc.log.read_text()


def _wait_rows(proc: subprocess.Popen, run: Path, n: int, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the run ended (status {proc.returncode}) before {n} rows"
        if (run / "metrics.csv").exists() and len(_rows(run)) >= n:
            return
        time.sleep(0.1)
    proc.kill()
    pytest.fail(f"no {n} rows in {run}/metrics.csv after {timeout} s")


def _resume(script: str, out: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, f"examples/{script}.py", *TINY[script], "--out", str(out), "--resume"]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=180)


# ----------------------------------------------------------------------------- arguments
BAD = [
    (["--frames", "0"], "--frames"),
    (["--frames", "100", "--random-frames", "100"], "--random-frames"),
    (["--random-frames", "-1"], "--random-frames"),
    (["--ensemble", "2"], "--ensemble"),  # SPQR needs 3
    (["--ensemble", "1", "--beta", "0"], "--ensemble"),
    (["--ensemble", "2.5"], "--ensemble"),
    (["--beta", "nan"], "--beta"),
    (["--beta", "-0.5"], "--beta"),
    (["--beta", "abc"], "--beta"),
    (["--utd", "0"], "--utd"),
    (["--batch-size", "0"], "--batch-size"),
    (["--hidden", "0"], "--hidden"),
    (["--eval-every", "0"], "--eval-every"),
    (["--eval-episodes", "0"], "--eval-episodes"),
    (["--log-every", "0"], "--log-every"),
    (["--threads", "0"], "--threads"),
    (["--seed", "-1"], "--seed"),
    (["--env", "Hoper-v5"], "'Hoper-v5'"),
    (["--env", "CartPole-v1"], "continuous (Box) actions"),
    (["--resume", "--overwrite"], "--overwrite"),
]


@pytest.mark.parametrize("script", ["redq_spqr", "spqr_demo"])
def test_bad_arguments_name_the_argument(script, tmp_path, capsys):
    mod = _load(script)
    for argv, named in BAD:
        with pytest.raises(SystemExit) as exc:
            mod.parse_args([*argv, "--out", str(tmp_path)])
        assert exc.value.code == 2, argv
        err = capsys.readouterr().err
        assert "error:" in err and named in err, (argv, err)
        assert argv[0] == "--resume" or argv[1] in err, (argv, err)  # the value, too
    (tmp_path / "x").write_text("a file, not a folder")
    with pytest.raises(SystemExit):
        mod.parse_args(["--out", str(tmp_path / "x")])
    assert "not a writable folder" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["x"]  # validation wrote nothing


@pytest.mark.parametrize("script", ["redq_spqr", "spqr_demo"])
def test_existing_run_folder_is_not_overwritten(script, tmp_path, capsys):
    mod = _load(script)
    args = mod.parse_args(["--out", str(tmp_path)])  # the defaults, in a fresh folder: fine
    run = mod.run_dir_of(args)
    run.mkdir(parents=True)
    (run / "metrics.csv").write_text("frames\n")
    with pytest.raises(SystemExit) as exc:
        mod.parse_args(["--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "--resume" in err and "--overwrite" in err and str(run) in err
    assert mod.parse_args(["--out", str(tmp_path), "--overwrite"]).overwrite
    assert mod.parse_args(["--out", str(tmp_path), "--resume"]).resume
    assert (run / "metrics.csv").read_text() == "frames\n"  # parsing touched nothing


# ----------------------------------------------------------------------------- interrupts
@pytest.mark.parametrize("script", ["redq_spqr", pytest.param("spqr_demo", marks=pytest.mark.slow)])
def test_ctrl_c_stops_cleanly_and_resume_completes_the_log(script, tmp_path):
    run = tmp_path / RUN_NAME[script]
    proc = _start(script, tmp_path)
    _wait_rows(proc, run, 3)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130, _output(proc)
    assert "stopped at frame" in _output(proc) and "Traceback" not in _output(proc)
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    stopped = ckpt["frames"]
    assert RANDOM < stopped < FRAMES and ckpt["replay_buffer"]
    assert _rows(run) == [r for r in _schedule(script) if r[0] <= stopped]
    assert (run / "learning_curve.png").exists()
    if script == "redq_spqr":  # the plot tool still reads the example's checkpoint
        from torchrl_spqr import analysis

        assert analysis.checkpoint_q_values(run, batch_size=8, rollout_steps=8).q.shape == (3, 8)

    res = _resume(script, tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"resuming at frame {stopped}" in res.stdout
    assert _rows(run) == _schedule(script)  # every logged step, once, in order
    assert torch.load(run / "checkpoint.pt", weights_only=True)["frames"] == FRAMES
    if script == "redq_spqr":  # a finished run: --resume has nothing to do
        res = _resume(script, tmp_path)
        assert res.returncode == 0 and "already complete" in res.stdout
        assert _rows(run) == _schedule(script)


def _kill_and_resume(script: str, tmp_path: Path, seed: int) -> None:
    run = tmp_path / RUN_NAME[script]
    proc = _start(script, tmp_path)
    _wait_rows(proc, run, 1)
    time.sleep(random.Random(seed).uniform(0.0, 3.0))  # somewhere in training (or in a save)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)  # complete, whatever the instant
    assert 0 <= ckpt["frames"] <= FRAMES
    res = _resume(script, tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert _rows(run) == _schedule(script)
    assert not (run / "checkpoint.pt.tmp").exists() and not (run / "metrics.csv.tmp").exists()


@pytest.mark.parametrize(
    ("script", "seed"),
    [
        pytest.param("redq_spqr", 0, marks=pytest.mark.slow),
        pytest.param("redq_spqr", 1, marks=pytest.mark.slow),
        pytest.param("spqr_demo", 2, marks=pytest.mark.slow),
    ],
)
def test_sigkill_keeps_a_readable_checkpoint_and_resume_works(script, seed, tmp_path):
    _kill_and_resume(script, tmp_path, seed)


def test_a_save_cut_short_keeps_the_previous_file(tmp_path):
    mod = _load("redq_spqr")
    path = tmp_path / "checkpoint.pt"
    mod.write_atomic(path, lambda fh: torch.save({"frames": 10}, fh))

    def killed(fh):
        fh.write(b"half a checkpoint")
        raise KeyboardInterrupt  # stands for a kill in the middle of torch.save

    with pytest.raises(KeyboardInterrupt):
        mod.write_atomic(path, killed)
    assert torch.load(path, weights_only=True) == {"frames": 10}
    mod.write_atomic(path, lambda fh: torch.save({"frames": 20}, fh))  # the next save replaces it
    assert torch.load(path, weights_only=True) == {"frames": 20}


def test_resume_after_a_kill_mid_row_and_after_checkpoint(tmp_path):
    """A row cut by a kill and rows logged after the checkpoint are dropped and logged again."""
    mod = _load("redq_spqr")
    csv_path = tmp_path / "metrics.csv"
    header = ",".join(mod.FIELDS) + "\r\n"
    csv_path.write_text(header + "60,20,,\r\n70,40,,\r\n80,60,,\r\n9")
    f, writer = mod.open_metrics(csv_path, resume_frames=70)
    writer.writerow({"frames": 80, "updates": 60})
    f.close()
    assert [r[:2] for r in _rows(tmp_path)] == [(60, 20), (70, 40), (80, 60)]
    assert not os.path.exists(str(csv_path) + ".tmp")


@pytest.mark.parametrize("script", ["redq_spqr", "spqr_demo"])
def test_resume_refuses_an_unreadable_or_foreign_checkpoint(script, tmp_path):
    mod = _load(script)
    args = mod.parse_args([*TINY[script], "--out", str(tmp_path), "--resume"])
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(SystemExit, match="cannot read .*--overwrite"):
        mod.load_checkpoint(path, args)
    torch.save({"actor": {}, "loss": {}}, path)  # an older example's checkpoint
    with pytest.raises(SystemExit, match="lacks .*--overwrite"):
        mod.load_checkpoint(path, args)
    saved = {k: v for k, v in vars(args).items() if k not in ("resume", "overwrite")}
    ckpt = {"format": 1, "frames": 100, "replay_buffer": {}, "args": {**saved, "hidden": 64}}
    torch.save(ckpt, path)
    with pytest.raises(SystemExit, match="--hidden is 16 but the run .* used 64"):
        mod.load_checkpoint(path, args)
    torch.save({**ckpt, "args": saved, "frames": FRAMES + 1}, path)
    with pytest.raises(SystemExit, match=f"--frames {FRAMES} is below the {FRAMES + 1} frames"):
        mod.load_checkpoint(path, args)

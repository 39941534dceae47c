"""A bad config stops every Hydra script with one line on stderr and exit code 2, no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "script,override,field",
    [
        ("sac_ens_spqr/sac_ens_spqr.py", "spqr.beta=abc", "spqr.beta"),
        ("redq_spqr/redq_spqr.py", "collector.total_frames=0", "collector.total_frames"),
    ],
)
def test_bad_config_is_one_line_and_exit_2(tmp_path, script, override, field):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "sota_scripts" / script), override,
         f"hydra.run.dir={tmp_path / 'run'}"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert f"error: ConfigError: {field}=" in proc.stderr
    assert not (tmp_path / "run" / "metrics.csv").exists()


def test_user_errors_are_the_packages_named_errors():
    from torchrl_spqr.training.builders import ConfigError
    from torchrl_spqr.training.cli import run_script, user_errors

    assert ConfigError in user_errors()

    def bad(_cfg):
        raise ConfigError("x.y=1: expected 2")

    with pytest.raises(SystemExit) as exc:
        run_script(bad, None)
    assert exc.value.code == 2

    def bug(_cfg):
        raise ZeroDivisionError("a bug keeps its traceback")

    with pytest.raises(ZeroDivisionError):
        run_script(bug, None)


def test_ctrl_c_exits_130_with_the_resume_line(capsys, tmp_path):
    from torchrl_spqr.training.cli import run_script

    def interrupted(_cfg, _run_dir):
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as exc:
        run_script(interrupted, None, tmp_path / "run")
    err = capsys.readouterr().err
    assert exc.value.code == 130
    assert f"resume=true hydra.run.dir={tmp_path / 'run'}" in err and "Traceback" not in err

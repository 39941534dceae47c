"""The learning-benchmark commands in ``benchmarks/learning/*.sh`` stay valid.

Each script is run by bash with ``python`` replaced by a recorder on ``PATH``, so
every training command it would start is captured (nothing trains). Each captured
``sota_scripts`` command must compose with Hydra (an unknown or misspelled key
fails), each ``examples/spqr_demo.py`` command must parse, and the run folders
must differ only in ``beta`` and ``seed`` so that ``torchrl_spqr.analysis`` groups
the arms.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("hydra")
from hydra import compose, initialize_config_dir  # noqa: E402

from torchrl_spqr import analysis  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
LEARNING = ROOT / "benchmarks" / "learning"

OUT = "<out>"  # stands for a temporary output folder in the script's arguments
# (script, positional arguments, extra environment)
CASES = [
    ("run_hopper_sac_ens.sh", ["1", OUT], {}),
    ("run_hopper_sac_ens.sh", ["2", OUT], {"ENV": "Walker2d-v5"}),
    ("run_redq.sh", ["2", OUT], {}),
    ("run_redq.sh", ["1", OUT], {"ENV": "walker2d"}),
    ("run_offline_compare.sh", ["local_hopper_random", "1"], {}),
    ("run_offline_compare.sh", ["local_hopper_medium_replay", "0", "500", OUT], {}),
    ("run_offline_hopper.sh", ["1", "600", OUT], {}),
    ("masac_balance/run.sh", ["1", OUT], {}),
]

RECORDER = """#!/usr/bin/env bash
# records its arguments, one per line, in a file of its own (the scripts start their
# arms concurrently: a shared file would interleave them), and does nothing
printf '%s\\n' "$@" > "$(mktemp "$RECORD/call.XXXXXXXX")"
"""


def _captured(tmp_path: Path, script: str, args: list[str], env: dict[str, str]):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "python"
    shim.write_text(RECORDER)
    shim.chmod(0o755)
    record = tmp_path / "calls"
    record.mkdir()
    run_env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "RECORD": str(record),
        "MINARI_DATASETS_PATH": str(tmp_path / "minari"),
        **env,
    }
    argv = [str(tmp_path / "out") if a == OUT else a for a in args]
    res = subprocess.run(
        ["bash", str(LEARNING / script), *argv],
        cwd=ROOT,
        env=run_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    calls = [f.read_text().rstrip("\n").split("\n") for f in sorted(record.iterdir())]
    return [c for c in calls if c and c[0] not in ("-m",)]  # dataset tool calls: not training


def _compose(script_path: str, overrides: list[str]):
    folder = ROOT / Path(script_path).parent
    with initialize_config_dir(config_dir=str(folder), version_base="1.3"):
        return compose(config_name="config", overrides=overrides, return_hydra_config=True)


def _demo_args(argv: list[str]):
    spec = importlib.util.spec_from_file_location("spqr_demo", ROOT / "examples/spqr_demo.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    old = sys.argv
    try:
        sys.argv = ["spqr_demo.py", *argv]
        return mod.parse_args()
    finally:
        sys.argv = old


@pytest.mark.parametrize(("script", "args", "env"), CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_learning_script_commands_are_valid(tmp_path, script, args, env):
    calls = _captured(tmp_path, script, args, env)
    assert len(calls) >= 2, calls  # at least the two arms
    run_dirs, betas = [], set()
    for call in calls:
        path, argv = call[0], call[1:]
        if path.startswith("sota_scripts/"):
            cfg = _compose(path, argv)  # raises on an unknown key or a missing config group
            run_dir = cfg.hydra.run.dir
            betas.add(float(cfg.spqr.beta))
            seed = int(cfg.seed)
            if "dataset" in cfg and cfg.dataset is not None:
                ds = cfg.dataset.id
                assert ds.startswith("local/hopper/"), ds  # datasets the package builds itself
                if script == "run_offline_compare.sh" and len(args) >= 3:
                    assert int(cfg.optim.num_updates) == int(args[2])
        elif path == "examples/spqr_demo.py":
            ns = _demo_args(argv)
            betas.add(float(ns.beta))
            seed = ns.seed
            assert ns.env == env.get("ENV", "Hopper-v5")
            run_dir = f"{ns.out}/spqr_sac_ens_{ns.env}_N{ns.ensemble}_beta{ns.beta:g}_seed{ns.seed}"
        else:
            pytest.fail(f"{script}: unexpected command {call}")
        assert seed == int(_seed_arg(script, args))
        run_dirs.append(run_dir)
    assert betas == {0.0, 1.0}, betas
    # the arms differ only by beta (and the algorithm), the seed is in the folder name
    assert len(set(run_dirs)) == len(run_dirs)
    for rd in run_dirs:
        assert f"seed{seed}" in Path(rd).name
        assert analysis.group_name(rd) != Path(rd).name


def _seed_arg(script: str, args: list[str]) -> str:
    return args[1] if script == "run_offline_compare.sh" else args[0]

"""``benchmarks/learning/paper_scale.sh`` plans valid runs (``DRY_RUN=1``: nothing trains).

The plan's commands must compose with Hydra (an unknown or misspelled key fails), cover
beta 0 and 1 for every seed with the planned budget, and name their run folders so that
``torchrl_spqr.analysis`` pairs the arms by seed.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("hydra")
from hydra import compose, initialize_config_dir  # noqa: E402

from torchrl_spqr import analysis  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "learning" / "paper_scale.sh"


def _plan(tmp_path: Path, **env: str) -> tuple[str, list[list[str]]]:
    run_env = {**os.environ, "DRY_RUN": "1", "OUT_DIR": str(tmp_path / "out"), **env}
    res = subprocess.run(
        ["bash", str(SCRIPT)],
        cwd=tmp_path,
        env=run_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert not (tmp_path / "out").exists()  # a dry run writes nothing
    cmds = [shlex.split(line[5:]) for line in res.stdout.splitlines() if line.startswith("CMD: ")]
    return res.stdout, cmds


def _compose(argv: list[str]):
    folder = ROOT / Path(argv[0]).parent
    with initialize_config_dir(config_dir=str(folder), version_base="1.3"):
        return compose(config_name="config", overrides=argv[1:], return_hydra_config=True)


@pytest.mark.parametrize(
    ("env", "seeds", "device"),
    [
        ({"DEVICE": "cuda"}, [0, 1, 2, 3], "cuda"),  # the GPU machine's plan
        ({"CPU": "1"}, [0, 1], "cpu"),  # the rehearsal's plan
        ({"DEVICE": "cpu", "TOTAL_FRAMES": "300000", "SEEDS": "5"}, [5], "cpu"),
    ],
)
def test_paper_scale_plan_composes(tmp_path, env, seeds, device):
    out, cmds = _plan(tmp_path, **env)
    assert f"device: {device}" in out
    assert len(cmds) == 2 * len(seeds)
    runs: dict[tuple[float, int], str] = {}
    frames = set()
    for argv in cmds:
        assert argv[0] in ("python", "python3")
        assert argv[1] == "sota_scripts/sac_ens_spqr/sac_ens_spqr.py"
        cfg = _compose(argv[1:])  # raises on an unknown key
        assert cfg.env.name == "Hopper-v5"
        assert cfg.network.ensemble_size == 10 and cfg.optim.utd_ratio == 1
        assert cfg.device == device and cfg.logger.progress is False
        total = int(cfg.collector.total_frames)
        assert 0 < int(cfg.collector.init_random_frames) < total
        assert total % int(cfg.logger.eval_interval) == 0
        assert int(cfg.checkpoint.interval) >= total  # only the checkpoint at the end
        frames.add(total)
        runs[(float(cfg.spqr.beta), int(cfg.seed))] = cfg.hydra.run.dir
    assert len(frames) == 1  # every run has the same budget
    if "TOTAL_FRAMES" in env:
        assert frames == {int(env["TOTAL_FRAMES"])}
    else:
        assert frames.pop() <= (2000 if env.get("CPU") else 300_000)
    assert set(runs) == {(b, s) for b in (0.0, 1.0) for s in seeds}
    # the folders pair up: one arm per beta, seeds in the names, SPQR against its beta0 twin
    groups: dict[str, list[Path]] = {}
    for (_, s), rd in runs.items():
        assert f"seed{s}" in Path(rd).name
        groups.setdefault(analysis.group_name(rd), []).append(Path(rd))
    assert len(groups) == 2
    pairs = analysis.effect_pairs(groups)
    assert len(pairs) == 1 and pairs[0][1] == 1.0


def test_paper_scale_plan_fits_the_budget(tmp_path):
    """A slower assumed rate plans fewer frames; the cap holds at a fast one."""
    _, slow = _plan(tmp_path, DEVICE="cuda", ASSUMED_RATE="100")
    _, fast = _plan(tmp_path, DEVICE="cuda", ASSUMED_RATE="100000")

    def total(cmds):
        return {
            int(a.split("=", 1)[1])
            for c in cmds
            for a in c
            if a.startswith("collector.total_frames=")
        }

    (f_slow,), (f_fast,) = total(slow), total(fast)
    assert 10_000 <= f_slow < f_fast == 300_000

"""TorchRL's own SAC script (examples/torchrl_sac_spqr/) adopting SPQR by its loss alone.

- the adopted script runs end to end (TorchRL's CI overrides, Pendulum-v1): its
  optimisers, ``SoftUpdate(loss_module, ...)``, update and logging work on the wrapper;
- the SPQR penalty is in the ``loss_qvalue`` the script back-propagates (in-process,
  with the script's own ``make_*`` builders);
- the folder's first commit is TorchRL's files (their git blob hashes at pytorch/rl
  6e18e35b2c68) plus a header; the adoption (the next commit) changes only how the
  loss is built, and the files since add only one listed fix of TorchRL's script.
"""

from __future__ import annotations

import ast
import difflib
import hashlib
import importlib.util
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
FOLDER = ROOT / "examples" / "torchrl_sac_spqr"
REL = "examples/torchrl_sac_spqr"

#: git blob hashes of TorchRL's sota-implementations/sac files at pytorch/rl
#: 6e18e35b2c68be1a56afebfb0676d217925114cd (``git rev-parse <commit>:<path>``).
TORCHRL_BLOBS = {
    "sac.py": "7e25324c8a030de0c7e6ece83061c7985d5bae9c",
    "utils.py": "0fb2702d46c5dec1ef8eee5ceb9e2bb49d785dbc",
    "config.yaml": "9389b53fc56b0a3c1d8c6226521896b0db50cae6",
}
HEADER_START = "# torchrl_spqr: this file is TorchRL's"
HEADER_END = "# (end of the torchrl_spqr header)"
#: the functions of utils.py the adoption may change (plus the import block)
LOSS_BUILDERS = ("make_sac_agent", "make_loss_module")
#: and the one fix that is not SPQR's (TorchRL's script fails the same way without SPQR):
#: log_metrics logs the mean of the per-episode returns, which the csv logger cannot take
FIXES = ("log_metrics",)

# TorchRL's CI overrides for this script (.github/unittest/linux_sota/scripts/test_sota.py),
# with one environment (no worker processes) and the csv logger (so the logging runs too).
CI_OVERRIDES = [
    "collector.total_frames=48",
    "collector.init_random_frames=10",
    "collector.frames_per_batch=16",
    "collector.env_per_collector=1",
    "optim.batch_size=10",
    "optim.utd_ratio=1",
    "replay_buffer.size=120",
    "env.name=Pendulum-v1",
    "logger.backend=csv",
]


def _strip_header(text: str) -> str:
    lines = text.splitlines(keepends=True)
    start = next(i for i, line in enumerate(lines) if line.startswith(HEADER_START))
    end = next(i for i, line in enumerate(lines) if line.rstrip("\n") == HEADER_END)
    if start > 0 and lines[start - 1] == "#\n":  # .py files: the header follows a "#" line
        start -= 1
    return "".join(lines[:start] + lines[end + 1 :])


def _git_blob(text: str) -> str:
    data = text.encode()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _git(*args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout


def _history(name: str) -> list[str]:
    """The commits that touched the file, oldest first (the first is TorchRL's copy)."""
    if shutil.which("git") is None:
        pytest.skip("git is not available")
    try:
        if _git("rev-parse", "--is-shallow-repository").strip() == "true":
            pytest.skip("a shallow clone: the example folder's first commit is missing")
        commits = _git("log", "--format=%H", "--", f"{REL}/{name}").split()[::-1]
        added = _git("log", "--diff-filter=A", "--format=%H", "--", f"{REL}/{name}").split()
    except subprocess.CalledProcessError as err:  # not a checkout
        pytest.skip(f"git history unavailable: {err.stderr.strip()}")
    if not added or commits[0] != added[-1]:
        pytest.skip("the example folder's git history is incomplete")
    return commits


def _at(commit: str, name: str) -> str:
    return _git("show", f"{commit}:{REL}/{name}")


def _pristine(name: str) -> str:
    """The file as the folder's first commit (TorchRL's copy) holds it."""
    return _at(_history(name)[0], name)


def _assert_utils_changed_only_in(old: str, new: str, functions: tuple[str, ...]) -> None:
    """``new`` differs from ``old`` only in the import block and in ``functions``."""
    old_lines, new_lines = old.splitlines(), new.splitlines()
    tree = ast.parse(old)
    first_def = min(n.lineno for n in tree.body if isinstance(n, ast.FunctionDef))
    spans = [
        (n.lineno, n.end_lineno)
        for n in tree.body
        if isinstance(n, ast.FunctionDef) and n.name in functions
    ]
    assert len(spans) == len(functions)
    changed = 0
    opcodes = difflib.SequenceMatcher(None, old_lines, new_lines, autojunk=False).get_opcodes()
    for tag, i1, i2, _j1, _j2 in opcodes:
        if tag == "equal":
            continue
        changed += 1
        first, last = i1 + 1, max(i1 + 1, i2)  # 1-based old lines (insertions: the next one)
        inside = first < first_def or any(a < first and last <= b for a, b in spans)
        assert inside, f"utils.py changed outside {functions} at old lines {first}-{last}"
    assert changed > 0


def _load_utils():
    spec = importlib.util.spec_from_file_location("torchrl_sac_spqr_utils", FOLDER / "utils.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cfg(*overrides: str):
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(FOLDER / "config.yaml")
    return OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(CI_OVERRIDES) + list(overrides)))


# ---------------------------------------------------------------------------
# The adoption is only the loss (and one listed fix of TorchRL's script)


@pytest.mark.parametrize("name", sorted(TORCHRL_BLOBS))
def test_first_commit_is_torchrl_files(name):
    assert _git_blob(_strip_header(_pristine(name))) == TORCHRL_BLOBS[name]


def test_adoption_changes_only_the_loss():
    # sac.py: TorchRL's training script, untouched
    assert (FOLDER / "sac.py").read_text() == _pristine("sac.py")

    # config.yaml: only the spqr: group appended
    from omegaconf import OmegaConf

    old, new = _pristine("config.yaml"), (FOLDER / "config.yaml").read_text()
    assert new.startswith(old)
    added = OmegaConf.create(new[len(old) :])
    assert set(added) == {"spqr"}
    assert set(added.spqr) == {"num_qvalue_nets", "beta", "pairs"}

    # utils.py: the adoption commit (the folder's second) changes only the imports and
    # the two loss-building functions; today's file adds only the listed fix
    commits = _history("utils.py")
    assert len(commits) >= 2
    pristine, adoption = _at(commits[0], "utils.py"), _at(commits[1], "utils.py")
    _assert_utils_changed_only_in(pristine, adoption, LOSS_BUILDERS)
    assert _at(commits[1], "sac.py") == _pristine("sac.py")
    current = (FOLDER / "utils.py").read_text()
    _assert_utils_changed_only_in(pristine, current, LOSS_BUILDERS + FIXES)


# ---------------------------------------------------------------------------
# The regulariser is in loss_qvalue, and TorchRL's optimiser / target updater work


def test_penalty_is_in_loss_qvalue_the_script_backpropagates():
    from torchrl_spqr import SPQRLoss

    utils = _load_utils()
    torch.manual_seed(0)
    cfg = _cfg("spqr.num_qvalue_nets=4", "network.hidden_sizes=[32,32]")
    train_env, eval_env = utils.make_environment(cfg)
    try:
        model, _ = utils.make_sac_agent(cfg, train_env, eval_env, torch.device("cpu"))
        batch = train_env.rollout(24).reshape(-1)
    finally:
        for env in (train_env, eval_env):  # as sac.py closes them
            if not env.is_closed:
                env.close()
    assert len(model) == 1 + 4  # the actor and 4 independently initialised critics
    biases = torch.stack([model[k].module[-1].bias.detach() for k in range(1, 5)])
    assert biases.unique().numel() == 4

    loss, updater = utils.make_loss_module(cfg, model)
    cfg0 = _cfg("spqr.num_qvalue_nets=4", "network.hidden_sizes=[32,32]", "spqr.beta=0")
    loss0, _ = utils.make_loss_module(cfg0, model)  # same model: same parameters
    assert isinstance(loss, SPQRLoss) and loss.num_qvalue_nets == 4

    torch.manual_seed(1)
    out = loss(batch)
    torch.manual_seed(1)
    out0 = loss0(batch)
    assert "loss_spqr" not in out.keys()  # add_to="loss_qvalue": the penalty is inside
    kl = out["spqr_kl"].item()
    assert kl > 0 and math.isfinite(kl)
    torch.testing.assert_close(
        out["loss_qvalue"] - out0["loss_qvalue"], cfg.spqr.beta * out["spqr_kl"]
    )
    torch.testing.assert_close(out["loss_actor"], out0["loss_actor"])

    # TorchRL's make_sac_optimizer and update step: the critic gradients carry the penalty
    optimizer_actor, optimizer_critic, optimizer_alpha = utils.make_sac_optimizer(cfg, loss)
    critic_params = optimizer_critic.param_groups[0]["params"]
    assert sum(p.numel() for p in critic_params) == sum(
        p.numel() for p in loss.qvalue_network_params.values(True, True)
    )
    assert optimizer_alpha.param_groups[0]["params"][0] is loss.log_alpha

    (out["loss_actor"] + out["loss_qvalue"] + out["loss_alpha"]).sum().backward()
    grads = [p.grad.clone() for p in critic_params]
    for p in critic_params:
        p.grad = None
    (out0["loss_actor"] + out0["loss_qvalue"] + out0["loss_alpha"]).sum().backward()
    grads0 = [p.grad.clone() for p in loss0.qvalue_network_params.values(True, True)]
    assert any(not torch.allclose(g, g0) for g, g0 in zip(grads, grads0, strict=True))

    # SoftUpdate(loss_module, ...) moves the wrapped loss's target critics
    target = loss.target_qvalue_network_params.clone()
    for p, g in zip(critic_params, grads, strict=True):
        p.grad = g
    optimizer_critic.step()
    updater.step()
    after = loss.target_qvalue_network_params.values(True, True)
    assert any(not torch.equal(a, b) for a, b in zip(after, target.values(True, True), strict=True))


# ---------------------------------------------------------------------------
# The script itself, in a subprocess


def test_adopted_script_runs(tmp_path):
    run_dir = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", RL_WARNINGS="False")
    env.pop("WANDB_MODE", None)
    proc = subprocess.run(
        [sys.executable, str(FOLDER / "sac.py"), *CI_OVERRIDES, f"hydra.run.dir={run_dir}"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # its own logging ran on the wrapper's output (loss_td["loss_qvalue"], ["alpha"], ...)
    (scalars,) = list((run_dir / "sac_logging").glob("*/scalars"))
    for name in ("q_loss", "actor_loss", "alpha_loss", "alpha", "entropy"):
        rows = (scalars / "train" / f"{name}.csv").read_text().split()
        assert len(rows) == 3, (name, rows)  # one per collected batch
        assert all(math.isfinite(float(row.split(",")[-1])) for row in rows)

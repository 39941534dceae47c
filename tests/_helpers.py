"""Small builders shared by the tests (Hopper-like sizes scaled down)."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType

import torch
from tensordict import TensorDict
from tensordict.nn import NormalParamExtractor, TensorDictModule
from torch import nn
from torchrl.data import Bounded
from torchrl.modules import ProbabilisticActor, TanhNormal

from torchrl_spqr import QEnsemble, make_q_member

N_OBS, N_ACT = 5, 2


def make_actor(hidden: int = 16) -> ProbabilisticActor:
    net = nn.Sequential(
        nn.Linear(N_OBS, hidden), nn.ReLU(), nn.Linear(hidden, 2 * N_ACT), NormalParamExtractor()
    )
    return ProbabilisticActor(
        TensorDictModule(net, in_keys=["observation"], out_keys=["loc", "scale"]),
        in_keys=["loc", "scale"],
        distribution_class=TanhNormal,
        spec=Bounded(-1.0, 1.0, (N_ACT,)),
        return_log_prob=True,
    )


def make_det_actor(hidden: int = 16) -> TensorDictModule:
    net = nn.Sequential(nn.Linear(N_OBS, hidden), nn.ReLU(), nn.Linear(hidden, N_ACT), nn.Tanh())
    return TensorDictModule(net, in_keys=["observation"], out_keys=["action"])


def make_ensemble(n: int, hidden: int = 16, **kw) -> QEnsemble:
    return QEnsemble(lambda: make_q_member(N_OBS + N_ACT, num_cells=(hidden, hidden), **kw), n)


def make_batch(b: int = 8, seed: int = 0) -> TensorDict:
    g = torch.Generator().manual_seed(seed)
    return TensorDict(
        {
            "observation": torch.randn(b, N_OBS, generator=g),
            "action": torch.rand(b, N_ACT, generator=g) * 2 - 1,
            "next": {
                "observation": torch.randn(b, N_OBS, generator=g),
                "reward": torch.randn(b, 1, generator=g),
                "done": torch.zeros(b, 1, dtype=torch.bool),
                "terminated": torch.zeros(b, 1, dtype=torch.bool),
            },
        },
        [b],
    )


def wigner_members(d: int, batch: int, theta: float, seed: int) -> torch.Tensor:
    """Upper triangles of (G + G^T)/sqrt(2) + theta sqrt(d) v v^T as [T, batch] member values."""
    g = torch.Generator().manual_seed(seed)
    gmat = torch.randn(batch, d, d, generator=g, dtype=torch.float64)
    w = (gmat + gmat.transpose(-1, -2)) / math.sqrt(2)
    v = torch.randn(batch, d, 1, generator=g, dtype=torch.float64)
    v = v / v.norm(dim=1, keepdim=True)
    w = w + theta * math.sqrt(d) * (v @ v.transpose(-1, -2))
    rows, cols = torch.triu_indices(d, d)
    return w[:, rows, cols].T.contiguous()


SCRIPTS_DIR = Path(__file__).resolve().parents[1] / "sota_scripts"


def package_modules() -> dict[str, Path]:
    """Every module of ``torchrl_spqr`` by dotted name (a package by its ``__init__.py``)."""
    root = SCRIPTS_DIR.parent
    out = {}
    for path in (root / "torchrl_spqr").rglob("*.py"):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def load_script(name: str) -> ModuleType:
    """Import ``sota_scripts/<name>/<name>.py`` (with its own ``utils.py``) as a module.

    Every script folder has a ``utils.py``: the script's ``utils`` is imported under the
    unique name ``<name>_utils`` and the bare name ``utils`` is taken out of
    ``sys.modules`` again, so scripts loaded one after the other each get their own. A
    module is imported once per name (the same object on later calls, as ``import``).
    """
    key = f"sota_{name}"
    if key in sys.modules:
        return sys.modules[key]
    folder = SCRIPTS_DIR / name
    saved = sys.modules.pop("utils", None)
    sys.path.insert(0, str(folder))
    try:
        spec = importlib.util.spec_from_file_location(key, folder / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[key]
            raise
        if "utils" in sys.modules:
            sys.modules[f"{name}_utils"] = sys.modules.pop("utils")
    finally:
        sys.path.remove(str(folder))
        if saved is not None:
            sys.modules["utils"] = saved
    return module


def signal_on_call(fn, n: int, signum: int, calls: dict[str, int]):
    """``fn`` wrapped so that its ``n``-th call first sends ``signum`` to this process (its
    Python handler runs at once, inside that call); ``calls["n"]`` counts the calls."""
    import os

    def wrapped(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            os.kill(os.getpid(), signum)
        return fn(*args, **kwargs)

    return wrapped

"""The losses under CUDA graph capture, checked on CPU as far as CPU allows.

While a CUDA graph is being captured, reading a device value on the host
(``float(t)``, ``int(t)``, ``bool(t)``, ``t.item()``, ``t.tolist()``) or copying
a host value to the device (``torch.tensor(x, device=...)``) is an error. The
losses branch on counters (SPQR's step and beta, REDQ's policy delay, CQL's
behaviour-cloning steps) and check their inputs; under capture
(``torchrl_spqr.functional.cuda_graph_capturing``) they read host copies of
the counters and skip the data-dependent checks. Here the capture is
simulated (the predicate patched to True after eager warm-up calls, as
tensordict's ``CudaGraphModule`` warms up before capturing) and every such
host read made from the package's code is recorded by a ``TorchFunctionMode``.
"""

from __future__ import annotations

import copy
import os
import traceback

import pytest
import torch
from _helpers import N_ACT, make_actor, make_batch, make_ensemble
from tensordict import TensorDict
from torch import nn
from torch.overrides import TorchFunctionMode
from torchrl.data import Bounded

import torchrl_spqr
from torchrl_spqr import (
    CQLNLoss,
    QEnsemble,
    ReferenceREDQLoss,
    SACNLoss,
    SPQRLoss,
)
from torchrl_spqr import functional as F
from torchrl_spqr.objectives.utils import host_count, host_read

PKG = os.path.dirname(torchrl_spqr.__file__)
HOST_READS = {"item", "__bool__", "__int__", "__float__", "tolist", "__index__"}
B = 32
SPEC = Bounded(-1.0, 1.0, (N_ACT,))


class HostSyncRecorder(TorchFunctionMode):
    """Records host reads of tensors (and host-to-device tensor creation) made directly by
    the package's code: what a CUDA graph capture refuses."""

    def __init__(self) -> None:
        super().__init__()
        self.sites: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        creates = name in ("tensor", "as_tensor") and kwargs.get("device") is not None
        if name in HOST_READS or creates:
            caller = traceback.extract_stack()[-2]
            if caller.filename.startswith(PKG):
                where = caller.filename[len(PKG) :]
                self.sites.append(f"{name} at {where}:{caller.lineno}: {caller.line}")
        return func(*args, **kwargs)


def critics() -> QEnsemble:
    return make_ensemble(5)


def data(seed: int) -> TensorDict:
    return make_batch(B, seed=seed)


LOSSES = {
    "sacn-beta1-data-diagnostics": lambda: SPQRLoss(
        SACNLoss(make_actor(), critics()), beta=1.0, pairs="data", diagnostics_interval=1
    ),
    "sacn-beta0-next_policy-diagnostics": lambda: SPQRLoss(
        SACNLoss(make_actor(), critics()), beta=0.0, pairs="next_policy", diagnostics_interval=1
    ),
    "sacn-beta-schedule": lambda: SPQRLoss(
        SACNLoss(make_actor(), critics()),
        beta=lambda step: min(1.0, step / 10),
        diagnostics_interval=0,
    ),
    "redq-policy-delay": lambda: SPQRLoss(
        ReferenceREDQLoss(make_actor(), critics(), action_spec=SPEC, policy_update_delay=2),
        beta=1.0,
        diagnostics_interval=0,
    ),
    "cqln-bc-steps": lambda: SPQRLoss(
        CQLNLoss(make_actor(), critics(), action_spec=SPEC, bc_steps=2),
        beta=1.0,
        diagnostics_interval=0,
    ),
}


def _update(loss, opt, batch):
    out = loss(batch)
    sum(v for k, v in out.items() if k.startswith("loss_")).backward()
    opt.step()
    opt.zero_grad()
    return out


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_captured_update_reads_no_device_value_and_equals_eager(name, monkeypatch):
    """After eager warm-up updates, a 'captured' update makes no host read of a tensor from
    the package's code, and computes what the same update run eagerly computes (the
    schedules at the state they reached: host copies kept in step with the buffers)."""
    torch.manual_seed(0)
    loss = LOSSES[name]()
    opt = torch.optim.Adam(loss.parameters())
    for i in range(3):  # warm-up (at step 2 CQL-N leaves behaviour cloning, REDQ's actor is due)
        _update(loss, opt, data(i))
    twin = copy.deepcopy(loss)
    twin_opt = torch.optim.Adam(twin.parameters())
    twin_opt.load_state_dict(opt.state_dict())

    recorder = HostSyncRecorder()
    monkeypatch.setattr(F, "cuda_graph_capturing", lambda: True)
    torch.manual_seed(1)
    with recorder:
        captured = _update(loss, opt, data(3))
    monkeypatch.setattr(F, "cuda_graph_capturing", lambda: False)
    assert recorder.sites == [], "\n".join(recorder.sites)

    torch.manual_seed(1)
    eager = _update(twin, twin_opt, data(3))
    # the same losses (the actor's min takes the plain path under capture: the same value
    # up to round-off) and the same schedules (REDQ's actor_updated, the counters, beta)
    assert set(captured.keys()) == set(eager.keys())
    for key, value in eager.items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(
                captured.get(key), value, rtol=1e-5, atol=1e-6, equal_nan=True, msg=key
            )
    buffers = dict(loss.named_buffers())
    for key, value in twin.named_buffers():
        assert torch.equal(buffers[key], value), key


def test_eager_updates_do_read_counters_on_the_host():
    """The recorder sees the host reads the eager path makes (it is not blind)."""
    loss = LOSSES["redq-policy-delay"]()
    recorder = HostSyncRecorder()
    with recorder:
        loss(data(0))
    assert any("objectives/utils.py" in site for site in recorder.sites), recorder.sites
    assert any("finite" in site for site in recorder.sites), recorder.sites  # the NaN check


def test_host_read_counts_and_refuses_a_capture_before_any_eager_read(monkeypatch):
    m = nn.Module()
    m.register_buffer("count", torch.tensor(4))
    monkeypatch.setattr(F, "cuda_graph_capturing", lambda: True)
    with pytest.raises(RuntimeError, match=r"Module\.count is read while a CUDA graph"):
        host_read(m, "count")
    monkeypatch.setattr(F, "cuda_graph_capturing", lambda: False)
    assert host_read(m, "count") == 4
    host_count(m, "count", 2)
    assert int(m.count) == 6  # the buffer, on its device
    monkeypatch.setattr(F, "cuda_graph_capturing", lambda: True)
    assert host_read(m, "count") == 6  # and its host copy


def test_capture_predicate_is_false_without_a_capture():
    assert F.cuda_graph_capturing() is False


@pytest.mark.parametrize("pairs", ["data", "next_policy"])
def test_captured_population_update_reads_no_device_value(pairs, monkeypatch):
    """PopulationUpdate (K = 2 agents, beta 0 and 1, vmapped) under a simulated capture."""
    from torchrl_spqr.training.population import PopulationUpdate

    def agent(seed, beta):
        torch.manual_seed(seed)
        return SPQRLoss(
            SACNLoss(make_actor(), critics()), beta=beta, pairs=pairs, diagnostics_interval=0
        )

    pop = PopulationUpdate([agent(0, 0.0), agent(1, 1.0)])
    batch = torch.stack([data(0), data(1)])
    for _ in range(2):
        pop(batch)
    recorder = HostSyncRecorder()
    monkeypatch.setattr(F, "cuda_graph_capturing", lambda: True)
    with recorder:
        out = pop(batch)
    assert recorder.sites == [], "\n".join(recorder.sites)
    assert torch.isfinite(out["loss_qvalue"]).all() and out["loss_spqr"][0] == 0

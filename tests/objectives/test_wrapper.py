"""``LossWrapper`` on its own: a minimal wrapper stands where TorchRL's ``SACLoss`` stood.

``SPQRLoss``'s transparency is tested at length in ``test_spqr_contract.py``; here a
wrapper with no SPQR logic checks that the base class alone gives it.
"""

from __future__ import annotations

import pytest
import torch
from _helpers import N_ACT, N_OBS, make_actor, make_batch
from tensordict import TensorDictBase
from torchrl.objectives import SACLoss, SoftUpdate

from torchrl_spqr import QEnsemble, make_q_member
from torchrl_spqr.objectives.wrapper import LossWrapper

N = 3


class ScaledCritic(LossWrapper):
    """Multiplies the wrapped loss's ``loss_qvalue`` by its ``scale`` buffer."""

    def __init__(self, loss_module, scale: float = 2.0) -> None:
        super().__init__()
        self._wrap(loss_module)
        self.register_buffer("scale", torch.tensor(scale))
        self.rebuilt = 0

    def _make_vmap(self) -> None:
        self.rebuilt += 1

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        out = self.loss_module(tensordict)
        out.set("loss_qvalue", out.get("loss_qvalue") * self.scale)
        return out


def _sac(seed: int = 0) -> SACLoss:
    torch.manual_seed(seed)
    ens = QEnsemble(lambda: make_q_member(N_OBS + N_ACT, num_cells=(16,)), N)
    return SACLoss(make_actor(), ens.members(), num_qvalue_nets=N)


def test_attributes_keys_and_estimator_are_the_wrapped_losses():
    base = _sac()
    loss = ScaledCritic(base)
    assert loss.wrapped
    assert loss.qvalue_network_params is base.qvalue_network_params
    assert loss.num_qvalue_nets == N
    assert loss.tensor_keys is base.tensor_keys
    loss.set_keys(action="act")
    assert base.tensor_keys.action == "act"
    loss.make_value_estimator(gamma=0.9)
    assert loss.value_estimator is base.value_estimator
    assert float(base.value_estimator.gamma) == pytest.approx(0.9)
    before = loss.rebuilt
    loss.set_vmap_randomness("same")
    assert base.vmap_randomness == "same" and loss.vmap_randomness == "same"
    assert loss.rebuilt == before + 1


def test_soft_update_reaches_the_wrapped_targets():
    base = _sac()
    loss = ScaledCritic(base)
    updater = SoftUpdate(loss, tau=0.5)
    # one registry of target updaters: the wrapped loss knows it has one (no warning)
    assert base._has_update_associated["qvalue_network"]
    with torch.no_grad():
        for leaf in base.qvalue_network_params.values(True, True):
            leaf.add_(1.0)
    target = base.target_qvalue_network_params
    before = target.clone()
    updater.step()
    online = base.qvalue_network_params
    for key, leaf in target.items(True, True):
        torch.testing.assert_close(leaf, 0.5 * before.get(key) + 0.5 * online.get(key).data)


def test_bare_state_dict_loads_and_own_buffers_stay():
    trained = _sac(seed=1)
    trained(make_batch(8))
    loss = ScaledCritic(_sac(seed=2), scale=3.0)
    loss.load_state_dict(trained.state_dict())
    for key, leaf in trained.qvalue_network_params.items(True, True):
        torch.testing.assert_close(loss.qvalue_network_params.get(key), leaf)
    assert float(loss.scale) == 3.0  # not in the bare state: kept
    assert loss._own_state_names() == {"scale"}
    full = loss.state_dict()
    assert "scale" in full and any(k.startswith("loss_module.") for k in full)
    other = ScaledCritic(_sac(seed=3), scale=1.0)
    other.load_state_dict(full)
    assert float(other.scale) == 3.0
    out = loss(make_batch(8))
    ref = trained(make_batch(8))
    assert set(out.keys()) == set(ref.keys())


def test_standalone_wrapper_has_no_value_estimator():
    loss = ScaledCritic(_sac())
    loss.loss_module = None
    assert not loss.wrapped
    assert loss.value_estimator is None
    with pytest.raises(AttributeError, match="standalone ScaledCritic has no value estimator"):
        loss.value_estimator = object()

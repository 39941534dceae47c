"""``EnsembleSACLoss`` / ``EnsembleREDQLoss`` / ``EnsembleTD3Loss`` are TorchRL's losses.

They must give exactly TorchRL's values and gradients, with and without a
member-values request (``fuse=False``), and serve the right tensors: these tests
pin the installed TorchRL's call pattern that the subclasses listen to.
"""

from __future__ import annotations

import pytest
import torch
from _helpers import N_ACT, make_actor, make_batch, make_det_actor, make_ensemble
from tensordict import TensorDict
from torchrl.data import Bounded
from torchrl.objectives import REDQLoss, SACLoss, TD3Loss

from torchrl_spqr.objectives import EnsembleREDQLoss, EnsembleSACLoss, EnsembleTD3Loss

pytestmark = pytest.mark.filterwarnings("ignore:No target network updater:UserWarning")

N, B, H = 5, 6, 8
PAIRS = {"sac": (SACLoss, EnsembleSACLoss), "redq": (REDQLoss, EnsembleREDQLoss),
         "td3": (TD3Loss, EnsembleTD3Loss)}  # fmt: skip


def build(name: str, ours: bool, **kw):
    torch.manual_seed(0)
    ens = make_ensemble(N, H)
    cls = PAIRS[name][int(ours)]
    if name == "td3":
        return cls(make_det_actor(H), ens.members(), num_qvalue_nets=N,
                   action_spec=Bounded(-1.0, 1.0, (N_ACT,)), **kw)  # fmt: skip
    return cls(make_actor(H), ens.members(), num_qvalue_nets=N, **kw)


def run(loss, request=None, seed=0):
    torch.manual_seed(seed)
    batch = make_batch(B, seed=seed)
    if request is None:
        out, req = loss(batch), None
    else:
        with loss.request_member_values(request[0], fuse=request[1]) as req:
            out = loss(batch)
    loss.zero_grad()
    sum(v for k, v in out.items() if k.startswith("loss_")).backward()
    grads = {k: v.grad.clone() for k, v in loss.named_parameters() if v.grad is not None}
    return out, grads, req, batch


@pytest.mark.parametrize("name", PAIRS)
@pytest.mark.parametrize("kw", [{}, {"delay_qvalue": False}])
def test_same_values_and_gradients_as_torchrl(name, kw):
    if name == "td3" and kw:
        kw = {"delay_actor": False, "delay_qvalue": False}
    ref_out, ref_grads, _, _ = run(build(name, False, **kw))
    for request in (None, ("data", False)) + ((("next_policy", False),) if name != "td3" else ()):
        out, grads, req, _ = run(build(name, True, **kw), request)
        for key in ref_out.keys(True, True):
            assert torch.equal(ref_out.get(key), out.get(key)), (request, key)
        assert ref_grads.keys() == grads.keys()
        for key, g in ref_grads.items():
            assert torch.equal(g, grads[key]), (request, key)
        if request is not None:
            assert req.source is not None


def _explicit(loss, td: TensorDict) -> torch.Tensor:
    """Online member values at ``td`` through one member at a time (no vmap)."""
    outs = []
    for i in range(N):
        with loss.qvalue_network_params[i].to_module(loss.qvalue_network):
            outs.append(loss.qvalue_network(td.select("observation", "action").copy())
                        ["state_action_value"])  # fmt: skip
    return torch.stack(outs)


@pytest.mark.parametrize("name", PAIRS)
@pytest.mark.parametrize("delay", [True, False])
def test_data_request_serves_the_online_prediction(name, delay):
    kw = {"delay_qvalue": delay} if name != "td3" else {"delay_qvalue": delay}
    loss = build(name, True, **kw)
    _, _, req, batch = run(loss, ("data", True))
    assert req.source == "reused" and req.q.requires_grad
    torch.testing.assert_close(req.q.reshape(N, B), _explicit(loss, batch).reshape(N, B))


@pytest.mark.parametrize("name", ("sac", "redq"))
def test_next_policy_request_serves_the_targets_sample(name):
    loss = build(name, True)
    _, _, req, batch = run(loss, ("next_policy", False))
    assert req.source == "reused_sample"
    nxt = req.next_input
    torch.testing.assert_close(nxt["observation"], batch["next", "observation"])
    assert not nxt["action"].requires_grad
    # fused: the same pairs evaluated in the critic loss's call
    loss2 = build(name, True)
    _, _, req2, _ = run(loss2, ("next_policy", True))
    if name == "sac":
        assert req2.source == "fused"
        torch.testing.assert_close(req2.q.reshape(N, B), _explicit(loss2, nxt).reshape(N, B))
    else:  # REDQ hands the input over: fusing would copy all 2N+M parameter sets
        assert req2.source == "reused_sample"


def test_td3_does_not_serve_next_policy():
    loss = build("td3", True)
    with pytest.raises(ValueError, match="next_policy"), loss.request_member_values("next_policy"):
        pass
    assert build("sac", True).member_value_pairs == ("data", "next_policy")


def test_sac_skip_done_states_leaves_next_pairs_to_the_caller():
    loss = build("sac", True, skip_done_states=True)
    torch.manual_seed(0)
    batch = make_batch(B)
    batch["next", "done"][0] = True
    with loss.request_member_values("next_policy", fuse=True) as req:
        loss(batch)
    assert req.q is None and req.next_input is None


@pytest.mark.parametrize("name", PAIRS)
def test_set_vmap_randomness_keeps_serving(name):
    loss = build(name, True)
    loss.set_vmap_randomness("different")
    _, _, req, _ = run(loss, ("data", True))
    assert req.source == "reused"


@pytest.mark.parametrize("name", PAIRS)
def test_outside_a_request_nothing_is_kept(name):
    loss = build(name, True)
    run(loss)
    assert loss.member_values_request is None
    assert loss.__dict__.get("_member_scope_") is None

"""The package's ensemble losses on TorchRL's full ``LossModule`` contract.

Reduction through ``_reduce_loss`` (priority weights, loss masks), the
value-estimator registry (TD(0) by default, TD(1), TD(lambda)),
``deactivate_vmap``, ``set_vmap_randomness``, ``@dispatch`` keyword calls,
per-member ``reset_parameters_recursive``, and the ``REDQLoss`` ->
``ReferenceREDQLoss`` rename.
"""

from __future__ import annotations

import importlib
import warnings

import pytest
import torch
from _helpers import N_ACT, N_OBS, make_actor, make_batch, make_ensemble
from tensordict import TensorDict
from torchrl.objectives.utils import ValueEstimators

from torchrl_spqr import make_q_member
from torchrl_spqr.objectives import CQLNLoss, EDACLoss, ReferenceREDQLoss, SACNLoss

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

B = 8
CLASSES = [SACNLoss, ReferenceREDQLoss, CQLNLoss, EDACLoss]
#: REDQ updates its actor at every call here, so every loss entry is per element
KW = {ReferenceREDQLoss: {"policy_update_delay": 1}}


def _make(cls, n=4, seed=0, **kw):
    torch.manual_seed(seed)
    loss = cls(make_actor(), make_ensemble(n), **{**KW.get(cls, {}), **kw})
    with torch.no_grad():  # targets differ from the online critics, as after training
        for p in loss.target_qvalue_network_params.values(True, True):
            p.add_(0.05 * torch.randn_like(p))
    return loss


def _pair(cls, **kw):
    """Two losses with the same parameters (the second built with ``kw``)."""
    a = _make(cls)
    b = _make(cls, **kw)
    b.load_state_dict(a.state_dict())
    return a, b


def _batch(b=B, seed=0):
    data = make_batch(b, seed=seed)
    data["next", "terminated"][::3] = True
    data["next", "done"][::2] = True
    data["next", "done"] |= data["next", "terminated"]
    return data


def _run(loss, data, seed=1):
    torch.manual_seed(seed)
    return loss(data.clone())


def _loss_keys(out):
    return [k for k in out.keys() if k.startswith("loss_")]


# ------------------------------------------------------------ value estimator
@pytest.mark.parametrize("cls", CLASSES)
def test_td0_target_equals_the_hand_written_one(cls):
    """TorchRL's TD(0) with ``terminated`` is ``r + gamma (1 - terminated) V'``, bit for bit."""
    loss = _make(cls, gamma=0.97)
    assert loss.value_type == ValueEstimators.TD0 or loss.value_type is None
    data = _batch()
    v = torch.randn(B)
    r = data["next", "reward"].squeeze(-1)
    term = data["next", "terminated"].squeeze(-1).clone()
    hand = r + loss.gamma * (~term.bool()).to(r.dtype) * v
    before = set(data.keys(True, True))
    assert torch.equal(loss._td_target(data, v), hand)
    assert set(data.keys(True, True)) == before  # the input batch is not modified
    assert loss.value_type == ValueEstimators.TD0
    # truncation bootstraps, termination does not
    data["next", "terminated"][:] = False
    data["next", "done"][:] = True
    assert torch.equal(loss._td_target(data, v), r + loss.gamma * v)
    # ``done`` is optional; non-bool flags are read as bools
    del data["next", "done"]
    data["next", "terminated"] = term.unsqueeze(-1).float()
    assert torch.equal(loss._td_target(data, v), hand)
    # rewards without a trailing singleton dim
    flat = TensorDict({"next": {"reward": r, "terminated": term, "done": term}}, [B])
    assert torch.equal(loss._td_target(flat, v), hand)


@pytest.mark.parametrize("cls", CLASSES)
def test_gamma_constructor_schedule_and_make_value_estimator(cls):
    loss = _make(cls, gamma=0.9)
    data = _batch()
    v = torch.randn(B)
    r = data["next", "reward"].squeeze(-1)
    alive = (~data["next", "terminated"].squeeze(-1)).float()
    torch.testing.assert_close(loss._td_target(data, v), r + 0.9 * alive * v)
    loss.gamma = 0.5  # schedulable buffer, in place
    torch.testing.assert_close(loss._td_target(data, v), r + 0.5 * alive * v)
    loss.make_value_estimator(gamma=0.8)
    assert float(loss.gamma) == pytest.approx(0.8)
    torch.testing.assert_close(loss._td_target(data, v), r + 0.8 * alive * v)
    with pytest.raises(ValueError, match="gamma"):
        loss.make_value_estimator(gamma=1.5)
    with pytest.raises(NotImplementedError, match="GAE"):
        loss.make_value_estimator(ValueEstimators.GAE)


@pytest.mark.parametrize("cls", CLASSES)
def test_td_lambda_and_td1(cls):
    """TD(lambda) and TD(1) run on [B, T] slices; TD(lambda=0) is TD(0)."""
    loss = _make(cls)
    data = make_batch(4 * 5, seed=3).reshape(4, 5)
    data["next", "done"][:, -1] = True  # slice ends: truncation
    data["next", "terminated"][1, 2] = True
    data["next", "done"][1, 2] = True
    v = torch.randn(4, 5)
    td0 = loss._td_target(data, v)
    # (vectorized=False: the vectorised kernel of TorchRL 0.14 fails at lmbda=0 exactly)
    loss.make_value_estimator(ValueEstimators.TDLambda, lmbda=0.0, vectorized=False)
    assert loss.value_type == ValueEstimators.TDLambda
    torch.testing.assert_close(loss._td_target(data, v), td0)
    loss.make_value_estimator(ValueEstimators.TDLambda, lmbda=0.9)
    assert float(loss.value_estimator.lmbda) == pytest.approx(0.9)
    td_lambda = loss._td_target(data, v)
    assert not torch.allclose(td_lambda, td0)
    # last step of each slice and terminal steps: the one-step target
    torch.testing.assert_close(td_lambda[:, -1], td0[:, -1])
    torch.testing.assert_close(td_lambda[1, 2], td0[1, 2])
    out = _run(loss, data)
    assert all(torch.isfinite(out[k]).all() for k in _loss_keys(out))
    loss.make_value_estimator(ValueEstimators.TD1)
    out = _run(loss, data)
    assert all(torch.isfinite(out[k]).all() for k in _loss_keys(out))


@pytest.mark.parametrize("cls", CLASSES)
def test_state_dict_is_the_same_with_any_estimator(cls):
    """Old checkpoints (``gamma`` buffer, no estimator entries) load strictly, before and after."""
    loss = _make(cls, gamma=0.95)
    keys = set(loss.state_dict().keys())
    assert "gamma" in keys and not any("value_estimator" in k for k in keys)
    _run(loss, _batch())
    loss.make_value_estimator(ValueEstimators.TDLambda, lmbda=0.5)
    _run(loss, make_batch(8).reshape(2, 4))
    assert set(loss.state_dict().keys()) == keys
    fresh = cls(make_actor(), make_ensemble(4), **KW.get(cls, {}))
    fresh.load_state_dict(loss.state_dict())  # strict
    assert float(fresh.gamma) == pytest.approx(0.95)
    v = torch.randn(B)
    data = _batch()
    r = data["next", "reward"].squeeze(-1)
    alive = (~data["next", "terminated"].squeeze(-1)).float()
    torch.testing.assert_close(fresh._td_target(data, v), r + 0.95 * alive * v)


# ------------------------------------------------------------ reduction
@pytest.mark.parametrize("cls", CLASSES)
def test_priority_weights(cls):
    """Weights of ones change nothing; other weights give the weighted mean, as in TorchRL."""
    loss, per_elem = _pair(cls, reduction="none")
    data = _batch()
    plain = _run(loss, data)
    elems = _run(per_elem, data)
    data_w = data.clone()
    data_w["priority_weight"] = torch.ones(B)
    ones = _run(loss, data_w)
    w = torch.rand(B, generator=torch.Generator().manual_seed(5)) + 0.1
    data_w["priority_weight"] = w
    weighted = _run(loss, data_w)
    keys = _loss_keys(plain)
    assert keys and set(keys) == set(_loss_keys(elems))
    for k in keys:
        torch.testing.assert_close(ones[k], plain[k])
        assert elems[k].shape == (B,)
        torch.testing.assert_close(elems[k].mean(), plain[k])
        torch.testing.assert_close(weighted[k], (elems[k] * w).sum() / w.sum())
    moved = [k for k in keys if not torch.allclose(weighted[k], plain[k])]
    assert "loss_qvalue" in moved
    # reduction="none": per-element losses times the weights
    elems_w = _run(per_elem, data_w)
    torch.testing.assert_close(elems_w["loss_qvalue"], elems["loss_qvalue"] * w)
    # use_prioritized_weights=False ignores them
    off = _make(cls, use_prioritized_weights=False)
    off.load_state_dict(loss.state_dict())
    ignored = _run(off, data_w)
    for k in keys:
        torch.testing.assert_close(ignored[k], plain[k])


@pytest.mark.parametrize("cls", CLASSES)
def test_loss_mask(cls):
    """Positions masked by ``("collector", "mask")`` do not count; ``loss_mask_key=None`` ignores it."""
    loss, per_elem = _pair(cls, reduction="none")
    data = _batch()
    elems = _run(per_elem, data)
    mask = torch.tensor([True, False, True, True, False, True, True, False])
    masked = data.clone()
    masked["collector", "mask"] = mask.unsqueeze(-1)
    out = _run(loss, masked)
    for k in _loss_keys(out):
        torch.testing.assert_close(out[k], elems[k][mask].mean())
    loss.loss_mask_key = None
    plain = _run(loss, masked)
    for k in _loss_keys(out):
        torch.testing.assert_close(plain[k], elems[k].mean())


# ------------------------------------------------------------ vmap
@pytest.mark.parametrize("cls", CLASSES)
def test_deactivate_vmap_equals_vmap(cls):
    loss, looped = _pair(cls, deactivate_vmap=True)
    assert looped.deactivate_vmap and looped._batched_q is None
    data = _batch()
    outs, grads = [], []
    for mod in (loss, looped):
        out = _run(mod, data)
        mod.zero_grad(set_to_none=True)
        sum(out[k] for k in _loss_keys(out)).backward()
        outs.append(out)
        grads.append([p.grad for p in mod.parameters()])
    assert set(outs[0].keys()) == set(outs[1].keys())
    for k in outs[0].keys():
        torch.testing.assert_close(outs[1][k], outs[0][k], rtol=1e-5, atol=1e-5)
    for a, b in zip(*grads):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("deactivate_vmap", [False, True])
def test_set_vmap_randomness_after_construction(deactivate_vmap):
    torch.manual_seed(0)
    loss = SACNLoss(make_actor(), make_ensemble(4, dropout=0.5), deactivate_vmap=deactivate_vmap)
    assert loss.vmap_randomness == "different"  # dropout detected
    with torch.no_grad():  # identical members: only the dropout masks can differ
        for p in loss.qvalue_network_params.values(True, True):
            p.copy_(p[0].expand_as(p))
    td = make_batch(B).select("observation", "action")
    q = loss._q(td, loss.qvalue_network_params)
    assert not torch.allclose(q[0], q[1])  # a mask per member
    if deactivate_vmap:
        with pytest.raises(ValueError, match="same"):
            loss.set_vmap_randomness("same")
        return
    old = loss._vmap_qvalue_networkN0
    loss.set_vmap_randomness("same")
    assert loss.vmap_randomness == "same" and loss._vmap_qvalue_networkN0 is not old
    assert loss._batched_q is None  # the batched path cannot share a mask across members
    q = loss._q(td, loss.qvalue_network_params)
    torch.testing.assert_close(q[0], q[1])
    loss.set_vmap_randomness("different")
    assert loss._batched_q is not None
    q = loss._q(td, loss.qvalue_network_params)
    assert not torch.allclose(q[0], q[1])
    with pytest.raises(ValueError):
        loss.set_vmap_randomness("sometimes")


# ------------------------------------------------------------ dispatch
@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_dispatch_equals_tensordict_call(cls, reduction):
    loss, kw_loss = _pair(cls, reduction=reduction)
    loss.reduction = reduction
    data = _batch()
    out = _run(loss, data)
    assert set(loss.out_keys) <= set(out.keys())
    assert set(_loss_keys(out)) <= set(loss.out_keys)
    kwargs = {
        "observation": data["observation"],
        "action": data["action"],
        "next_observation": data["next", "observation"],
        "next_reward": data["next", "reward"],
        "next_done": data["next", "done"],
        "next_terminated": data["next", "terminated"],
    }
    assert set(kwargs) == {"_".join((k,) if isinstance(k, str) else k) for k in kw_loss.in_keys}
    torch.manual_seed(1)
    values = kw_loss(**kwargs)
    assert isinstance(values, tuple) and len(values) == len(kw_loss.out_keys)
    for key, value in zip(kw_loss.out_keys, values):
        torch.testing.assert_close(value, out[key])


def test_redq_out_keys_hold_on_critic_only_calls():
    loss = _make(ReferenceREDQLoss, policy_update_delay=3)
    data = _batch()
    kwargs = dict(
        observation=data["observation"],
        action=data["action"],
        next_observation=data["next", "observation"],
        next_reward=data["next", "reward"],
        next_terminated=data["next", "terminated"],
    )
    flags = [bool(dict(zip(loss.out_keys, loss(**kwargs)))["actor_updated"]) for _ in range(3)]
    assert flags == [False, False, True]


# ------------------------------------------------------------ reset
@pytest.mark.parametrize("cls", CLASSES)
def test_reset_parameters_per_member(cls):
    """Each member re-drawn on its own, with a fresh member's statistics; targets copy them."""
    n, hidden = 8, 128
    torch.manual_seed(0)
    loss = cls(
        make_actor(),
        [make_q_member(N_OBS + N_ACT, num_cells=(hidden, hidden)) for _ in range(n)],
        **KW.get(cls, {}),
    )
    online_before = loss.qvalue_network_params.data.clone()
    actor_before = loss.actor_network_params.data.clone()
    with torch.no_grad():  # targets drift away first
        for p in loss.target_qvalue_network_params.values(True, True):
            p.add_(1.0)
    loss.reset_parameters_recursive()
    online = loss.qvalue_network_params
    target = loss.target_qvalue_network_params
    fresh = [make_q_member(N_OBS + N_ACT, num_cells=(hidden, hidden)) for _ in range(n)]
    fresh = TensorDict.from_modules(*fresh).data
    for key, value in online.items(True, True):
        assert isinstance(value, torch.nn.Parameter) and value.requires_grad
        assert torch.equal(target.get(key), value.data), key
        assert not torch.equal(value.data, online_before.get(key)), key
        members = value.data.flatten(1)
        for i in range(n):
            for j in range(i + 1, n):
                assert not torch.equal(members[i], members[j]), (key, i, j)
        if members.shape[1] >= 64:  # enough entries for a per-member std
            std = members.std(1).mean()
            ref = fresh.get(key).flatten(1).std(1).mean()
            torch.testing.assert_close(std, ref, rtol=0.1, atol=0.0)
            # and not the fan-in of the stacked [N, out, in] tensor
            if value.ndim == 3 and value.shape[1] > 1:
                stacked_bound = 1.0 / (value.shape[1] * value.shape[2]) ** 0.5
                assert std > 3 * stacked_bound / 3**0.5
    for key, value in loss.actor_network_params.items(True, True):
        assert not torch.equal(value.data, actor_before.get(key)), key
    out = _run(loss, _batch())
    assert all(torch.isfinite(out[k]).all() for k in _loss_keys(out))


# ------------------------------------------------------------ rename
@pytest.mark.parametrize("module", ["torchrl_spqr", "torchrl_spqr.objectives"])
def test_redq_loss_renamed_with_future_warning(module):
    mod = importlib.import_module(module)
    with pytest.warns(FutureWarning, match="ReferenceREDQLoss.*torchrl.objectives.REDQLoss"):
        old = mod.REDQLoss
    assert old is ReferenceREDQLoss
    with pytest.warns(FutureWarning):
        exec(f"from {module} import REDQLoss", {})
    assert "REDQLoss" not in mod.__all__ and "ReferenceREDQLoss" in mod.__all__
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        exec(f"from {module} import *", {})
        exec(f"from {module} import ReferenceREDQLoss", {})
    with pytest.raises(AttributeError):
        mod.NotALoss  # noqa: B018

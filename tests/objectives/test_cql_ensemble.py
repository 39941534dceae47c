"""EnsembleCQLLoss: TorchRL's CQLLoss generalised to N critics."""

from __future__ import annotations

import copy

import pytest
import torch
from _helpers import N_ACT, N_OBS, make_actor, make_batch, make_ensemble
from tensordict import TensorDict
from tensordict.nn import NormalParamExtractor, TensorDictModule
from torch import nn
from torchrl.data import Bounded
from torchrl.modules import ProbabilisticActor, TanhNormal
from torchrl.objectives import CQLLoss, SoftUpdate, ValueEstimators

from torchrl_spqr import make_q_member
from torchrl_spqr.objectives.cql import EnsembleCQLLoss

pytestmark = pytest.mark.filterwarnings("ignore:No target network updater:UserWarning")


def _critics(n: int, hidden: int = 16, **kw) -> list[TensorDictModule]:
    return [make_q_member(N_OBS + N_ACT, num_cells=(hidden, hidden), **kw) for _ in range(n)]


def _loss_entries(out: TensorDict) -> dict[str, torch.Tensor]:
    return {k: out[k] for k in out.keys() if k.startswith("loss_")}


def _grads(loss: nn.Module, value: torch.Tensor) -> dict[str, torch.Tensor | None]:
    names, params = zip(*[(n, p) for n, p in loss.named_parameters() if p.requires_grad])
    if not value.requires_grad:  # e.g. loss_alpha with fixed_alpha
        return dict.fromkeys(names)
    grads = torch.autograd.grad(value.sum(), params, retain_graph=True, allow_unused=True)
    return dict(zip(names, grads))


def _pair(n_seed: int = 0, **kwargs) -> tuple[CQLLoss, EnsembleCQLLoss]:
    torch.manual_seed(n_seed)
    actor, critics = make_actor(), _critics(2)
    ref = CQLLoss(copy.deepcopy(actor), copy.deepcopy(critics), **kwargs)
    ens = EnsembleCQLLoss(copy.deepcopy(actor), copy.deepcopy(critics), num_qvalue_nets=2, **kwargs)
    return ref, ens


CASES = [
    {},
    {"with_lagrange": True, "lagrange_thresh": 5.0},
    {"max_q_backup": True},
    {"deterministic_backup": False},
    {"max_q_backup": True, "with_lagrange": True, "loss_function": "l2"},
    {"deterministic_backup": False, "reduction": "sum", "temperature": 2.0, "min_q_weight": 5.0},
    {"reduction": "none", "scalar_output_mode": "exclude", "num_random": 3},
    {"reduction": "none", "scalar_output_mode": "exclude", "max_q_backup": True},
    {"fixed_alpha": True, "alpha_init": 0.2, "deactivate_vmap": True, "reduction": "sum"},
    {"estimator": ValueEstimators.TD1, "deterministic_backup": False},
    {"estimator": ValueEstimators.TDLambda, "max_q_backup": True, "with_lagrange": True},
]


@pytest.mark.parametrize("kwargs", CASES, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()))
def test_n2_equals_torchrl_cql(kwargs):
    kwargs = dict(kwargs)
    estimator = kwargs.pop("estimator", ValueEstimators.TD0)
    ref, ens = _pair(**kwargs)
    for loss in (ref, ens):
        loss.make_value_estimator(estimator, gamma=0.9)
    data = make_batch(6, seed=1)
    torch.manual_seed(123)
    td_ref = data.clone()
    out_ref = ref(td_ref)
    torch.manual_seed(123)
    td_ens = data.clone()
    out_ens = ens(td_ens)
    assert set(out_ref.keys()) == set(out_ens.keys())
    for key in out_ref.keys():
        torch.testing.assert_close(out_ens[key], out_ref[key], msg=key)
    for key in ("td_error", "pred_q1", "pred_q2", "cql_q1_loss", "cql_q2_loss"):
        torch.testing.assert_close(td_ens[key], td_ref[key], msg=key)
    for key, value in _loss_entries(out_ref).items():
        g_ref, g_ens = _grads(ref, value), _grads(ens, out_ens[key])
        assert g_ref.keys() == g_ens.keys()
        for name in g_ref:
            if g_ref[name] is None:
                assert g_ens[name] is None, (key, name)
            else:
                torch.testing.assert_close(g_ens[name], g_ref[name], msg=f"{key} / {name}")


def test_n2_single_module_equals_torchrl_cql():
    """A single critic is expanded and resampled exactly as CQLLoss does."""
    torch.manual_seed(0)
    actor, critic = make_actor(), _critics(1)[0]
    torch.manual_seed(5)
    ref = CQLLoss(copy.deepcopy(actor), copy.deepcopy(critic))
    torch.manual_seed(5)
    ens = EnsembleCQLLoss(copy.deepcopy(actor), copy.deepcopy(critic))
    assert ens.num_qvalue_nets == 2
    for (n1, p1), (n2, p2) in zip(ref.named_parameters(), ens.named_parameters(), strict=True):
        assert n1 == n2
        torch.testing.assert_close(p1, p2)
    data = make_batch(4)
    torch.manual_seed(1)
    a = ref(data.clone())
    torch.manual_seed(1)
    b = ens(data.clone())
    for key in a.keys():
        torch.testing.assert_close(b[key], a[key])


@pytest.mark.parametrize("n", [1, 3, 10])
def test_n_members_backprop_and_soft_update(n):
    torch.manual_seed(0)
    loss = EnsembleCQLLoss(
        make_actor(), _critics(n), num_qvalue_nets=n, with_lagrange=True, max_q_backup=n == 3
    )
    loss.make_value_estimator(gamma=0.99)
    updater = SoftUpdate(loss, tau=0.5)
    assert loss.qvalue_network_params.batch_size == torch.Size([n])
    data = make_batch(8)
    out = loss(data)
    assert data["pred_q"].shape == (8, n)
    assert data["pred_q1"].shape == (8, 1)
    assert ("pred_q2" in data.keys()) == (n > 1)
    assert data["cql_q_loss"].shape == (8, 8 * loss.num_random, n)
    assert data["td_error"].shape == (8,)
    losses = _loss_entries(out)
    assert set(losses) == {
        "loss_actor",
        "loss_actor_bc",
        "loss_qvalue",
        "loss_cql",
        "loss_alpha",
        "loss_alpha_prime",
    }
    expect = {
        "loss_qvalue": "qvalue_network_params",
        "loss_cql": "qvalue_network_params",
        "loss_actor": "actor_network_params",
        "loss_actor_bc": "actor_network_params",
        "loss_alpha": "log_alpha",
        "loss_alpha_prime": "log_alpha_prime",
    }
    for key, value in losses.items():
        assert value.shape == () and torch.isfinite(value)
        grads = _grads(loss, value)
        hit = [g for name, g in grads.items() if name.startswith(expect[key]) and g is not None]
        assert hit and any(g.abs().sum() > 0 for g in hit), key
        if expect[key] == "qvalue_network_params":
            # every member gets a gradient from its own regression / conservative term
            per_member = sum(
                g.flatten(1).abs().sum(1)
                for name, g in grads.items()
                if name.startswith("qvalue_network_params") and g is not None
            )
            assert (per_member > 0).all(), key
    before = loss.target_qvalue_network_params.clone()
    opt = torch.optim.Adam(loss.parameters(), lr=1e-2)
    sum(losses.values()).backward()
    opt.step()
    updater.step()
    after = loss.target_qvalue_network_params
    moved = [(after[k] - before[k]).abs().sum() > 0 for k in before.keys(True, True)]
    assert all(moved)
    torch.testing.assert_close(
        after["module", "net", "0", "weight"],
        0.5 * before["module", "net", "0", "weight"]
        + 0.5 * loss.qvalue_network_params["module", "net", "0", "weight"].detach(),
    )


def test_members_are_independent():
    torch.manual_seed(0)
    critics = _critics(4)
    loss = EnsembleCQLLoss(make_actor(), critics, num_qvalue_nets=4)
    w = loss.qvalue_network_params["module", "net", "0", "weight"]
    for k in range(4):
        torch.testing.assert_close(w[k], critics[k].module.net[0].weight.detach())
    for k in range(1, 4):
        assert not torch.equal(w[0], w[k])
    # gradients are not tied either
    data = make_batch(8)
    (g,) = torch.autograd.grad(loss(data)["loss_qvalue"], [w])
    assert not torch.equal(g[0], g[1])


def test_qensemble_input():
    torch.manual_seed(0)
    ens = make_ensemble(3)
    loss = EnsembleCQLLoss(make_actor(), ens, num_qvalue_nets=3)
    members = ens.members()
    w = loss.qvalue_network_params["module", "net", "0", "weight"]
    for k in range(3):
        torch.testing.assert_close(w[k], members[k].module.net[0].weight.detach())
    loss(make_batch(4))


def test_set_keys():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(N_OBS, 2 * N_ACT), NormalParamExtractor())
    actor = ProbabilisticActor(
        TensorDictModule(net, in_keys=["obs"], out_keys=["loc", "scale"]),
        in_keys=["loc", "scale"],
        out_keys=["act"],
        distribution_class=TanhNormal,
        spec=Bounded(-1.0, 1.0, (N_ACT,)),
    )
    critics = _critics(3, in_keys=("obs", "act"), out_keys=("sav",))
    # the actor's spec holds "act", not the default "action": give target_entropy's spec
    loss = EnsembleCQLLoss(
        actor,
        critics,
        num_qvalue_nets=3,
        with_lagrange=True,
        action_spec=Bounded(-1.0, 1.0, (N_ACT,)),
    )
    loss.set_keys(
        action="act",
        state_action_value="sav",
        reward="rew",
        terminated="term",
        done="dn",
        priority="prio",
        pred_q="my_pred",
        pred_q1="p1",
        pred_q2="p2",
        cql_q_loss="my_cql",
        cql_q1_loss="c1",
        cql_q2_loss="c2",
    )
    loss.make_value_estimator(gamma=0.9)
    b = make_batch(5)
    data = TensorDict(
        {
            "obs": b["observation"],
            "act": b["action"],
            "next": {
                "obs": b["next", "observation"],
                "rew": b["next", "reward"],
                "dn": b["next", "done"],
                "term": b["next", "terminated"],
            },
        },
        [5],
    )
    out = loss(data)
    assert torch.isfinite(sum(_loss_entries(out).values()))
    for key in ("my_pred", "p1", "p2", "my_cql", "c1", "c2", "prio"):
        assert key in data.keys(), key
    for key in ("pred_q", "pred_q1", "cql_q_loss", "td_error"):
        assert key not in data.keys(), key
    assert data["my_pred"].shape == (5, 3)


def test_reduction_none_shapes():
    torch.manual_seed(0)
    loss = EnsembleCQLLoss(
        make_actor(), _critics(3), num_qvalue_nets=3, reduction="none", scalar_output_mode="exclude"
    )
    loss.make_value_estimator(gamma=0.9)
    out = loss(make_batch(7))
    assert out.batch_size == torch.Size([7])
    for key, value in _loss_entries(out).items():
        assert value.shape == (7,), key
    with pytest.raises(ValueError, match="with_lagrange"):
        EnsembleCQLLoss(make_actor(), _critics(2), reduction="none", with_lagrange=True)


def test_member_values_protocol():
    torch.manual_seed(0)
    loss = EnsembleCQLLoss(make_actor(), _critics(4), num_qvalue_nets=4, loss_function="l2")
    loss.make_value_estimator(gamma=0.9)
    assert loss.member_value_pairs == ("data",)
    assert loss.member_values_request is None
    data = make_batch(6)
    torch.manual_seed(3)
    plain = loss(data.clone())
    torch.manual_seed(3)
    td = data.clone()
    with loss.request_member_values("data") as req:
        out = loss(td)
    assert loss.member_values_request is None
    assert req.source == "reused" and req.q.shape == (4, 6) and req.q.requires_grad
    for key in plain.keys():
        torch.testing.assert_close(out[key], plain[key])
    # same values as an explicit pass of each member with the online parameters
    explicit = []
    for k in range(4):
        with loss.qvalue_network_params[k].to_module(loss.qvalue_network):
            explicit.append(loss.qvalue_network(data.select("observation", "action").clone()))
    explicit = torch.stack([e["state_action_value"].squeeze(-1) for e in explicit])
    torch.testing.assert_close(req.q, explicit)
    # ... and the very tensor the critic loss regressed (no extra pass)
    assert req.q.untyped_storage().data_ptr() == td["pred_q"].untyped_storage().data_ptr()
    (dq,) = torch.autograd.grad(out["loss_qvalue"], req.q, retain_graph=True)
    target = req.q.detach() - dq * 6 / 2  # l2, summed over members, mean over batch
    torch.testing.assert_close(target, target[:1].expand_as(target))
    (g,) = torch.autograd.grad(
        req.q.sum(), [loss.qvalue_network_params["module", "net", "0", "weight"]]
    )
    assert (g.flatten(1).abs().sum(1) > 0).all()
    with pytest.raises(ValueError, match="next_policy"), loss.request_member_values("next_policy"):
        pass


def test_dispatch_call():
    torch.manual_seed(0)
    loss = EnsembleCQLLoss(make_actor(), _critics(3), num_qvalue_nets=3)
    loss.make_value_estimator(gamma=0.9)
    b = make_batch(4)
    res = loss(
        observation=b["observation"],
        action=b["action"],
        next_observation=b["next", "observation"],
        next_reward=b["next", "reward"],
        next_done=b["next", "done"],
        next_terminated=b["next", "terminated"],
    )
    assert len(res) == len(loss.out_keys)
    res[0].backward()


def test_bad_input():
    actor = make_actor()
    with pytest.raises(ValueError, match=">= 1"):
        EnsembleCQLLoss(actor, _critics(1), num_qvalue_nets=0)
    with pytest.raises(TypeError, match="int"):
        EnsembleCQLLoss(actor, _critics(2), num_qvalue_nets=2.0)
    with pytest.raises(ValueError, match="3 critics"):
        EnsembleCQLLoss(actor, _critics(3), num_qvalue_nets=2)
    with pytest.raises(ValueError, match="3 critics"):
        EnsembleCQLLoss(actor, _critics(3))  # default N = 2
    with pytest.raises(ValueError, match="QEnsemble has 3"):
        EnsembleCQLLoss(actor, make_ensemble(3), num_qvalue_nets=4)
    q = _critics(1)[0]
    with pytest.raises(ValueError, match="more than once"):
        EnsembleCQLLoss(actor, [q, q, q], num_qvalue_nets=3)
    shared = _critics(2)
    shared[1].module.net[0] = shared[0].module.net[0]
    with pytest.warns(UserWarning, match="share parameter"):
        EnsembleCQLLoss(actor, shared)
    loss = EnsembleCQLLoss(actor, _critics(2))
    with pytest.raises(KeyError, match="before q_loss"):
        loss.cql_loss(make_batch(3))


REFERENCE_CASES = [
    {},
    {"lagrange_thresh": 2.0},
    {"max_q_backup": True, "min_q_weight": 5.0, "temperature": 2.0},
    {"backup_entropy": True, "lagrange_thresh": -1.0},
    {"bc_steps": 1, "reduction": "sum"},
    {"reduction": "none", "num_random": 3},
]


@pytest.mark.parametrize("n", [3])
@pytest.mark.parametrize(
    "kwargs", REFERENCE_CASES, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items())
)
def test_reference_variant_equals_cqln(kwargs, n):
    """The authors' CQL-N (CQLNLoss) is a configuration of EnsembleCQLLoss."""
    from torchrl_spqr.objectives import CQLNLoss

    torch.manual_seed(0)
    actor, critics = make_actor(), _critics(n)
    common = {"alpha_init": 0.5, "reduction": kwargs.get("reduction", "mean")}
    cqln = CQLNLoss(
        copy.deepcopy(actor),
        copy.deepcopy(critics),
        num_qvalue_nets=n,
        gamma=0.9,
        num_random=kwargs.get("num_random", 4),
        min_q_weight=kwargs.get("min_q_weight", 5.0),
        temperature=kwargs.get("temperature", 1.0),
        lagrange_thresh=kwargs.get("lagrange_thresh"),
        max_q_backup=kwargs.get("max_q_backup", False),
        backup_entropy=kwargs.get("backup_entropy", False),
        bc_steps=kwargs.get("bc_steps", 0),
        **common,
    )
    ens = EnsembleCQLLoss(
        copy.deepcopy(actor),
        copy.deepcopy(critics),
        num_qvalue_nets=n,
        cql_variant="reference",
        loss_function="l2",
        num_random=kwargs.get("num_random", 4),
        min_q_weight=kwargs.get("min_q_weight", 5.0),
        temperature=kwargs.get("temperature", 1.0),
        with_lagrange=kwargs.get("lagrange_thresh") is not None,
        lagrange_thresh=kwargs.get("lagrange_thresh") or 0.0,
        max_q_backup=kwargs.get("max_q_backup", False),
        deterministic_backup=not kwargs.get("backup_entropy", False),
        bc_steps=kwargs.get("bc_steps", 0),
        scalar_output_mode="exclude" if common["reduction"] == "none" else None,
        **common,
    )
    ens.make_value_estimator(gamma=0.9)
    assert dict(cqln.named_parameters()).keys() == dict(ens.named_parameters()).keys()
    for call in range(2):  # with bc_steps=1: a BC call, then a Q-maximising one
        data = make_batch(6, seed=call)
        torch.manual_seed(10 + call)
        out_ref = cqln(data.clone())
        torch.manual_seed(10 + call)
        out_ens = ens(data.clone())
        keys = [k for k in out_ref.keys() if k.startswith("loss_")]
        assert set(keys) <= set(out_ens.keys())
        for key in keys:
            torch.testing.assert_close(out_ens[key], out_ref[key], msg=key)
            g_ref, g_ens = _grads(cqln, out_ref[key]), _grads(ens, out_ens[key])
            for name in g_ref:
                if g_ref[name] is None:
                    assert g_ens[name] is None or not g_ens[name].any(), (key, name)
                else:
                    torch.testing.assert_close(g_ens[name], g_ref[name], msg=f"{key} / {name}")

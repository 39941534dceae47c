"""The ``LossModule`` contract of :class:`~torchrl_spqr.SPQRLoss` over every loss it wraps.

In the style of TorchRL's ``test/objectives`` (``LossModuleTestBase``): for each
wrapped loss (TorchRL's bare ``SACLoss`` / ``REDQLoss`` / ``TD3Loss``, their
member-values subclasses, and the package's ensemble losses) and N in {3, 10}:
devices, reductions, remapping of every key through the wrapper, ``deactivate_vmap``,
``set_vmap_randomness`` after construction, ``reset_parameters_recursive``
independence, ``SoftUpdate`` moving the wrapped loss's targets, the call without a
tensordict, priority weights, the input left unmodified, and the transparency of
the wrapper (attributes, value estimator, state dicts, ``add_to``).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from tensordict import TensorDict
from tensordict.nn import NormalParamExtractor, TensorDictModule
from torch import nn
from torchrl.data import Bounded, Composite
from torchrl.modules import ProbabilisticActor, TanhNormal
from torchrl.objectives import REDQLoss, SACLoss, SoftUpdate, TD3Loss, ValueEstimators

import torchrl_spqr.objectives as O
from torchrl_spqr import QEnsemble, SPQRLoss, make_q_member

pytestmark = pytest.mark.filterwarnings(
    "ignore:No target network updater:UserWarning",
    "ignore:SPQRLoss\\(pairs=.*does not hand over:UserWarning",
)

N_OBS, N_ACT, B, H = 4, 2, 6, 8
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
_REF_REDQ = getattr(O, "ReferenceREDQLoss", None) or O.ensemble.__dict__.get("REDQLoss")

TORCHRL = ("sac", "redq", "td3", "ens_sac", "ens_redq", "ens_td3")
PACKAGE = ("sacn", "ref_redq", "edac", "cqln")
ALL = TORCHRL + PACKAGE


def _actor(action_key="action", deterministic=False) -> nn.Module:
    if deterministic:
        net = nn.Sequential(nn.Linear(N_OBS, H), nn.ReLU(), nn.Linear(H, N_ACT), nn.Tanh())
        from torchrl.modules import Actor

        return Actor(
            net, in_keys=["observation"], out_keys=[action_key], spec=Bounded(-1.0, 1.0, (N_ACT,))
        )
    net = nn.Sequential(
        nn.Linear(N_OBS, H), nn.ReLU(), nn.Linear(H, 2 * N_ACT), NormalParamExtractor()
    )
    return ProbabilisticActor(
        TensorDictModule(net, in_keys=["observation"], out_keys=["loc", "scale"]),
        in_keys=["loc", "scale"],
        out_keys=[action_key],
        distribution_class=TanhNormal,
        spec=Bounded(-1.0, 1.0, (N_ACT,)),
        return_log_prob=True,
    )


def _critics(n: int, action_key="action", value_key="state_action_value") -> QEnsemble:
    return QEnsemble(
        lambda: make_q_member(
            N_OBS + N_ACT,
            num_cells=(H, H),
            in_keys=("observation", action_key),
            out_keys=(value_key,),
        ),
        n,
    )


def make_loss(name: str, n: int = 3, *, action_key="action", value_key="state_action_value", **kw):
    """The loss ``name`` with ``n`` independent critics reading ``action_key``/``value_key``."""
    torch.manual_seed(0)
    members = _critics(n, action_key, value_key).members()
    det = name in ("td3", "ens_td3")
    actor = _actor(action_key, deterministic=det)
    spec = Bounded(-1.0, 1.0, (N_ACT,))
    if name in ("sac", "ens_sac"):
        cls = SACLoss if name == "sac" else O.EnsembleSACLoss
        loss = cls(actor, members, num_qvalue_nets=n, loss_function="l2", **kw)
    elif name in ("redq", "ens_redq"):
        cls = REDQLoss if name == "redq" else O.EnsembleREDQLoss
        loss = cls(actor, members, num_qvalue_nets=n, **kw)
    elif name in ("td3", "ens_td3"):
        cls = TD3Loss if name == "td3" else O.EnsembleTD3Loss
        loss = cls(actor, members, num_qvalue_nets=n, action_spec=spec, **kw)
    elif name == "sacn":
        loss = O.SACNLoss(actor, members, action_spec=spec, **kw)
    elif name == "ref_redq":
        loss = _REF_REDQ(actor, members, action_spec=spec, policy_update_delay=1, **kw)
    elif name == "edac":
        loss = O.EDACLoss(actor, members, action_spec=spec, **kw)
    elif name == "cqln":
        loss = O.CQLNLoss(actor, members, action_spec=spec, num_random=2, **kw)
    else:
        raise ValueError(name)
    if action_key != "action" or value_key != "state_action_value":
        loss.set_keys(action=action_key, state_action_value=value_key)
    return loss


def make_batch(b: int = B, seed: int = 0, action_key="action", device="cpu") -> TensorDict:
    g = torch.Generator().manual_seed(seed)
    return TensorDict(
        {
            "observation": torch.randn(b, N_OBS, generator=g),
            action_key: torch.rand(b, N_ACT, generator=g) * 2 - 1,
            "next": {
                "observation": torch.randn(b, N_OBS, generator=g),
                "reward": torch.randn(b, 1, generator=g),
                "done": torch.zeros(b, 1, dtype=torch.bool),
                "terminated": torch.zeros(b, 1, dtype=torch.bool),
            },
        },
        [b],
    ).to(device)


def _losses(out: TensorDict) -> dict[str, torch.Tensor]:
    return {k: v for k, v in out.items() if k.startswith("loss_")}


# ====================================================================== values and devices
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", (3, 10))
@pytest.mark.parametrize("name", ALL)
def test_forward_devices_and_each_loss_backprops(name, n, device):
    loss = SPQRLoss(make_loss(name, n), beta=1.0).to(device)
    batch = make_batch(device=device)
    before = batch.clone()
    out = loss(batch)
    # the input's existing entries are not modified (losses may add e.g. td_error)
    for key in before.keys(True, True):
        assert torch.equal(before.get(key), batch.get(key)), key
    assert out["loss_spqr"].device.type == device
    assert out["loss_spqr"] > 0
    for value in _losses(out).values():
        if value.requires_grad:
            loss.zero_grad()
            value.backward(retain_graph=True)
    # the penalty reaches every critic member and never the actor
    loss.zero_grad()
    out = loss(make_batch(seed=1, device=device))
    out["loss_spqr"].backward()
    for key, leaf in loss.qvalue_network_params.items(True, True):
        assert leaf.grad is not None, key
        assert all(leaf.grad[i].abs().sum() > 0 for i in range(n)), key
    for key, leaf in loss.actor_network_params.items(True, True):
        assert leaf.grad is None or not leaf.grad.any(), key


@pytest.mark.parametrize("name", ALL)
def test_beta_zero_every_loss_entry_backprops_alone(name):
    """beta=0: the zero ``loss_spqr`` can be back-propagated like every other entry."""
    loss = SPQRLoss(make_loss(name), beta=0.0)
    out = loss(make_batch())
    for key, value in _losses(out).items():
        if key == "loss_spqr" or value.requires_grad:
            value.backward(retain_graph=True)
    assert out["loss_spqr"] == 0


@pytest.mark.parametrize("name", ("sac", "ens_sac", "redq", "ens_redq", "td3", "ens_td3", "sacn"))
def test_beta_zero_no_diagnostics_costs_no_critic_call(name):
    """beta=0 with diagnostics off: the wrapped loss runs alone (no SPQR critic pass)."""
    loss = SPQRLoss(make_loss(name), beta=0.0, diagnostics_interval=0)
    calls = []
    net = loss.qvalue_network
    handle = net.register_forward_pre_hook(lambda *a: calls.append(1))
    bare = make_loss(name)
    bare_calls = []
    h2 = bare.qvalue_network.register_forward_pre_hook(lambda *a: bare_calls.append(1))
    torch.manual_seed(1)
    out = loss(make_batch())
    torch.manual_seed(1)
    bare_out = bare(make_batch())
    handle.remove()
    h2.remove()
    assert len(calls) == len(bare_calls)
    for key in bare_out.keys(True, True):
        torch.testing.assert_close(bare_out.get(key), out.get(key), rtol=0, atol=0)


# ====================================================================== reductions, weights
@pytest.mark.parametrize("reduction", ("mean", "sum", "none"))
@pytest.mark.parametrize("name", ("sac", "ens_sac", "ens_redq", "ens_td3", "sacn", "edac"))
def test_reduction(name, reduction):
    kw = {"reduction": reduction}
    if name in ("sac", "ens_sac", "ens_redq") and reduction == "none":
        kw["scalar_output_mode"] = "exclude"
    loss = SPQRLoss(make_loss(name, **kw), beta=1.0)
    assert loss.reduction == reduction
    out = loss(make_batch())
    spqr = out["loss_spqr"]
    if reduction == "none":
        assert spqr.shape == torch.Size([B])
    else:
        assert spqr.shape == torch.Size([])
    per = SPQRLoss(
        make_loss(
            name,
            reduction="none",
            **({"scalar_output_mode": "exclude"} if name in ("sac", "ens_sac", "ens_redq") else {}),
        ),
        beta=1.0,
    )
    torch.manual_seed(3)
    a = loss(make_batch(seed=3))["loss_spqr"]
    torch.manual_seed(3)
    b = per(make_batch(seed=3))["loss_spqr"]
    expected = {"mean": b.mean(), "sum": b.sum(), "none": b}[reduction]
    torch.testing.assert_close(a, expected)


@pytest.mark.parametrize("name", ("ens_sac", "sac", "sacn"))
def test_priority_weights_weigh_the_kl(name):
    loss = SPQRLoss(make_loss(name), beta=1.0, pairs="data")
    batch = make_batch()
    key = loss.tensor_keys.priority_weight if hasattr(loss.tensor_keys, "priority_weight") else None
    if key is None:
        pytest.skip(f"{name} has no priority_weight key")
    torch.manual_seed(0)
    plain = loss(batch.clone())["spqr_kl"]
    weighted_batch = batch.clone()
    weighted_batch.set(key, torch.ones(B))
    torch.manual_seed(0)
    ones = loss(weighted_batch)["spqr_kl"]
    torch.testing.assert_close(plain, ones)
    w = torch.zeros(B)
    w[0] = float(B)
    weighted_batch.set(key, w)
    per = SPQRLoss(
        make_loss(
            name,
            reduction="none",
            **({"scalar_output_mode": "exclude"} if name in ("sac",) else {}),
        ),
        beta=1.0,
        pairs="data",
    )
    torch.manual_seed(0)
    per_el = per(batch.clone())["spqr_kl"]
    torch.manual_seed(0)
    got = loss(weighted_batch)["spqr_kl"]
    torch.testing.assert_close(got, per_el[0], rtol=1e-5, atol=1e-6)


# ====================================================================== keys
@pytest.mark.parametrize("name", ALL)
def test_keys_are_the_wrapped_losses(name):
    base = make_loss(name)
    loss = SPQRLoss(base, beta=1.0)
    assert loss.tensor_keys is base.tensor_keys
    with pytest.raises(ValueError):
        loss.set_keys(not_a_key="x")
    # remap every key through the wrapper; the wrapped loss sees it
    for field in type(base.tensor_keys).__dataclass_fields__:
        old = getattr(base.tensor_keys, field)
        loss.set_keys(**{field: "renamed_" + field})
        assert getattr(base.tensor_keys, field) == "renamed_" + field
        loss.set_keys(**{field: old})
        assert getattr(base.tensor_keys, field) == old


@pytest.mark.parametrize("pairs", ("next_policy", "data", "policy"))
@pytest.mark.parametrize("name", ("sac", "ens_sac", "ens_redq", "ens_td3", "sacn", "cqln"))
def test_renamed_action_and_value_keys(name, pairs):
    loss = SPQRLoss(make_loss(name, action_key="act", value_key="q_act"), beta=1.0, pairs=pairs)
    out = loss(make_batch(action_key="act"))
    assert torch.isfinite(out["loss_spqr"]) and out["loss_spqr"] > 0
    with pytest.raises(KeyError, match="act"):
        loss(make_batch(action_key="act").exclude("act"))


@pytest.mark.parametrize("name", ("sac", "ens_sac", "redq", "ens_redq", "ens_td3", "sacn"))
def test_renamed_reward_done_terminated(name):
    loss = SPQRLoss(make_loss(name), beta=1.0)
    loss.set_keys(reward="rew", done="dn", terminated="term")
    batch = make_batch()
    batch.rename_key_(("next", "reward"), ("next", "rew"))
    batch.rename_key_(("next", "done"), ("next", "dn"))
    batch.rename_key_(("next", "terminated"), ("next", "term"))
    out = loss(batch)
    assert torch.isfinite(out["loss_qvalue"])


# ====================================================================== vmap
@pytest.mark.parametrize("name", ("sac", "ens_sac", "redq", "ens_redq", "td3", "ens_td3"))
def test_deactivate_vmap_same_values(name):
    a = SPQRLoss(make_loss(name), beta=1.0, pairs="data")
    b = SPQRLoss(make_loss(name, deactivate_vmap=True), beta=1.0, pairs="data")
    assert b.deactivate_vmap
    torch.manual_seed(5)
    out_a = a(make_batch())
    torch.manual_seed(5)
    out_b = b(make_batch())
    for key in ("loss_qvalue", "loss_spqr", "spqr_kl"):
        torch.testing.assert_close(out_a[key], out_b[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ("ens_sac", "ens_redq", "ens_td3", "sac"))
def test_set_vmap_randomness_after_construction(name):
    """Rebuilding the vmapped calls keeps the member values flowing (no silent extra pass)."""
    loss = SPQRLoss(make_loss(name), beta=1.0, pairs="data")
    loss(make_batch())
    src = loss.last_source
    loss.set_vmap_randomness("different")
    assert loss.vmap_randomness == "different"
    assert loss.loss_module.vmap_randomness == "different"
    loss(make_batch(seed=1))
    assert loss.last_source == src
    if name.startswith("ens_"):
        assert src == "reused"


# ====================================================================== reset and targets
@pytest.mark.parametrize("name", ("ens_sac", "ens_redq", "sacn"))
def test_reset_parameters_recursive_members_independent(name):
    loss = SPQRLoss(make_loss(name, n=5), beta=1.0)
    loss.reset_parameters_recursive()
    params = loss.qvalue_network_params
    for key, leaf in params.items(True, True):
        if leaf.dim() >= 2 and leaf[0].numel() > 1:
            for i in range(1, leaf.shape[0]):
                assert not torch.equal(leaf[0], leaf[i]), f"members 0 and {i} equal at {key}"


@pytest.mark.parametrize(
    "name", ("sac", "ens_sac", "redq", "ens_redq", "td3", "ens_td3", "sacn", "edac", "cqln")
)
def test_soft_update_moves_the_wrapped_losses_targets(name):
    loss = SPQRLoss(make_loss(name), beta=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "no updater associated" warning
        updater = SoftUpdate(loss, tau=0.5)
    target = loss.loss_module.target_qvalue_network_params
    assert loss.target_qvalue_network_params is target
    before = target.clone()
    opt = torch.optim.SGD(loss.qvalue_network_params.values(True, True), lr=0.5)
    out = loss(make_batch())
    (out["loss_qvalue"] + out["loss_spqr"]).backward()
    opt.step()
    updater.step()
    online = loss.loss_module.qvalue_network_params
    for key, leaf in target.items(True, True):
        expected = 0.5 * before.get(key) + 0.5 * online.get(key).data
        torch.testing.assert_close(leaf, expected)
        assert not torch.equal(leaf, before.get(key)), key


# ====================================================================== dispatch
@pytest.mark.parametrize("name", ("sac", "ens_sac", "redq", "ens_redq", "td3", "ens_td3", "sacn"))
def test_call_without_tensordict(name):
    loss = SPQRLoss(make_loss(name), beta=1.0)
    batch = make_batch()
    kwargs = {
        "_".join(k) if isinstance(k, tuple) else k: batch.get(k)
        for k in loss.in_keys
        if k in batch.keys(True, True)
    }
    torch.manual_seed(0)
    outs = loss(**kwargs)
    torch.manual_seed(0)
    td_out = loss(batch.clone())
    assert len(outs) == len(loss.out_keys)
    for key, value in zip(loss.out_keys, outs):
        torch.testing.assert_close(td_out.get(key), value, msg=key)


@pytest.mark.parametrize("name", ("sac", "ens_sac"))
def test_call_without_tensordict_between_diagnostics(name):
    """With ``diagnostics_interval > 1`` the keyword call still returns every ``out_keys``
    entry: the diagnostics skipped at that call are NaN (the tensordict output omits them)."""
    loss = SPQRLoss(make_loss(name), beta=1.0, diagnostics_interval=2)
    twin = SPQRLoss(make_loss(name), beta=1.0, diagnostics_interval=2)
    twin.load_state_dict(loss.state_dict())
    batch = make_batch()
    kwargs = {
        "_".join(k) if isinstance(k, tuple) else k: batch.get(k)
        for k in loss.in_keys
        if k in batch.keys(True, True)
    }
    for step in range(3):
        torch.manual_seed(step)
        outs = loss(**kwargs)
        torch.manual_seed(step)
        td_out = twin(batch.clone())
        assert len(outs) == len(loss.out_keys)
        values = dict(zip(loss.out_keys, outs))
        due = step % 2 == 0
        assert ("spqr_spike" in td_out.keys()) == due
        for key, value in values.items():
            if key in td_out.keys():
                torch.testing.assert_close(td_out.get(key), value, msg=key)
            else:
                assert key.startswith("spqr_") and not due, key
                assert value.shape == () and torch.isnan(value), (key, value)


# ====================================================================== transparency
@pytest.mark.parametrize("name", ("sac", "ens_sac", "redq", "ens_redq", "td3", "sacn", "edac"))
def test_public_attributes_are_the_wrapped_losses(name):
    base = make_loss(name)
    loss = SPQRLoss(base, beta=1.0)
    for attr in (
        "qvalue_network_params",
        "actor_network_params",
        "target_qvalue_network_params",
        "qvalue_network",
        "actor_network",
        "num_qvalue_nets",
    ):
        assert getattr(loss, attr) is getattr(base, attr), attr
    if hasattr(base, "log_alpha"):
        assert loss.log_alpha is base.log_alpha
    if name in ("sac", "ens_sac", "redq", "ens_redq"):
        assert loss.target_entropy == base.target_entropy
    params = {id(p) for p in loss.parameters()}
    assert params == {id(p) for p in base.parameters()} | {id(p) for p in loss._parameters.values()}


@pytest.mark.parametrize("name", ("sac", "ens_sac", "redq", "td3"))
def test_value_estimator_is_the_wrapped_losses(name):
    base = make_loss(name)
    loss = SPQRLoss(base, beta=1.0)
    loss.make_value_estimator(ValueEstimators.TDLambda, gamma=0.9, lmbda=0.5)
    assert loss.value_estimator is base.value_estimator
    assert float(base.value_estimator.gamma) == pytest.approx(0.9)
    # reading it never resets it
    loss.value_estimator  # noqa: B018
    assert type(base.value_estimator).__name__ == "TDLambdaEstimator"
    assert float(base.value_estimator.gamma) == pytest.approx(0.9)


@pytest.mark.parametrize("name", ("sac", "ens_sac", "redq", "sacn"))
def test_bare_state_dict_loads_into_wrapper(name):
    trained = make_loss(name)
    with torch.no_grad():
        for leaf in trained.qvalue_network_params.values(True, True):
            leaf.add_(1.0)
    trained(make_batch())
    sd = trained.state_dict()
    fresh = SPQRLoss(make_loss(name), beta=3.0)
    fresh.load_state_dict(sd)
    for key, leaf in trained.qvalue_network_params.items(True, True):
        torch.testing.assert_close(fresh.qvalue_network_params.get(key).data, leaf.data)
    assert float(fresh.beta) == 3.0
    # and an SPQRLoss state round-trips
    other = SPQRLoss(make_loss(name), beta=0.5)
    other.load_state_dict(fresh.state_dict())
    assert float(other.beta) == 3.0


@pytest.mark.parametrize("name", ("sac", "ens_sac", "ens_redq", "sacn"))
def test_add_to_puts_the_penalty_in_the_named_entry(name):
    plain = SPQRLoss(make_loss(name), beta=2.0, pairs="data")
    folded = SPQRLoss(make_loss(name), beta=2.0, pairs="data", add_to="loss_qvalue")
    torch.manual_seed(0)
    a = plain(make_batch())
    torch.manual_seed(0)
    b = folded(make_batch())
    assert "loss_spqr" not in b.keys() and "loss_spqr" not in folded.out_keys
    torch.testing.assert_close(b["loss_qvalue"], a["loss_qvalue"] + a["loss_spqr"])
    with pytest.raises(ValueError, match="add_to"):
        SPQRLoss(make_loss(name), add_to="loss_nothing")


@pytest.mark.filterwarnings("always::UserWarning")
def test_extra_pass_warns_once_and_says_so():
    loss = SPQRLoss(make_loss("sac"), beta=1.0)
    with pytest.warns(UserWarning, match="extra ensemble pass"):
        loss(make_batch())
    assert loss.last_source == "extra_pass"
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warnings.filterwarnings("ignore", "No target network updater")
        loss(make_batch(seed=1))


@pytest.mark.parametrize("name", ("sac", "redq", "td3"))
def test_bare_torchrl_loss_explicit_pass_equals_member_values_path(name):
    """The compatibility path regularises the same Q-values as the member-values path."""
    bare = SPQRLoss(make_loss(name), beta=1.0, pairs="data")
    ens = SPQRLoss(make_loss("ens_" + name), beta=1.0, pairs="data")
    torch.manual_seed(0)
    a = bare(make_batch())
    torch.manual_seed(0)
    b = ens(make_batch())
    assert (bare.last_source, ens.last_source) == ("extra_pass", "reused")
    torch.testing.assert_close(a["spqr_kl"], b["spqr_kl"], rtol=1e-5, atol=1e-6)


def test_wrapping_twice_and_non_losses_are_refused():
    loss = SPQRLoss(make_loss("ens_sac"))
    with pytest.raises(TypeError, match="already an SPQRLoss"):
        SPQRLoss(loss)
    with pytest.raises(ValueError, match="at least 3"):
        SPQRLoss(make_loss("ens_sac", n=2))


@pytest.mark.parametrize("pairs", ("next_policy", "data", "policy"))
@pytest.mark.parametrize("beta", (0.0, 1.0))
def test_composite_action_distribution(pairs, beta):
    """A policy with a composite action (``("action", "action1")``), as TorchRL's tests build."""
    import functools

    from tensordict.nn import CompositeDistribution

    net = nn.Sequential(nn.Linear(N_OBS, 2 * N_ACT), NormalParamExtractor())
    module = TensorDictModule(
        net, in_keys=["observation"],
        out_keys=[("params", "action1", "loc"), ("params", "action1", "scale")],
    )  # fmt: skip
    actor = ProbabilisticActor(
        module,
        in_keys=["params"],
        out_keys=["action"],
        distribution_class=functools.partial(
            CompositeDistribution, distribution_map={"action1": TanhNormal}
        ),
        spec=Composite({"action": {"action1": Bounded(-1.0, 1.0, (N_ACT,))}}),
        return_log_prob=True,
    )
    critics = QEnsemble(
        lambda: make_q_member(N_OBS + N_ACT, num_cells=(H,), in_keys=("observation",
                              ("action", "action1"))), 3)  # fmt: skip
    sac = O.EnsembleSACLoss(
        actor, critics.members(), num_qvalue_nets=3, loss_function="l2", target_entropy=-2.0
    )
    loss = SPQRLoss(sac, beta=beta, pairs=pairs)
    batch = make_batch()
    batch.set(("action", "action1"), batch.pop("action"))
    out = loss(batch)
    assert torch.isfinite(out["spqr_kl"]) and out["spqr_kl"] > 0
    assert torch.isfinite(out["loss_qvalue"])

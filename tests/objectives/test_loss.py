"""Tests of :class:`torchrl_spqr.SPQRLoss`, in the style of TorchRL's ``test_cost.py``.

Wrapped losses: TorchRL's ``SACLoss`` (N=10, l2), ``REDQLoss`` (N=10, sub-sample 2)
and ``TD3Loss`` (N=10, deterministic actor) as their member-values subclasses
(``torchrl_spqr.objectives.Ensemble*Loss``); ``pairs`` in next_policy / data / policy.
The bare TorchRL classes (no member values: explicit pass) are in ``test_spqr_contract.py``.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from _helpers import N_ACT, N_OBS, make_actor, make_batch, make_det_actor, make_ensemble
from tensordict import TensorDict
from tensordict.nn import NormalParamExtractor, TensorDictModule
from torch import nn
from torchrl.data import Bounded
from torchrl.modules import ProbabilisticActor, TanhNormal
from torchrl.objectives import CQLLoss, SACLoss, SoftUpdate

from torchrl_spqr import QEnsemble, SPQRLoss, make_q_member
from torchrl_spqr.functional import spqr_kl
from torchrl_spqr.objectives import EnsembleREDQLoss, EnsembleSACLoss, EnsembleTD3Loss

pytestmark = pytest.mark.filterwarnings("ignore:No target network updater:UserWarning")

N = 10
B = 8
HIDDEN = 16
BASES = ("sac", "redq", "td3")
PAIRS = ("next_policy", "data", "policy")
SOURCE = {"next_policy": "fused", "data": "reused", "policy": "extra_pass"}


def source(name: str, pairs: str) -> str:
    """Expected path: TorchRL's REDQ keeps the target's next-state input and runs one
    separate online call (fusing would copy all 2N+M parameter sets each update); TD3's
    target uses the target policy's smoothed action, so the policy's is drawn explicitly."""
    if name == "redq" and pairs == "next_policy":
        return "reused_sample"
    if name == "td3" and pairs == "next_policy":
        return "extra_pass"
    return SOURCE[pairs]


SPQR_KEYS = (
    "loss_spqr",
    "spqr_kl",
    "spqr_beta",
    "spqr_spike",
    "spqr_accept_rate",
    "spqr_mp_ratio",
    "spqr_mean_pairwise_corr",
    "spqr_ensemble_std",
)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def make_base(name: str, seed: int = 0, n: int = N, ens: QEnsemble | None = None, **kw):
    """A fresh wrapped loss; the same ``seed`` gives the same weights."""
    torch.manual_seed(seed)
    ens = make_ensemble(n, HIDDEN) if ens is None else ens
    if name == "sac":
        kw.setdefault("loss_function", "l2")
        return EnsembleSACLoss(make_actor(HIDDEN), ens.members(), num_qvalue_nets=n, **kw)
    if name == "redq":
        return EnsembleREDQLoss(
            make_actor(HIDDEN), ens.members(), num_qvalue_nets=n, sub_sample_len=2, **kw
        )
    if name == "td3":
        return EnsembleTD3Loss(
            make_det_actor(HIDDEN),
            ens.members(),
            num_qvalue_nets=n,
            action_spec=Bounded(-1.0, 1.0, (N_ACT,)),
            **kw,
        )
    raise ValueError(name)


def tied_ensemble(loss) -> QEnsemble:
    """A QEnsemble reading the wrapped loss's online critic parameters."""
    return make_ensemble(loss.num_qvalue_nets, HIDDEN).tie_to_loss(loss)


def total_loss(out: TensorDict) -> torch.Tensor:
    return sum(v for k, v in out.items() if k.startswith("loss_") and v.requires_grad)


def _grads(module: nn.Module) -> dict[str, torch.Tensor | None]:
    return {
        n: (p.grad.clone() if p.grad is not None else None) for n, p in module.named_parameters()
    }


def _assert_no_grad(params: TensorDict | None, what: str) -> None:
    if params is None:
        return
    for key, leaf in params.items(True, True):
        g = leaf.grad
        assert g is None or not g.any(), f"{what} {key} received a gradient"


def _assert_grad_every_member(params: TensorDict) -> None:
    n = params.batch_size[0]
    for key, leaf in params.items(True, True):
        assert leaf.grad is not None, key
        for i in range(n):
            assert leaf.grad[i].abs().sum() > 0, f"member {i} {key} got no gradient"


class _CallCounter:
    """Counts forward calls of a critic module (vmapped calls count once)."""

    def __init__(self, module: nn.Module) -> None:
        self.calls = 0
        self.handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, *_):
        self.calls += 1


class _Spy:
    """Records the inputs of a wrapped loss's vmapped critic function (outside vmap)."""

    def __init__(self, fn, base) -> None:
        self.fn, self.base, self.calls = fn, base, []

    def __call__(self, td, params, *args, **kwargs):
        tag = "target" if params is self.base.target_qvalue_network_params else "other"
        self.calls.append((tag, td.detach().clone()))
        return self.fn(td, params, *args, **kwargs)


def _install_spy(base) -> _Spy:
    names = [
        n
        for n in ("_vmap_qnetworkN0", "_vmap_qvalue_networkN0", "_vmap_qvalue_network00")
        if n in base.__dict__
    ]
    assert len(names) == 1
    spy = _Spy(base.__dict__[names[0]], base)
    base.__dict__[names[0]] = spy
    return spy


# =========================================================================== outputs
@pytest.mark.parametrize("pairs", PAIRS)
@pytest.mark.parametrize("name", BASES)
class TestWrapped:
    def test_output_keys_and_detached_diagnostics(self, name, pairs):
        bare = make_base(name)
        bare_batch = make_batch(B)
        bare_out = bare(bare_batch)
        loss = SPQRLoss(make_base(name), beta=2.5, pairs=pairs)
        batch = make_batch(B)
        before = batch.clone()
        out = loss(batch)
        spqr = [k for k in loss.out_keys if k.startswith("spqr_") or k == "loss_spqr"]
        assert tuple(spqr) == SPQR_KEYS
        assert set(out.keys()) == set(bare_out.keys()) | set(SPQR_KEYS)
        assert loss.last_source == source(name, pairs)
        assert out["loss_spqr"].shape == ()
        assert out["loss_spqr"].requires_grad
        for k in SPQR_KEYS[1:]:
            assert not out[k].requires_grad, k
            assert torch.isfinite(out[k]).all(), k
        assert out["spqr_beta"] == 2.5
        torch.testing.assert_close(out["loss_spqr"].detach(), 2.5 * out["spqr_kl"])
        assert 0.3 < out["spqr_kl"] < 1.2  # d = 4 band, section 5 of the spec
        assert 0.0 <= out["spqr_accept_rate"] <= 1.0
        # the input: SPQR writes nothing beyond what the wrapped loss writes (td_error,
        # the actor's loc/scale...) and changes none of the existing entries
        assert set(batch.keys(True, True)) == set(bare_batch.keys(True, True))
        for key in before.keys(True, True):
            assert torch.equal(batch.get(key), before.get(key)), key
        # in_keys: the wrapped loss's plus what SPQR reads
        assert set(bare.in_keys) <= set(loss.in_keys)

    def test_beta_zero_is_exactly_the_wrapped_loss(self, name, pairs):
        """beta=0: same values and gradients, and the same RNG stream over calls."""
        bare = make_base(name, seed=1)
        loss = SPQRLoss(make_base(name, seed=1), beta=0.0, pairs=pairs)

        def run(module, base):
            torch.manual_seed(123)
            outs = [module(make_batch(B, seed=0))]
            total_loss(outs[0]).backward()
            grads = _grads(base)
            outs += [module(make_batch(B, seed=s)) for s in (1, 2)]
            return outs, grads

        bare_outs, bare_grads = run(bare, bare)
        outs, grads = run(loss, loss.loss_module)
        for bo, o in zip(bare_outs, outs):
            for key in bo.keys(True, True):
                assert torch.equal(bo.get(key), o.get(key)), key
            # a zero that back-propagates on its own and carries no graph
            assert o["loss_spqr"] == 0 and o["loss_spqr"].grad_fn is None
            assert o["loss_spqr"].requires_grad
            assert o["spqr_kl"] > 0  # diagnostics still computed
        assert bare_grads.keys() == grads.keys()
        for k, g in bare_grads.items():
            if g is None:
                assert grads[k] is None, k
            else:
                assert torch.equal(g, grads[k]), k

    def test_gradient_isolation(self, name, pairs):
        loss = SPQRLoss(make_base(name), beta=1.0, pairs=pairs)
        base = loss.loss_module
        out = loss(make_batch(B))
        out["loss_spqr"].backward()
        _assert_grad_every_member(base.qvalue_network_params)
        _assert_no_grad(base.actor_network_params, "actor")
        _assert_no_grad(base.target_qvalue_network_params, "target critic")
        _assert_no_grad(getattr(base, "target_actor_network_params", None), "target actor")
        if hasattr(base, "log_alpha"):
            assert base.log_alpha.grad is None or not base.log_alpha.grad.any()
        # nothing else in the module received a gradient
        critic_ids = {id(p) for p in base.qvalue_network_params.values(True, True)}
        for n, p in loss.named_parameters():
            if id(p) not in critic_ids:
                assert p.grad is None or not p.grad.any(), n

    def test_critic_call_count(self, name, pairs):
        """data and fused next_policy add no critic call; policy (and REDQ's next_policy,
        which re-uses the target's sample but not its call) add exactly one."""
        bare = make_base(name)
        loss = SPQRLoss(make_base(name), beta=1.0, pairs=pairs)
        c_bare = _CallCounter(bare.qvalue_network)
        c_spqr = _CallCounter(loss.loss_module.qvalue_network)
        torch.manual_seed(0)
        bare(make_batch(B))
        torch.manual_seed(0)
        loss(make_batch(B))
        assert c_bare.calls == (1 if name == "redq" else 3)
        extra = 1 if source(name, pairs) in ("extra_pass", "reused_sample") else 0
        assert c_spqr.calls == c_bare.calls + extra
        # with reuse disabled every pair needs its own pass
        c_spqr.calls = 0
        SPQRLoss(loss.loss_module, beta=1.0, pairs=pairs, reuse=False)(make_batch(B))
        assert c_spqr.calls == c_bare.calls + 1

    def test_fused_values_match_bare(self, name, pairs):
        """With beta>0 the wrapped loss's own outputs are unchanged (up to round-off)."""
        bare = make_base(name)
        loss = SPQRLoss(make_base(name), beta=1.0, pairs=pairs)
        torch.manual_seed(5)
        bo = bare(make_batch(B))
        torch.manual_seed(5)
        o = loss(make_batch(B))
        for key in bo.keys(True, True):
            torch.testing.assert_close(o.get(key), bo.get(key), rtol=1e-5, atol=1e-6)

    def test_reduction(self, name, pairs):
        outs = {}
        for red in ("mean", "sum", "none"):
            loss = SPQRLoss(make_base(name), beta=2.0, pairs=pairs, reduction=red)
            torch.manual_seed(7)
            outs[red] = loss(make_batch(B))
        assert outs["none"]["loss_spqr"].shape == (B,)
        assert outs["none"]["spqr_kl"].shape == (B,)
        torch.testing.assert_close(outs["sum"]["loss_spqr"], B * outs["mean"]["loss_spqr"])
        torch.testing.assert_close(
            outs["none"]["loss_spqr"].mean(), outs["mean"]["loss_spqr"], rtol=1e-6, atol=1e-6
        )


# =========================================================================== sources
@pytest.mark.parametrize("name", ("sac", "redq"))
def test_fused_equals_manual_next_state_kl(name):
    """Fused path: KL of the online ensemble at (s', a') with a' the target's own sample."""
    loss = SPQRLoss(make_base(name), beta=1.0)
    base = loss.loss_module
    spy = _install_spy(base)
    batch = make_batch(B)
    out = loss(batch)
    assert loss.last_source == source(name, "next_policy")
    if name == "redq":
        # REDQ's one call: rows [actor N | next M | data N]; SPQR re-uses the next rows' input
        td_all = spy.calls[0][1]
        nxt = td_all[N]
        assert td_all.batch_size[0] == 2 * N + 2
    else:
        targets = [td for tag, td in spy.calls if tag == "target"]
        assert len(targets) == 1
        nxt = targets[0]
    torch.testing.assert_close(nxt["observation"], batch["next", "observation"])
    ens = tied_ensemble(base)
    with torch.no_grad():
        q = ens.q_values(TensorDict(observation=nxt["observation"], action=nxt["action"]))
    torch.testing.assert_close(out["spqr_kl"], spqr_kl(q), rtol=1e-5, atol=1e-5)
    # and not the data pairs
    with torch.no_grad():
        q_data = ens.q_values(batch)
    assert not torch.allclose(out["spqr_kl"], spqr_kl(q_data))


def test_td3_next_policy_is_the_policy_action_not_the_smoothed_target():
    """TD3's target acts with the target policy plus clipped noise; SPQR's next-state pairs
    are the (online) policy's own action at s'."""
    loss = SPQRLoss(make_base("td3"), beta=1.0)
    base = loss.loss_module
    spy = _install_spy(base)
    batch = make_batch(B)
    out = loss(batch)
    assert loss.last_source == "extra_pass"
    ens = tied_ensemble(base)
    with torch.no_grad(), base.actor_network_params.to_module(base.actor_network):
        a_pi = base.actor_network(batch["next"].select("observation").copy())["action"]
    with torch.no_grad():
        q = ens.q_values(TensorDict(observation=batch["next", "observation"], action=a_pi))
    torch.testing.assert_close(out["spqr_kl"], spqr_kl(q), rtol=1e-5, atol=1e-5)
    target_in = [td for tag, td in spy.calls if tag == "target"][0][0]
    assert not torch.allclose(target_in["action"], a_pi)


@pytest.mark.parametrize("name", BASES)
def test_data_pairs_equal_manual_and_reuse_false(name):
    torch.manual_seed(3)
    reused = SPQRLoss(make_base(name), beta=1.0, pairs="data")
    o1 = reused(make_batch(B))
    explicit = SPQRLoss(make_base(name), beta=1.0, pairs="data", reuse=False)
    o2 = explicit(make_batch(B))
    assert (reused.last_source, explicit.last_source) == ("reused", "extra_pass")
    torch.testing.assert_close(o1["loss_spqr"], o2["loss_spqr"], rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        q = tied_ensemble(reused.loss_module).q_values(make_batch(B))
    torch.testing.assert_close(o1["spqr_kl"], spqr_kl(q), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ("sac", "redq"))
def test_reuse_false_next_policy_draws_fresh_sample(name):
    """Without reuse, next_policy evaluates a fresh (online-policy) sample at s'."""
    loss = SPQRLoss(make_base(name), beta=1.0, reuse=False)
    out = loss(make_batch(B))
    assert loss.last_source == "extra_pass"
    assert torch.isfinite(out["loss_spqr"])
    out["loss_spqr"].backward()
    _assert_grad_every_member(loss.loss_module.qvalue_network_params)
    _assert_no_grad(loss.loss_module.actor_network_params, "actor")


# =========================================================================== keys
def _act_actor() -> ProbabilisticActor:
    net = nn.Sequential(
        nn.Linear(N_OBS, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 2 * N_ACT), NormalParamExtractor()
    )
    return ProbabilisticActor(
        TensorDictModule(net, in_keys=["observation"], out_keys=["loc", "scale"]),
        in_keys=["loc", "scale"],
        out_keys=["act"],
        distribution_class=TanhNormal,
        spec=Bounded(-1.0, 1.0, (N_ACT,)),
        return_log_prob=True,
    )


class TestKeys:
    @pytest.mark.parametrize("pairs", PAIRS)
    def test_renamed_action_key(self, pairs):
        ens = make_ensemble(N, HIDDEN, in_keys=("observation", "act"))
        sac = EnsembleSACLoss(_act_actor(), ens.members(), num_qvalue_nets=N, loss_function="l2")
        sac.set_keys(action="act")
        loss = SPQRLoss(sac, beta=1.0, pairs=pairs)
        assert loss.tensor_keys.action == "act"
        assert "action" not in loss.in_keys
        batch = make_batch(B)
        batch.rename_key_("action", "act")
        out = loss(batch)
        assert loss.last_source == source("sac", pairs)
        assert torch.isfinite(out["loss_spqr"])
        if pairs == "data":
            ens.tie_to_loss(sac)
            with torch.no_grad():
                q = ens.q_values(batch)
            torch.testing.assert_close(out["spqr_kl"], spqr_kl(q))
        if pairs == "data":  # the missing-key message uses the renamed key
            with pytest.raises(KeyError, match="'act'"):
                loss(batch.exclude("act"))

    def test_default_keys_and_unknown_key(self):
        loss = SPQRLoss(make_base("sac"))
        assert loss.tensor_keys.action == "action"
        assert loss.tensor_keys.state_action_value == "state_action_value"
        with pytest.raises(ValueError):
            loss.set_keys(not_a_key="x")

    @pytest.mark.parametrize(
        "pairs,drop,name",
        [
            ("data", "action", "action"),
            ("data", "observation", "observation"),
            ("next_policy", ("next", "observation"), "next.observation"),
            ("policy", "observation", "observation"),
        ],
    )
    def test_missing_batch_key(self, pairs, drop, name):
        loss = SPQRLoss(make_base("sac"), pairs=pairs)
        batch = make_batch(B).exclude(drop)
        with pytest.raises(KeyError, match=name.replace(".", r"\.")):
            loss(batch)
        standalone = SPQRLoss(
            qvalue_network=make_ensemble(N, HIDDEN), actor_network=make_actor(), pairs=pairs
        )
        with pytest.raises(KeyError, match=name.replace(".", r"\.")):
            standalone(batch)


# =========================================================================== errors
class TestErrors:
    @pytest.mark.parametrize(
        "pairs,key",
        [
            ("data", "observation"),
            ("next_policy", ("next", "observation")),
            ("policy", "observation"),
        ],
    )
    @pytest.mark.parametrize("name", ("sac", "td3"))
    def test_non_finite_q(self, name, pairs, key):
        loss = SPQRLoss(make_base(name), pairs=pairs)
        batch = make_batch(B)
        batch[key][0, 0] = float("nan")
        with pytest.raises(ValueError, match=r"state_action_value contains 10 non-finite"):
            loss(batch)

    def test_cql_two_critics_raises(self):
        cql = CQLLoss(make_actor(HIDDEN), make_q_member(N_OBS + N_ACT, num_cells=(HIDDEN,)))
        with pytest.raises(ValueError, match="N=2"):
            SPQRLoss(cql)

    def test_sac_two_critics_raises(self):
        with pytest.raises(ValueError, match="N=2"):
            SPQRLoss(make_base("sac", n=2))

    def test_bad_arguments(self):
        with pytest.raises(ValueError, match="pairs"):
            SPQRLoss(make_base("sac"), pairs="nope")
        with pytest.raises(ValueError, match="beta"):
            SPQRLoss(make_base("sac"), beta=-1.0)
        with pytest.raises(ValueError, match="reduction"):
            SPQRLoss(make_base("sac"), reduction="max")
        with pytest.raises(ValueError, match="not both"):
            SPQRLoss(make_base("sac"), qvalue_network=make_ensemble(N, HIDDEN))
        with pytest.raises(TypeError):
            SPQRLoss(nn.Linear(2, 2))

    def test_no_rsample_actor_raises(self):
        class NoRsampleNormal(torch.distributions.Normal):
            has_rsample = False

            def rsample(self, sample_shape=()):  # pragma: no cover - not reached
                raise NotImplementedError

        actor = ProbabilisticActor(
            TensorDictModule(
                nn.Sequential(nn.Linear(N_OBS, 2 * N_ACT), NormalParamExtractor()),
                in_keys=["observation"],
                out_keys=["loc", "scale"],
            ),
            in_keys=["loc", "scale"],
            distribution_class=NoRsampleNormal,
        )
        ens = make_ensemble(N, HIDDEN)
        for pairs in ("policy", "next_policy"):
            loss = SPQRLoss(qvalue_network=ens, actor_network=actor, pairs=pairs)
            with pytest.raises(ValueError, match="rsample"):
                loss(make_batch(B))
        # data pairs do not need the actor
        out = SPQRLoss(qvalue_network=ens, actor_network=actor, pairs="data")(make_batch(B))
        assert torch.isfinite(out["loss_spqr"])


# =========================================================================== seeds / schedule
class TestSeedsAndSchedule:
    def test_same_seed_same_outputs(self):
        loss = SPQRLoss(make_base("sac"), beta=1.0)
        torch.manual_seed(11)
        o1 = loss(make_batch(B))
        torch.manual_seed(11)
        o2 = loss(make_batch(B))
        for key in o1.keys(True, True):
            assert torch.equal(o1.get(key), o2.get(key)), key
        o3 = loss(make_batch(B))  # fresh samples
        assert not torch.equal(o1["loss_qvalue"], o3["loss_qvalue"])

    def test_random_filling_seeded(self):
        def kls(seed):
            loss = SPQRLoss(make_base("sac"), pairs="data", filling="random", seed=seed)
            return torch.stack([loss(make_batch(B))["spqr_kl"] for _ in range(4)])

        torch.manual_seed(0)
        a = kls(3)
        torch.manual_seed(99)  # the global RNG does not matter
        b = kls(3)
        assert torch.equal(a, b)
        assert not torch.equal(a, kls(4))
        # fresh positions at each call: the data are fixed, yet the KL changes
        assert len(set(a.tolist())) > 1
        ordered = SPQRLoss(make_base("sac"), pairs="data")(make_batch(B))["spqr_kl"]
        assert not torch.isclose(a, ordered).all()

    def test_beta_zero_random_filling_keeps_global_rng(self):
        """Unseeded random filling draws from the global RNG only when it matters (beta>0)."""
        bare = make_base("sac", seed=1)
        loss = SPQRLoss(make_base("sac", seed=1), beta=0.0, pairs="data", filling="random")
        torch.manual_seed(5)
        ref = [bare(make_batch(B, seed=s))["loss_qvalue"] for s in range(3)]
        torch.manual_seed(5)
        outs = [loss(make_batch(B, seed=s)) for s in range(3)]
        for r, o in zip(ref, outs):
            assert torch.equal(r, o["loss_qvalue"])
        assert len({float(o["spqr_kl"]) for o in outs}) > 1  # positions still vary

    def test_beta_schedule(self):
        loss = SPQRLoss(make_base("sac"), beta=lambda step: min(1.0, step / 10), pairs="data")
        betas = []
        for _ in range(3):
            out = loss(make_batch(B))
            betas.append(float(out["spqr_beta"]))
            torch.testing.assert_close(out["loss_spqr"].detach(), out["spqr_beta"] * out["spqr_kl"])
        assert betas == pytest.approx([0.0, 0.1, 0.2])
        assert int(loss.step_count) == 3
        loss.eval()
        for _ in range(2):
            out = loss(make_batch(B))
            assert float(out["spqr_beta"]) == pytest.approx(0.3)
        assert int(loss.step_count) == 3
        loss.train()
        assert float(loss(make_batch(B))["spqr_beta"]) == pytest.approx(0.3)
        assert int(loss.step_count) == 4
        assert float(loss.beta) == pytest.approx(0.3)

    def test_beta_buffer_is_schedulable(self):
        loss = SPQRLoss(make_base("sac"), beta=1.0, pairs="data")
        buf = loss.beta
        loss.beta = 3.0
        assert loss.beta is buf and float(buf) == 3.0
        assert "beta" in dict(loss.named_buffers())
        out = loss(make_batch(B))
        assert float(out["spqr_beta"]) == 3.0
        torch.testing.assert_close(out["loss_spqr"].detach(), 3.0 * out["spqr_kl"])

    def test_diagnostics_interval(self):
        loss = SPQRLoss(make_base("sac"), beta=1.0, pairs="data", diagnostics_interval=3)
        has = ["spqr_spike" in loss(make_batch(B)).keys() for _ in range(7)]
        assert has == [True, False, False, True, False, False, True]
        out = loss(make_batch(B))
        assert "spqr_kl" in out.keys() and "spqr_mp_ratio" not in out.keys()
        loss.eval()
        assert "spqr_spike" in loss(make_batch(B)).keys()
        off = SPQRLoss(make_base("sac"), beta=1.0, pairs="data", diagnostics_interval=0)
        out = off(make_batch(B))
        assert not any(k.startswith("spqr_") for k in out.keys())
        assert out["loss_spqr"].requires_grad and out["loss_spqr"] > 0


# =========================================================================== state / device
class TestStateAndDevice:
    def test_state_dict_round_trip(self):
        src = SPQRLoss(make_base("sac", seed=1), beta=2.0)
        src(make_batch(B))  # step_count -> 1
        dst = SPQRLoss(make_base("sac", seed=2), beta=1.0)
        torch.manual_seed(4)
        before = dst(make_batch(B))
        dst.load_state_dict(src.state_dict())
        assert int(dst.step_count) == int(src.step_count) == 1
        assert float(dst.beta) == 2.0
        torch.manual_seed(4)
        o_src = src(make_batch(B))
        torch.manual_seed(4)
        o_dst = dst(make_batch(B))
        for key in o_src.keys(True, True):
            assert torch.equal(o_src.get(key), o_dst.get(key)), key
        assert not torch.equal(o_src["loss_qvalue"], before["loss_qvalue"])

    @pytest.mark.parametrize("name", ("sac", "redq"))
    def test_fresh_wrapper_loads_trained_state(self, name):
        """The base's lazily registered ``target_entropy`` must not break a resume: a fresh,
        never-run SPQRLoss loads (strict) the state of one that has trained."""
        src = SPQRLoss(make_base(name, seed=1), beta=1.0)
        src(make_batch(B))
        state = src.state_dict()
        assert any(k.endswith("target_entropy") or "target_entropy" in k for k in state)
        dst = SPQRLoss(make_base(name, seed=2), beta=1.0)
        dst.load_state_dict(state)  # strict: raised "Unexpected key(s) ... target_entropy"
        for k, v in state.items():
            torch.testing.assert_close(dst.state_dict()[k], v, msg=k)

    @pytest.mark.parametrize("pairs", ("data", "next_policy"))
    def test_to_and_double(self, pairs):
        loss = SPQRLoss(make_base("sac"), beta=1.0, pairs=pairs)
        torch.manual_seed(2)
        ref = loss(make_batch(B))  # a forward first: TorchRL/tensordict cache detached params
        loss.to("cpu")
        assert loss.beta.device.type == "cpu"
        loss.double()
        assert loss.beta.dtype == torch.float64
        assert loss.loss_module.qvalue_network_params.dtype == torch.float64
        batch = make_batch(B).apply(lambda x: x.double() if x.is_floating_point() else x)
        torch.manual_seed(2)
        out = loss(batch)
        assert loss.last_source == source("sac", pairs)
        for key in out.keys():
            if key.startswith(("loss_", "spqr_")):
                assert out[key].dtype == torch.float64, key
                assert torch.isfinite(out[key]).all(), key
        if pairs == "data":  # no policy sample in the KL: float64 draws differ from float32 ones
            for key in ("loss_spqr", "spqr_kl", "spqr_ensemble_std"):
                torch.testing.assert_close(out[key].float(), ref[key], rtol=1e-4, atol=1e-5)
        loss.float()
        torch.manual_seed(2)
        back = loss(make_batch(B))
        for key in ref.keys():
            torch.testing.assert_close(back[key], ref[key], rtol=1e-5, atol=1e-5)


class TestCompile:
    def test_compile_eager_backend_standalone(self):
        """Compiled (dynamo, eager backend) standalone SPQRLoss gives the eager values."""
        ens = make_ensemble(N, HIDDEN)
        loss = SPQRLoss(qvalue_network=ens, actor_network=make_actor(HIDDEN), pairs="policy")
        torch._dynamo.reset()
        compiled = torch.compile(loss, backend="eager")
        for seed in (8, 9):
            torch.manual_seed(seed)
            ref = loss(make_batch(B, seed=seed))
            torch.manual_seed(seed)
            out = compiled(make_batch(B, seed=seed))
            assert set(out.keys()) == set(ref.keys())
            for key in ref.keys():
                torch.testing.assert_close(out[key], ref[key], rtol=1e-6, atol=1e-6)
        grads = torch.autograd.grad(out["loss_spqr"], list(ens.parameters()))
        ref_grads = torch.autograd.grad(ref["loss_spqr"], list(ens.parameters()))
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g, r)

    @pytest.mark.slow  # ~80 s on 2 CPU cores: dynamo tracing through SACLoss itself (~75 s bare)
    def test_compile_eager_backend_wrapped(self):
        """The capture/fuse logic works under dynamo (graph breaks allowed): same values."""
        loss = SPQRLoss(make_base("sac"), beta=1.0)
        torch._dynamo.reset()
        compiled = torch.compile(loss, backend="eager")
        for seed in (8, 9, 10):
            torch.manual_seed(seed)
            ref = loss(make_batch(B, seed=seed))
            torch.manual_seed(seed)
            out = compiled(make_batch(B, seed=seed))
            assert loss.last_source == "fused"
            assert set(out.keys()) == set(ref.keys())
            for key in ref.keys():
                torch.testing.assert_close(out[key], ref[key], rtol=1e-6, atol=1e-6)


# =========================================================================== standalone
class TestStandalone:
    @pytest.mark.parametrize("pairs", PAIRS)
    def test_gradients(self, pairs):
        ens = make_ensemble(N, HIDDEN)
        actor = make_actor(HIDDEN)
        loss = SPQRLoss(qvalue_network=ens, actor_network=actor, beta=2.0, pairs=pairs)
        out = loss(make_batch(B))
        assert loss.last_source == "extra_pass"
        assert set(out.keys()) == set(SPQR_KEYS)
        out["loss_spqr"].backward()
        _assert_grad_every_member(ens.params)
        assert all(p.grad is None for p in actor.parameters())
        torch.testing.assert_close(out["loss_spqr"].detach(), 2.0 * out["spqr_kl"])
        if pairs == "data":
            with torch.no_grad():
                torch.testing.assert_close(out["spqr_kl"], spqr_kl(ens.q_values(make_batch(B))))

    def test_reduction_none(self):
        loss = SPQRLoss(qvalue_network=make_ensemble(N, HIDDEN), pairs="data", reduction="none")
        out = loss(make_batch(B))
        assert out.batch_size == (B,)
        assert out["loss_spqr"].shape == (B,)

    def test_errors(self):
        ens = make_ensemble(N, HIDDEN)
        for pairs in ("next_policy", "policy"):
            with pytest.raises(ValueError, match="actor_network"):
                SPQRLoss(qvalue_network=ens, pairs=pairs)
        SPQRLoss(qvalue_network=ens, pairs="data")  # fine
        member = make_q_member(N_OBS + N_ACT, num_cells=(HIDDEN,))
        with pytest.raises(TypeError, match="QEnsemble"):
            SPQRLoss(qvalue_network=member, actor_network=make_actor(HIDDEN))
        with pytest.raises(ValueError, match="N=2"):
            SPQRLoss(qvalue_network=make_ensemble(2, HIDDEN), pairs="data")


# =========================================================================== training
def test_training_loop_smoke():
    ens = make_ensemble(N, HIDDEN)
    sac = SACLoss(make_actor(HIDDEN), ens.members(), num_qvalue_nets=N, loss_function="l2")
    loss = SPQRLoss(sac, beta=1.0)
    updater = SoftUpdate(loss.loss_module, tau=0.05)
    opt = torch.optim.Adam(loss.parameters(), lr=3e-3)
    target0 = sac.target_qvalue_network_params.clone()
    kls = []
    for step in range(20):
        out = loss(make_batch(B, seed=step))
        total = total_loss(out)
        for k, v in out.items():
            if k.startswith("loss_"):
                assert torch.isfinite(v).all(), (step, k)
        opt.zero_grad()
        total.backward()
        opt.step()
        updater.step()
        kls.append(float(out["spqr_kl"]))
    assert all(0.3 < k < 1.2 for k in kls)
    assert int(loss.step_count) == 20
    params = sac.qvalue_network_params.detach()
    for key, leaf in params.items(True, True):
        for i, j in itertools.combinations(range(N), 2):
            assert not torch.equal(leaf[i], leaf[j]), (key, i, j)
    # targets moved towards the online params
    for key, leaf in sac.target_qvalue_network_params.items(True, True):
        assert not torch.equal(leaf, target0.get(key)), key


def test_multi_dim_batch_per_column():
    """Batch [4, 3] (e.g. batch x agents): per-element KL equals the per-column spqr_kl."""
    sac = make_base("sac")
    loss = SPQRLoss(sac, beta=1.0, pairs="data", reduction="none")
    batch = make_batch(12).reshape(4, 3)
    out = loss(batch)
    assert loss.last_source == "reused"
    assert out["loss_spqr"].shape == (4, 3)
    with torch.no_grad():
        q = tied_ensemble(sac).q_values(batch)
    assert q.shape == (N, 4, 3)
    for j in range(3):
        torch.testing.assert_close(
            out["loss_spqr"][:, j].detach(), spqr_kl(q[:, :, j], reduction="none")
        )
    mean = SPQRLoss(sac, beta=1.0, pairs="data")(batch)
    torch.testing.assert_close(mean["loss_spqr"], out["loss_spqr"].mean())


# ====================================================================== issue 20: bad inputs
def test_identical_critics_read_degenerate_not_independent():
    """Issue 20: critics built from one shared module stay identical under SAC-N + SPQR (the
    SPQR gradient is zero there); the diagnostics must not read "independent"."""
    from torchrl_spqr.objectives import SACNLoss

    shared = make_q_member(N_OBS + N_ACT, num_cells=(HIDDEN, HIDDEN))
    with pytest.raises(ValueError, match="build each member with its own init"):
        QEnsemble(lambda: shared, 6)
    critics = QEnsemble(lambda: shared, 6, allow_shared=True)  # asked for explicitly
    sac = SACNLoss(make_actor(HIDDEN), critics)
    loss = SPQRLoss(sac, beta=1.0)
    opt = torch.optim.Adam(loss.parameters(), lr=1e-3)
    for step in range(3):
        out = loss(make_batch(B, seed=step))
        opt.zero_grad()
        total_loss(out).backward()
        opt.step()
        assert float(out["spqr_ensemble_std"]) == 0.0
        for key in ("spqr_accept_rate", "spqr_mean_pairwise_corr", "spqr_mp_ratio"):
            assert bool(torch.isnan(out[key])), key  # "degenerate", not 1.0 / 0.0
        assert bool(torch.isfinite(out["loss_spqr"]))
    for leaf in sac.qvalue_network_params.values(True, True):
        assert all(torch.equal(leaf[0], leaf[i]) for i in range(1, 6))  # still one critic
    # out_keys unchanged (no new entry), and diagnostics_interval=0 writes no spqr_* entry
    assert tuple(k for k in loss.out_keys if k.startswith("spqr_") or k == "loss_spqr") == SPQR_KEYS
    quiet = SPQRLoss(make_base("sac"), beta=1.0, diagnostics_interval=0)
    assert not [k for k in quiet(make_batch(B)).keys() if k.startswith("spqr_")]


def test_independent_critics_diagnostics_finite():
    out = SPQRLoss(make_base("sac"), beta=1.0, pairs="data")(make_batch(64))
    for key in ("spqr_accept_rate", "spqr_mean_pairwise_corr", "spqr_mp_ratio"):
        assert bool(torch.isfinite(out[key])), key
    assert 0.5 < float(out["spqr_accept_rate"]) <= 1.0


@pytest.mark.parametrize("standalone", [False, True])
def test_empty_batch_refused(standalone):
    if standalone:
        loss = SPQRLoss(qvalue_network=make_ensemble(N, HIDDEN), pairs="data")
    else:
        loss = SPQRLoss(make_base("sac"), beta=1.0)
    with pytest.raises(ValueError, match=r"empty batch \(batch_size \(0,\)\)"):
        loss(make_batch(0))


def test_q_with_wrong_leading_dim_refused():
    """SPQRLoss knows N: Q-values [batch, N] (or any other leading size) are refused."""
    loss = SPQRLoss(make_base("sac"), beta=1.0)
    with pytest.raises(ValueError, match=r"pairs='next_policy'.*dim 0.*num_members=10.*movedim"):
        loss._validated(torch.randn(B, N))
    with pytest.raises(ValueError, match="num_members=10"):
        loss._validated(torch.randn(6, B, 1))
    assert loss._validated(torch.randn(N, B, 1)).shape == (N, B)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(rho=0.0), r"rho must be in \(0, 1\]"),
        (dict(rho=2.0), r"rho must be in \(0, 1\]"),
        (dict(rho=float("nan")), r"rho must be in \(0, 1\]"),
        (dict(eps=-1.0), r"eps must be a finite number >= 0"),
        (dict(eps=float("inf")), r"eps must be a finite number >= 0"),
        (dict(rho=1.0, density="corrected"), r"corrected.*infinite"),
    ],
)
def test_rho_eps_out_of_range_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        SPQRLoss(make_base("sac"), **kw)
    with pytest.raises(ValueError, match=match):
        SPQRLoss(qvalue_network=make_ensemble(N, HIDDEN), pairs="data", **kw)


@pytest.mark.parametrize("beta", ["1", None, b"1", [1.0], True, 1j])
def test_non_numeric_beta_refused(beta):
    with pytest.raises(TypeError, match="beta must be a real number"):
        SPQRLoss(make_base("sac"), beta=beta)


def test_numeric_beta_kinds_accepted():
    import numpy as np

    for beta in (1, 0.5, np.float32(0.5), torch.tensor(0.5)):
        assert float(SPQRLoss(make_base("sac"), beta=beta).beta) == float(beta)
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="finite non-negative"):
            SPQRLoss(make_base("sac"), beta=bad)


@pytest.mark.parametrize("bad", [-0.5, float("nan"), float("inf")])
def test_beta_schedule_bad_value_raises_at_that_step(bad):
    """A schedule that turns negative or NaN raises in forward at that step (not applied as 0)."""
    loss = SPQRLoss(make_base("sac"), beta=lambda step: 1.0 if step < 2 else bad)
    for _ in range(2):
        loss(make_batch(B))
    before = int(loss.step_count)
    with pytest.raises(ValueError, match=r"beta schedule returned .* at step 2.*non-negative"):
        loss(make_batch(B))
    assert int(loss.step_count) == before  # nothing was applied
    assert float(loss.beta) == 1.0


def test_beta_schedule_non_numeric_value_raises():
    with pytest.raises(TypeError, match="value at step 0 must be a real number"):
        SPQRLoss(make_base("sac"), beta=lambda step: "1")
    loss = SPQRLoss(make_base("sac"), beta=lambda step: 1.0 if step == 0 else "0.5")
    loss(make_batch(B))
    with pytest.raises(TypeError, match="value at step 1 must be a real number"):
        loss(make_batch(B))


def test_beta_buffer_set_negative_raises():
    loss = SPQRLoss(make_base("sac"), beta=1.0)
    loss.beta.fill_(-1.0)  # e.g. by a scheduler of the buffer
    with pytest.raises(ValueError, match=r"beta buffer holds -1\.0"):
        loss(make_batch(B))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_q_values(dtype):
    """float16/bfloat16 critics: regularised in float32, the penalty in their dtype."""
    ens = make_ensemble(N, HIDDEN).to(dtype)
    loss = SPQRLoss(qvalue_network=ens, pairs="data", beta=1.0)
    batch = make_batch(32).apply(lambda t: t.to(dtype) if t.is_floating_point() else t)
    out = loss(batch)
    assert out["loss_spqr"].dtype == dtype
    out["loss_spqr"].backward()
    grads = [leaf.grad for leaf in ens.params.values(True, True)]
    assert all(g is not None and bool(torch.isfinite(g).all()) for g in grads)
    with torch.no_grad():
        ref = spqr_kl(ens.q_values(batch).float())
    assert float(out["spqr_kl"]) == pytest.approx(float(ref), rel=2e-2)
    assert 0.0 <= float(out["spqr_accept_rate"]) <= 1.0

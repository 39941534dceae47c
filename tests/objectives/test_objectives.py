"""SAC-N, REDQ, CQL-N and EDAC against hand computations of their defining formulas."""

from __future__ import annotations

import math

import pytest
import torch
from _helpers import N_ACT, N_OBS, make_actor, make_batch, make_ensemble

from torchrl_spqr import SPQRLoss
from torchrl_spqr.objectives import (
    CQLNLoss,
    EDACLoss,
    ReferenceREDQLoss,
    SACNLoss,
    mbpo_target_entropy,
)
from torchrl_spqr.objectives.min_q import ARGMIN_MIN_MEMBERS

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

B = 8


def _fixed_sampler(loss, seed: int = 123):
    """Replace the policy sampler by a deterministic function of the observation.

    Actions and log-probs are fixed functions of the input, so the hand
    computation below sees the same values as the loss.
    """
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N_OBS, N_ACT, generator=g)

    def sample(td, *, grad):
        obs = td.get("observation")
        action = torch.tanh(obs @ w)
        log_prob = -(obs.pow(2).sum(-1)) * 0.1
        if grad:  # keep a path to the actor params so gradient tests see the actor
            p = next(iter(loss.actor_network_params.values(True, True)))
            log_prob = log_prob + 0.0 * p.sum()
        return action, log_prob

    loss._sample = sample
    return sample


def _member_q(loss, k: int, obs, act, target: bool = False):
    params = loss.target_qvalue_network_params if target else loss.qvalue_network_params
    from tensordict import TensorDict

    td = TensorDict({"observation": obs, "action": act}, obs.shape[:-1])
    with params[k].to_module(loss.qvalue_network):
        return loss.qvalue_network(td)["state_action_value"].squeeze(-1)


def _build(cls, n=5, **kw):
    torch.manual_seed(0)
    loss = cls(make_actor(), make_ensemble(n), **kw)
    # make targets differ from the online critics, as after training
    with torch.no_grad():
        for p in loss.target_qvalue_network_params.values(True, True):
            p.add_(0.05 * torch.randn_like(p))
    return loss


def _grads(loss, key, out):
    loss.zero_grad(set_to_none=True)
    out[key].backward(retain_graph=True)
    groups = {
        "actor": list(loss.actor_network_params.values(True, True)),
        "critic": list(loss.qvalue_network_params.values(True, True)),
        "log_alpha": [loss.log_alpha],
    }
    if getattr(loss, "with_lagrange", False):
        groups["log_alpha_prime"] = [loss.log_alpha_prime]
    res = {}
    for name, ps in groups.items():
        res[name] = any(p.grad is not None and p.grad.abs().sum() > 0 for p in ps)
    targets = list(loss.target_qvalue_network_params.values(True, True))
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in targets)
    return res


# ---------------------------------------------------------------- SAC-N
def test_sacn_matches_hand_computation():
    n = 5
    loss = _build(SACNLoss, n, alpha_init=0.2)
    _fixed_sampler(loss)
    data = make_batch(B)
    out = loss(data.clone())
    alpha = 0.2
    s, a = data["observation"], data["action"]
    s2 = data["next", "observation"]
    a2, lp2 = loss._sample(data["next"], grad=False)
    with torch.no_grad():
        q_next = torch.stack([_member_q(loss, k, s2, a2, target=True) for k in range(n)])
        y = data["next", "reward"].squeeze(-1) + 0.99 * (q_next.min(0).values - alpha * lp2)
        pred = torch.stack([_member_q(loss, k, s, a) for k in range(n)])
        expected_q = ((pred - y) ** 2).sum(0).mean()
        a_pi, lp = loss._sample(data, grad=False)
        q_pi = torch.stack([_member_q(loss, k, s, a_pi) for k in range(n)])
        expected_actor = (alpha * lp - q_pi.min(0).values).mean()
    torch.testing.assert_close(out["loss_qvalue"], expected_q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["loss_actor"], expected_actor, rtol=1e-5, atol=1e-5)
    te = -float(N_ACT)
    torch.testing.assert_close(
        out["loss_alpha"], (-math.log(alpha) * (lp + te)).mean(), rtol=1e-5, atol=1e-5
    )


def test_terminal_vs_truncated():
    loss = _build(SACNLoss, 3, alpha_init=0.2)
    _fixed_sampler(loss)
    data = make_batch(B)
    data["next", "done"][:] = True  # truncation only: bootstraps
    out_trunc = loss(data.clone())
    data["next", "terminated"][:] = True
    out_term = loss(data.clone())
    r = data["next", "reward"].squeeze(-1)
    with torch.no_grad():
        pred = torch.stack(
            [_member_q(loss, k, data["observation"], data["action"]) for k in range(3)]
        )
    torch.testing.assert_close(out_term["loss_qvalue"], ((pred - r) ** 2).sum(0).mean())
    assert not torch.allclose(out_trunc["loss_qvalue"], out_term["loss_qvalue"])


@pytest.mark.parametrize(
    "key,expect",
    [
        ("loss_qvalue", {"critic"}),
        ("loss_actor", {"actor"}),
        ("loss_alpha", {"log_alpha"}),
    ],
)
def test_sacn_gradient_isolation(key, expect):
    loss = _build(SACNLoss, 4, alpha_init=0.5)
    out = loss(make_batch(B))
    got = {k for k, v in _grads(loss, key, out).items() if v}
    assert got == expect


@pytest.mark.parametrize("n", [2, 3, 10, 50])
def test_shapes_and_keys_over_n(n):
    loss = SACNLoss(make_actor(), make_ensemble(n, hidden=8))
    out = loss(make_batch(B))
    assert {"loss_qvalue", "loss_actor", "loss_alpha", "alpha", "entropy"} <= set(out.keys())
    assert all(out[k].shape == () for k in out.keys())
    assert loss.qvalue_network_params.batch_size[0] == n
    loss_none = SACNLoss(make_actor(), make_ensemble(n, hidden=8), reduction="none")
    out = loss_none(make_batch(B))
    assert out["loss_qvalue"].shape == (B,)


def test_errors():
    with pytest.raises(ValueError, match="at least 2 critics"):
        SACNLoss(make_actor(), make_ensemble(1))
    with pytest.raises(TypeError, match="QEnsemble or a list"):
        SACNLoss(make_actor(), make_ensemble(3).members()[0])
    ens = make_ensemble(3)
    m = ens.members()[0]
    with pytest.raises(ValueError, match="share parameter"):
        SACNLoss(make_actor(), [m, m, m])
    with pytest.raises(ValueError, match="num_qvalue_nets=4"):
        SACNLoss(make_actor(), ens, num_qvalue_nets=4)
    loss = SACNLoss(make_actor(), ens)
    with pytest.raises(ValueError, match="not an accepted"):
        loss.set_keys(not_a_key="x")
    data = make_batch(B)
    del data["next", "reward"]
    with pytest.raises(KeyError, match="next.reward"):
        loss(data)
    with pytest.raises(ValueError, match="sub_sample_len"):
        ReferenceREDQLoss(make_actor(), make_ensemble(3), sub_sample_len=5)
    with pytest.raises(ValueError, match="policy_update_delay"):
        ReferenceREDQLoss(make_actor(), make_ensemble(3), policy_update_delay=0)


def test_key_remapping():
    loss = SACNLoss(make_actor(), make_ensemble(3))
    loss.set_keys(reward="rew")
    data = make_batch(B)
    data["next", "rew"] = data["next"].pop("reward")
    out = loss(data)
    assert torch.isfinite(out["loss_qvalue"])


# ---------------------------------------------------------------- REDQ
def test_redq_subset_min_and_mse_sum():
    n, m = 10, 2
    loss = _build(ReferenceREDQLoss, n, sub_sample_len=m, alpha_init=0.1, policy_update_delay=20)
    _fixed_sampler(loss)
    data = make_batch(B)
    torch.manual_seed(7)
    out = loss(data.clone())
    torch.manual_seed(7)
    subset = torch.randperm(n)[:m]
    s2 = data["next", "observation"]
    a2, lp2 = loss._sample(data["next"], grad=False)
    with torch.no_grad():
        q_next = torch.stack([_member_q(loss, int(k), s2, a2, target=True) for k in subset])
        y = data["next", "reward"].squeeze(-1) + 0.99 * (q_next.min(0).values - 0.1 * lp2)
        pred = torch.stack(
            [_member_q(loss, k, data["observation"], data["action"]) for k in range(n)]
        )
    torch.testing.assert_close(out["loss_qvalue"], ((pred - y) ** 2).sum(0).mean())
    # the subset matters: the min over all N would give a different target
    with torch.no_grad():
        q_all = torch.stack([_member_q(loss, k, s2, a2, target=True) for k in range(n)])
    y_all = data["next", "reward"].squeeze(-1) + 0.99 * (q_all.min(0).values - 0.1 * lp2)
    assert not torch.allclose(((pred - y_all) ** 2).sum(0).mean(), out["loss_qvalue"])


def test_redq_actor_mean_and_policy_delay():
    n, g = 6, 4
    loss = _build(ReferenceREDQLoss, n, alpha_init=0.1, policy_update_delay=g)
    _fixed_sampler(loss)
    data = make_batch(B)
    flags = []
    for _ in range(2 * g):
        out = loss(data.clone())
        flags.append(bool(out["actor_updated"]))
        if not flags[-1]:
            assert float(out["loss_actor"]) == 0.0 and not out["loss_actor"].requires_grad
        else:
            a_pi, lp = loss._sample(data, grad=False)
            with torch.no_grad():
                q = torch.stack([_member_q(loss, k, data["observation"], a_pi) for k in range(n)])
            torch.testing.assert_close(out["loss_actor"], (0.1 * lp - q.mean(0)).mean())
    assert flags == [False, False, False, True] * 2


def test_redq_critic_only_path_skips_actor():
    loss = _build(ReferenceREDQLoss, 5, policy_update_delay=20)
    calls = {"n": 0}
    orig = loss._actor_out

    def counting(*a, **k):
        calls["n"] += 1
        return orig(*a, **k)

    loss._actor_out = counting
    for _ in range(19):
        out = loss(make_batch(B))
        loss.zero_grad(set_to_none=True)
        sum(v for k, v in out.items() if k.startswith("loss_")).backward()
        assert all(p.grad is None for p in loss.actor_network_params.values(True, True))
    assert calls["n"] == 0
    loss(make_batch(B))
    assert calls["n"] == 1


def test_mbpo_target_entropy():
    assert mbpo_target_entropy("Hopper-v5") == -1.0
    assert mbpo_target_entropy("Humanoid-v5") == -2.0
    with pytest.raises(KeyError, match="Pendulum"):
        mbpo_target_entropy("Pendulum-v1")


# ---------------------------------------------------------------- CQL-N
@pytest.mark.parametrize("lagrange", [None, 5.0])
def test_cql_logsumexp_term(lagrange):
    n, r = 4, 3
    loss = _build(CQLNLoss, n, num_random=r, min_q_weight=5.0, lagrange_thresh=lagrange)
    _fixed_sampler(loss)
    data = make_batch(B)
    torch.manual_seed(11)
    out = loss(data.clone())
    torch.manual_seed(11)
    a_rand = torch.empty(B, r, N_ACT).uniform_(-1, 1)
    s = data["observation"]
    s_rep = s.unsqueeze(1).expand(B, r, N_OBS)
    s2_rep = data["next", "observation"].unsqueeze(1).expand(B, r, N_OBS)
    a_cur, lp_cur = loss._sample(_td(s_rep), grad=False)
    a_nxt, lp_nxt = loss._sample(_td(s2_rep), grad=False)
    gaps = []
    with torch.no_grad():
        for k in range(n):
            vals = []
            for j in range(r):  # explicit loops over the sampled actions
                vals.append(_member_q(loss, k, s, a_rand[:, j]) - N_ACT * math.log(0.5))
            for j in range(r):
                vals.append(_member_q(loss, k, s, a_cur[:, j]) - lp_cur[:, j])
            for j in range(r):
                vals.append(_member_q(loss, k, s, a_nxt[:, j]) - lp_nxt[:, j])
            lse = torch.logsumexp(torch.stack(vals, -1), -1)  # over all 3R actions per state
            gaps.append(lse - _member_q(loss, k, s, data["action"]))
    gaps = torch.stack(gaps)
    torch.testing.assert_close(out["cql_gap"], gaps.mean(), rtol=1e-5, atol=1e-5)
    if lagrange is None:
        torch.testing.assert_close(
            out["loss_cql"], (5.0 * gaps).sum(0).mean(), rtol=1e-5, atol=1e-5
        )
    else:  # alpha' = exp(0) = 1 at init
        torch.testing.assert_close(
            out["loss_cql"], (5.0 * gaps - lagrange).sum(0).mean(), rtol=1e-5, atol=1e-5
        )
        torch.testing.assert_close(
            out["loss_alpha_prime"], -(5.0 * gaps - lagrange).mean(), rtol=1e-5, atol=1e-5
        )


def _td(obs):
    from tensordict import TensorDict

    return TensorDict({"observation": obs}, obs.shape[:-1])


@pytest.mark.parametrize(
    "key,expect",
    [
        ("loss_qvalue", {"critic"}),
        ("loss_cql", {"critic"}),
        ("loss_alpha_prime", {"log_alpha_prime"}),
        ("loss_actor", {"actor"}),
    ],
)
def test_cql_gradient_isolation(key, expect):
    loss = _build(CQLNLoss, 3, num_random=2, lagrange_thresh=5.0, alpha_init=0.5)
    out = loss(make_batch(B))
    got = {k for k, v in _grads(loss, key, out).items() if v}
    assert got == expect


def test_cql_min_target_max_backup_and_bc():
    n = 3
    loss = _build(CQLNLoss, n, num_random=2, bc_steps=1)
    _fixed_sampler(loss)
    data = make_batch(B)
    out = loss(data.clone())
    # BC warm start: actor loss = alpha * log pi(a~pi) - log pi(a_data | s)
    assert torch.isfinite(out["loss_actor"])
    out2 = loss(data.clone())  # second call: normal actor loss, min over N
    a_pi, lp = loss._sample(data, grad=False)
    with torch.no_grad():
        q = torch.stack([_member_q(loss, k, data["observation"], a_pi) for k in range(n)])
    torch.testing.assert_close(out2["loss_actor"], (lp - q.min(0).values).mean())
    # default target: min over N target members, no entropy term
    a2, _ = loss._sample(data["next"], grad=False)
    with torch.no_grad():
        q_next = torch.stack(
            [_member_q(loss, k, data["next", "observation"], a2, target=True) for k in range(n)]
        )
        y = data["next", "reward"].squeeze(-1) + 0.99 * q_next.min(0).values
        pred = torch.stack(
            [_member_q(loss, k, data["observation"], data["action"]) for k in range(n)]
        )
    torch.testing.assert_close(out2["loss_qvalue"], ((pred - y) ** 2).sum(0).mean())
    # max-Q backup runs and gives a target at least as large (max over sampled actions)
    loss_mq = _build(CQLNLoss, n, num_random=4, max_q_backup=True)
    out_mq = loss_mq(data.clone())
    assert torch.isfinite(out_mq["loss_qvalue"])


# ---------------------------------------------------------------- EDAC
def test_edac_cosine_term():
    n = 5
    loss = _build(EDACLoss, n, eta=2.0)
    data = make_batch(B)
    div = loss.diversity(data)
    grads = []
    for k in range(n):
        act = data["action"].clone().requires_grad_(True)
        q = _member_q(loss, k, data["observation"], act)
        (g,) = torch.autograd.grad(q.sum(), act)
        grads.append(g / g.norm(dim=-1, keepdim=True))
    expected = torch.zeros(B)
    for i in range(n):
        for j in range(n):
            if i != j:
                expected += (grads[i] * grads[j]).sum(-1)
    expected /= n - 1
    torch.testing.assert_close(div, expected, rtol=1e-5, atol=1e-5)
    out = loss(data.clone())
    torch.testing.assert_close(out["loss_diversity"], 2.0 * expected.mean(), rtol=1e-5, atol=1e-5)
    got = {k for k, v in _grads(loss, "loss_diversity", out).items() if v}
    assert got == {"critic"}


# ---------------------------------------------------------------- SPQR
@pytest.mark.parametrize("cls", [SACNLoss, ReferenceREDQLoss, CQLNLoss, EDACLoss])
@pytest.mark.parametrize("pairs,source", [("next_policy", "fused"), ("data", "reused")])
def test_spqr_composes_without_extra_pass(cls, pairs, source):
    base = _build(cls, 6)
    calls = {"n": 0}
    orig = base._q

    def counting(td, params):
        calls["n"] += 1
        return orig(td, params)

    base._q = counting
    torch.manual_seed(0)
    base(make_batch(B))
    bare_calls = calls["n"]
    calls["n"] = 0
    loss = SPQRLoss(base, beta=1.0, pairs=pairs)
    out = loss(make_batch(B))
    assert loss.last_source == source
    assert calls["n"] == bare_calls
    assert out["loss_spqr"].requires_grad
    got = {k for k, v in _grads(base, "loss_qvalue", out).items() if v}
    assert got == {"critic"}
    base.zero_grad(set_to_none=True)
    out["loss_spqr"].backward()
    per_member = [
        p.grad.flatten(1).abs().sum(1) for p in base.qvalue_network_params.values(True, True)
    ]
    assert (torch.stack(per_member).sum(0) > 0).all()  # every member receives SPQR's gradient
    assert all(p.grad is None for p in base.actor_network_params.values(True, True))


def test_spqr_beta_zero_exact_on_package_loss():
    def run(wrap):
        base = _build(SACNLoss, 6)
        loss = SPQRLoss(base, beta=0.0) if wrap else base
        torch.manual_seed(3)
        out = loss(make_batch(B))
        base.zero_grad(set_to_none=True)
        sum(v for k, v in out.items() if k.startswith("loss_")).backward()
        return out, [p.grad.clone() for p in base.qvalue_network_params.values(True, True)]

    (o1, g1), (o2, g2) = run(False), run(True)
    for k in o1.keys():
        assert torch.equal(o1[k], o2[k]), k
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))


@pytest.mark.parametrize("kw", [{}, {"layer_norm": True}, {"layer_norm": True, "dropout": 0.1}])
def test_batched_mlp_equals_vmap(kw):
    """The batched-matmul critic path gives the vmapped module's values and gradients."""
    loss = SACNLoss(make_actor(), make_ensemble(4, **kw))
    loss.eval()  # dropout off: both paths deterministic
    assert loss._batched_q is not None
    data = make_batch(B)
    td = data.select("observation", "action")
    fast = loss._q(td, loss.qvalue_network_params)
    slow = loss._vmap_qvalue_networkN0(td, loss.qvalue_network_params)["state_action_value"]
    torch.testing.assert_close(fast, slow.squeeze(-1), rtol=1e-5, atol=1e-6)
    g_fast = torch.autograd.grad(fast.sum(), list(loss.qvalue_network_params.values(True, True)))
    g_slow = torch.autograd.grad(slow.sum(), list(loss.qvalue_network_params.values(True, True)))
    for a, b in zip(g_fast, g_slow):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # multi-dim batch and a parameter subset (REDQ's target subset)
    td2 = td.reshape(2, B // 2)
    sub = loss.target_qvalue_network_params[torch.tensor([0, 2])]
    out = loss._q(td2, sub)
    assert out.shape == (2, 2, B // 2)
    ref = loss._vmap_qvalue_networkN0(td2, sub)["state_action_value"].squeeze(-1)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    if kw.get("dropout"):  # train mode: members draw different masks
        loss.train()
        with torch.no_grad():
            for p in loss.qvalue_network_params.values(True, True):
                p.copy_(p[0].expand_as(p))
        q = loss._q(td, loss.qvalue_network_params)
        assert not torch.allclose(q[0], q[1])


@pytest.mark.parametrize("n", [2, 5, 50])
def test_batched_select_equals_chosen_members(n):
    """``BatchedMLP.select`` runs each row through its chosen member (values and input grads)."""
    loss = SACNLoss(make_actor(), make_ensemble(n))
    bq, params = loss._batched_q, loss.qvalue_network_params.detach()
    g = torch.Generator().manual_seed(n)
    x = torch.randn(37, N_OBS + N_ACT, generator=g, requires_grad=True)
    for index in (torch.randint(0, n, (37,), generator=g), torch.full((37,), n - 1)):
        out = bq.select(params, [x], index).squeeze(-1)
        full = bq(params, [x]).squeeze(-1)  # [n, 37]
        ref = full.gather(0, index.unsqueeze(0)).squeeze(0)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
        (gx,) = torch.autograd.grad(out.sum(), x)
        (gref,) = torch.autograd.grad(ref.sum(), x)
        torch.testing.assert_close(gx, gref, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="index"):
        bq.select(params, [x], torch.zeros(5, dtype=torch.long))


def _argmin_spread_setup(n: int, mdtype=None):
    """A loss whose critics' arg-min spreads over the members (zero biases: at
    initialisation one member's bias would be the min of most rows, and the arg-min
    path would fall back to the plain min), an action with grad, and its inputs."""
    torch.manual_seed(n)
    loss = SACNLoss(make_actor(), make_ensemble(n))
    loss.critic_matmul_dtype = mdtype
    with torch.no_grad():
        for key, value in loss.qvalue_network_params.items(True, True):
            if key[-1] == "bias":
                value.zero_()
    loss.target_qvalue_network_params.data.update_(loss.qvalue_network_params.data)
    data = make_batch(64)
    action = (torch.rand(64, N_ACT) * 2 - 1).requires_grad_(True)
    td, params = loss._q_in(data, action), loss._detached_qvalue_params
    with torch.no_grad():
        index = loss._q(td, params).min(0).indices
    assert 2 * int(torch.bincount(index, minlength=n).max()) <= 64, "rows concentrate"
    return loss, data, action, td, params


def _count_select(monkeypatch, loss) -> list:
    calls = []
    cls = type(loss._batched_q)
    real = cls.select
    monkeypatch.setattr(cls, "select", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    return calls


@pytest.mark.parametrize("n", [10, ARGMIN_MIN_MEMBERS, 50])
def test_min_q_argmin_path_matches_full_min(n, monkeypatch):
    """The actor's min over members: arg-min-only backward gives the full path's value and grads."""
    loss, data, action, td, params = _argmin_spread_setup(n)
    loss.min_q_path = "argmin"  # the default takes it from ARGMIN_MIN_MEMBERS members on
    calls = _count_select(monkeypatch, loss)
    fast = loss._min_q(td, params)
    assert calls, "the arg-min path was not taken"
    slow = loss._q(td, params).min(0).values
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-6)
    (g_fast,) = torch.autograd.grad(fast.sum(), action)
    (g_slow,) = torch.autograd.grad(slow.sum(), action)
    torch.testing.assert_close(g_fast, g_slow, rtol=1e-4, atol=1e-6)
    # end to end: same loss_actor and actor gradients as the vmap path's plain min
    ref = SACNLoss(make_actor(), make_ensemble(n))
    ref.load_state_dict(loss.state_dict())
    ref._batched_q = None
    outs, grads = [], []
    calls.clear()
    for mod in (loss, ref):
        torch.manual_seed(1)
        o = mod(data)
        outs.append(o["loss_actor"])
        grads.append(
            torch.autograd.grad(o["loss_actor"], list(mod.actor_network_params.values(True, True)))
        )
    assert calls, "the loss's actor pass did not take the arg-min path"
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "n, mdtype, argmin",
    [
        (10, None, False),
        (ARGMIN_MIN_MEMBERS - 1, None, False),
        (ARGMIN_MIN_MEMBERS, None, True),
        (ARGMIN_MIN_MEMBERS, torch.bfloat16, False),
    ],
)
def test_min_q_auto_path_follows_the_measured_rule(n, mdtype, argmin, monkeypatch):
    """``min_q_path="auto"`` takes the arg-min path with full-precision products and at
    least ARGMIN_MIN_MEMBERS members only (bench_min_q.py); "argmin"/"full" force a path,
    and any other value is refused by name when it is set."""
    loss, _, _, td, params = _argmin_spread_setup(n, mdtype)
    calls = _count_select(monkeypatch, loss)
    assert loss.min_q_path == "auto"
    loss._min_q(td, params)
    assert bool(calls) == argmin
    for forced in ("argmin", "full"):
        calls.clear()
        loss.min_q_path = forced
        loss._min_q(td, params)
        assert bool(calls) == (forced == "argmin"), forced
    with pytest.raises(ValueError, match="min_q_path must be 'auto', 'argmin' or 'full'"):
        loss.min_q_path = "fast"
    assert loss.min_q_path == "full"


def test_spqr_loss_sets_the_wrapped_losses_min_q_path():
    """``SPQRLoss(...).min_q_path = ...`` reaches the wrapped loss (a plain attribute on the
    wrapper would do nothing); around a TorchRL loss it is refused by name."""
    from torchrl.objectives import SACLoss

    base = SACNLoss(make_actor(), make_ensemble(3))
    spqr = SPQRLoss(base, beta=1.0, pairs="data", diagnostics_interval=0)
    assert spqr.min_q_path == "auto"
    spqr.min_q_path = "argmin"
    assert base.min_q_path == "argmin" and "min_q_path" not in spqr.__dict__
    torchrl_sac = SACLoss(make_actor(), make_ensemble(3).members(), num_qvalue_nets=3)
    wrapped = SPQRLoss(torchrl_sac, beta=1.0, pairs="data", diagnostics_interval=0)
    with pytest.raises(AttributeError, match="min_q_path: the wrapped SACLoss has no such"):
        wrapped.min_q_path = "full"


def test_min_q_traces_as_one_graph_under_compile():
    """Under torch.compile the actor's min takes the plain path: no data-dependent group
    sizes, so the min traces without a graph break (fullgraph=True) and gives the same
    value and action gradient as eager."""
    torch.manual_seed(0)
    loss = SACNLoss(make_actor(), make_ensemble(5))
    data = make_batch(32)
    params = loss._detached_qvalue_params
    obs = data.get("observation")

    def min_q(observation, action):
        td = data.empty().set("observation", observation)
        return loss._min_q(loss._q_in(td, action), params)

    compiled = torch.compile(min_q, backend="eager", fullgraph=True)
    action = (torch.rand(32, N_ACT) * 2 - 1).requires_grad_(True)
    got, want = compiled(obs, action), min_q(obs, action)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    (g_got,) = torch.autograd.grad(got.sum(), action)
    (g_want,) = torch.autograd.grad(want.sum(), action)
    torch.testing.assert_close(g_got, g_want, rtol=1e-4, atol=1e-6)

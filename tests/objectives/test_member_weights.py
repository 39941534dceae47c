"""``SPQRLoss(member_weights=...)``: the authors' per-member weighting of the SPQR gradient.

The reference is a literal re-implementation of the critic update in the authors'
CQL-N (``dohyeoklee/SPQR``, ``SPQR-CQL-Min/rlkit/torch/sac/cql.py`` l. 361-407): N
critics with N optimisers, ``beta * rmt_loss`` added to every critic's loss, then
for each critic in turn ``optimizer[k].zero_grad(); loss[k].backward(retain_graph=True)``,
the steps after the last backward.
"""

from __future__ import annotations

import math

import pytest
import torch
from _helpers import N_ACT, N_OBS, make_actor, make_batch, make_ensemble
from tensordict import TensorDict
from torch import nn

from torchrl_spqr import SPQRLoss
from torchrl_spqr import objectives as O
from torchrl_spqr.functional import spqr_kl
from torchrl_spqr.training.builders import ConfigError, make_spqr_loss, validate_spqr

N, B, BETA = 6, 16, 2.0


def _ens(seed: int = 0):
    torch.manual_seed(seed)
    return make_ensemble(N, hidden=8)


def _inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    s, a = torch.randn(B, N_OBS, generator=g), torch.rand(B, N_ACT, generator=g) * 2 - 1
    s2, a2 = torch.randn(B, N_OBS, generator=g), torch.rand(B, N_ACT, generator=g) * 2 - 1
    y = torch.randn(B, 1, generator=g)
    return s, a, s2, a2, y


def _authors_update(ens, s, a, s2, a2, y, beta=BETA, with_td=True):
    """The authors' loop, literally: per-member gradients as their optimisers step them."""
    critics = ens.members()  # N stand-alone critics (copies of the ensemble's members)
    opts = [torch.optim.Adam(c.parameters(), lr=3e-4) for c in critics]

    def q(c, obs, act):
        return c(TensorDict({"observation": obs, "action": act}, [B]))["state_action_value"]

    # qfs_loss = [self.qf_criterion(q_pred, q_target) ...] (own TD terms, target detached)
    losses = [
        nn.functional.mse_loss(q(c, s, a), y) if with_td else torch.zeros(()) for c in critics
    ]
    # qs_pred_list = [qf(next_obs, new_next_actions) ...]; rmt_loss; qf_loss + beta * rmt_loss
    rmt = spqr_kl(torch.stack([q(c, s2, a2) for c in critics]))
    losses = [loss + beta * rmt for loss in losses]
    for k in range(N):  # cql.py l. 388-400: zero_grad of critic k only, then its backward
        opts[k].zero_grad()
        losses[k].backward(retain_graph=True)
    # cql.py l. 402-407 would step now: these are the gradients the steps use
    return [{n: p.grad.clone() for n, p in c.named_parameters()} for c in critics], rmt


def _member_grads(ens, loss: torch.Tensor):
    names = list(ens.params.keys(True, True))
    grads = torch.autograd.grad(loss, [ens.params.get(n) for n in names], allow_unused=True)
    out = []
    for k in range(N):
        out.append(
            {
                ".".join(n) if isinstance(n, tuple) else n: (
                    torch.zeros_like(ens.params.get(n)[k]) if g is None else g[k]
                )
                for n, g in zip(names, grads)
            }
        )
    return out


def _compare(ref, got):
    for k in range(N):
        for name, g in ref[k].items():
            key = next(n for n in got[k] if n.endswith(name))
            torch.testing.assert_close(got[k][key], g, msg=f"member {k}, {name}")


def test_authors_weights_are_n_minus_k():
    loss = SPQRLoss(qvalue_network=_ens(), pairs="data", beta=BETA, member_weights="authors")
    assert loss.member_weights == (6.0, 5.0, 4.0, 3.0, 2.0, 1.0)
    assert [BETA * w for w in loss.member_weights] == [12, 10, 8, 6, 4, 2]


@pytest.mark.parametrize("with_td", [False, True])
def test_matches_authors_update(with_td):
    """Each member's gradient equals what the authors' N optimisers would step with."""
    ens = _ens()
    s, a, s2, a2, y = _inputs()
    ref, rmt = _authors_update(ens, s, a, s2, a2, y, with_td=with_td)
    reg = SPQRLoss(qvalue_network=ens, pairs="data", beta=BETA, member_weights="authors")
    out = reg(TensorDict({"observation": s2, "action": a2}, [B]))
    total = out["loss_spqr"]
    if with_td:  # the package's critic losses sum over members: each member's own term once
        q = ens(TensorDict({"observation": s, "action": a}, [B]))["state_action_value"]
        total = total + sum(nn.functional.mse_loss(q[k], y) for k in range(N))
    _compare(ref, _member_grads(ens, total))
    torch.testing.assert_close(out["spqr_kl"], rmt.detach())


def test_spqr_part_is_n_minus_k_times_beta():
    """The shared term's part: (N - k) * beta * dKL/dtheta_k (12, 10, ..., 2 for beta=2)."""
    ens = _ens(3)
    s, a, s2, a2, y = _inputs(4)
    ref, _ = _authors_update(ens, s, a, s2, a2, y, with_td=False)
    once = SPQRLoss(qvalue_network=ens, pairs="data", beta=1.0)
    unit = _member_grads(ens, once(TensorDict({"observation": s2, "action": a2}, [B]))["loss_spqr"])
    for k in range(N):
        for name, g in ref[k].items():
            key = next(n for n in unit[k] if n.endswith(name))
            torch.testing.assert_close(g, (N - k) * BETA * unit[k][key])


def _wrapped(kind, ens, actor, **kw):
    members = ens.members()
    if kind == "sac":
        base = O.EnsembleSACLoss(actor, members, num_qvalue_nets=N, loss_function="l2")
    else:
        base = O.CQLNLoss(actor, members, num_random=2)
    return SPQRLoss(base, **kw)


def _stacked_grads(loss_module, value):
    params = loss_module.qvalue_network_params
    names = list(params.keys(True, True))
    grads = torch.autograd.grad(
        value, [params.get(n) for n in names], allow_unused=True, retain_graph=True
    )
    return {n: g for n, g in zip(names, grads) if g is not None}


@pytest.mark.parametrize("kind", ["sac", "cql"])
@pytest.mark.parametrize("pairs", ["next_policy", "data", "policy"])
def test_wrapped_all_pairs(kind, pairs):
    """Wrapped: member k's SPQR gradient is w_k times the unweighted one; values unchanged."""
    ens, actor, td = _ens(5), make_actor(), make_batch(B, seed=6)
    weights = [0.5, 3.0, 0.0, 1.0, 2.5, 7.0]
    outs, grads = {}, {}
    for mw in (None, "authors", weights):
        loss = _wrapped(kind, ens, actor, beta=BETA, pairs=pairs, member_weights=mw)
        torch.manual_seed(7)
        out = loss(td.clone())
        outs[str(mw)] = out
        grads[str(mw)] = _stacked_grads(loss, out["loss_spqr"])
    for mw, w in (("authors", [6, 5, 4, 3, 2, 1]), (str(weights), weights)):
        assert torch.equal(outs[mw]["loss_spqr"], outs["None"]["loss_spqr"])
        assert torch.equal(outs[mw]["spqr_kl"], outs["None"]["spqr_kl"])
        assert torch.equal(outs[mw]["loss_qvalue"], outs["None"]["loss_qvalue"])
        for name, g in grads["None"].items():
            scale = torch.tensor(w, dtype=g.dtype).reshape(-1, *([1] * (g.dim() - 1)))
            torch.testing.assert_close(grads[mw][name], scale * g, msg=f"{mw} {name}")


@pytest.mark.parametrize("pairs", ["next_policy", "data", "policy"])
def test_standalone_all_pairs_value_unchanged(pairs):
    ens, actor, td = _ens(8), make_actor(), make_batch(B, seed=9)
    res = {}
    for mw in (None, "authors"):
        loss = SPQRLoss(
            qvalue_network=ens, actor_network=actor, pairs=pairs, beta=BETA, member_weights=mw
        )
        torch.manual_seed(10)
        out = loss(td.clone())
        res[mw] = (out, _member_grads(ens, out["loss_spqr"]))
    (o0, g0), (o1, g1) = res[None], res["authors"]
    assert torch.equal(o0["loss_spqr"], o1["loss_spqr"])
    assert torch.equal(o0["spqr_kl"], o1["spqr_kl"])
    torch.testing.assert_close(o1["loss_spqr"], BETA * o1["spqr_kl"])
    for k in range(N):
        for name, g in g0[k].items():
            torch.testing.assert_close(g1[k][name], (N - k) * g)


def test_beta_zero_unaffected():
    ens, actor, td = _ens(11), make_actor(), make_batch(B, seed=12)
    outs, grads = [], []
    for mw in (None, "authors"):
        loss = _wrapped("sac", ens, actor, beta=0.0, member_weights=mw)
        torch.manual_seed(13)
        out = loss(td.clone())
        outs.append(out)
        grads.append(_stacked_grads(loss, out["loss_qvalue"]))
        assert float(out["loss_spqr"].detach()) == 0.0
    for key in ("loss_qvalue", "loss_actor", "spqr_kl"):
        assert torch.equal(outs[0][key], outs[1][key]), key
    for name in grads[0]:
        assert torch.equal(grads[0][name], grads[1][name]), name


def test_add_to_and_reduction_none():
    ens, actor, td = _ens(14), make_actor(), make_batch(B, seed=15)
    base_kw = dict(beta=BETA, pairs="data")
    g = {}
    for mw in (None, "authors"):
        loss = _wrapped("sac", ens, actor, add_to="loss_qvalue", member_weights=mw, **base_kw)
        torch.manual_seed(16)
        out = loss(td.clone())
        assert "loss_spqr" not in out.keys()
        torch.manual_seed(16)
        bare = loss.loss_module(td.clone())["loss_qvalue"]
        gw, gb = _stacked_grads(loss, out["loss_qvalue"]), _stacked_grads(loss, bare)
        g[mw] = {n: gw[n] - gb[n] for n in gw}  # the penalty's part of loss_qvalue's gradient
    for name, gq in g[None].items():
        scale = torch.arange(N, 0, -1, dtype=gq.dtype).reshape(-1, *([1] * (gq.dim() - 1)))
        torch.testing.assert_close(g["authors"][name], scale * gq, atol=1e-5, rtol=1e-4)
    reg = SPQRLoss(qvalue_network=ens, pairs="data", reduction="none", beta=1.0)
    regw = SPQRLoss(qvalue_network=ens, pairs="data", reduction="none", beta=1.0,
                    member_weights="authors")  # fmt: skip
    assert torch.equal(reg(td)["loss_spqr"], regw(td)["loss_spqr"])


def test_explicit_weights_and_tensor():
    ens = _ens()
    w = torch.tensor([1.0, 0.0, 2.0, 0.5, 1.0, 3.0])
    loss = SPQRLoss(qvalue_network=ens, pairs="data", member_weights=w)
    assert loss.member_weights == (1.0, 0.0, 2.0, 0.5, 1.0, 3.0)
    assert "_member_w" not in loss.state_dict()
    loss2 = SPQRLoss(qvalue_network=ens, pairs="data", member_weights=(1, 1, 1, 1, 1, 1))
    assert loss2.member_weights == (1.0,) * N


@pytest.mark.parametrize(
    ("spec", "err", "match"),
    [
        ("author", ValueError, "not a known weighting"),
        ("Authors", ValueError, "not a known weighting"),
        ([1.0] * 5, ValueError, "5 entries but the ensemble has N=6"),
        ([1.0] * 7, ValueError, "7 entries"),
        ([1, 1, -1, 1, 1, 1], ValueError, r"member_weights\[2\] = -1.0"),
        ([1, 1, 1, math.nan, 1, 1], ValueError, r"member_weights\[3\] = nan"),
        ([1, 1, 1, 1, math.inf, 1], ValueError, r"member_weights\[4\] = inf"),
        ([0] * 6, ValueError, "all 0"),
        ([1, 1, 1, 1, 1, "1"], TypeError, r"member_weights\[5\]"),
        ([1, 1, 1, True, 1, 1], TypeError, r"member_weights\[3\]"),
        (2.0, TypeError, "member_weights must be"),
        (torch.ones(2, 3), ValueError, "1-D"),
    ],
)
def test_validation(spec, err, match):
    with pytest.raises(err, match=match):
        SPQRLoss(qvalue_network=_ens(), pairs="data", member_weights=spec)


def test_config_builder_and_validation():
    from omegaconf import OmegaConf

    ens, actor = _ens(), make_actor()
    base = O.CQLNLoss(actor, ens.members(), num_random=2)
    for mw, want in (
        ("authors", (6.0, 5.0, 4.0, 3.0, 2.0, 1.0)),
        (None, None),
        ([1, 2, 3, 4, 5, 6], (1.0, 2.0, 3.0, 4.0, 5.0, 6.0)),
    ):
        cfg = OmegaConf.create({"algorithm": "cql", "spqr": {"beta": 2.0, "member_weights": mw}})
        validate_spqr(cfg, N)
        assert make_spqr_loss(cfg, base).member_weights == want
    for bad, match in (("nope", "not a known weighting"), ([1, 2], "2 entries"), ([1, -1] * 3, "")):
        cfg = OmegaConf.create({"spqr": {"beta": 2.0, "member_weights": bad}})
        with pytest.raises(ConfigError, match="spqr.member_weights=.*" + match):
            validate_spqr(cfg, N)


def test_dataset_configs_use_authors():
    from pathlib import Path

    from omegaconf import OmegaConf

    root = Path(__file__).resolve().parents[2] / "sota_scripts"
    files = sorted((root / "cql_spqr" / "dataset").glob("kitchen_*.yaml"))
    files += sorted((root / "cql_spqr" / "dataset").glob("antmaze_*.yaml"))
    assert files
    for f in files:
        cfg = OmegaConf.load(f)
        assert cfg.spqr.member_weights == "authors", f.name
        assert "cql.py" in f.read_text(), f.name
    for f in sorted(root.glob("*/config.yaml")):
        assert OmegaConf.load(f).spqr.member_weights is None, f

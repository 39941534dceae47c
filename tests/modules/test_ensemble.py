"""Tests of :class:`torchrl_spqr.QEnsemble` (independent init, one vmapped call, TorchRL interop)."""

from __future__ import annotations

import itertools
import math
import shutil

import pytest
import torch
from _helpers import N_ACT, N_OBS, make_actor, make_batch, make_det_actor, make_ensemble
from tensordict import TensorDict
from torch import nn
from torchrl.data import Bounded
from torchrl.objectives import REDQLoss, SACLoss, TD3Loss

from torchrl_spqr import QEnsemble, make_q_member

N = 10
B = 8
HIDDEN = 16
IN = N_OBS + N_ACT


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _layer_of(ens: QEnsemble, key: tuple[str, ...]) -> nn.Module:
    return dict(ens.module.named_modules())[".".join(key[:-1])]


def _leaves(ens: QEnsemble):
    return list(ens.params.items(True, True))


def _assert_members_pairwise_distinct(stacked: TensorDict, keys=None) -> None:
    """Every (selected) leaf differs between every pair of members."""
    n = stacked.batch_size[0]
    for key, leaf in stacked.items(True, True):
        if keys is not None and key not in keys:
            continue
        for i, j in itertools.combinations(range(n), 2):
            assert not torch.equal(leaf[i], leaf[j]), f"members {i} and {j} share {key}"


def _linear_keys(ens: QEnsemble) -> list:
    return [k for k, _ in _leaves(ens) if isinstance(_layer_of(ens, k), nn.Linear)]


def _loop_members(ens: QEnsemble, td: TensorDict) -> torch.Tensor:
    return torch.stack([m(td.clone())["state_action_value"] for m in ens.members()], 0)


# ------------------------------------------------------------------ construction
class TestInit:
    @pytest.mark.parametrize("how", ["factory", "template"])
    def test_members_differ_in_every_linear_param(self, how):
        kw = dict(num_cells=(HIDDEN, HIDDEN), layer_norm=True)
        if how == "factory":
            ens = QEnsemble(lambda: make_q_member(IN, **kw), N)
        else:
            ens = QEnsemble(template=make_q_member(IN, **kw), num_members=N)
        lin = _linear_keys(ens)
        # 3 Linear layers, weight and bias each
        assert len(lin) == 6
        _assert_members_pairwise_distinct(ens.params, keys=set(lin))
        # LayerNorm: its own reset gives weight=1, bias=0 for every member
        ln_keys = [k for k, _ in _leaves(ens) if isinstance(_layer_of(ens, k), nn.LayerNorm)]
        assert len(ln_keys) == 4
        for k in ln_keys:
            leaf = ens.params.get(k)
            expected = torch.ones_like(leaf) if k[-1] == "weight" else torch.zeros_like(leaf)
            assert torch.equal(leaf, expected), k
        # every param is accounted for
        assert set(lin) | set(ln_keys) == {k for k, _ in _leaves(ens)}

    def test_template_fan_in(self):
        """Template copies are re-initialised by each layer's own reset_parameters (fan-in)."""
        template = make_q_member(IN, num_cells=(64, 64))
        with torch.no_grad():  # a template with a silly init: must not leak into members
            for p in template.parameters():
                p.fill_(3.0)
        ens = QEnsemble(template=template, num_members=N)
        for key, leaf in _leaves(ens):
            layer = _layer_of(ens, key)
            assert isinstance(layer, nn.Linear)
            bound = 1.0 / math.sqrt(layer.in_features)  # fan-in bound of nn.Linear's init
            assert float(leaf.abs().max()) <= bound + 1e-6, key
            if leaf.numel() < 100:  # the last bias: N values only
                continue
            # std of U(-b, b) is b / sqrt(3) (also that of a fresh layer): loose tolerance
            assert float(leaf.std()) == pytest.approx(bound / math.sqrt(3), rel=0.2), key
            if key[-1] == "weight":
                ref = nn.Linear(layer.in_features, layer.out_features).weight
                assert float(leaf.std()) == pytest.approx(float(ref.std()), rel=0.25), key
        # template untouched
        assert all(bool((p == 3.0).all()) for p in template.parameters())

    def test_template_without_reset_parameters_raises(self):
        class Scaled(nn.Module):
            def __init__(self):
                super().__init__()
                self.lin = nn.Linear(IN, 1)
                self.scale = nn.Parameter(torch.ones(1))

            def forward(self, obs, act):
                return self.lin(torch.cat([obs, act], -1)) * self.scale

        with pytest.raises(ValueError, match="reset_parameters"):
            QEnsemble(template=Scaled(), num_members=3)
        # the factory path accepts it (custom init is the factory's business)
        ens = QEnsemble(Scaled, 3)
        assert ens(make_batch(B))["state_action_value"].shape == (3, B, 1)

    def test_lazy_member_raises(self):
        with pytest.raises(ValueError, match="lazy"):
            QEnsemble(lambda: make_q_member(None, num_cells=(HIDDEN,)), 3)

    def test_factory_same_module_twice_raises(self):
        member = make_q_member(IN, num_cells=(HIDDEN,))
        with pytest.raises(ValueError, match="same module twice"):
            QEnsemble(lambda: member, 3)

    def test_bad_arguments(self):
        with pytest.raises(ValueError, match="exactly one"):
            QEnsemble(num_members=3)
        with pytest.raises(ValueError, match="exactly one"):
            QEnsemble(lambda: make_q_member(IN), 3, template=make_q_member(IN))
        with pytest.raises(ValueError, match="num_members"):
            QEnsemble(lambda: make_q_member(IN), 0)


# ------------------------------------------------------------------ forward
class TestForward:
    def test_matches_loop_over_members(self):
        ens = make_ensemble(N, HIDDEN)
        td = make_batch(B)
        out = ens(td)
        assert out.batch_size == (N, B)
        q = out["state_action_value"]
        assert q.shape == (N, B, 1)
        torch.testing.assert_close(q, _loop_members(ens, td), rtol=1e-6, atol=1e-6)
        assert ens.q_values(td).shape == (N, B)
        # input is not modified
        assert "state_action_value" not in td.keys()

    def test_multi_dim_batch(self):
        ens = make_ensemble(N, HIDDEN)
        td = make_batch(12).reshape(4, 3)
        out = ens(td)
        assert out.batch_size == (N, 4, 3)
        assert out["state_action_value"].shape == (N, 4, 3, 1)
        torch.testing.assert_close(
            out["state_action_value"], _loop_members(ens, td), rtol=1e-6, atol=1e-6
        )
        flat = ens(td.reshape(-1))["state_action_value"]
        torch.testing.assert_close(out["state_action_value"].reshape(N, 12, 1), flat)

    def test_missing_keys_raise(self):
        ens = make_ensemble(3, HIDDEN)
        td = make_batch(B).exclude("action")
        with pytest.raises(KeyError, match="action"):
            ens(td)

    def test_plain_module_members(self):
        class Q(nn.Module):
            def __init__(self):
                super().__init__()
                self.lin = nn.Linear(IN, 1)

            def forward(self, obs, act):
                return self.lin(torch.cat([obs, act], -1))

        ens = QEnsemble(Q, 4, in_keys=("observation", "action"), out_keys=("q",))
        assert ens.out_keys == ["q"]
        td = make_batch(B)
        out = ens(td)["q"]
        loop = torch.stack([m(td.clone())["q"] for m in ens.members()], 0)
        torch.testing.assert_close(out, loop)


class TestDropout:
    def _identical_members(self, **kw) -> QEnsemble:
        ens = make_ensemble(N, HIDDEN, dropout=0.5, **kw)
        with torch.no_grad():
            for leaf in ens.params.values(True, True):
                leaf.copy_(leaf[0].clone().expand_as(leaf))
        _, w = _leaves(ens)[0]
        assert torch.equal(w[0], w[-1])
        return ens

    def test_train_mode_different_masks_per_member(self):
        ens = self._identical_members()
        ens.train()
        q = ens(make_batch(B))["state_action_value"]
        # identical parameters, yet members differ: each has its own mask
        for i, j in itertools.combinations(range(N), 2):
            assert not torch.equal(q[i], q[j]), (i, j)

    def test_eval_mode_deterministic(self):
        ens = self._identical_members()
        ens.eval()
        assert not ens.module.training
        assert not any(m.training for m in ens.module.modules())
        td = make_batch(B)
        q1 = ens(td)["state_action_value"]
        q2 = ens(td)["state_action_value"]
        assert torch.equal(q1, q2)
        # identical members + no dropout -> identical outputs
        for i in range(1, N):
            torch.testing.assert_close(q1[i], q1[0])
        ens.train()
        assert ens.module.training
        assert not torch.equal(ens(td)["state_action_value"], q1)


# ------------------------------------------------------------------ TorchRL interop
def _sac(ens, **kw):
    return SACLoss(make_actor(HIDDEN), ens.members(), num_qvalue_nets=ens.num_members, **kw)


def _redq(ens, **kw):
    return REDQLoss(
        make_actor(HIDDEN), ens.members(), num_qvalue_nets=ens.num_members, sub_sample_len=2, **kw
    )


def _td3(ens, **kw):
    return TD3Loss(
        make_det_actor(HIDDEN),
        ens.members(),
        num_qvalue_nets=ens.num_members,
        action_spec=Bounded(-1.0, 1.0, (N_ACT,)),
        **kw,
    )


BUILDERS = {"sac": _sac, "redq": _redq, "td3": _td3}


class TestTorchRLLosses:
    @pytest.mark.parametrize("name", list(BUILDERS))
    def test_members_kept_exactly(self, name):
        ens = make_ensemble(N, HIDDEN)
        loss = BUILDERS[name](ens)
        lp = loss.qvalue_network_params
        assert lp.batch_size[0] == N
        assert set(lp.keys(True, True)) == set(ens.params.keys(True, True))
        for i in range(N):
            for key, leaf in ens.params[i].items(True, True):
                assert torch.equal(lp[i].get(key), leaf), (name, i, key)
        # target params start equal to the online ones
        tp = loss.target_qvalue_network_params
        for key, leaf in lp.items(True, True):
            assert torch.equal(tp.get(key), leaf.data)
        # and the loss's params are not the ensemble's storage (a copy, until tied)
        k0 = _linear_keys(ens)[0]
        assert lp.get(k0).data_ptr() != ens.params.get(k0).data_ptr()

    @pytest.mark.parametrize("name", list(BUILDERS))
    def test_tie_to_loss_shares_params(self, name):
        ens = make_ensemble(N, HIDDEN)
        loss = BUILDERS[name](ens)
        td = make_batch(B)
        before = ens(td)["state_action_value"].clone()
        assert ens.tie_to_loss(loss) is ens
        torch.testing.assert_close(ens(td)["state_action_value"], before)
        with torch.no_grad():
            for leaf in loss.qvalue_network_params.values(True, True):
                leaf.add_(0.1)
        after = ens(td)["state_action_value"]
        assert not torch.allclose(after, before)
        # ens now reads exactly the loss's values
        lp = loss.qvalue_network_params
        for key, leaf in ens.params.items(True, True):
            assert leaf.data_ptr() == lp.get(key).data_ptr()

    def test_tie_to_loss_mismatched_n_raises(self):
        loss = _sac(make_ensemble(N, HIDDEN))
        with pytest.raises(ValueError, match="critics"):
            make_ensemble(6, HIDDEN).tie_to_loss(loss)
        with pytest.raises(AttributeError):
            make_ensemble(N, HIDDEN).tie_to_loss(loss, name="nonexistent")
        other = QEnsemble(lambda: make_q_member(IN, num_cells=(HIDDEN,)), N)
        with pytest.raises(ValueError, match="names differ"):
            other.tie_to_loss(loss)

    def test_members_stay_distinct_after_training(self):
        ens = make_ensemble(N, HIDDEN)
        loss = _sac(ens, loss_function="l2")
        ens.tie_to_loss(loss)
        init = loss.qvalue_network_params.detach().clone()
        opt = torch.optim.Adam(loss.parameters(), lr=1e-2)
        for step in range(5):
            out = loss(make_batch(B, seed=step))
            total = sum(v for k, v in out.items() if k.startswith("loss_"))
            opt.zero_grad()
            total.backward()
            opt.step()
        params = loss.qvalue_network_params.detach()
        # training moved every member
        for key, leaf in params.items(True, True):
            for i in range(N):
                assert not torch.equal(leaf[i], init.get(key)[i]), (key, i)
        _assert_members_pairwise_distinct(params)
        # and the tied ensemble reflects the trained values
        td = make_batch(B, seed=99)
        ref = torch.stack([_materialised_q(ens, params[i], td) for i in range(N)])
        torch.testing.assert_close(ens(td)["state_action_value"], ref, rtol=1e-5, atol=1e-6)


def _materialised_q(ens: QEnsemble, params: TensorDict, td: TensorDict) -> torch.Tensor:
    member = make_q_member(IN, num_cells=(HIDDEN, HIDDEN))
    params.to_module(member)
    return member(td.clone())["state_action_value"]


# ------------------------------------------------------------------ misc
class TestReset:
    def test_reset_parameters_changes_every_linear_param(self):
        ens = make_ensemble(N, HIDDEN, layer_norm=True)
        before = ens.params.detach().clone()
        ens.reset_parameters()
        for key in _linear_keys(ens):
            new, old = ens.params.get(key), before.get(key)
            for i in range(N):
                assert not torch.equal(new[i], old[i]), (key, i)
        _assert_members_pairwise_distinct(ens.params, keys=set(_linear_keys(ens)))
        # LayerNorm returns to its own init
        for key, leaf in _leaves(ens):
            if isinstance(_layer_of(ens, key), nn.LayerNorm):
                assert torch.equal(leaf, before.get(key))
        # the params are still leaves that train
        assert all(p.requires_grad for p in ens.parameters())


class TestStateDict:
    def test_round_trip(self):
        ens1 = make_ensemble(N, HIDDEN)
        ens2 = make_ensemble(N, HIDDEN)
        td = make_batch(B)
        assert not torch.allclose(ens1(td)["state_action_value"], ens2(td)["state_action_value"])
        sd = ens1.state_dict()
        assert len(sd) == 6 and all(v.shape[0] == N for v in sd.values())
        ens2.load_state_dict(sd)
        assert torch.equal(ens1(td)["state_action_value"], ens2(td)["state_action_value"])
        # a copy, not shared storage
        with torch.no_grad():
            next(iter(ens1.parameters())).add_(1.0)
        assert not torch.equal(ens1(td)["state_action_value"], ens2(td)["state_action_value"])

    def test_dtype_move(self):
        ens = make_ensemble(N, HIDDEN)
        td = make_batch(B)
        ref = ens(td)["state_action_value"]
        ens.double().to("cpu")
        out = ens(td.apply(lambda x: x.double() if x.is_floating_point() else x))
        assert out["state_action_value"].dtype == torch.float64
        torch.testing.assert_close(out["state_action_value"].float(), ref, rtol=1e-5, atol=1e-5)


class TestCompile:
    def test_compile_eager_backend(self):
        ens = make_ensemble(N, HIDDEN)
        td = make_batch(B)
        ref = ens(td)["state_action_value"]
        torch._dynamo.reset()
        compiled = torch.compile(ens, backend="eager")
        torch.testing.assert_close(compiled(td)["state_action_value"], ref)
        torch.testing.assert_close(
            compiled(make_batch(B, seed=1))["state_action_value"],
            ens(make_batch(B, seed=1))["state_action_value"],
        )

    @pytest.mark.skipif(
        shutil.which("c++") is None and shutil.which("g++") is None,
        reason="inductor's CPU backend needs a C++ compiler",
    )
    def test_compile_inductor(self):
        """Default backend (inductor): ~20 s on 2 CPU cores with a cold cache."""
        ens = make_ensemble(N, HIDDEN)
        td = make_batch(B)
        ref = ens(td)["state_action_value"]
        torch._dynamo.reset()
        compiled = torch.compile(ens)
        torch.testing.assert_close(compiled(td)["state_action_value"], ref, rtol=1e-5, atol=1e-5)
        td2 = make_batch(B, seed=1)
        torch.testing.assert_close(
            compiled(td2)["state_action_value"],
            ens(td2)["state_action_value"],
            rtol=1e-5,
            atol=1e-5,
        )


# ------------------------------------------------------------------ issue 20: bad members
class TestSharedAndBadMembers:
    """Members that are one critic, or not one architecture, are refused with a fix."""

    def test_factory_wrapping_one_module_names_the_fix(self):
        shared = make_q_member(IN, num_cells=(HIDDEN,))
        with pytest.raises(ValueError, match="build each member with its own init"):
            QEnsemble(lambda: shared, N)

    def test_members_sharing_a_parameter_tensor_refused(self):
        base = make_q_member(IN, num_cells=(HIDDEN,))

        def factory():
            m = make_q_member(IN, num_cells=(HIDDEN,))
            m.module.net[0].weight = base.module.net[0].weight  # one tensor in every member
            return m

        with pytest.raises(ValueError, match=r"share a tensor.*module\.net\.0\.weight") as err:
            QEnsemble(factory, 4)
        assert "allow_shared=True" in str(err.value)
        assert "own init" in str(err.value)

    def test_members_sharing_a_submodule_refused(self):
        trunk = nn.Linear(IN, HIDDEN)

        class Q(nn.Module):
            def __init__(self):
                super().__init__()
                self.trunk = trunk
                self.head = nn.Linear(HIDDEN, 1)

            def forward(self, obs, act):
                return self.head(self.trunk(torch.cat([obs, act], -1)))

        with pytest.raises(ValueError, match=r"share a tensor.*trunk"):
            QEnsemble(Q, 3)

    def test_members_sharing_a_buffer_refused(self):
        buf = torch.zeros(1)

        class Q(nn.Module):
            def __init__(self):
                super().__init__()
                self.lin = nn.Linear(IN, 1)
                self.register_buffer("offset", buf)

            def forward(self, obs, act):
                return self.lin(torch.cat([obs, act], -1)) + self.offset

        with pytest.raises(ValueError, match=r"share a tensor.*offset"):
            QEnsemble(Q, 3)

    def test_identical_values_refused(self):
        def reseeded():
            torch.manual_seed(123)
            return make_q_member(IN, num_cells=(HIDDEN,))

        with pytest.raises(ValueError, match=r"Members 0 and 1 are identical in value.*own init"):
            QEnsemble(reseeded, 3)
        template = make_q_member(IN, num_cells=(HIDDEN,))
        import copy

        with pytest.raises(ValueError, match="identical in value"):
            QEnsemble(lambda: copy.deepcopy(template), 3)

    def test_partly_equal_values_accepted(self):
        """Members equal in some tensors only (zero-initialised heads, buffers) are fine."""

        class Q(nn.Module):
            def __init__(self):
                super().__init__()
                self.lin = nn.Linear(IN, HIDDEN)
                self.head = nn.Linear(HIDDEN, 1)
                nn.init.zeros_(self.head.weight)
                nn.init.zeros_(self.head.bias)

            def forward(self, obs, act):
                return self.head(torch.relu(self.lin(torch.cat([obs, act], -1))))

        assert QEnsemble(Q, 3).num_members == 3

    def test_allow_shared_builds_independent_copies(self):
        shared = make_q_member(IN, num_cells=(HIDDEN,))
        before = {k: v.clone() for k, v in shared.state_dict().items()}
        ens = QEnsemble(lambda: shared, 4, allow_shared=True)
        q = ens(make_batch(B))["state_action_value"]
        assert all(torch.equal(q[0], q[i]) for i in range(4))  # identical, as asked
        with torch.no_grad():  # the stacked copies are not tied to the module or each other
            for leaf in ens.params.values(True, True):
                leaf[1].add_(1.0)
        for k, v in shared.state_dict().items():
            assert v.device.type == "cpu" and torch.equal(v, before[k]), k
        assert not torch.equal(ens.params[0].get(("module", "net", "0", "weight")),
                               ens.params[1].get(("module", "net", "0", "weight")))  # fmt: skip

    def test_kept_modules_never_altered(self):
        """The constructor used to move the first member's parameters to ``meta``."""
        kept = [make_q_member(IN, num_cells=(HIDDEN,)) for _ in range(3)]
        states = [{k: v.clone() for k, v in m.state_dict().items()} for m in kept]
        params = [[id(p) for p in m.parameters()] for m in kept]
        it = iter(kept)
        ens = QEnsemble(lambda: next(it), 3)
        with torch.no_grad():
            for leaf in ens.params.values(True, True):
                leaf.mul_(2.0).add_(1.0)
        td = make_batch(B)
        for m, state, ids in zip(kept, states, params):
            assert [id(p) for p in m.parameters()] == ids
            assert all(isinstance(p, nn.Parameter) and p.is_leaf for p in m.parameters())
            for k, v in m.state_dict().items():
                assert v.device.type == "cpu" and torch.equal(v, state[k]), k
            assert m(td.clone())["state_action_value"].shape == (B, 1)  # still usable
        # and the ensemble does not see the kept modules' later changes
        q0 = ens(td)["state_action_value"].clone()
        with torch.no_grad():
            kept[0].module.net[0].weight.zero_()
        torch.testing.assert_close(ens(td)["state_action_value"], q0)

    @pytest.mark.parametrize("n", [2.5, 3.7, float("nan"), float("inf")])
    def test_fractional_size_refused(self, n):
        with pytest.raises(ValueError, match=f"whole number.*{n}"):
            QEnsemble(lambda: make_q_member(IN, num_cells=(HIDDEN,)), n)

    @pytest.mark.parametrize("n", ["3", True, [3]])
    def test_non_numeric_size_refused(self, n):
        with pytest.raises(TypeError, match="num_members must be a positive integer"):
            QEnsemble(lambda: make_q_member(IN, num_cells=(HIDDEN,)), n)

    def test_integral_sizes_accepted(self):
        import numpy as np

        for n in (3, 3.0, np.int64(3), torch.tensor(3)):
            assert QEnsemble(lambda: make_q_member(IN, num_cells=(HIDDEN,)), n).num_members == 3

    def test_mismatched_architecture_names_the_parameter(self):
        widths = iter([(HIDDEN,), (HIDDEN,), (HIDDEN + 1,)])
        with pytest.raises(
            ValueError,
            match=r"Member 2 differs from member 0 in parameter 'module\.net\.0\.weight': "
            r"shape \(17, 7\) vs \(16, 7\).*one architecture",
        ):
            QEnsemble(lambda: make_q_member(IN, num_cells=next(widths)), 3)

    def test_mismatched_structure_names_the_parameter(self):
        depths = iter([(HIDDEN,), (HIDDEN, HIDDEN)])
        with pytest.raises(ValueError, match=r"Member 1 differs .* 'module\.net\.2\.weight'"):
            QEnsemble(lambda: make_q_member(IN, num_cells=next(depths)), 2)
        biases = iter([True, False])
        with pytest.raises(ValueError, match=r"Member 1 has no parameter 'module\.bias'"):
            QEnsemble(lambda: nn.Linear(IN, 1, bias=next(biases)), 2)
        biases = iter([False, True])
        with pytest.raises(ValueError, match=r"Member 1 has a parameter 'module\.bias' .* lacks"):
            QEnsemble(lambda: nn.Linear(IN, 1, bias=next(biases)), 2)

    def test_mismatched_dtype_named(self):
        dtypes = iter([torch.float32, torch.float64])
        with pytest.raises(ValueError, match=r"dtype torch\.float64 vs torch\.float32"):
            QEnsemble(lambda: make_q_member(IN, num_cells=(HIDDEN,)).to(next(dtypes)), 2)

    def test_mismatched_keys_named(self):
        keys = iter([("observation", "action"), ("observation", "act")])
        with pytest.raises(ValueError, match="in_keys"):
            QEnsemble(lambda: make_q_member(IN, num_cells=(HIDDEN,), in_keys=next(keys)), 2)

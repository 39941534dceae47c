"""The fused ReLU-MLP kernel with lower-precision products (``matmul_dtype``).

What ``matmul_dtype`` promises (``modules/relu_mlp.py``): the products below the
last layer take their operands in the lower dtype; the output, every gradient
and the parameters stay in the parameters' dtype; the last layer runs in full
precision, so the output is not rounded to the lower dtype.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from tensordict import TensorDict

from torchrl_spqr import QEnsemble, SACNLoss, make_q_member
from torchrl_spqr.modules import BatchedMLP, ensemble_relu_mlp

N, B = 4, 64
LOW = (torch.bfloat16, torch.float16)


def params(sizes, n=N, dtype=torch.float32, seed=0):
    """Scaled like a default init: activations of order one at every layer."""
    g = torch.Generator().manual_seed(seed)
    ws = [
        (torch.randn(n, o, i, generator=g, dtype=dtype) / math.sqrt(i)).requires_grad_()
        for i, o in zip(sizes[:-1], sizes[1:])
    ]
    bs = [(0.1 * torch.randn(n, o, generator=g, dtype=dtype)).requires_grad_() for o in sizes[1:]]
    return ws, bs


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def emulate(x, ws, bs, mdtype):
    """The kernel's arithmetic written op by op in float64: each product's operands and
    output rounded to ``mdtype`` where the kernel rounds them (straight-through for the
    gradient), the last layer in full precision. Its autograd gradient is the exact
    gradient of that rounded forward: same ReLU masks as the kernel's."""

    def rnd(t):
        return t + (t.to(mdtype).double() - t).detach()

    last = len(ws) - 1
    h = x.double()
    for i, (w, b) in enumerate(zip(ws, bs)):
        w, b = w.double(), b.double()
        if i == last:  # full precision: the hidden activations are already rounded
            h = torch.matmul(h, w.mT) + b.unsqueeze(-2)
        else:  # the bias in the product (layer 0) or added by it (baddbmm): one rounding
            h = torch.relu(rnd(torch.matmul(rnd(h), rnd(w).mT) + rnd(b).unsqueeze(-2)))
    return h


@pytest.mark.parametrize("mdtype", LOW, ids=["bf16", "fp16"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared-input", "per-member-input"])
@pytest.mark.parametrize("sizes", [[14, 64, 64, 1], [14, 32, 32, 32, 3]])
def test_values_and_gradients_match_the_rounded_arithmetic(mdtype, shared, sizes):
    ws, bs = params(sizes)
    g = torch.Generator().manual_seed(1)
    shape = (B, sizes[0]) if shared else (N, B, sizes[0])
    x = torch.randn(*shape, generator=g).requires_grad_()
    y = ensemble_relu_mlp(x, ws, bs, matmul_dtype=mdtype)
    full = ensemble_relu_mlp(x, ws, bs)
    emu = emulate(x, ws, bs, mdtype)
    assert y.dtype == torch.float32 and y.shape == full.shape
    # the products ran in the low dtype: rounded, to that dtype's precision
    assert not torch.equal(y, full)
    assert rel_err(y, full) < (2e-2 if mdtype is torch.bfloat16 else 4e-3)
    assert rel_err(y, emu) < 1e-4
    # the gradients: those of the rounded forward, up to the backward's own rounding
    go = torch.randn(y.shape, generator=g)
    got = torch.autograd.grad(y, [x, *ws, *bs], go)
    want = torch.autograd.grad(emu, [x, *ws, *bs], go.double())
    for a, b in zip(got, want):
        assert a.dtype == torch.float32 and a.shape == b.shape
        assert rel_err(a, b) < (1.5e-2 if mdtype is torch.bfloat16 else 2e-3)


def test_the_output_is_not_rounded_to_the_low_dtype():
    """The last layer runs in full precision: Q-values keep float32's resolution."""
    ws, bs = params([14, 64, 64, 1])
    x = torch.randn(B, 14, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        y = ensemble_relu_mlp(
            x, ws, [b + 300.0 * (i == 1) for i, b in enumerate(bs)], matmul_dtype=torch.bfloat16
        )
    # Q-values near 300: bfloat16 would round them to multiples of 2
    assert (y.to(torch.bfloat16).float() != y).float().mean() > 0.9


def test_one_layer_runs_in_full_precision():
    ws, bs = params([14, 3])
    x = torch.randn(B, 14)
    torch.testing.assert_close(
        ensemble_relu_mlp(x, ws, bs, matmul_dtype=torch.bfloat16),
        ensemble_relu_mlp(x, ws, bs),
        rtol=0,
        atol=0,
    )


@pytest.mark.parametrize("mask", range(1, 8))
def test_every_subset_of_inputs_needing_a_gradient(mask):
    """The target pass, the actor-loss pass (input only) and the critic pass, in bf16."""
    ws, bs = params([14, 32, 32, 1])
    x = torch.randn(B, 14, requires_grad=bool(mask & 1))
    w_used = [w if mask & 2 else w.detach() for w in ws]
    b_used = [b if mask & 4 else b.detach() for b in bs]
    y = ensemble_relu_mlp(x, w_used, b_used, matmul_dtype=torch.bfloat16)
    ref = emulate(x, w_used, b_used, torch.bfloat16)
    wrt = [t for t in (x, *w_used, *b_used) if t.requires_grad]
    got = torch.autograd.grad(y.sum(), wrt)
    want = torch.autograd.grad(ref.sum(), wrt)
    for a, b in zip(got, want):
        assert a.dtype == torch.float32 and rel_err(a, b) < 1.5e-2


def test_vmap_folds_agents_in_low_precision():
    """A population's K agents (vmap) get the same result as K separate calls."""
    k = 3
    per_agent = [params([14, 32, 32, 1], seed=s) for s in range(k)]
    ws = [torch.stack([p[0][i] for p in per_agent]).detach() for i in range(3)]
    bs = [torch.stack([p[1][i] for p in per_agent]).detach() for i in range(3)]
    x = torch.randn(k, B, 14)
    got = torch.vmap(lambda x, *p: ensemble_relu_mlp(x, p[:3], p[3:], matmul_dtype=torch.bfloat16))(
        x, *ws, *bs
    )
    for a in range(k):
        want = ensemble_relu_mlp(
            x[a], [w[a] for w in ws], [b[a] for b in bs], matmul_dtype=torch.bfloat16
        )
        torch.testing.assert_close(got[a], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad", [torch.float64, torch.int8, "bfloat16"])
def test_bad_matmul_dtype_is_refused(bad):
    ws, bs = params([14, 8, 1])
    with pytest.raises(ValueError, match="matmul_dtype must be torch.bfloat16"):
        ensemble_relu_mlp(torch.randn(B, 14), ws, bs, matmul_dtype=bad)


# ------------------------------------------------------------------ through the losses
def _actor():
    from tensordict.nn import NormalParamExtractor, TensorDictModule
    from torchrl.modules import MLP, ProbabilisticActor, TanhNormal

    net = torch.nn.Sequential(
        MLP(in_features=11, out_features=6, num_cells=[64]), NormalParamExtractor()
    )
    return ProbabilisticActor(
        TensorDictModule(net, ["observation"], ["loc", "scale"]),
        in_keys=["loc", "scale"],
        distribution_class=TanhNormal,
    )


def _batch(b=32):
    g = torch.Generator().manual_seed(3)
    return TensorDict(
        {
            "observation": torch.randn(b, 11, generator=g),
            "action": torch.rand(b, 3, generator=g) * 2 - 1,
            "next": {
                "observation": torch.randn(b, 11, generator=g),
                "reward": torch.randn(b, 1, generator=g),
                "done": torch.zeros(b, 1, dtype=torch.bool),
                "terminated": torch.zeros(b, 1, dtype=torch.bool),
            },
        },
        [b],
    )


def _loss(**kwargs):
    torch.manual_seed(0)
    ens = QEnsemble(lambda: make_q_member(14, num_cells=(64, 64), **kwargs), 5)
    return SACNLoss(_actor(), ens, target_entropy=-3.0)


def test_loss_with_bfloat16_critics_is_close_and_keeps_float32():
    loss = _loss()
    low = copy.deepcopy(loss)
    low.critic_matmul_dtype = torch.bfloat16
    assert low.critic_matmul_dtype is torch.bfloat16 and loss.critic_matmul_dtype is None
    batch = _batch()
    torch.manual_seed(5)
    ref = loss(batch.clone())
    torch.manual_seed(5)
    got = low(batch.clone())
    assert got["loss_qvalue"].dtype == torch.float32
    assert not torch.equal(got["loss_qvalue"], ref["loss_qvalue"])
    for key in ("loss_qvalue", "loss_actor"):
        assert abs(float((got[key] - ref[key]).detach())) < 2e-2 * (1 + abs(float(ref[key]))), key
    got["loss_qvalue"].backward()
    grads = [p.grad for p in low.qvalue_network_params.values(True, True)]
    assert all(g is not None and g.dtype == torch.float32 for g in grads)
    # a rebuild of the ensemble callers (set_vmap_randomness) keeps the precision
    low.set_vmap_randomness("different")
    assert low.critic_matmul_dtype is torch.bfloat16
    torch.manual_seed(5)
    again = low(batch.clone())
    torch.testing.assert_close(again["loss_qvalue"], got["loss_qvalue"])
    low.critic_matmul_dtype = None
    torch.manual_seed(5)
    torch.testing.assert_close(low(batch.clone())["loss_qvalue"], ref["loss_qvalue"])


def test_loss_refuses_low_precision_where_the_kernel_cannot_run():
    with pytest.raises(ValueError, match="not Linear"):
        _loss(layer_norm=True).critic_matmul_dtype = torch.bfloat16
    loss = _loss()
    loss.deactivate_vmap = True
    loss._make_vmap()
    with pytest.raises(ValueError, match="deactivate_vmap"):
        loss.critic_matmul_dtype = torch.bfloat16
    with pytest.raises(ValueError, match="torch.bfloat16, torch.float16 or None"):
        _loss().critic_matmul_dtype = torch.float64


def test_batched_mlp_warns_when_the_op_by_op_path_ignores_it(monkeypatch):
    ens = QEnsemble(lambda: make_q_member(14, num_cells=(16, 16)), 3)
    bq = BatchedMLP.from_member(ens.module)
    bq.matmul_dtype = torch.bfloat16
    monkeypatch.setattr(BatchedMLP, "use_fused_kernel", False)
    with pytest.warns(UserWarning, match="use_fused_kernel is False"):
        out = bq(ens.params, [torch.randn(4, 14)])
    assert out.dtype == torch.float32


def test_the_class_default_applies_until_a_loss_sets_its_own(monkeypatch):
    monkeypatch.setattr(BatchedMLP, "matmul_dtype", torch.bfloat16)
    loss = _loss()
    assert loss.critic_matmul_dtype is torch.bfloat16
    batch = _batch()
    torch.manual_seed(5)
    class_default = loss(batch.clone())["loss_qvalue"]
    loss.critic_matmul_dtype = None  # its own choice, over the class default
    loss.set_vmap_randomness("different")  # and kept by a rebuild
    assert loss.critic_matmul_dtype is None
    torch.manual_seed(5)
    full = loss(batch.clone())["loss_qvalue"]
    assert not torch.equal(class_default, full)


def test_spqr_loss_sets_the_wrapped_losses_precision():
    from torchrl.objectives import SACLoss

    from torchrl_spqr import SPQRLoss

    base = _loss()
    spqr = SPQRLoss(base, beta=1.0, pairs="data", diagnostics_interval=0)
    spqr.critic_matmul_dtype = torch.bfloat16
    assert base.critic_matmul_dtype is torch.bfloat16
    assert spqr.critic_matmul_dtype is torch.bfloat16
    assert "critic_matmul_dtype" not in spqr.__dict__
    ens = QEnsemble(lambda: make_q_member(14, num_cells=(16, 16)), 3)
    torchrl_sac = SACLoss(_actor(), ens.members(), num_qvalue_nets=3)
    wrapped = SPQRLoss(torchrl_sac, beta=1.0, pairs="data", diagnostics_interval=0)
    with pytest.raises(AttributeError, match="no such setting"):
        wrapped.critic_matmul_dtype = torch.bfloat16


@pytest.mark.parametrize("mdtype", LOW, ids=["bf16", "fp16"])
def test_relu_on_the_bits_equals_torch_relu_for_every_16_bit_pattern(mdtype):
    """The 16-bit ReLU and its backward run on the ``int16`` view of the bits (PyTorch's
    CPU ``clamp_min_`` on bfloat16 is several times slower): checked on all 65,536 values,
    NaNs of either sign and infinities included."""
    from torchrl_spqr.modules.relu_mlp import _relu_, _relu_backward_

    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    x = bits.view(mdtype)
    got = _relu_(x.clone())
    want = torch.relu(x)
    same = (got == want) | (got.isnan() & want.isnan())
    assert bool(same.all()), x[~same][:5]
    assert int(got.isnan().sum()) == int(x.isnan().sum())  # NaNs of both signs kept
    # the backward: g kept exactly where the ReLU's output is positive; at a NaN output
    # (whose gradient is meaningless either way) it is kept for a NaN with the sign bit clear
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(0)).to(mdtype)
    got_g = _relu_backward_(g.clone(), got)
    keep = torch.where(got.isnan(), got.view(torch.int16) > 0, got > 0)
    assert torch.equal(got_g.view(torch.int16), torch.where(keep, g, 0).view(torch.int16))


@pytest.mark.parametrize("where", ["input", "weight"])
def test_nan_still_reaches_the_output_in_low_precision(where):
    """A NaN of either sign in the input or a hidden weight is not hidden by the ReLU."""
    for sign in (1.0, -1.0):
        ws, bs = params([14, 32, 32, 32, 1])
        x = torch.randn(B, 14)
        ws = [w.detach().clone() for w in ws]
        if where == "input":
            x[3, 5] = sign * math.nan
        else:
            ws[1][2, 7, 4] = sign * math.nan
        y = ensemble_relu_mlp(x, ws, bs, matmul_dtype=torch.bfloat16)
        ref = ensemble_relu_mlp(x, ws, bs)
        assert torch.equal(y.isnan(), ref.isnan()) and bool(ref.isnan().any())


def test_vmap_gradients_in_low_precision_match_separate_calls():
    """Four layers (two hidden weights cast in the forward and kept for the backward),
    ``K`` agents under vmap: the same gradients as ``K`` separate calls."""
    k, sizes = 3, [14, 32, 32, 32, 1]
    per_agent = [params(sizes, seed=s) for s in range(k)]
    ws = [torch.stack([p[0][i] for p in per_agent]).detach().requires_grad_() for i in range(4)]
    bs = [torch.stack([p[1][i] for p in per_agent]).detach().requires_grad_() for i in range(4)]
    x = torch.randn(k, B, 14, requires_grad=True)
    go = torch.randn(k, N, B, 1)
    run = torch.vmap(lambda x, *p: ensemble_relu_mlp(x, p[:4], p[4:], matmul_dtype=torch.bfloat16))
    got = torch.autograd.grad(run(x, *ws, *bs), [x, *ws, *bs], go)
    for a in range(k):
        wa = [w[a].detach().requires_grad_() for w in ws]
        ba = [b[a].detach().requires_grad_() for b in bs]
        xa = x[a].detach().requires_grad_()
        y = ensemble_relu_mlp(xa, wa, ba, matmul_dtype=torch.bfloat16)
        want = torch.autograd.grad(y, [xa, *wa, *ba], go[a])
        for g_all, w in zip(got, want):
            torch.testing.assert_close(g_all[a], w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bias", [0.0, 300.0])
@pytest.mark.parametrize("out", [1, 3])
def test_last_layer_from_bfloat16_is_float32_accurate(out, bias):
    """The last layer reads the bfloat16 activation without a float32 copy: two bfloat16
    products of a split weight, each one's rounding recovered in the next one's float32
    accumulation. Within 2^-16 of the terms' size of the exact result (about 2^-18 here; a
    float32 product's own error is about 2^-22); a bfloat16 output would be off by 2^-9."""
    from torchrl_spqr.modules.relu_mlp import _last_layer_from_bf16

    g = torch.Generator().manual_seed(3)
    h = torch.randn(N, 256, 256, generator=g).relu().to(torch.bfloat16)
    w = torch.randn(N, out, 256, generator=g) / 16
    b = bias + torch.randn(N, out, generator=g)
    y = _last_layer_from_bf16(h, w, b)
    exact = h.double() @ w.double().mT + b.double().unsqueeze(-2)
    scale = h.double().abs() @ w.double().abs().mT + b.double().abs().unsqueeze(-2)
    assert y.dtype == torch.float32 and y.shape == (N, 256, out)
    assert float(((y.double() - exact).abs() / scale).max()) < 2**-16
    rounded = ((exact.to(torch.bfloat16).double() - exact).abs() / scale).max()
    assert float(rounded) > 2**-12  # what a bfloat16 output would lose

"""The fused ReLU-MLP ensemble kernel (``modules/relu_mlp.py``) against the op-by-op path."""

from __future__ import annotations

import pytest
import torch

from torchrl_spqr.modules import BatchedMLP, QEnsemble, ensemble_relu_mlp, make_q_member
from torchrl_spqr.modules.relu_mlp import relu_mlp_layers

N, B = 4, 7


def reference(x, weights, biases):
    """Op-by-op: Linear, ReLU, ..., Linear per member (broadcast over a shared input)."""
    h = torch.matmul(x, weights[0].mT) + biases[0].unsqueeze(-2)
    for w, b in zip(weights[1:], biases[1:]):
        h = torch.matmul(torch.relu(h), w.mT) + b.unsqueeze(-2)
    return h


def params(sizes, n=N, dtype=torch.float64, lead=()):
    ws = [
        torch.randn(*lead, n, o, i, dtype=dtype, requires_grad=True)
        for i, o in zip(sizes[:-1], sizes[1:])
    ]
    bs = [torch.randn(*lead, n, o, dtype=dtype, requires_grad=True) for o in sizes[1:]]
    return ws, bs


@pytest.mark.parametrize("shared", [True, False], ids=["shared-input", "per-member-input"])
@pytest.mark.parametrize("sizes", [[5, 16, 16, 1], [5, 1], [5, 8, 3], [3, 6, 6, 6, 2]])
def test_values_and_gradients_match_op_by_op(shared, sizes):
    torch.manual_seed(0)
    ws, bs = params(sizes)
    shape = (B, sizes[0]) if shared else (N, B, sizes[0])
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    y, ref = ensemble_relu_mlp(x, ws, bs), reference(x, ws, bs)
    assert y.shape == (N, B, sizes[-1])
    torch.testing.assert_close(y, ref)
    go = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, *ws, *bs], go)
    want = torch.autograd.grad(ref, [x, *ws, *bs], go)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
        assert g.shape == w.shape


def test_gradcheck():
    torch.manual_seed(1)
    ws, bs = params([3, 5, 5, 1], n=2)
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    n_w = len(ws)
    assert torch.autograd.gradcheck(
        lambda x, *p: ensemble_relu_mlp(x, p[:n_w], p[n_w:]), (x, *ws, *bs)
    )


def test_input_gradient_only_with_detached_parameters():
    """The actor loss's pass: critic parameters detached, the gradient reaches the action."""
    torch.manual_seed(2)
    ws, bs = params([5, 16, 16, 1])
    x = torch.randn(B, 5, dtype=torch.float64, requires_grad=True)
    y = ensemble_relu_mlp(x, [w.detach() for w in ws], [b.detach() for b in bs])
    (gx,) = torch.autograd.grad(y.min(0).values.sum(), x)
    (want,) = torch.autograd.grad(reference(x, ws, bs).min(0).values.sum(), x)
    torch.testing.assert_close(gx, want)
    assert all(w.grad is None for w in ws)


@pytest.mark.parametrize("mask", range(1, 16), ids=lambda m: f"mask{m:04b}")
def test_every_subset_of_inputs_needing_a_gradient(mask):
    """Whatever subset needs a gradient (the input, a frozen first layer under trained
    later ones, ...), each gets the op-by-op gradient and the others get none."""
    torch.manual_seed(7)
    ws, bs = params([5, 8, 8, 1])
    x = torch.randn(B, 5, dtype=torch.float64)
    wants = [x, ws[0], ws[1], bs[2]]  # bit i of mask: wants[i] needs a gradient
    chosen = [t for i, t in enumerate(wants) if mask >> i & 1]
    x = x.requires_grad_(bool(mask & 1))
    detached_w = [w if any(w is c for c in chosen) else w.detach() for w in ws]
    detached_b = [b if any(b is c for c in chosen) else b.detach() for b in bs]
    go = torch.randn(N, B, 1, dtype=torch.float64)
    got = torch.autograd.grad(ensemble_relu_mlp(x, detached_w, detached_b), chosen, go)
    want = torch.autograd.grad(reference(x, detached_w, detached_b), chosen, go)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_no_gradient_recorded_under_no_grad():
    ws, bs = params([5, 8, 1])
    with torch.no_grad():
        y = ensemble_relu_mlp(torch.randn(B, 5, dtype=torch.float64), ws, bs)
    assert y.grad_fn is None and not y.requires_grad


@pytest.mark.parametrize(
    "in_dims",
    [(0, 0), (None, 0), (0, None)],
    ids=["both-batched", "params-batched", "input-batched"],
)
def test_vmap_folds_the_batch_into_the_ensemble(in_dims):
    """Under vmap (a population of K agents) values and gradients equal K separate calls."""
    torch.manual_seed(3)
    k = 3
    x_dim, p_dim = in_dims
    ws, bs = params([5, 16, 16, 1], dtype=torch.float32, lead=(k,) if p_dim == 0 else ())
    x = torch.randn(*((k,) if x_dim == 0 else ()), B, 5, requires_grad=True)

    def f(x, *p):
        return ensemble_relu_mlp(x, p[:3], p[3:])

    y = torch.vmap(f, (x_dim, *[p_dim] * 6))(x, *ws, *bs)

    def pick(t, dim, i):
        return t[i] if dim == 0 else t

    ref = torch.stack(
        [
            reference(
                pick(x, x_dim, i), [pick(w, p_dim, i) for w in ws], [pick(b, p_dim, i) for b in bs]
            )
            for i in range(k)
        ]
    )
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    go = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, *ws, *bs], go)
    want = torch.autograd.grad(ref, [x, *ws, *bs], go)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


def test_vmap_with_per_member_inputs():
    torch.manual_seed(4)
    k = 2
    ws, bs = params([5, 8, 1], dtype=torch.float32, lead=(k,))
    x = torch.randn(k, N, B, 5)
    y = torch.vmap(lambda x, *p: ensemble_relu_mlp(x, p[:2], p[2:]))(x, *ws, *bs)
    ref = torch.stack([reference(x[i], [w[i] for w in ws], [b[i] for b in bs]) for i in range(k)])
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


def test_func_grad():
    torch.manual_seed(5)
    ws, bs = params([5, 8, 8, 1])
    x = torch.randn(B, 5, dtype=torch.float64)
    got = torch.func.grad(lambda x: ensemble_relu_mlp(x, ws, bs).sum())(x)
    xr = x.clone().requires_grad_(True)
    (want,) = torch.autograd.grad(reference(xr, ws, bs).sum(), xr)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: ([torch.randn(N, 8, 5)], [torch.randn(N, 8)], torch.randn(B, 6)), "x must be"),
        (lambda: ([torch.randn(N, 8, 5)], [torch.randn(N, 7)], torch.randn(B, 5)), "layer 0"),
        (lambda: ([torch.randn(N, 8, 5)], [], torch.randn(B, 5)), "one bias per weight"),
        (
            lambda: (
                [torch.randn(N, 8, 5), torch.randn(N, 1, 9)],
                [torch.randn(N, 8), torch.randn(N, 1)],
                torch.randn(B, 5),
            ),
            "layer 1 takes 9 inputs",
        ),
        (
            lambda: (
                [torch.randn(N, 8, 5), torch.randn(N + 1, 1, 8)],
                [torch.randn(N, 8), torch.randn(N + 1, 1)],
                torch.randn(B, 5),
            ),
            "layer 1",
        ),
        (
            lambda: ([torch.randn(N, 8, 5)], [torch.randn(N, 8)], torch.randn(N + 1, B, 5)),
            "member rows",
        ),
    ],
    ids=["input-width", "bias-shape", "no-bias", "chain", "members", "member-rows"],
)
def test_bad_shapes_are_named(build, message):
    ws, bs, x = build()
    with pytest.raises(ValueError, match=message):
        ensemble_relu_mlp(x, ws, bs)


def test_layer_pattern_detection():
    lin = torch.nn.Linear(3, 3)
    relu = torch.nn.ReLU()
    assert relu_mlp_layers([("0", lin), ("1", relu), ("2", lin)]) == ["0", "2"]
    assert relu_mlp_layers([("0", lin)]) == ["0"]
    assert relu_mlp_layers([("0", lin), ("1", torch.nn.Tanh()), ("2", lin)]) is None
    assert relu_mlp_layers([("0", lin), ("1", relu)]) is None
    assert relu_mlp_layers([("0", torch.nn.Linear(3, 3, bias=False))]) is None
    assert relu_mlp_layers([("0", lin), ("1", torch.nn.LayerNorm(3)), ("2", lin)]) is None


@pytest.mark.parametrize("activation", [torch.nn.ReLU, torch.nn.Tanh])
def test_batched_mlp_fused_equals_op_by_op(activation):
    """BatchedMLP takes the fused kernel for ReLU critics only; both paths agree."""
    torch.manual_seed(6)
    ens = QEnsemble(lambda: make_q_member(5, num_cells=(16, 16), activation_class=activation), N)
    bm = BatchedMLP.from_member(ens.module)
    assert (bm._fused is not None) == (activation is torch.nn.ReLU)
    params = ens.params
    x = [torch.randn(B, 3), torch.randn(B, 2, requires_grad=True)]
    fused = bm(params, x)
    (g_fused, *gp_fused) = torch.autograd.grad(fused.sum(), [x[1], *params.values(True, True)])
    bm.use_fused_kernel = False
    plain = bm(params, x)
    (g_plain, *gp_plain) = torch.autograd.grad(plain.sum(), [x[1], *params.values(True, True)])
    torch.testing.assert_close(fused, plain)
    torch.testing.assert_close(g_fused, g_plain)
    for a, b in zip(gp_fused, gp_plain):
        torch.testing.assert_close(a, b)

"""Tests of :mod:`torchrl_spqr.functional` (spec: docs/spqr-spec.md, sections 2-6).

The parity tests compare against an independent float64 NumPy reference written
here from the spec's formulas, mimicking the authors' computation (raw ddof=1
std with no epsilon, ``numpy.linalg.eigvalsh``, the paper density evaluated
literally).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from _helpers import wigner_members
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from torchrl_spqr import functional as F
from torchrl_spqr.functional import (
    ensemble_to_matrices,
    matrix_side,
    member_positions,
    normalize_matrices,
    num_used_members,
    semicircle_density,
    soft_semicircle_density,
    spectral_kl,
    spqr_eigenvalues,
    spqr_kl,
    triangle_indices,
)

RHO, EPS = 0.5, 0.01
PAPER_OUTSIDE = RHO / math.pi + (1 - RHO) * EPS  # 0.164..., the paper density outside [-2, 2]
CORRECTED_OUTSIDE = (1 - RHO) * EPS  # 0.005

PARITY_NS = [3, 4, 5, 6, 7, 10, 15, 21, 28]
PARITY_BATCHES = [1, 2, 17, 256]

CUDA = pytest.param(
    "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
)
DEVICES = ["cpu", CUDA]

# Our own one-time warnings are exercised explicitly in TestWarnings; elsewhere
# they (and dynamo's note about the lru_cache-wrapped helper) are noise.
pytestmark = [
    pytest.mark.filterwarnings("ignore:SPQR ordered filling:UserWarning"),
    pytest.mark.filterwarnings("ignore:SPQR density='paper':UserWarning"),
    pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`"),
]


# --------------------------------------------------------------------------- #
# Independent NumPy reference (float64), from the spec's formulas
# --------------------------------------------------------------------------- #
def ref_side(n: int) -> int:
    return int(math.floor((math.sqrt(1 + 8 * n) - 1) / 2))


def ref_matrices(q: np.ndarray) -> np.ndarray:
    """[N, B] member values -> [B, d, d] normalised matrices, as the authors compute them."""
    q = np.asarray(q, dtype=np.float64)
    n, b = q.shape
    d = ref_side(n)
    out = np.empty((b, d, d))
    for e in range(b):
        m = np.zeros((d, d))
        k = 0
        for i in range(d):  # row by row over the upper triangle, diagonal included
            for j in range(i, d):
                m[i, j] = m[j, i] = q[k, e]
                k += 1
        # raw ddof=1 std over all d*d entries, no epsilon (the authors' choice)
        m = (m - m.mean()) / m.std(ddof=1) / math.sqrt(d)
        out[e] = m
    return out


def ref_density(x: np.ndarray, density: str = "paper", rho: float = RHO, eps: float = EPS):
    inside = np.abs(x) < 2
    if density == "paper":
        # literally: rho * sqrt(4 - x^2 * 1[|x|<2]) / (2 pi) + (1 - rho) * eps * 1[|x|>=2]
        return rho * np.sqrt(4 - x**2 * inside) / (2 * np.pi) + (1 - rho) * eps * (~inside)
    semi = np.where(inside, np.sqrt(np.clip(4 - x**2, 0, None)), 0.0) / (2 * np.pi)
    return rho * semi + (1 - rho) * eps


def ref_kl(q: np.ndarray, density: str = "paper") -> tuple[np.ndarray, np.ndarray]:
    """Per-element KL [B] and eigenvalues [B, d]."""
    lam = np.linalg.eigvalsh(ref_matrices(q))
    d = lam.shape[-1]
    with np.errstate(divide="ignore"):
        kl = -np.mean(np.log(d * ref_density(lam, density)), axis=-1)
    return kl, lam


def _edge_sensitivity(lam: np.ndarray) -> np.ndarray:
    """(1/d) sum_i |d log p / d lambda_i| for eigenvalues inside (-2, 2) ([B])."""
    inside = np.abs(lam) < 2
    return np.where(inside, np.abs(lam) / np.clip(4 - lam**2, 1e-300, None), 0.0).mean(-1)


def parity_tolerance(ref: np.ndarray, lam: np.ndarray, dtype: torch.dtype):
    """Per-element tolerance and the mask of elements where parity is well defined.

    float32 round-off of the eigenvalues (about 1e-6) is amplified near the
    semicircle edge by |d log p / d lambda| = |lambda| / (4 - lambda^2); in
    paper mode the density even jumps at |lambda| = 2. Elements with an
    eigenvalue within 100 * delta of +-2 are excluded (there is no meaningful
    float32 answer there); elsewhere the tolerance is atol + rtol * |ref| plus
    the edge sensitivity times delta. For N <= 10 no eigenvalue is near the edge.
    """
    if dtype == torch.float32:
        atol, rtol, delta = 1e-6, 1e-5, 1e-5
    else:
        atol, rtol, delta = 1e-12, 1e-10, 1e-9
    gap = np.abs(np.abs(lam) - 2).min(-1)
    ok = gap > 100 * delta
    tol = atol + rtol * np.abs(ref) + delta * _edge_sensitivity(lam)
    return tol, ok


def assert_parity(q: torch.Tensor, density: str = "paper", **kwargs) -> None:
    """Check spqr_kl(q) against the reference with every reduction."""
    q2 = q.squeeze(-1) if q.ndim == 3 else q
    ref, lam = ref_kl(q2.detach().cpu().double().numpy(), density)
    tol, ok = parity_tolerance(ref, lam, q.dtype)
    assert ok.mean() > 0.9, "too many elements at the semicircle edge for a parity check"
    ours = spqr_kl(q, density=density, reduction="none", **kwargs)
    assert ours.shape == q2.shape[1:]
    assert ours.dtype == q.dtype
    ours = ours.detach().cpu().double().numpy()
    err = np.abs(ours - ref)
    assert np.all(err[ok] <= tol[ok]), f"max excess {np.max(err[ok] - tol[ok]):.3g}"
    # reductions, over the well-conditioned elements
    idx = torch.as_tensor(np.flatnonzero(ok), device=q.device)
    sub = q.index_select(1, idx)
    for reduction, expect in (("mean", ref[ok].mean()), ("sum", ref[ok].sum())):
        got = float(spqr_kl(sub, density=density, reduction=reduction, **kwargs))
        scale = 1.0 if reduction == "mean" else ok.sum()
        bound = tol[ok].mean() * scale
        assert abs(got - expect) <= bound, (reduction, got, expect)


def _randn(*shape, seed: int, dtype=torch.float64, device="cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)


# --------------------------------------------------------------------------- #
# Matrix construction
# --------------------------------------------------------------------------- #
class TestConstruction:
    @pytest.mark.parametrize(
        "n, d, t",
        [
            (3, 2, 3),
            (4, 2, 3),
            (5, 2, 3),
            (6, 3, 6),
            (9, 3, 6),
            (10, 4, 10),
            (14, 4, 10),
            (15, 5, 15),
            (21, 6, 21),
            (28, 7, 28),
            (36, 8, 36),
            (45, 9, 45),
            (55, 10, 55),
            (56, 10, 55),
        ],
    )
    def test_side_and_used_members(self, n, d, t):
        assert matrix_side(n) == d == ref_side(n)
        assert num_used_members(n) == t

    def test_side_matches_formula_for_many_n(self):
        for n in range(3, 2000):
            assert matrix_side(n) == ref_side(n)

    def test_n10_ordered_layout(self):
        q = torch.arange(10.0).unsqueeze(-1)  # batch of one
        mat = ensemble_to_matrices(q)
        expected = torch.tensor(
            [[0, 1, 2, 3], [1, 4, 5, 6], [2, 5, 7, 8], [3, 6, 8, 9]], dtype=torch.float32
        )
        assert mat.shape == (1, 4, 4)
        torch.testing.assert_close(mat[0], expected, rtol=0, atol=0)

    def test_triangle_indices_row_by_row(self):
        rows, cols = triangle_indices(4)
        assert rows.tolist() == [0, 0, 0, 0, 1, 1, 1, 2, 2, 3]
        assert cols.tolist() == [0, 1, 2, 3, 1, 2, 3, 2, 3, 3]

    def test_ordered_ignores_trailing_members(self):
        q = _randn(9, 5, seed=0)
        q_changed = q.clone()
        q_changed[6:] = 1e3  # members 6..8 are not used with N=9 (d=3, T=6)
        torch.testing.assert_close(ensemble_to_matrices(q), ensemble_to_matrices(q_changed))
        torch.testing.assert_close(spqr_kl(q), spqr_kl(q_changed))
        q_changed[5] += 1.0  # member 5 is used
        assert not torch.equal(ensemble_to_matrices(q), ensemble_to_matrices(q_changed))

    @pytest.mark.parametrize("batch_shape", [(7,), (2, 3), (2, 3, 1), (1,)])
    def test_batch_shapes(self, batch_shape):
        q = _randn(6, *batch_shape, seed=1)
        mat = ensemble_to_matrices(q)
        squeezed = (
            batch_shape[:-1] if len(batch_shape) >= 2 and batch_shape[-1] == 1 else batch_shape
        )
        assert mat.shape == (*squeezed, 3, 3)
        torch.testing.assert_close(mat, mat.transpose(-1, -2), rtol=0, atol=0)
        assert spqr_kl(q, reduction="none").shape == squeezed
        assert spqr_kl(q).shape == ()

    def test_trailing_singleton_is_squeezed(self):
        q = _randn(10, 32, seed=2)
        torch.testing.assert_close(
            spqr_kl(q.unsqueeze(-1), reduction="none"), spqr_kl(q, reduction="none")
        )

    def test_random_positions_distinct_and_in_range(self):
        g = torch.Generator().manual_seed(0)
        for n in (3, 5, 8, 10, 14, 15):
            t = num_used_members(n)
            for _ in range(20):
                pos = member_positions(n, "random", generator=g)
                assert pos.dtype == torch.long and pos.shape == (t,)
                assert len(set(pos.tolist())) == t
                assert int(pos.min()) >= 0 and int(pos.max()) < n

    def test_random_positions_reproducible_and_varying(self):
        draws_a = [
            member_positions(10, "random", generator=g).tolist()
            for g in [torch.Generator().manual_seed(123)]
            for _ in range(5)
        ]
        draws_b = [
            member_positions(10, "random", generator=g).tolist()
            for g in [torch.Generator().manual_seed(123)]
            for _ in range(5)
        ]
        assert draws_a == draws_b  # same seed, same sequence
        assert len({tuple(x) for x in draws_a}) == 5  # fresh assignment at every call
        assert draws_a[0] != list(range(10))

    def test_random_filling_uses_every_member_in_expectation(self):
        g = torch.Generator().manual_seed(0)
        counts = torch.zeros(8)
        diag_counts = torch.zeros(8)
        for _ in range(400):
            pos = member_positions(8, "random", generator=g)  # T = 6 of 8
            counts[pos] += 1
            diag_counts[pos[torch.tensor([0, 3, 5])]] += 1  # diagonal positions for d = 3
        assert bool((counts > 0).all())
        # each member is used with probability 6/8 and sits on the diagonal w.p. 3/8
        assert torch.allclose(counts / 400, torch.full((8,), 0.75), atol=0.1)
        assert torch.allclose(diag_counts / 400, torch.full((8,), 0.375), atol=0.1)

    def test_random_filling_matches_reference_on_permuted_members(self):
        q = _randn(8, 64, seed=3)
        pos = member_positions(8, "random", generator=torch.Generator().manual_seed(7))
        ours = spqr_kl(
            q, filling="random", generator=torch.Generator().manual_seed(7), reduction="none"
        )
        ref, _ = ref_kl(q[pos].numpy())
        np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-10, atol=1e-12)
        # and the positions override matches
        torch.testing.assert_close(
            ensemble_to_matrices(q, positions=pos), ensemble_to_matrices(q[pos])
        )

    def test_random_filling_reproducible_and_differs_from_ordered(self):
        q = _randn(10, 64, seed=4)
        a = spqr_kl(q, filling="random", generator=torch.Generator().manual_seed(1))
        b = spqr_kl(q, filling="random", generator=torch.Generator().manual_seed(1))
        c = spqr_kl(q, filling="random", generator=torch.Generator().manual_seed(2))
        assert torch.equal(a, b)
        assert not torch.equal(a, c)
        assert not torch.equal(a, spqr_kl(q))


# --------------------------------------------------------------------------- #
# Warnings
# --------------------------------------------------------------------------- #
class TestWarnings:
    def test_non_triangular_warns_once_per_n(self):
        F._warned_unused.clear()
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            for _ in range(3):
                spqr_kl(_randn(7, 4, seed=0))
            spqr_kl(_randn(8, 4, seed=0))
            spqr_kl(_randn(8, 4, seed=0))
            spqr_kl(_randn(10, 4, seed=0))  # triangular: silent
            spqr_kl(_randn(9, 4, seed=0), filling="random")  # random filling: silent
        msgs = [
            str(w.message)
            for w in rec
            if issubclass(w.category, UserWarning) and "ordered filling" in str(w.message)
        ]
        assert len(msgs) == 2, msgs
        assert "N=7" in msgs[0] and "only the first 6 members are used" in msgs[0]
        assert "1 ignored" in msgs[0]
        assert "N=8" in msgs[1] and "only the first 6 members" in msgs[1]
        assert "2 ignored" in msgs[1]
        F._warned_unused.clear()

    def test_warning_points_at_caller(self):
        F._warned_unused.clear()
        with pytest.warns(UserWarning, match=r"N=4 .*only the first 3 members") as rec:
            spqr_kl(_randn(4, 4, seed=0))
        assert rec[0].filename == __file__
        F._warned_unused.clear()

    @pytest.mark.parametrize("n", [15, 21])
    def test_paper_density_large_n_warns(self, n):
        F._warned_paper_large.clear()
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            spqr_kl(_randn(n, 4, seed=0))
            spqr_kl(_randn(n, 4, seed=0))
            spqr_kl(_randn(n, 4, seed=0), density="corrected")
            spqr_kl(_randn(10, 4, seed=0))  # d = 4: eigenvalues cannot leave [-2, 2]
        msgs = [str(w.message) for w in rec if "density='paper'" in str(w.message)]
        assert len(msgs) == 1, msgs
        assert f"N={n}" in msgs[0] and "density='corrected' is recommended" in msgs[0]
        F._warned_paper_large.clear()


# --------------------------------------------------------------------------- #
# Errors
# --------------------------------------------------------------------------- #
class TestErrors:
    @pytest.mark.parametrize("n", [1, 2])
    def test_too_few_members(self, n):
        with pytest.raises(ValueError, match=r"at least 3 members.*N=" + str(n)):
            spqr_kl(torch.randn(n, 8))
        with pytest.raises(ValueError, match="at least 3 members"):
            matrix_side(n)

    def test_non_finite_counts(self):
        q = torch.randn(6, 8)
        q[0, 0] = float("nan")
        q[1, 2] = float("inf")
        q[3, 4] = -float("inf")
        with pytest.raises(ValueError, match=r"3 non-finite value\(s\).*out of 48"):
            spqr_kl(q)

    @pytest.mark.parametrize("shape", [(), (6,)])
    def test_too_few_dims(self, shape):
        with pytest.raises(ValueError, match=r"shape \[N, \*batch\].*got shape"):
            spqr_kl(torch.randn(shape))

    @pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
    def test_non_float_dtype(self, dtype):
        with pytest.raises((TypeError, ValueError), match="floating-point"):
            spqr_kl(torch.ones(6, 4, dtype=dtype))

    def test_not_a_tensor(self):
        with pytest.raises(TypeError, match="must be a torch.Tensor"):
            spqr_kl(np.ones((6, 4)))

    def test_bad_options(self):
        q = torch.randn(6, 4)
        with pytest.raises(ValueError, match=r"filling must be one of .*'diagonal'"):
            spqr_kl(q, filling="diagonal")
        with pytest.raises(ValueError, match=r"density must be one of .*'gaussian'"):
            spqr_kl(q, density="gaussian")
        with pytest.raises(ValueError, match=r"reduction must be one of .*'max'"):
            spqr_kl(q, reduction="max")
        with pytest.raises(ValueError, match="filling must be one of"):
            member_positions(6, "diagonal")
        with pytest.raises(ValueError, match="density must be one of"):
            soft_semicircle_density(torch.zeros(3), density="gaussian")


# --------------------------------------------------------------------------- #
# Parity with the NumPy reference
# --------------------------------------------------------------------------- #
class TestParity:
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
    @pytest.mark.parametrize("batch", PARITY_BATCHES)
    @pytest.mark.parametrize("n", PARITY_NS)
    def test_paper_mode_matches_reference(self, n, batch, dtype):
        q = _randn(n, batch, seed=1000 * n + batch, dtype=dtype)
        assert_parity(q, "paper")

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
    @pytest.mark.parametrize("n", PARITY_NS)
    def test_corrected_mode_matches_reference(self, n, dtype):
        q = _randn(n, 256, seed=n, dtype=dtype)
        assert_parity(q, "corrected")

    @pytest.mark.parametrize("device", DEVICES)
    @pytest.mark.parametrize("density", ["paper", "corrected"])
    def test_parity_on_device_with_trailing_dim(self, device, density):
        q = _randn(15, 128, 1, seed=5, dtype=torch.float32, device=device)
        assert_parity(q, density)

    def test_batch_of_one_does_not_crash(self):
        q = torch.randn(10, 1, requires_grad=True)
        kl = spqr_kl(q)
        kl.backward()
        assert torch.isfinite(kl) and bool(torch.isfinite(q.grad).all())

    def test_multi_dim_batch_matches_flattened(self):
        q = _randn(10, 4, 8, seed=6)
        flat = spqr_kl(q.reshape(10, 32), reduction="none")
        torch.testing.assert_close(spqr_kl(q, reduction="none"), flat.reshape(4, 8))
        torch.testing.assert_close(spqr_kl(q), flat.mean())
        torch.testing.assert_close(spqr_kl(q, reduction="sum"), flat.sum())

    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(
        n=st.integers(3, 30),
        batch=st.integers(1, 40),
        log_scale=st.floats(-6, 6),
        shift=st.floats(-50, 50),
        use_float32=st.booleans(),
        density=st.sampled_from(["paper", "corrected"]),
        seed=st.integers(0, 2**31 - 1),
    )
    def test_property_parity(self, n, batch, log_scale, shift, use_float32, density, seed):
        scale = 10.0**log_scale
        base = _randn(n, batch, seed=seed)
        q = (base * scale + shift * scale).to(torch.float32 if use_float32 else torch.float64)
        ref, lam = ref_kl(q.double().numpy(), density)
        tol, ok = parity_tolerance(ref, lam, q.dtype)
        ours = spqr_kl(q, density=density, reduction="none").double().numpy()
        assert np.all(np.isfinite(ours))
        assert np.all(np.abs(ours - ref)[ok] <= tol[ok])
        # the regulariser is also invariant: same value as the unscaled, unshifted members
        if not use_float32:
            np.testing.assert_allclose(
                ours, spqr_kl(base, density=density, reduction="none").numpy(), rtol=1e-6, atol=1e-7
            )


# --------------------------------------------------------------------------- #
# Densities
# --------------------------------------------------------------------------- #
class TestDensity:
    def test_matches_reference_on_a_grid(self):
        x = torch.linspace(-4, 4, 2001, dtype=torch.float64)
        for density in ("paper", "corrected"):
            ours = soft_semicircle_density(x, density=density).numpy()
            ref = ref_density(x.numpy(), density)
            np.testing.assert_allclose(ours, ref, rtol=1e-12, atol=1e-6)  # atol: edge floor

    def test_semicircle_is_a_density(self):
        x = torch.linspace(-2.5, 2.5, 200_001, dtype=torch.float64)
        s = semicircle_density(x)
        assert float(torch.trapezoid(s, x)) == pytest.approx(1.0, abs=1e-5)
        assert float(s[x.abs() >= 2].abs().max()) == 0.0
        assert float(semicircle_density(torch.tensor(0.0))) == pytest.approx(1 / math.pi)

    @pytest.mark.parametrize("x", [2.0, 2.0001, 2.5, 3.0, 10.0, -2.0, -2.2, -7.0])
    def test_paper_quirk_outside(self, x):
        xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
        p = soft_semicircle_density(xt, density="paper")
        assert float(p.detach()) == pytest.approx(PAPER_OUTSIDE, rel=1e-12)
        assert float(p.detach()) == pytest.approx(0.164155, abs=1e-6)
        (grad,) = torch.autograd.grad(p, xt)
        assert float(grad) == 0.0
        pc = soft_semicircle_density(xt, density="corrected")
        assert float(pc.detach()) == pytest.approx(CORRECTED_OUTSIDE, rel=1e-12)
        (gradc,) = torch.autograd.grad(pc, xt)
        assert float(gradc) == 0.0

    def test_paper_outside_exceeds_its_peak_and_corrected_does_not(self):
        x = torch.linspace(-1.999, 1.999, 4001, dtype=torch.float64)
        paper_inside = soft_semicircle_density(x, density="paper")
        corr_inside = soft_semicircle_density(x, density="corrected")
        assert float(paper_inside.max()) == pytest.approx(RHO / math.pi, rel=1e-9)  # 0.159
        assert float(paper_inside.max()) < PAPER_OUTSIDE
        assert float(corr_inside.min()) > CORRECTED_OUTSIDE
        # corrected = paper inside + the floor
        torch.testing.assert_close(corr_inside, paper_inside + CORRECTED_OUTSIDE)

    def test_finite_gradients_at_the_edge(self):
        x = torch.tensor(
            [-2.0, -1.9999999, 0.0, 1.9999999, 2.0], dtype=torch.float64, requires_grad=True
        )
        for density in ("paper", "corrected"):
            kl = spectral_kl(x.unsqueeze(0), density=density)
            (g,) = torch.autograd.grad(kl.sum(), x)
            assert torch.isfinite(kl).all() and torch.isfinite(g).all()

    def test_spectral_kl_formula(self):
        lam = torch.tensor([[-1.0, 0.0, 0.5, 2.5]], dtype=torch.float64)
        p = ref_density(lam.numpy(), "paper")
        expected = -np.mean(np.log(4 * p), axis=-1)
        np.testing.assert_allclose(spectral_kl(lam).numpy(), expected, rtol=1e-12)
        rho, eps = 0.3, 0.05
        pc = ref_density(lam.numpy(), "corrected", rho=rho, eps=eps)
        np.testing.assert_allclose(
            spectral_kl(lam, rho=rho, eps=eps, density="corrected").numpy(),
            -np.mean(np.log(4 * pc), axis=-1),
            rtol=1e-12,
        )


# --------------------------------------------------------------------------- #
# Normalisation: the squared-eigenvalue identity and invariances
# --------------------------------------------------------------------------- #
class TestNormalisation:
    @pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
    @pytest.mark.parametrize("n", [3, 6, 10, 15, 21, 28, 55])
    def test_sum_of_squared_eigenvalues(self, n, dtype, tol):
        d = matrix_side(n)
        q = _randn(n, 200, seed=n, dtype=dtype)
        q[0, :50] += 30.0  # outlier members make no difference
        q[:, 50:100] *= torch.linspace(0.1, 10, n, dtype=dtype).unsqueeze(-1)
        eig = spqr_eigenvalues(q).double()
        torch.testing.assert_close(
            eig.pow(2).sum(-1),
            torch.full((200,), (d * d - 1) / d, dtype=torch.float64),
            rtol=tol,
            atol=tol,
        )
        # Frobenius norm of the normalised matrix, the same identity
        mat = normalize_matrices(ensemble_to_matrices(q)).double()
        torch.testing.assert_close(
            mat.pow(2).sum((-1, -2)),
            torch.full((200,), (d * d - 1) / d, dtype=torch.float64),
            rtol=tol,
            atol=tol,
        )

    @pytest.mark.parametrize("n", [3, 4, 6, 8, 10, 14])
    def test_no_eigenvalue_reaches_two_for_n_up_to_10(self, n):
        d = matrix_side(n)
        bound = math.sqrt((d * d - 1) / d)
        assert bound < 2
        q = _randn(n, 500, seed=n)
        q[0, :100] += 1e3  # a diagonal outlier: the most extreme pattern
        q[1, 100:200] += 1e3  # an off-diagonal outlier
        q[:, 200:300] = _randn(n, 1, seed=99) * _randn(1, 100, seed=98)  # rank one in batch
        eig = spqr_eigenvalues(q)
        assert float(eig.abs().max()) <= bound + 1e-12
        assert float(eig.abs().max()) < 2
        # the paper density's flat branch is unreachable, so both densities differ by
        # exactly the floor inside and no element sees p = 0.164
        assert bool((soft_semicircle_density(eig) <= RHO / math.pi + 1e-12).all())

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
    @pytest.mark.parametrize("scale", [1e-20, 1e-6, 1e-3, 1.0, 1e3, 1e6, 1e12, 1e20])
    def test_scale_and_shift_invariance(self, scale, dtype):
        base = _randn(10, 64, seed=11)
        expected = spqr_kl(base)
        tol = 1e-6 if dtype == torch.float32 else 1e-12
        for shift in (0.0, 1.0, -3.0, 10.0):
            q = ((base + shift) * scale).to(dtype).requires_grad_()
            kl = spqr_kl(q)
            (g,) = torch.autograd.grad(kl, q)
            assert kl.dtype == dtype
            assert float(kl.detach()) == pytest.approx(float(expected), abs=tol)
            assert bool(torch.isfinite(g).all())
        # invariances seen by the gradient: per element it is orthogonal to the constant
        # direction (shift) and to q itself (scale)
        q = (base * scale).to(dtype).requires_grad_()
        (g,) = torch.autograd.grad(spqr_kl(q), q)
        g64 = g.double() * scale  # O(1) after undoing the 1/scale of the gradient
        top = float(g64.abs().max())
        assert top > 0
        assert float(g64.sum(0).abs().max()) <= 1e-4 * top
        assert float((g64 * base).sum(0).abs().max()) <= 1e-4 * top

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
    @pytest.mark.parametrize("shift", [1e6, 1e12, -1e20])
    def test_huge_shift_stays_finite(self, shift, dtype):
        q = (_randn(15, 32, seed=12) + shift).to(dtype).requires_grad_()
        kl = spqr_kl(q, density="corrected")
        (g,) = torch.autograd.grad(kl, q)
        assert torch.isfinite(kl) and bool(torch.isfinite(g).all())

    def test_gradient_scales_inversely(self):
        base = _randn(10, 16, seed=13).requires_grad_()
        (g1,) = torch.autograd.grad(spqr_kl(base), base)
        big = (base.detach() * 1e6).requires_grad_()
        (g2,) = torch.autograd.grad(spqr_kl(big), big)
        torch.testing.assert_close(g2 * 1e6, g1, rtol=1e-9, atol=1e-15)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
    @pytest.mark.parametrize("density", ["paper", "corrected"])
    @pytest.mark.parametrize("n", [3, 6, 10, 15, 21])
    def test_identical_members(self, n, density, dtype):
        """Identical members give the zero matrix: KL = -log(d p(0)), zero gradient.

        The per-element values are random (not powers of two), so the plain mean of
        d*d copies is not exact in floating point; the normalisation must still see
        exactly zero deviations.
        """
        d = matrix_side(n)
        values = (_randn(1, 64, seed=n) * 1234.567 + 89.1).to(dtype)
        q = values.expand(n, 64).clone().requires_grad_()
        kl = spqr_kl(q, density=density, reduction="none")
        (g,) = torch.autograd.grad(kl.sum(), q)
        p0 = RHO / math.pi + (CORRECTED_OUTSIDE if density == "corrected" else 0.0)
        expected = torch.full((64,), -math.log(d * p0), dtype=dtype)
        torch.testing.assert_close(kl, expected)
        assert bool(torch.isfinite(g).all())
        assert float(g.abs().max()) == 0.0

    @pytest.mark.parametrize(
        "dtype, value",
        [
            (torch.float32, 0.0),
            (torch.float32, 3.3),
            (torch.float32, -1e30),
            (torch.float64, 1e300),
        ],
    )
    def test_constant_q(self, dtype, value):
        q = torch.full((10, 8, 1), value, dtype=dtype, requires_grad=True)
        kl = spqr_kl(q)
        kl.backward()
        assert float(kl.detach()) == pytest.approx(-math.log(4 * RHO / math.pi), rel=1e-6)
        assert bool(torch.isfinite(q.grad).all())

    def test_members_one_ulp_apart_keep_their_pattern(self):
        """float32 members that differ by one ulp: the exact pattern, as in float64."""
        q64 = torch.ones(6, 1, dtype=torch.float64)
        q64[1] += 2.0**-23  # one float32 ulp at 1.0
        q32 = q64.float()
        torch.testing.assert_close(
            spqr_eigenvalues(q32).double(), spqr_eigenvalues(q64), rtol=1e-6, atol=1e-6
        )
        torch.testing.assert_close(spqr_kl(q32).double(), spqr_kl(q64), rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- #
# What the regulariser sees: outliers and planted spikes
# --------------------------------------------------------------------------- #
class TestSpikes:
    def test_paper_density_rewards_a_diagonal_outlier_at_n15(self):
        """Documented quirk (spec section 4), measured on 1024 elements.

        A member on the diagonal (member 0) shifted by delta standard deviations:
        with the corrected density the KL increases monotonically with delta; with
        the paper density it first rises slightly, then drops BELOW the i.i.d. level
        once the eigenvalue leaves [-2, 2], where the paper density is 0.164.
        Measured (seed 3): paper 0.402, 0.424, 0.435, 0.287, 0.237, 0.227 and
        corrected 0.367, 0.410, 0.642, 0.858, 0.902, 0.900 for delta = 0, 4, 8, 12,
        16, 48.
        """
        deltas = [0.0, 4.0, 8.0, 12.0, 16.0, 48.0]
        base = _randn(15, 1024, seed=3)
        paper, corrected = [], []
        for delta in deltas:
            q = base.clone()
            q[0] += delta
            paper.append(float(spqr_kl(q, density="paper")))
            corrected.append(float(spqr_kl(q, density="corrected")))
        # corrected: a larger outlier is always penalised more (up to saturation)
        assert all(b > a for a, b in zip(corrected[:5], corrected[1:5]))
        assert corrected[-1] > 2 * corrected[0]
        # paper: big outliers get a LOWER loss than i.i.d. members
        assert paper[4] < paper[0] - 0.1 and paper[5] < paper[0] - 0.1
        assert paper[5] < paper[2]
        # ... while for small outliers (eigenvalues inside [-2, 2]) the two agree in trend
        assert paper[1] > paper[0] and corrected[1] > corrected[0]

    def test_off_diagonal_outlier_is_almost_invisible(self):
        """An off-diagonal member enters the matrix twice: its pattern e_i e_j^T + e_j e_i^T
        has eigenvalues +-1, not a single spike, so the KL barely moves (measured:
        0.402 -> 0.408 paper for delta = 1000)."""
        base = _randn(15, 1024, seed=3)
        q = base.clone()
        q[1] += 1000.0
        for density in ("paper", "corrected"):
            assert (
                abs(float(spqr_kl(q, density=density)) - float(spqr_kl(base, density=density)))
                < 0.02
            )
        assert float(spqr_eigenvalues(q).abs().amax(-1).max()) < 2

    def test_wigner_null_and_planted_spike(self):
        """Spec section 6: 0.616, 0.629, 0.664, 0.713 for theta = 0, 2, 4, 8 at d = 4.

        Measured here on 20000 matrices: 0.6158, 0.6291, 0.6666, 0.7108 (across seeds
        the values move by about 5e-4, the gaps between thetas from 2 on are >= 0.013).
        """
        thetas = [0.0, 1.0, 2.0, 4.0, 8.0]
        spec = {0.0: 0.616, 2.0: 0.629, 4.0: 0.664, 8.0: 0.713}
        means = [float(spqr_kl(wigner_members(4, 20000, th, seed=0))) for th in thetas]
        for th, m in zip(thetas, means):
            if th in spec:
                assert m == pytest.approx(spec[th], abs=0.005), (th, m)
        # same G and v for every theta (common random numbers): strictly increasing,
        # even below the BBP threshold theta = 1 (0.6158 -> 0.6177)
        assert all(b > a + 0.001 for a, b in zip(means, means[1:])), means
        assert means[-1] - means[0] > 0.08
        iid = float(spqr_kl(_randn(10, 20000, seed=1)))
        assert iid == pytest.approx(0.615, abs=0.004)
        assert abs(iid - means[0]) < 0.004  # the GOE null is the i.i.d. null level

    def test_typical_band_at_d4(self):
        """Spec section 5: per-element values for d = 4 lie in about [0.585, 0.80]."""
        kl = spqr_kl(_randn(10, 20000, seed=2), reduction="none")
        assert float(kl.min()) > 0.58
        assert float(kl.max()) < 0.81


# --------------------------------------------------------------------------- #
# Autograd, vmap, compile
# --------------------------------------------------------------------------- #
class TestAutograd:
    @pytest.mark.parametrize("density", ["paper", "corrected"])
    @pytest.mark.parametrize("n", [3, 6, 10])
    def test_gradcheck_ordered(self, n, density):
        q = _randn(n, 5, seed=20 + n).requires_grad_()
        assert torch.autograd.gradcheck(
            lambda x: spqr_kl(x, density=density, reduction="none"), (q,)
        )

    def test_gradcheck_corrected_n15(self):
        q = _randn(15, 4, seed=21)
        lam = spqr_eigenvalues(q)
        assert float((lam.abs() - 2).abs().min()) > 0.05  # generic: away from the edge
        assert torch.autograd.gradcheck(
            lambda x: spqr_kl(x, density="corrected", reduction="none"), (q.requires_grad_(),)
        )

    @pytest.mark.parametrize("n", [8, 10])
    def test_gradcheck_random_filling(self, n):
        def fn(x):
            gen = torch.Generator().manual_seed(5)  # same assignment at every evaluation
            return spqr_kl(x, filling="random", generator=gen, reduction="none")

        q = _randn(n, 4, seed=22).requires_grad_()
        assert torch.autograd.gradcheck(fn, (q,))

    def test_gradient_reaches_exactly_the_used_members(self):
        q = _randn(9, 16, seed=23).requires_grad_()
        (g,) = torch.autograd.grad(spqr_kl(q), q)
        assert bool((g[:6].abs().sum(-1) > 0).all())
        assert float(g[6:].abs().max()) == 0.0

    def test_vmap_matches_loop(self):
        q = _randn(5, 10, 32, seed=24)
        out = torch.vmap(spqr_kl)(q)
        loop = torch.stack([spqr_kl(x) for x in q])
        torch.testing.assert_close(out, loop, rtol=1e-12, atol=1e-12)
        # vmapping over a batch dim that is not the leading one
        out2 = torch.vmap(
            lambda x: spqr_kl(x, density="corrected", reduction="none"), in_dims=1, out_dims=0
        )(q.permute(1, 0, 2))
        loop2 = torch.stack([spqr_kl(x, density="corrected", reduction="none") for x in q])
        torch.testing.assert_close(out2, loop2, rtol=1e-12, atol=1e-12)

    def test_vmap_of_grad_matches_loop(self):
        q = _randn(4, 6, 16, seed=25)
        grad_fn = torch.func.grad(spqr_kl)
        torch.testing.assert_close(
            torch.vmap(grad_fn)(q), torch.stack([grad_fn(x) for x in q]), rtol=1e-10, atol=1e-12
        )

    def test_vmap_random_filling_same_randomness(self):
        q = _randn(3, 10, 16, seed=26)
        out = torch.vmap(
            lambda x: spqr_kl(x, filling="random", generator=torch.Generator().manual_seed(9)),
            randomness="same",
        )(q)
        loop = torch.stack(
            [spqr_kl(x, filling="random", generator=torch.Generator().manual_seed(9)) for x in q]
        )
        torch.testing.assert_close(out, loop, rtol=1e-12, atol=1e-12)

    @pytest.mark.parametrize("density", ["paper", "corrected"])
    def test_compile_eager_backend(self, density):
        torch._dynamo.reset()
        fn = torch.compile(spqr_kl, backend="eager")
        q = _randn(10, 64, seed=27, dtype=torch.float32)
        qc = q.clone().requires_grad_()
        qe = q.clone().requires_grad_()
        out_c = fn(qc, density=density)
        out_e = spqr_kl(qe, density=density)
        torch.testing.assert_close(out_c, out_e, rtol=0, atol=0)
        out_c.backward()
        out_e.backward()
        torch.testing.assert_close(qc.grad, qe.grad, rtol=0, atol=0)
        # a second shape reuses or recompiles without error
        q2 = _randn(6, 33, seed=28, dtype=torch.float32)
        torch.testing.assert_close(fn(q2, density=density), spqr_kl(q2, density=density))

    @pytest.mark.slow  # inductor compiles C++: about 45 s on 2 loaded cores, cold cache
    @pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
    def test_compile_inductor(self):
        """Default (inductor) backend, forward and backward (the default suite compiles
        with the eager backend above, and the ensemble with inductor in test_ensemble)."""
        torch._dynamo.reset()
        fn = torch.compile(spqr_kl)
        q = _randn(10, 256, seed=29, dtype=torch.float32)
        qc = q.clone().requires_grad_()
        qe = q.clone().requires_grad_()
        out_c = fn(qc)
        out_c.backward()
        out_e = spqr_kl(qe)
        out_e.backward()
        torch.testing.assert_close(out_c, out_e, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(qc.grad, qe.grad, rtol=1e-4, atol=1e-7)

    @pytest.mark.parametrize("device", DEVICES)
    def test_backward_on_device(self, device):
        q = _randn(10, 256, 1, seed=30, dtype=torch.float32, device=device).requires_grad_()
        kl = spqr_kl(q, filling="random", generator=torch.Generator().manual_seed(0))
        kl.backward()
        assert kl.device.type == device and q.grad.device.type == device
        assert torch.isfinite(kl) and bool(torch.isfinite(q.grad).all())


# --------------------------------------------------------------------------- #
# Issue 20: bad inputs get a clear error or a documented result
# --------------------------------------------------------------------------- #
class TestBadInputs:
    @pytest.mark.parametrize("shape", [(6, 0), (6, 0, 1), (10, 4, 0)])
    def test_empty_batch_refused(self, shape):
        with pytest.raises(ValueError, match=r"empty batch.*at least one state-action pair"):
            spqr_kl(torch.randn(shape))
        with pytest.raises(ValueError, match="empty batch"):
            F.check_ensemble_values(torch.randn(shape))

    def test_num_members_checks_the_layout(self):
        q = torch.randn(256, 10)  # [batch, N] by mistake
        with pytest.raises(ValueError, match=r"256 entries on dim 0.*num_members=10.*movedim"):
            spqr_kl(q, num_members=10)
        torch.testing.assert_close(spqr_kl(q.T, num_members=10), spqr_kl(q.T.contiguous()))
        with pytest.raises(ValueError, match="num_members=6"):
            F.check_ensemble_values(torch.randn(10, 4), num_members=6)

    def test_batch_first_layout_warns_once(self):
        F._warned_layout.discard((256, 10))
        q = torch.randn(256, 10)
        with pytest.warns(UserWarning, match=r"read as N=256 ensemble members.*movedim"):
            spqr_kl(q, filling="random")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            kw = dict(filling="random", density="corrected")
            spqr_kl(q, **kw)  # once per shape
            spqr_kl(torch.randn(257, 10), num_members=257, **kw)  # layout stated
            spqr_kl(torch.randn(10, 4))  # N > batch but a plausible ensemble: no warning
            spqr_kl(torch.randn(150, 256), **kw)  # more pairs than members

    @pytest.mark.parametrize(
        "kw, match",
        [
            (dict(rho=0.0), r"rho must be in \(0, 1\].*got 0\.0"),
            (dict(rho=-0.5), r"rho must be in \(0, 1\]"),
            (dict(rho=1.5), r"rho must be in \(0, 1\]"),
            (dict(rho=float("nan")), r"rho must be in \(0, 1\].*nan"),
            (dict(rho=float("inf")), r"rho must be in \(0, 1\]"),
            (dict(eps=-0.01), r"eps must be a finite number >= 0.*-0\.01"),
            (dict(eps=float("nan")), r"eps must be a finite number >= 0"),
            (dict(eps=float("inf")), r"eps must be a finite number >= 0"),
            (dict(rho=1.0, density="corrected"), r"corrected.*rho=1\.0.*infinite"),
            (dict(eps=0.0, density="corrected"), r"corrected.*eps=0\.0.*infinite"),
        ],
    )
    def test_rho_eps_out_of_range(self, kw, match):
        q = torch.randn(6, 16)
        with pytest.raises(ValueError, match=match):
            spqr_kl(q, **kw)
        with pytest.raises(ValueError, match=match):
            soft_semicircle_density(torch.zeros(3), **kw)

    def test_rho_eps_edges_that_stay_finite(self):
        q = torch.randn(6, 16) * 3
        for kw in (dict(rho=1.0), dict(eps=0.0), dict(rho=1e-6), dict(eps=5.0)):
            assert bool(torch.isfinite(spqr_kl(q, **kw))), kw
        for kw in (dict(rho=0.999), dict(eps=1e-6)):
            assert bool(torch.isfinite(spqr_kl(q, density="corrected", **kw))), kw

    @pytest.mark.parametrize("kw", [dict(rho="0.5"), dict(eps="0.01"), dict(rho=None)])
    def test_rho_eps_non_numeric(self, kw):
        with pytest.raises(TypeError, match=r"must be a real number.*not a string"):
            spqr_kl(torch.randn(6, 4), **kw)

    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
    def test_low_precision_computed_in_float32(self, dtype):
        """float16/bfloat16: no eigensolver traceback; float32 math, result in the input dtype."""
        q32 = torch.randn(10, 64) * 5 + 20
        q = q32.to(dtype).requires_grad_()
        kl = spqr_kl(q)
        assert kl.dtype == dtype
        ref = spqr_kl(q.detach().float())
        assert float(kl) == pytest.approx(float(ref), rel=1e-2)
        kl.backward()
        assert q.grad.dtype == dtype and bool(torch.isfinite(q.grad).all())
        none = spqr_kl(q.detach(), reduction="none", density="corrected")
        assert none.dtype == dtype and none.shape == (64,)
        eig = spqr_eigenvalues(q.detach())
        assert eig.dtype == dtype
        torch.testing.assert_close(eig.float(), spqr_eigenvalues(q.detach().float()),
                                   rtol=2e-2, atol=2e-2)  # fmt: skip
        mat = F.normalize_matrices(F.ensemble_to_matrices(q.detach()))
        assert mat.dtype == dtype and bool(torch.isfinite(mat).all())

    def test_low_precision_identical_members_finite(self):
        q = torch.full((6, 4), 3.0, dtype=torch.float16, requires_grad=True)
        kl = spqr_kl(q)
        kl.backward()
        assert bool(torch.isfinite(kl)) and float(q.grad.abs().max()) == 0.0

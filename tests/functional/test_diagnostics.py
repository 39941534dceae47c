"""Tests of :mod:`torchrl_spqr.diagnostics` (spec: docs/spqr-spec.md, section 7)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _helpers import wigner_members

from torchrl_spqr import diagnostics as D
from torchrl_spqr.functional import matrix_side, spqr_eigenvalues

pytestmark = pytest.mark.filterwarnings("ignore:SPQR ordered filling:UserWarning")

LEVEL = 0.05
NULL_SAMPLES = 100_000  # the module's default


def _randn(*shape, seed: int, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def np_spike(q: np.ndarray) -> np.ndarray:
    """Independent NumPy max |eigenvalue| of the normalised ordered SPQR matrices."""
    n, b = q.shape
    d = matrix_side(n)
    rows, cols = np.triu_indices(d)
    m = np.zeros((b, d, d))
    m[:, rows, cols] = q[: len(rows)].T
    m[:, cols, rows] = q[: len(rows)].T
    flat = m.reshape(b, -1)
    flat = (flat - flat.mean(-1, keepdims=True)) / flat.std(-1, ddof=1, keepdims=True)
    m = flat.reshape(b, d, d) / math.sqrt(d)
    return np.abs(np.linalg.eigvalsh(m)).max(-1)


def acceptance_bound(batch: int, null_samples: int = NULL_SAMPLES, level: float = LEVEL) -> float:
    """4-sigma band for the acceptance rate under the null.

    Two independent Monte Carlo errors: the batch (binomial over ``batch``) and the
    finite null sample that sets the critical value (binomial over ``null_samples``).
    """
    var = level * (1 - level) * (1 / batch + 1 / null_samples)
    return 4 * math.sqrt(var)


# --------------------------------------------------------------------------- #
# spectral_spike
# --------------------------------------------------------------------------- #
class TestSpectralSpike:
    @pytest.mark.parametrize("n", [3, 6, 10, 15, 21])
    def test_matches_max_abs_eigenvalue(self, n):
        q = _randn(n, 64, seed=n)
        spike = D.spectral_spike(q)
        assert spike.shape == (64,)
        torch.testing.assert_close(spike, spqr_eigenvalues(q).abs().amax(-1), rtol=0, atol=0)
        np.testing.assert_allclose(spike.numpy(), np_spike(q.numpy()), rtol=1e-10, atol=1e-12)
        d = matrix_side(n)
        # bounds from the normalisation: sum of squares (d*d - 1)/d shared by d eigenvalues
        assert bool((spike <= math.sqrt((d * d - 1) / d) + 1e-12).all())
        assert bool((spike >= math.sqrt((d * d - 1) / d / d) - 1e-12).all())

    def test_batch_shape_and_dtype(self):
        q = _randn(10, 4, 5, 1, seed=0, dtype=torch.float32)
        spike = D.spectral_spike(q)
        assert spike.shape == (4, 5) and spike.dtype == torch.float32

    def test_random_filling_seeded(self):
        q = _randn(8, 32, seed=1)
        a = D.spectral_spike(q, filling="random", generator=torch.Generator().manual_seed(3))
        b = D.spectral_spike(q, filling="random", generator=torch.Generator().manual_seed(3))
        assert torch.equal(a, b)


# --------------------------------------------------------------------------- #
# The null distribution and p-values
# --------------------------------------------------------------------------- #
class TestNull:
    def test_cached_sorted_float64(self):
        null = D.spike_null_distribution(4)
        assert D.spike_null_distribution(4) is null  # cached: same object
        assert null.dtype == torch.float64 and null.device.type == "cpu"
        assert null.shape == (NULL_SAMPLES,)
        assert bool((null[1:] >= null[:-1]).all())
        assert float(null.min()) > 0 and float(null.max()) <= math.sqrt(15 / 4) + 1e-12

    def test_seeded(self):
        a = D.spike_null_distribution(3, num_samples=2000, seed=11)
        # the documented construction, recomputed independently: i.i.d. Gaussian members
        members = torch.randn(
            6, 2000, generator=torch.Generator().manual_seed(11), dtype=torch.float64
        )
        expected = np.sort(np_spike(members.numpy()))
        np.testing.assert_allclose(a.numpy(), expected, rtol=1e-10, atol=1e-12)
        b = D.spike_null_distribution(3, num_samples=2000, seed=12)
        assert not torch.equal(a, b)

    @pytest.mark.parametrize("d", [2, 3, 4, 5])
    def test_null_quantile_agrees_with_an_independent_sample(self, d):
        """The 95% quantile of the cached null vs an independent NumPy-RNG sample."""
        null = D.spike_null_distribution(d).numpy()
        t = d * (d + 1) // 2
        rng = np.random.default_rng(1234 + d)
        other = np_spike(rng.standard_normal((t, 40_000)))
        # compare the null's CDF at the independent sample's 95% quantile
        q95 = np.quantile(other, 0.95)
        cdf = np.searchsorted(null, q95) / null.size
        sd = math.sqrt(0.05 * 0.95 * (1 / 40_000 + 1 / null.size))
        assert abs(cdf - 0.95) < 4 * sd + 2e-3

    def test_pvalues_in_unit_interval(self):
        d = 4
        null = D.spike_null_distribution(d)
        top = float(null[-1])
        assert top < math.sqrt(15 / 4)  # the largest possible spike at d = 4
        spikes = torch.tensor(
            [0.0, float(null[0]), float(null[50_000]), top, top + 1e-9, math.sqrt(15 / 4), 5.0],
            dtype=torch.float64,
        )
        p = D.spike_pvalue(spikes, d)
        assert bool(((p > 0) & (p <= 1)).all())
        assert float(p[0]) == 1.0  # below every null value
        assert float(p[1]) == 1.0  # P(null >= its minimum) = 1
        assert float(p[2]) == pytest.approx(0.5, abs=1e-4)
        assert float(p[3]) == pytest.approx(2 / (NULL_SAMPLES + 1))  # (k + 1) / (n + 1)
        for i in (4, 5, 6):  # beyond every null value: never exactly 0
            assert float(p[i]) == pytest.approx(1 / (NULL_SAMPLES + 1))
        assert bool((p[1:] <= p[:-1]).all())  # decreasing in the spike

    def test_pvalue_dtype_follows_spike(self):
        p = D.spike_pvalue(torch.tensor([1.0, 1.5], dtype=torch.float32), 3)
        assert p.dtype == torch.float32 and p.shape == (2,)

    def test_pvalues_uniform_under_null(self):
        q = _randn(10, 20_000, seed=5)
        p = D.spike_pvalue(D.spectral_spike(q), 4).numpy()
        for level in (0.01, 0.05, 0.2, 0.5):
            frac = float((p < level).mean())
            sd = math.sqrt(level * (1 - level) * (1 / 20_000 + 1 / NULL_SAMPLES))
            assert abs(frac - level) < 4 * sd, (level, frac)

    def test_errors(self):
        with pytest.raises(ValueError, match="d must be >= 2"):
            D.spike_null_distribution(1)
        with pytest.raises(ValueError, match="num_samples must be >= 100"):
            D.spike_null_distribution(3, num_samples=10)


# --------------------------------------------------------------------------- #
# The independence test
# --------------------------------------------------------------------------- #
class TestIndependence:
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
    @pytest.mark.parametrize("n", [3, 6, 10, 15])
    def test_acceptance_under_null(self, n, dtype):
        batch = 20_000
        q = _randn(n, batch, seed=100 + n, dtype=dtype) * 3.0 + 7.0
        rate = float(D.acceptance_rate(q, level=LEVEL))
        assert abs(rate - (1 - LEVEL)) < acceptance_bound(batch), rate

    def test_acceptance_at_other_levels(self):
        q = _randn(6, 20_000, seed=7)
        for level in (0.01, 0.2):
            rate = float(D.acceptance_rate(q, level=level))
            assert abs(rate - (1 - level)) < acceptance_bound(20_000, level=level), (level, rate)

    def test_acceptance_under_null_random_filling(self):
        q = _randn(8, 20_000, seed=8)  # non-triangular: 6 random members of 8 per call
        rate = float(
            D.acceptance_rate(q, filling="random", generator=torch.Generator().manual_seed(0))
        )
        assert abs(rate - 0.95) < acceptance_bound(20_000)

    def test_planted_wigner_spike_is_rejected(self):
        """GOE + theta sqrt(d) v v^T at d = 4, 5000 elements. Measured acceptance:
        0.942 (theta 0; the GOE diagonal has twice the variance, so slightly below
        0.95), 0.859 (2), 0.492 (4), 0.177 (8)."""
        rates = [
            float(D.acceptance_rate(wigner_members(4, 5000, th, seed=0)))
            for th in (0.0, 2.0, 4.0, 8.0)
        ]
        assert rates[0] > 0.92
        assert rates[2] < 0.6 and rates[3] < 0.3
        assert all(b < a - 0.05 for a, b in zip(rates, rates[1:])), rates

    def test_diagonal_outlier_member_is_rejected(self):
        """Member 0 (on the diagonal) shifted by 8 sd: acceptance 0.33 (measured)."""
        q = _randn(10, 5000, seed=9)
        q[0] += 8.0
        assert float(D.acceptance_rate(q)) < 0.45

    def test_off_diagonal_outlier_member_is_not_detected(self):
        """Documented blind spot of the spike statistic: an off-diagonal outlier
        (member 1) makes a +-pair of eigenvalues, not one spike; acceptance rises
        above 0.95 (measured 0.998 for 8 sd)."""
        q = _randn(10, 5000, seed=9)
        q[1] += 8.0
        assert float(D.acceptance_rate(q)) > 0.97

    def test_independence_test_shape_and_consistency(self):
        q = _randn(10, 8, 16, 1, seed=10, dtype=torch.float32)
        accept = D.independence_test(q)
        assert accept.dtype == torch.bool and accept.shape == (8, 16)
        p = D.spike_pvalue(D.spectral_spike(q), 4)
        assert torch.equal(accept, p >= LEVEL)
        assert float(D.acceptance_rate(q)) == pytest.approx(float(accept.float().mean()))

    def test_no_gradient_needed(self):
        q = _randn(10, 64, seed=11).requires_grad_()
        rate = D.acceptance_rate(q)
        assert not rate.requires_grad

    @pytest.mark.parametrize("level", [0.0, 1.0, -0.1, 1.5])
    def test_bad_level(self, level):
        q = _randn(6, 16, seed=0)
        with pytest.raises(ValueError, match=r"level must be in \(0, 1\)"):
            D.independence_test(q, level=level)
        with pytest.raises(ValueError, match=r"level must be in \(0, 1\)"):
            D.acceptance_rate(q, level=level)

    def test_bad_input(self):
        with pytest.raises(ValueError, match="at least 3 members"):
            D.acceptance_rate(torch.randn(2, 16))
        with pytest.raises(ValueError, match="non-finite"):
            D.acceptance_rate(torch.full((6, 4), float("nan")))


# --------------------------------------------------------------------------- #
# Cross-sample dependence
# --------------------------------------------------------------------------- #
class TestResidualCorrelation:
    @pytest.mark.parametrize("n", [3, 6, 10])
    def test_independent_members(self, n):
        stats = D.residual_correlation(_randn(n, 20_000, seed=n))
        assert sorted(stats) == ["mean_pairwise_corr", "mp_edge", "mp_ratio", "top_eigenvalue"]
        assert all(v.shape == () for v in stats.values())
        assert float(stats["mean_pairwise_corr"]) == pytest.approx(-1 / (n - 1), abs=5e-3)
        assert D.expected_null_mean_pairwise_corr(n) == pytest.approx(-1 / (n - 1))
        assert float(stats["mp_edge"]) == pytest.approx((1 + math.sqrt(n / 20_000)) ** 2)
        assert 0.9 < float(stats["mp_ratio"]) <= 1.05
        # the top eigenvalue itself is inflated by N/(N-1) by the centring
        assert float(stats["top_eigenvalue"]) == pytest.approx(
            float(stats["mp_ratio"]) * float(stats["mp_edge"]) * n / (n - 1)
        )

    def test_small_batch_near_edge(self):
        """At B = 256 the top eigenvalue fluctuates around the asymptotic MP edge on the
        Tracy-Widom scale: measured ratios 0.86 .. 1.07 over 10 seeds, median 0.92."""
        ratios = [
            float(D.residual_correlation(_randn(10, 256, seed=s))["mp_ratio"]) for s in range(10)
        ]
        assert float(np.median(ratios)) <= 1.0
        assert max(ratios) <= 1.15

    def test_matches_numpy(self):
        q = _randn(6, 300, seed=1)
        x = q.numpy()
        r = x - x.mean(0, keepdims=True)
        corr = np.corrcoef(r)
        stats = D.residual_correlation(q)
        n = 6
        np.testing.assert_allclose(
            float(stats["top_eigenvalue"]), np.linalg.eigvalsh(corr)[-1], rtol=1e-10
        )
        off = corr[~np.eye(n, dtype=bool)].mean()
        np.testing.assert_allclose(float(stats["mean_pairwise_corr"]), off, rtol=1e-10)

    @pytest.mark.parametrize("n", [6, 10])
    def test_shared_component_raises_mp_ratio(self, n):
        """q_k = z_k + a_k w with w shared by half of the members. Measured mp_ratio
        for a = 0.5 and B = 4096: 1.22 (N = 6), 1.40 (N = 10), vs <= 1 for a = 0."""
        batch = 4096
        z = _randn(n, batch, seed=20 + n)
        w = _randn(batch, seed=40 + n)
        a = torch.zeros(n, 1, dtype=torch.float64)
        a[: n // 2] = 0.5
        indep = D.residual_correlation(z)
        shared = D.residual_correlation(z + a * w)
        assert float(indep["mp_ratio"]) <= 1.02
        assert float(shared["mp_ratio"]) > 1.15
        assert float(shared["mp_ratio"]) > float(indep["mp_ratio"]) + 0.15
        # the per-element spike statistic cannot see this (w is i.i.d. over the batch)
        assert abs(float(D.acceptance_rate(z + a * w)) - 0.95) < 0.03

    def test_mean_pairwise_corr_bounds(self):
        """Residuals sum to zero over members, so the mean pairwise correlation is
        ((sum_k z_k)^2 - N) / (N (N - 1)) >= -1/(N - 1), with equality when all the
        residual variances are equal. A shared component with balanced residual
        variance leaves it at -1/(N - 1); members whose residual variances differ
        (one member much noisier than the rest) raise it clearly."""
        n, batch = 10, 4096
        z = _randn(n, batch, seed=3)
        w = _randn(batch, seed=4)
        a = torch.zeros(n, 1, dtype=torch.float64)
        a[:5] = 1.0
        base = float(D.residual_correlation(z)["mean_pairwise_corr"])
        balanced = float(D.residual_correlation(z + a * w)["mean_pairwise_corr"])
        assert balanced >= -1 / (n - 1) - 1e-12
        assert base >= -1 / (n - 1) - 1e-12
        assert balanced == pytest.approx(-1 / (n - 1), abs=0.01)
        noisy = z.clone()
        noisy[0] *= 10.0
        high = float(D.residual_correlation(noisy)["mean_pairwise_corr"])
        assert high > base + 0.3

    def test_trailing_dim_and_dtype(self):
        q = _randn(6, 32, 1, seed=5, dtype=torch.float32)
        stats = D.residual_correlation(q)
        assert all(v.dtype == torch.float32 for v in stats.values())
        ref = D.residual_correlation(q.squeeze(-1))
        for k in stats:
            assert torch.equal(stats[k], ref[k])

    def test_detached(self):
        q = _randn(6, 32, seed=6).requires_grad_()
        assert not any(v.requires_grad for v in D.residual_correlation(q).values())

    def test_identical_members_degenerate(self):
        """Identical members: the correlations are 0/0, NaN ("degenerate"), never the
        0.0 that reads as independent (issue 20); the MP edge stays defined."""
        q = _randn(1, 64, seed=7).expand(6, 64).clone()
        stats = D.residual_correlation(q)
        for key in ("top_eigenvalue", "mp_ratio", "mean_pairwise_corr"):
            assert bool(torch.isnan(stats[key])), key
        assert bool(torch.isfinite(stats["mp_edge"]))

    @pytest.mark.parametrize("shape", [(6, 1), (6, 1, 1)])
    def test_batch_of_one(self, shape):
        with pytest.raises(ValueError, match="at least 2 elements, got 1"):
            D.residual_correlation(torch.randn(shape))

    def test_bad_input(self):
        with pytest.raises(ValueError, match="at least 3 members"):
            D.residual_correlation(torch.randn(2, 64))
        with pytest.raises(ValueError, match="floating-point"):
            D.residual_correlation(torch.ones(6, 64, dtype=torch.long))


# --------------------------------------------------------------------------- #
# ensemble_std
# --------------------------------------------------------------------------- #
class TestEnsembleStd:
    @pytest.mark.parametrize("shape", [(10, 256), (10, 256, 1), (5, 4, 7)])
    def test_equals_torch_std(self, shape):
        q = _randn(*shape, seed=0, dtype=torch.float32) * 2.5 + 1.0
        expected = (q.squeeze(-1) if shape[-1] == 1 else q).std(0).mean()
        torch.testing.assert_close(D.ensemble_std(q), expected)
        # unbiased: sqrt(sum (q - mean)^2 / (N - 1))
        x = q.reshape(shape[0], -1).double().numpy()
        np.testing.assert_allclose(float(D.ensemble_std(q)), x.std(0, ddof=1).mean(), rtol=1e-5)

    def test_zero_for_identical_members_and_detached(self):
        q = torch.ones(6, 8, requires_grad=True)
        s = D.ensemble_std(q)
        assert float(s) == 0.0 and not s.requires_grad

    def test_bad_input(self):
        with pytest.raises(ValueError, match="at least 3 members"):
            D.ensemble_std(torch.randn(2, 8))


# --------------------------------------------------------------------------- #
# Issue 20: coinciding members read "degenerate", never "independent"
# --------------------------------------------------------------------------- #
class TestDegenerate:
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
    def test_identical_members(self, dtype):
        q = (_randn(1, 128, seed=11) * 50 + 7).to(dtype).expand(10, 128).clone()
        assert bool(D.degenerate_mask(q).all())
        assert float(D.degenerate_fraction(q)) == 1.0
        assert not bool(D.independence_test(q).any())
        assert bool(torch.isnan(D.acceptance_rate(q)))
        assert bool(torch.isnan(D.residual_correlation(q)["mean_pairwise_corr"]))
        assert float(D.ensemble_std(q)) == 0.0

    def test_round_off_counts_as_coinciding(self):
        """Members a few ulps apart (round-off of identical critics) are degenerate too."""
        base = _randn(1, 64, seed=12, dtype=torch.float32) * 100
        q = base.expand(6, 64).clone()
        q[1] = torch.nextafter(q[1], q[1] + 1)
        assert bool(D.degenerate_mask(q).all())
        assert bool(torch.isnan(D.acceptance_rate(q)))
        assert bool(torch.isnan(D.residual_correlation(q)["mp_ratio"]))

    def test_zero_values(self):
        assert bool(D.degenerate_mask(torch.zeros(6, 4)).all())
        assert not bool(D.degenerate_mask(torch.zeros(6, 4).index_fill(0, torch.tensor([2]), 1e-30)).any())  # fmt: skip

    def test_independent_members_unaffected(self):
        q = _randn(10, 512, seed=13)
        assert not bool(D.degenerate_mask(q).any())
        assert float(D.degenerate_fraction(q)) == 0.0
        accept = D.independence_test(q)
        assert float(D.acceptance_rate(q)) == pytest.approx(float(accept.double().mean()))
        assert bool(torch.isfinite(D.residual_correlation(q)["mean_pairwise_corr"]))

    def test_partly_degenerate_batch(self):
        """Degenerate elements are rejected by the test and left out of the rate."""
        q = _randn(10, 64, seed=14)
        q[:, :16] = q[0, :16]  # members coincide at the first 16 pairs
        mask = D.degenerate_mask(q)
        assert mask[:16].all() and not mask[16:].any()
        assert float(D.degenerate_fraction(q)) == pytest.approx(0.25)
        accept = D.independence_test(q)
        assert not accept[:16].any()
        rate = float(D.acceptance_rate(q))
        assert rate == pytest.approx(float(D.independence_test(q[:, 16:]).double().mean()))
        assert 0.7 < rate <= 1.0

    def test_constant_offsets_have_undefined_correlation(self):
        """Members that differ by constants only: residuals constant over the batch, 0/0."""
        base = _randn(1, 64, seed=15)
        q = base + torch.arange(6, dtype=torch.float64).unsqueeze(-1)
        assert not bool(D.degenerate_mask(q).any())  # they differ at every pair
        stats = D.residual_correlation(q)
        assert bool(torch.isnan(stats["mean_pairwise_corr"]))
        assert bool(torch.isfinite(stats["mp_edge"]))

    def test_num_members_and_empty_batch(self):
        q = _randn(64, 6, seed=16)
        for fn in (D.degenerate_mask, D.acceptance_rate, D.residual_correlation, D.ensemble_std):
            with pytest.raises(ValueError, match="num_members=6"):
                fn(q, num_members=6)
        with pytest.raises(ValueError, match="empty batch"):
            D.acceptance_rate(torch.randn(6, 0))
        with pytest.raises(ValueError, match="empty batch"):
            D.degenerate_mask(torch.randn(6, 0))

    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
    def test_low_precision(self, dtype):
        q = _randn(10, 256, seed=17).to(dtype)
        assert 0.8 < float(D.acceptance_rate(q)) <= 1.0
        assert D.spectral_spike(q).dtype == dtype
        assert bool(torch.isfinite(D.residual_correlation(q)["mp_ratio"]))

"""Diagnostics of ensemble independence (section 7 of the SPQR spec).

Pure tensor functions, all detached-friendly and cheap enough to log at every
update:

- :func:`spectral_spike`: the largest absolute eigenvalue of each normalised
  SPQR matrix (an outlier member or a low-rank pattern shows up here).
- :func:`spike_null_distribution`: the exact finite-``d`` null distribution of
  that statistic when the members are i.i.d. Gaussian (Monte Carlo, seeded,
  cached per ``d``), with :func:`spike_pvalue`, :func:`independence_test` and
  :func:`acceptance_rate`.
- :func:`residual_correlation`: cross-sample dependence the per-element
  statistic cannot see, from the ``N x N`` correlation matrix of members'
  deviations from the ensemble mean over the batch, compared with the
  Marchenko-Pastur edge.
- :func:`ensemble_std`: the spread of the members.
- :func:`degenerate_mask` / :func:`degenerate_fraction`: where the members
  coincide (their spread is zero within float resolution).

Coinciding members are *degenerate*, not independent: the normalised SPQR
matrix is 0/0 there (by convention the zero matrix, spike 0) and the residual
correlations are 0/0. So :func:`independence_test` rejects such elements,
:func:`acceptance_rate` is taken over the other elements only and is NaN when
every element is degenerate, and :func:`residual_correlation` returns NaN for
its correlation statistics when a member's residuals vanish (e.g. all members
identical). NaN there means "undefined: the members coincide", never
"independent".

Examples:
    >>> import torch
    >>> from torchrl_spqr.diagnostics import acceptance_rate, residual_correlation
    >>> q = torch.randn(10, 512)
    >>> 0.85 < float(acceptance_rate(q, level=0.05)) <= 1.0
    True
    >>> stats = residual_correlation(q)
    >>> sorted(stats)
    ['mean_pairwise_corr', 'mp_edge', 'mp_ratio', 'top_eigenvalue']
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import Tensor

from torchrl_spqr.functional import (
    Filling,
    check_ensemble_values,
    matrix_side,
    spqr_eigenvalues,
)

__all__ = [
    "spectral_spike",
    "spike_null_distribution",
    "spike_pvalue",
    "independence_test",
    "acceptance_rate",
    "residual_correlation",
    "ensemble_std",
    "degenerate_mask",
    "degenerate_fraction",
    "DEGENERATE_ULPS",
]

_NULL_SAMPLES = 100_000
_NULL_SEED = 0

#: Members at a state-action pair coincide when their spread (max - min) is at most
#: this many units of the dtype's resolution (``torch.finfo(dtype).eps``) times their
#: largest magnitude: round-off of identical critics, not a real difference.
DEGENERATE_ULPS = 8


def _degenerate_rtol(dtype: torch.dtype) -> float:
    return DEGENERATE_ULPS * torch.finfo(dtype).eps


def degenerate_mask(q: Tensor, *, num_members: int | None = None) -> Tensor:
    """Where the members coincide: bool ``[*batch]`` for ``q`` ``[N, *batch]``.

    ``True`` where ``max_k q_k - min_k q_k <= DEGENERATE_ULPS * eps * max_k |q_k|``
    (``eps`` the resolution of ``q``'s dtype; exactly equal members, zeros
    included, always count). The SPQR statistics are undefined there.

    Examples:
        >>> degenerate_mask(torch.ones(5, 3)).tolist()
        [True, True, True]
        >>> bool(degenerate_mask(torch.randn(5, 3)).any())
        False
    """
    return _degenerate(check_ensemble_values(q, num_members=num_members, check_finite=False))


def _degenerate(q: Tensor) -> Tensor:
    """:func:`degenerate_mask` of an already validated ``[N, *batch]`` tensor."""
    q = q.detach()
    spread = q.amax(0) - q.amin(0)
    scale = q.abs().amax(0)
    return spread <= _degenerate_rtol(q.dtype) * scale


def degenerate_fraction(q: Tensor, *, num_members: int | None = None) -> Tensor:
    """Fraction of batch elements where the members coincide (scalar, see :func:`degenerate_mask`).

    1.0 for an ensemble of identical critics (e.g. built from one shared module).
    """
    return degenerate_mask(q, num_members=num_members).to(torch.get_default_dtype()).mean()


def spectral_spike(
    q: Tensor,
    *,
    filling: Filling = "ordered",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Largest absolute eigenvalue of each normalised SPQR matrix: ``[N, *batch] -> [*batch]``."""
    eig = spqr_eigenvalues(q, filling, generator=generator)
    return eig.abs().amax(-1)


@lru_cache(maxsize=32)
def _null_spikes_cpu(d: int, num_samples: int, seed: int) -> Tensor:
    t = d * (d + 1) // 2
    gen = torch.Generator().manual_seed(seed)
    members = torch.randn(t, num_samples, generator=gen, dtype=torch.float64)
    spikes = spectral_spike(members)
    return spikes.sort().values


def spike_null_distribution(
    d: int, *, num_samples: int = _NULL_SAMPLES, seed: int = _NULL_SEED
) -> Tensor:
    """Sorted Monte Carlo sample (float64, CPU) of the spike statistic under the null.

    The null: the ``d (d + 1) / 2`` members at a state-action are i.i.d.
    Gaussian (the statistic is invariant to their common mean and scale). The
    sample is exact for the finite ``d`` in use, not the large-``d``
    Tracy-Widom limit, and is cached per ``(d, num_samples, seed)``.
    """
    if d < 2:
        raise ValueError(f"matrix side d must be >= 2, got {d}.")
    if num_samples < 100:
        raise ValueError(f"num_samples must be >= 100 for a usable null, got {num_samples}.")
    return _null_spikes_cpu(int(d), int(num_samples), int(seed))


def spike_pvalue(
    spike: Tensor, d: int, *, num_samples: int = _NULL_SAMPLES, seed: int = _NULL_SEED
) -> Tensor:
    """Monte Carlo p-value ``P_null(spike' >= spike)`` for each element of ``spike``.

    Uses the ``(k + 1) / (n + 1)`` estimate, so p-values are never exactly 0.
    """
    null = spike_null_distribution(d, num_samples=num_samples, seed=seed)
    null = null.to(device=spike.device, dtype=torch.float64)
    below = torch.searchsorted(null, spike.detach().to(torch.float64).contiguous(), right=False)
    n = null.numel()
    greater_equal = n - below
    return ((greater_equal + 1).to(torch.float64) / (n + 1)).to(spike.dtype)


def independence_test(
    q: Tensor,
    *,
    level: float = 0.05,
    filling: Filling = "ordered",
    generator: torch.Generator | None = None,
    num_samples: int = _NULL_SAMPLES,
    seed: int = _NULL_SEED,
    num_members: int | None = None,
) -> Tensor:
    """Per-element accept (``True``) / reject of "the members at this pair are i.i.d.".

    Rejects when the spike's Monte Carlo p-value is below ``level``, and where
    the members coincide (:func:`degenerate_mask`): the statistic is undefined
    there, and exact ties have probability zero under the i.i.d. null.
    Returns a bool tensor of shape ``*batch``.
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}.")
    q = check_ensemble_values(q, num_members=num_members)
    d = matrix_side(q.shape[0])
    with torch.no_grad():
        spike = spectral_spike(q, filling=filling, generator=generator)
        pval = spike_pvalue(spike, d, num_samples=num_samples, seed=seed)
        return (pval >= level) & ~_degenerate(q)


def acceptance_rate(
    q: Tensor,
    *,
    level: float = 0.05,
    filling: Filling = "ordered",
    generator: torch.Generator | None = None,
    num_samples: int = _NULL_SAMPLES,
    seed: int = _NULL_SEED,
    num_members: int | None = None,
) -> Tensor:
    """Fraction of batch elements where :func:`independence_test` accepts (scalar).

    Under the null it is about ``1 - level``. Elements where the members
    coincide (:func:`degenerate_mask`) are left out (the test is undefined
    there); when every element is degenerate the rate is NaN: "degenerate",
    not "independent" (see :func:`degenerate_fraction`).
    """
    q = check_ensemble_values(q, num_members=num_members)
    accept = independence_test(
        q,
        level=level,
        filling=filling,
        generator=generator,
        num_samples=num_samples,
        seed=seed,
        num_members=num_members,
    )
    valid = ~_degenerate(q)
    dtype = torch.get_default_dtype()
    return accept.to(dtype).sum() / valid.to(dtype).sum()


def residual_correlation(q: Tensor, *, num_members: int | None = None) -> dict[str, Tensor]:
    """Cross-sample dependence of the members' residuals over the batch.

    Residuals are the members' deviations from the ensemble mean at each pair,
    ``r_k(b) = q_k(b) - mean_j q_j(b)``; their ``N x N`` Pearson correlation over
    the batch elements is computed. Returned (all scalars, detached):

    - ``top_eigenvalue``: the largest eigenvalue of that correlation matrix;
    - ``mp_edge``: the Marchenko-Pastur edge ``(1 + sqrt(N / B))^2`` for ``B``
      batch elements;
    - ``mp_ratio``: ``top_eigenvalue * (N - 1) / N / mp_edge``, the top
      eigenvalue corrected for the centring (see the note) over the edge; about
      1 or below for independent members, above 1 signals a pattern shared
      across members beyond sampling noise;
    - ``mean_pairwise_corr``: mean off-diagonal correlation.

    Note: residuals sum to zero over members, so independent members have a
    mean pairwise correlation of ``-1 / (N - 1)``, not 0, and the non-zero
    eigenvalues of the correlation matrix are inflated by ``N / (N - 1)``, which ``mp_ratio`` undoes.

    What it cannot see: a component *common to all members* (every critic off by the
    same amount at a pair, e.g. an error inherited from a shared bootstrapped target)
    cancels in the residuals, so it leaves every number here, like every spectral
    statistic of the centred matrices, at its independent level. It detects
    structure *among* members (clusters, a subset sharing an error pattern across
    the batch), not the ensemble's shared bias; measuring that needs the true values
    (``experiments/spectral_vs_direct.py``).

    Degenerate ensembles: when a member's residuals are constant over the batch
    (within :data:`DEGENERATE_ULPS` of the values' resolution; e.g. all members
    identical, or a member that differs from the mean by a constant only), its
    correlations are 0/0, and ``top_eigenvalue``, ``mp_ratio``
    and ``mean_pairwise_corr`` are NaN (``mp_edge`` stays defined).
    """
    q = check_ensemble_values(q, num_members=num_members).detach()
    n = q.shape[0]
    x = q.flatten(1)  # [N, B]
    b = x.shape[1]
    if b < 2:
        raise ValueError(f"residual_correlation needs a batch of at least 2 elements, got {b}.")
    x = x.to(torch.float64)
    r = x - x.mean(0, keepdim=True)
    r = r - r.mean(1, keepdim=True)
    std = r.pow(2).sum(1, keepdim=True).sqrt().clamp_min(1e-300)
    z = r / std
    corr = z @ z.T  # [N, N]
    top = torch.linalg.eigvalsh(corr)[-1]
    edge = (1 + (n / b) ** 0.5) ** 2
    off = corr.sum() - corr.diagonal().sum()
    mean_pair = off / (n * (n - 1))
    # a member whose residuals are round-off only (rms <= rtol * the values' scale)
    rms = std.squeeze(1) / b**0.5
    # torch.where, not a Python branch: no host read of a device value (CUDA graph capture)
    degenerate = (rms <= _degenerate_rtol(q.dtype) * x.abs().amax()).any()
    nan = torch.full((), float("nan"), dtype=torch.float64, device=q.device)
    top, mean_pair = torch.where(degenerate, nan, top), torch.where(degenerate, nan, mean_pair)
    dtype = q.dtype
    return {
        "top_eigenvalue": top.to(dtype),
        "mp_edge": torch.full((), edge, dtype=dtype, device=q.device),
        "mp_ratio": (top * (n - 1) / n / edge).to(dtype),
        "mean_pairwise_corr": mean_pair.to(dtype),
    }


def ensemble_std(q: Tensor, *, num_members: int | None = None) -> Tensor:
    """Mean over the batch of the (unbiased) std over members: ``[N, *batch] -> scalar``."""
    q = check_ensemble_values(q, num_members=num_members)
    return q.detach().std(0).mean()


def expected_null_mean_pairwise_corr(num_members: int) -> float:
    """Mean pairwise residual correlation of independent members: ``-1 / (N - 1)``."""
    return -1.0 / (num_members - 1)

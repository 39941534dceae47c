"""Pure tensor math of the SPQR regulariser (no TorchRL state).

SPQR (Lee, Han, Cho, Lee, NeurIPS 2023, arXiv 2401.03137) arranges the ``N``
Q-values of an ensemble at one state-action pair into a small symmetric random
matrix, normalises it like a Wigner matrix and compares its eigenvalue
distribution with Wigner's semicircle law by a KL divergence.

Every function here takes and returns plain tensors, so it can be unit-tested
alone, used under :func:`torch.vmap` and :func:`torch.compile`, and moved
upstream without the rest of the package.

Conventions: the ensemble is on dim 0 of ``q`` (``[N, *batch]`` or
``[N, *batch, 1]``), as TorchRL's vmapped losses produce it.

Examples:
    >>> import torch
    >>> from torchrl_spqr.functional import spqr_kl
    >>> q = torch.randn(10, 256, 1, requires_grad=True)  # 10 critics, batch 256
    >>> kl = spqr_kl(q)  # paper mode: ordered filling, paper density
    >>> kl.shape
    torch.Size([])
    >>> kl.backward()
    >>> bool(torch.isfinite(q.grad).all())
    True
"""

from __future__ import annotations

import math
import numbers
import warnings
from functools import lru_cache
from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "DENSITIES",
    "FILLINGS",
    "matrix_side",
    "num_used_members",
    "triangle_indices",
    "member_positions",
    "check_ensemble_values",
    "check_density_params",
    "real_number",
    "upcast",
    "warn_unused",
    "warn_paper_large",
    "ensemble_to_matrices",
    "normalize_matrices",
    "spqr_eigenvalues",
    "semicircle_density",
    "soft_semicircle_density",
    "spectral_kl",
    "spqr_kl",
]

Filling = Literal["ordered", "random"]
Density = Literal["paper", "corrected"]
Reduction = Literal["mean", "sum", "none"]

FILLINGS: tuple[str, ...] = ("ordered", "random")
#: ``"paper"``: the authors' soft semicircle, including its quirk outside [-2, 2];
#: ``"corrected"``: semicircle term zero outside [-2, 2], floor ``(1 - rho) * eps``.
DENSITIES: tuple[str, ...] = ("paper", "corrected")
REDUCTIONS: tuple[str, ...] = ("mean", "sum", "none")

# Floors that keep values and gradients finite on degenerate input. They are far
# below float32 resolution of any non-degenerate value, so paper-mode values are
# unchanged wherever the members are not (numerically) identical.
_VAR_FLOOR = 1e-12
_SQRT_FLOOR = 1e-12

_warned_unused: set[int] = set()
_warned_paper_large: set[int] = set()
_warned_layout: set[tuple[int, ...]] = set()

#: Dtypes that the eigensolvers do not support: SPQR computes in float32 for them
#: and returns its results in the input dtype.
_LOW_PRECISION = (torch.float16, torch.bfloat16)

#: ``[*, B]`` inputs with more than this many rows, and more rows than columns, are
#: most likely ``[batch, N]`` (see :func:`check_ensemble_values`).
_LAYOUT_WARN_MIN_ROWS = 100


def upcast(x: Tensor) -> Tensor:
    """``x`` in float32 when it is float16/bfloat16 (autograd flows through the cast).

    The eigensolvers do not support half precision, so SPQR computes in float32 there.
    """
    return x.float() if x.dtype in _LOW_PRECISION else x


def real_number(name: str, value, *, hint: str | None = None) -> float:
    """``value`` as a Python float, or a TypeError naming ``name`` when it is not a real number.

    Accepts Python/NumPy reals and one-element real tensors; refuses strings,
    booleans, complex numbers and anything else. ``hint`` replaces the default
    advice at the end of the message.

    Examples:
        >>> real_number("rho", 0.5)
        0.5
    """
    if isinstance(value, Tensor):
        if value.numel() == 1 and not value.is_complex() and value.dtype != torch.bool:
            return float(value)
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    raise TypeError(
        f"{name} must be a real number (int or float), got {value!r} "
        f"({type(value).__name__}). " + (hint or f"Pass e.g. {name}=0.5, not a string.")
    )


def check_density_params(rho: float, eps: float, density: str = "paper") -> tuple[float, float]:
    """Validate the soft-semicircle parameters and return them as floats.

    The target density must be positive everywhere (its logarithm is taken at
    each eigenvalue), which needs ``0 < rho <= 1`` and a finite ``eps >= 0``,
    and for ``density="corrected"`` (whose density outside [-2, 2] is
    ``(1 - rho) * eps``) ``rho < 1`` and ``eps > 0``. Anything else would give
    an infinite or NaN KL; it raises a :class:`ValueError` naming the value
    (:class:`TypeError` for a non-number).

    Examples:
        >>> check_density_params(0.5, 0.01)
        (0.5, 0.01)
    """
    rho_f, eps_f = real_number("rho", rho), real_number("eps", eps)
    if not (math.isfinite(rho_f) and 0.0 < rho_f <= 1.0):
        raise ValueError(
            f"rho must be in (0, 1] (the weight of the semicircle term; authors: 0.5), got {rho}."
        )
    if not (math.isfinite(eps_f) and eps_f >= 0.0):
        raise ValueError(
            f"eps must be a finite number >= 0 (the density floor; authors: 0.01), got {eps}."
        )
    if density == "corrected" and not (1.0 - rho_f) * eps_f > 0.0:
        raise ValueError(
            f"density='corrected' with rho={rho} and eps={eps} is zero outside [-2, 2] "
            "(its floor is (1 - rho) * eps), so the KL would be infinite: use rho < 1 and "
            "eps > 0 (authors: rho=0.5, eps=0.01)."
        )
    return rho_f, eps_f


def matrix_side(num_members: int) -> int:
    """Side ``d`` of the symmetric matrix built from ``num_members`` values.

    ``d = floor((sqrt(1 + 8 N) - 1) / 2)``, the largest ``d`` with
    ``d (d + 1) / 2 <= N``.

    Examples:
        >>> [matrix_side(n) for n in (3, 5, 6, 10, 14, 15, 55)]
        [2, 2, 3, 4, 4, 5, 10]
    """
    if num_members < 3:
        raise ValueError(
            f"SPQR needs an ensemble of at least 3 members to form a 2x2 matrix, "
            f"got N={num_members}."
        )
    d = (math.isqrt(1 + 8 * num_members) - 1) // 2
    return d


def num_used_members(num_members: int) -> int:
    """Number ``T = d (d + 1) / 2`` of members placed on the matrix."""
    d = matrix_side(num_members)
    return d * (d + 1) // 2


@lru_cache(maxsize=64)
def _triangle_index_pairs(d: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    rows, cols = torch.triu_indices(d, d).tolist()
    return tuple(rows), tuple(cols)


def triangle_indices(d: int, device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """Row and column indices of the upper triangle (diagonal included), row by row.

    Member ``k`` of the ordered filling sits at ``(rows[k], cols[k])``.

    Examples:
        >>> rows, cols = triangle_indices(3)
        >>> rows.tolist(), cols.tolist()
        ([0, 0, 0, 1, 1, 2], [0, 1, 2, 1, 2, 2])
    """
    rows, cols = _triangle_index_pairs(d)
    return (
        torch.tensor(rows, dtype=torch.long, device=device),
        torch.tensor(cols, dtype=torch.long, device=device),
    )


@lru_cache(maxsize=64)
def _flat_triangle(d: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Flat ``d*d`` indices of the upper-triangle positions and of their mirror (cached)."""
    rows, cols = triangle_indices(d, device=device)
    return rows * d + cols, cols * d + rows


def member_positions(
    num_members: int,
    filling: Filling = "ordered",
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Which member goes to each upper-triangle position (``[T]`` long tensor).

    ``"ordered"`` (the authors' choice) places members ``0 .. T-1`` row by row and
    ignores members ``T .. N-1``. ``"random"`` draws a fresh random choice and
    order of ``T`` of the ``N`` members, reproducible with a seeded ``generator``.

    Examples:
        >>> member_positions(10).tolist()
        [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
        >>> g = torch.Generator().manual_seed(0)
        >>> sorted(member_positions(6, "random", generator=g).tolist())
        [0, 1, 2, 3, 4, 5]
    """
    t = num_used_members(num_members)
    if filling == "ordered":
        return torch.arange(t, device=device)
    if filling == "random":
        # Draw on the generator's device (CPU by default), then move.
        gen_device = generator.device if generator is not None else "cpu"
        perm = torch.randperm(num_members, generator=generator, device=gen_device)
        return perm[:t].to(device)
    raise ValueError(f"filling must be one of {FILLINGS}, got {filling!r}.")


def cuda_graph_capturing() -> bool:
    """True while a CUDA graph is being captured on the current stream.

    Reading a device value on the host (``float(t)``, ``bool(t)``, ``t.item()``)
    is not allowed then; code that branches on such values reads a host-side
    copy instead, and data-dependent checks are skipped.
    """
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def tracing_or_capturing() -> bool:
    """True under torch.compile tracing or CUDA graph capture, where data-dependent checks
    and branches must be skipped."""
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and compiler.is_compiling()) or cuda_graph_capturing()


def _is_batched(x: Tensor) -> bool:
    """True when ``x`` is a functorch-wrapped tensor (inside ``torch.vmap`` / grad transforms)."""
    try:
        return torch._C._functorch.is_functorch_wrapped_tensor(x)  # noqa: SLF001
    except AttributeError:  # pragma: no cover - very old torch
        return False


def check_ensemble_values(
    q: Tensor,
    *,
    name: str = "q",
    check_finite: bool = True,
    num_members: int | None = None,
    warn_layout: bool = True,
) -> Tensor:
    """Validate an ensemble tensor and return it as ``[N, *batch]``.

    Accepts ``[N, *batch]`` or ``[N, *batch, 1]``; a trailing singleton is
    squeezed only when there is a batch dim left (``[N, 1]`` is read as N members
    and a batch of one). Raises :class:`ValueError` with a message naming the
    problem for a non-tensor, a non-floating dtype, ``N < 3``, an empty batch
    (a batch dim of size 0: the mean over it would be NaN), or non-finite values
    (counted).

    The ensemble is always read from dim 0, and nothing in a tensor says which
    dim that is. With ``num_members`` given, a leading dim of any other size is
    refused (the message suggests ``q.movedim(-1, 0)`` for ``[batch, N]``
    input). Without it, a 2-D ``q`` whose leading dim is larger than 100 and
    larger than its batch dim, shapes typical of a batch and atypical of an
    ensemble (``[256, 10]`` read as 256 critics at 10 pairs), gives a one-time
    :class:`UserWarning` per shape; pass ``num_members`` (or
    ``warn_layout=False``) to state the layout and silence it.
    """
    if not isinstance(q, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(q).__name__}.")
    if not q.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {q.dtype}.")
    if q.ndim < 2:
        raise ValueError(
            f"{name} must have shape [N, *batch] or [N, *batch, 1] with the ensemble on "
            f"dim 0 and at least one batch dim, got shape {tuple(q.shape)}."
        )
    if q.ndim >= 3 and q.shape[-1] == 1:
        q = q.squeeze(-1)
    n = q.shape[0]
    if num_members is not None and n != num_members:
        hint = (
            f" It looks like [batch, N]: pass {name}.movedim(-1, 0)."
            if q.shape[-1] == num_members
            else ""
        )
        raise ValueError(
            f"{name} has {n} entries on dim 0 (shape {tuple(q.shape)}), but the ensemble has "
            f"num_members={num_members}: the ensemble must be on the leading dim, "
            f"[N, *batch].{hint}"
        )
    if n < 3:
        raise ValueError(
            f"SPQR needs an ensemble of at least 3 members on dim 0 of {name}, got N={n} "
            f"(shape {tuple(q.shape)}). Is the ensemble on the leading dim?"
        )
    if q.numel() == 0:
        raise ValueError(
            f"{name} has an empty batch (shape {tuple(q.shape)}, N={n} members on dim 0): "
            "SPQR needs at least one state-action pair. Skip the update for an empty batch."
        )
    if (
        num_members is None
        and warn_layout
        and q.ndim == 2
        and n > q.shape[1]
        and n > _LAYOUT_WARN_MIN_ROWS
        and tuple(q.shape) not in _warned_layout
        and not tracing_or_capturing()
    ):
        _warned_layout.add(tuple(q.shape))
        warnings.warn(
            f"{name} of shape {tuple(q.shape)} is read as N={n} ensemble members (dim 0) at "
            f"{q.shape[1]} state-action pairs. If it is [batch, N], pass "
            f"{name}.movedim(-1, 0); if the layout is right, pass num_members={n} to say so.",
            UserWarning,
            stacklevel=3,
        )
    if check_finite and not tracing_or_capturing() and not _is_batched(q):
        finite = torch.isfinite(q)
        if not bool(finite.all()):
            bad = int((~finite).sum())
            raise ValueError(
                f"{name} contains {bad} non-finite value(s) (NaN or inf) out of {q.numel()}; "
                "the SPQR regulariser needs finite Q-values."
            )
    return q


def warn_unused(n: int, t: int) -> None:
    """Warn once per ``n`` that ordered filling uses only the first ``t`` of ``n`` members.

    Silent when ``n == t`` (a triangular number). The warning points two frames up
    (the caller of the function that calls this one).
    """
    if n != t and n not in _warned_unused:
        _warned_unused.add(n)
        warnings.warn(
            f"SPQR ordered filling with N={n} members: N is not a triangular number, so "
            f"only the first {t} members are used ({n - t} ignored), as in the authors' "
            "code. Use filling='random' to regularise every member in expectation.",
            UserWarning,
            stacklevel=3,
        )


def warn_paper_large(n: int) -> None:
    """Warn once per ``n`` that ``density="paper"`` does not penalise spikes for ``d >= 5``.

    The caller decides when it applies (paper density and ``matrix_side(n) >= 5``).
    """
    if n not in _warned_paper_large:
        _warned_paper_large.add(n)
        warnings.warn(
            f"SPQR density='paper' with N={n} (d >= 5): eigenvalues can leave [-2, 2], where "
            "the paper density is flat and higher than inside, so spikes are not penalised. "
            "density='corrected' is recommended for N >= 15.",
            UserWarning,
            stacklevel=3,
        )


def ensemble_to_matrices(
    q: Tensor,
    filling: Filling = "ordered",
    *,
    generator: torch.Generator | None = None,
    positions: Tensor | None = None,
) -> Tensor:
    """Arrange ensemble values ``[N, *batch]`` into symmetric matrices ``[*batch, d, d]``.

    Members fill the upper triangle (diagonal included) row by row and are
    mirrored below. ``positions`` (from :func:`member_positions`) overrides
    ``filling``. No normalisation is applied.

    Examples:
        >>> q = torch.arange(6.).unsqueeze(-1)  # 6 members, batch of 1
        >>> ensemble_to_matrices(q)[0]
        tensor([[0., 1., 2.],
                [1., 3., 4.],
                [2., 4., 5.]])
    """
    q = check_ensemble_values(q, check_finite=False, warn_layout=False)
    n = q.shape[0]
    d = matrix_side(n)
    if positions is None:
        positions = member_positions(n, filling, generator=generator, device=q.device)
    flat_upper, flat_lower = _flat_triangle(d, q.device)
    vals = q.index_select(0, positions.to(q.device))  # [T, *batch]
    vals = vals.movedim(0, -1)  # [*batch, T]
    mat = vals.new_zeros(*vals.shape[:-1], d * d)
    idx_u = flat_upper.expand(*vals.shape[:-1], -1)
    idx_l = flat_lower.expand(*vals.shape[:-1], -1)
    # scatter (not scatter_add): the diagonal is written twice with the same value
    mat = mat.scatter(-1, idx_u, vals).scatter(-1, idx_l, vals)
    return mat.unflatten(-1, (d, d))


def normalize_matrices(mat: Tensor) -> Tensor:
    """Wigner normalisation of ``[*batch, d, d]`` matrices.

    Subtract the mean and divide by the unbiased (ddof=1) standard deviation of
    all ``d * d`` entries, then scale by ``1 / sqrt(d)``. Values are first
    divided by their largest absolute deviation (held constant for autograd,
    which is exact because the normalised matrix is scale-invariant) and the
    variance is floored at ``1e-12``: identical members give the zero matrix
    with finite gradients instead of the authors' 0/0, and huge or tiny Q scales
    behave like unit ones.

    After normalisation the squared eigenvalues sum to ``(d*d - 1) / d``.
    float16/bfloat16 matrices are normalised in float32 and returned in their
    dtype.
    """
    if mat.dtype in _LOW_PRECISION:
        return normalize_matrices(mat.float()).to(mat.dtype)
    d = mat.shape[-1]
    flat = mat.flatten(-2)
    # Centre on one entry first (held constant: the result does not depend on it).
    # Differences of nearby floats are exact, so identical members give exactly
    # zero deviations (the zero matrix) instead of the round-off of the mean,
    # which the rescaling below would otherwise blow up to an O(1) random matrix.
    shifted = flat - flat[..., :1].detach()
    centred = shifted - shifted.mean(-1, keepdim=True)
    scale = centred.detach().abs().amax(-1, keepdim=True)
    tiny = torch.finfo(mat.dtype).tiny
    centred = centred / scale.clamp_min(tiny)
    var = centred.pow(2).sum(-1, keepdim=True) / (d * d - 1)
    std = (var + _VAR_FLOOR).sqrt()
    out = centred / (std * math.sqrt(d))
    return out.unflatten(-1, (d, d))


def spqr_eigenvalues(
    q: Tensor,
    filling: Filling = "ordered",
    *,
    generator: torch.Generator | None = None,
    positions: Tensor | None = None,
) -> Tensor:
    """Eigenvalues ``[*batch, d]`` (ascending) of the normalised SPQR matrices of ``q``.

    float16/bfloat16 ``q`` (which the eigensolvers do not support) is computed in
    float32; the eigenvalues are returned in the input dtype.
    """
    if isinstance(q, Tensor) and q.dtype in _LOW_PRECISION:
        eig = spqr_eigenvalues(q.float(), filling, generator=generator, positions=positions)
        return eig.to(q.dtype)
    mat = normalize_matrices(
        ensemble_to_matrices(q, filling, generator=generator, positions=positions)
    )
    return torch.linalg.eigvalsh(mat)


def semicircle_density(x: Tensor) -> Tensor:
    """Wigner semicircle density ``sqrt(4 - x^2) / (2 pi)`` on [-2, 2], zero outside."""
    inside = x.abs() < 2
    root = (4 - x.pow(2)).clamp_min(0).sqrt()
    return torch.where(inside, root, torch.zeros_like(root)) / (2 * math.pi)


def soft_semicircle_density(
    x: Tensor, *, rho: float = 0.5, eps: float = 0.01, density: Density = "paper"
) -> Tensor:
    """Soft semicircle target density ``p(x)`` of SPQR.

    - ``"paper"`` (the authors' expression, default for reproducibility):
      ``rho * sqrt(4 - x^2 * 1[|x| < 2]) / (2 pi) + (1 - rho) * eps * 1[|x| >= 2]``.
      Outside [-2, 2] the first term is ``rho / pi``, not zero, so ``p = 0.164``
      there (for the defaults), higher than the peak inside (``0.159``) and flat.
    - ``"corrected"``: ``rho * s(x) + (1 - rho) * eps`` with the semicircle
      ``s`` zero outside [-2, 2]; the density outside is the floor, lower than
      anywhere inside. Recommended for ``N >= 15``.

    Inside the support, ``4 - x^2`` is floored at ``1e-12`` so that values and
    gradients stay finite at the edge.

    ``rho`` and ``eps`` must keep the density positive (see
    :func:`check_density_params`); other values raise a :class:`ValueError`
    (tensor ``rho``/``eps``, e.g. learnable ones, are used as given).
    """
    if density not in DENSITIES:
        raise ValueError(f"density must be one of {DENSITIES}, got {density!r}.")
    if not isinstance(rho, Tensor) and not isinstance(eps, Tensor):  # tensors: left as given
        rho, eps = check_density_params(rho, eps, density)
    inside = x.abs() < 2
    inner = (4 - x.pow(2)).clamp_min(_SQRT_FLOOR)
    if density == "paper":
        root = torch.where(inside, inner, torch.full_like(inner, 4.0)).sqrt()
        outside = inside.logical_not().to(x.dtype)
        return rho * root / (2 * math.pi) + (1 - rho) * eps * outside
    root = torch.where(inside, inner.sqrt(), torch.zeros_like(inner))
    return rho * root / (2 * math.pi) + (1 - rho) * eps


def spectral_kl(
    eigenvalues: Tensor, *, rho: float = 0.5, eps: float = 0.01, density: Density = "paper"
) -> Tensor:
    """KL(ESD || p) of each eigenvalue set ``[*batch, d]`` -> ``[*batch]``.

    ``KL = -(1/d) * sum_i log(d * p(l_i))``, the plug-in estimate with mass
    ``1/d`` on each eigenvalue.
    """
    d = eigenvalues.shape[-1]
    p = soft_semicircle_density(eigenvalues, rho=rho, eps=eps, density=density)
    return -(torch.log(d * p)).mean(-1)


def spqr_kl(
    q: Tensor,
    *,
    filling: Filling = "ordered",
    density: Density = "paper",
    rho: float = 0.5,
    eps: float = 0.01,
    reduction: Reduction = "mean",
    generator: torch.Generator | None = None,
    num_members: int | None = None,
) -> Tensor:
    """The SPQR regulariser: KL between the ensemble's spectrum and the soft semicircle.

    Args:
        q: ensemble values with the ensemble on dim 0, ``[N, *batch]`` or
            ``[N, *batch, 1]``, ``N >= 3``.
        filling: ``"ordered"`` (paper: members ``0..T-1`` fill the upper triangle
            row by row, the rest are ignored with a one-time warning) or
            ``"random"`` (fresh random assignment of ``T`` members per call).
        density: ``"paper"`` (the authors' density, default) or ``"corrected"``
            (recommended for ``N >= 15``; see :func:`soft_semicircle_density`).
        rho: weight of the semicircle term (authors: 0.5), in ``(0, 1]``
            (``< 1`` for ``density="corrected"``).
        eps: density floor (authors: 0.01), finite and ``>= 0`` (``> 0`` for
            ``density="corrected"``).
        reduction: ``"mean"`` over the batch (paper), ``"sum"``, or ``"none"``
            (shape ``*batch``).
        generator: random generator for ``filling="random"``.
        num_members: optional check of the layout: the ensemble size, refused
            if dim 0 of ``q`` has another size (e.g. ``[batch, N]`` input). See
            :func:`check_ensemble_values` for the warning given without it.

    Returns:
        The KL, reduced as requested, in the dtype of ``q`` (float16/bfloat16
        input is computed in float32). Its gradient flows to ``q``.

    Raises:
        ValueError: for an empty batch (the mean over no pairs is undefined),
            ``rho``/``eps`` that make the target density vanish, and the input
            errors of :func:`check_ensemble_values`.

    Examples:
        >>> q = torch.randn(6, 32)
        >>> spqr_kl(q, reduction="none").shape
        torch.Size([32])
        >>> float(spqr_kl(torch.ones(6, 4))) > 0  # identical members: finite
        True
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}.")
    if filling not in FILLINGS:
        raise ValueError(f"filling must be one of {FILLINGS}, got {filling!r}.")
    if density not in DENSITIES:
        raise ValueError(f"density must be one of {DENSITIES}, got {density!r}.")
    rho, eps = check_density_params(rho, eps, density)
    q = check_ensemble_values(q, num_members=num_members)
    out_dtype = q.dtype
    q = upcast(q)
    n = q.shape[0]
    d = matrix_side(n)
    t = d * (d + 1) // 2
    if filling == "ordered":
        warn_unused(n, t)
    if density == "paper" and d >= 5:
        warn_paper_large(n)
    eig = spqr_eigenvalues(q, filling, generator=generator)
    kl = spectral_kl(eig, rho=rho, eps=eps, density=density)
    if reduction == "mean":
        kl = kl.mean()
    elif reduction == "sum":
        kl = kl.sum()
    return kl.to(out_dtype)

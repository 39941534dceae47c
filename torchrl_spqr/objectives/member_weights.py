"""Per-member weights of the SPQR penalty's gradient (``SPQRLoss(member_weights=...)``).

:func:`member_weights` validates the user's choice (``None``, ``"authors"`` or one
weight per member) and :func:`weight_member_grads` applies it: each member keeps its
Q-values and gets its share of the penalty's gradient scaled by its weight. The
configuration check of the training builders calls :func:`member_weights` too, so a
run fails before anything is built.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
from torch import Tensor

__all__ = ["member_weights", "weight_member_grads"]


def member_weights(spec: Any, n: int) -> Tensor | None:
    """``member_weights`` as a float32 ``[n]`` tensor (``None`` for ``None``); clear errors.

    Args:
        spec: ``None`` (every member gets ``beta``), ``"authors"`` (member ``k``,
            0-based, gets ``(n - k) * beta``, as the authors' N optimisers do) or a
            sequence (or 1-D tensor) of ``n`` finite non-negative real weights, not all 0.
        n: the ensemble size.

    Raises:
        TypeError: ``spec`` is not a sequence, or a weight is not a real number.
        ValueError: an unknown string, a wrong length, a negative, non-finite or
            all-zero weight.

    Examples:
        >>> member_weights("authors", 4)
        tensor([4., 3., 2., 1.])
        >>> member_weights(None, 4) is None
        True
    """
    if spec is None:
        return None
    if isinstance(spec, str):
        if spec == "authors":
            return torch.arange(n, 0, -1, dtype=torch.float32)
        raise ValueError(
            f"member_weights={spec!r} is not a known weighting: use 'authors' (member k gets "
            f"(N - k) * beta, as the authors' N optimisers), a sequence of N={n} non-negative "
            "weights, or None (beta for every member)."
        )
    if isinstance(spec, Tensor):
        if spec.dim() != 1:
            raise ValueError(
                f"member_weights must be 1-D (one weight per member, N={n}), got a tensor of "
                f"shape {tuple(spec.shape)}."
            )
        spec = spec.detach().cpu().tolist()
    try:
        if isinstance(spec, (bytes, dict)):
            raise TypeError
        values = list(spec)  # a list, tuple, or e.g. an OmegaConf ListConfig
    except TypeError:
        raise TypeError(
            f"member_weights must be 'authors', a sequence of N={n} weights or None, got "
            f"{spec!r} ({type(spec).__name__})."
        ) from None
    if len(values) != n:
        raise ValueError(
            f"member_weights has {len(values)} entries but the ensemble has N={n} members: give "
            "one weight per member."
        )
    out = []
    for k, v in enumerate(values):
        if isinstance(v, Tensor) and v.numel() == 1 and v.is_floating_point():
            v = float(v)
        if not isinstance(v, numbers.Real) or isinstance(v, bool):
            raise TypeError(
                f"member_weights[{k}] = {v!r} ({type(v).__name__}): each member weight must be "
                "a real number."
            )
        w = float(v)
        if not math.isfinite(w) or w < 0:
            raise ValueError(
                f"member_weights[{k}] = {w}: each member weight must be a finite non-negative "
                "number."
            )
        out.append(w)
    if not any(out):
        raise ValueError(
            "member_weights are all 0: no member would receive the SPQR gradient; use beta=0 "
            "to switch the penalty off."
        )
    return torch.tensor(out, dtype=torch.float32)


def weight_member_grads(q: Tensor, w: Tensor) -> Tensor:
    """``q`` unchanged in value (bit for bit), its gradient scaled by ``w[k]`` on member ``k``.

    ``q.detach() + (q w - (q w).detach())``: the bracket is exactly 0 for finite
    values, so the forward is ``q`` itself; the gradient reaches ``q`` only through
    ``q w``. Member ``k``'s parameters reach the penalty only through ``q[k]``, so
    its parameter gradient is ``w[k]`` times the unweighted one (chain rule).

    Args:
        q: per-member values, ``[N, *batch]``.
        w: the weights, ``[N]``.

    Examples:
        >>> q = torch.ones(3, 2, requires_grad=True)
        >>> weight_member_grads(q, torch.tensor([3.0, 2.0, 1.0])).sum().backward()
        >>> q.grad[:, 0]
        tensor([3., 2., 1.])
    """
    wq = w.to(device=q.device, dtype=q.dtype).reshape(-1, *([1] * (q.dim() - 1)))
    scaled = q * wq
    return q.detach() + (scaled - scaled.detach())

"""The actor's ``min_k Q_k``: the arg-min path or the plain min.

A mixin of :class:`~torchrl_spqr.objectives.common.EnsembleLossBase`, split from
it: the loss keeps its batched critic caller in ``self._batched_q`` (a
:class:`~torchrl_spqr.modules.BatchedMLP`, or ``None`` when the members run one by
one) and evaluates its members with ``self._q(td, params)``.
"""

from __future__ import annotations

import torch
from tensordict import TensorDictBase
from torch import Tensor
from torch._C._functorch import is_batchedtensor

from torchrl_spqr import functional as F

__all__ = ["ARGMIN_MIN_MEMBERS", "MinQMixin"]

#: The fewest members for which the actor's min takes the arg-min path by default
#: (:attr:`MinQMixin.min_q_path` ``"auto"``, products in the parameters' dtype):
#: ``benchmarks/bench_min_q.py`` measured it slower than the plain min below this.
ARGMIN_MIN_MEMBERS = 30


class MinQMixin:
    """Adds :meth:`_min_q` and its switch, :attr:`min_q_path`."""

    @property
    def min_q_path(self) -> str:
        """How the actor loss takes ``min_k Q_k`` (:meth:`_min_q`; ``SACNLoss``,
        ``EDACLoss``, ``CQLNLoss``).

        ``"auto"`` (default) takes the arg-min path where it measured faster:
        products in the parameters' dtype and at least :data:`ARGMIN_MIN_MEMBERS`
        members (``benchmarks/bench_min_q.py``). ``"argmin"`` and ``"full"`` force
        one path. Both give the same values and gradients. Not part of the
        state dict.

        Examples:
            >>> loss.min_q_path = "full"  # doctest: +SKIP
        """
        return self.__dict__.get("_min_q_path", "auto")

    @min_q_path.setter
    def min_q_path(self, value: str) -> None:
        if value not in ("auto", "argmin", "full"):
            raise ValueError(f"min_q_path must be 'auto', 'argmin' or 'full', got {value!r}.")
        self.__dict__["_min_q_path"] = value

    def _min_q(self, td: TensorDictBase, params: TensorDictBase) -> Tensor:
        """``min_k Q_k`` at ``td`` with the gradient (to the inputs) of the arg-min member only.

        The min's gradient reaches only the arg-min member of each row, so the
        backward pass through all ``N`` members is mostly zeros. For batched MLP
        critics without active dropout, all members are evaluated without
        autograd to find the arg-min, then each row is re-evaluated through its
        arg-min member only (:meth:`BatchedMLP.select`, about ``1/N``-th of a
        pass when rows spread over members). Same value and gradient as
        ``self._q(td, params).min(0).values``, up to float round-off.
        Under ``torch.vmap``, ``torch.compile`` or CUDA graph capture the plain
        min is used: the grouping's sizes depend on the data (vmap cannot batch
        them; compile would break the graph there and recompile for every new
        group size; a capture cannot read them). :attr:`min_q_path` chooses
        between the two paths elsewhere: the arg-min path's extra no-grad pass
        and its small grouped products pay off only when the full backward is
        costly, so by default it is taken with the products in the parameters'
        dtype and at least :data:`ARGMIN_MIN_MEMBERS` members; with bfloat16
        products (``critic_matmul_dtype``) the plain min measured faster.
        """
        bq = self._batched_q
        inputs = [td.get(k) for k in self.qvalue_network.in_keys]
        if (
            bq is None
            or not bq.deterministic
            or is_batchedtensor(inputs[0])
            or F.tracing_or_capturing()
            or not self._argmin_path_chosen(params.batch_size[0])
        ):
            return self._q(td, params).min(0).values
        batch = inputs[0].shape[:-1]
        flat = [t.reshape(-1, t.shape[-1]) for t in inputs]
        rows = flat[0].shape[0]
        with torch.no_grad():
            index = bq(params, [t.detach() for t in flat]).squeeze(-1).min(0).indices
        if 2 * int(torch.bincount(index, minlength=params.batch_size[0]).max()) > rows:
            # rows concentrate on few members: padding would cost more than a full pass
            return self._q(td, params).min(0).values
        return bq.select(params, flat, index).squeeze(-1).reshape(batch)

    def _argmin_path_chosen(self, members: int) -> bool:
        """Whether :attr:`min_q_path` picks the arg-min path for ``members`` batched critics."""
        path = self.min_q_path
        if path != "auto":
            return path == "argmin"
        return self._batched_q.matmul_dtype is None and members >= ARGMIN_MIN_MEMBERS

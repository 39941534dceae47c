"""The public protocol by which a loss hands its per-member online Q-values to SPQR.

A loss that computes its critics' predictions ``Q_k(s, a)`` (with gradient) keeps
them as local variables; a regulariser such as :class:`~torchrl_spqr.SPQRLoss`
needs them, or the input at which to evaluate them, without a second pass
through the ensemble and without reaching into the loss's private attributes.

The protocol is two names on the loss:

- ``member_value_pairs``: the pairs the loss can serve (a tuple of
  ``"data"`` and/or ``"next_policy"``);
- ``request_member_values(pairs, fuse=...)``: a context manager that returns a
  :class:`MemberValuesRequest`; the loss fills it during the forward call made
  inside the context.

:class:`MemberValuesMixin` implements the bookkeeping; a loss only has to fill
``request.q`` (``[N, *batch]`` or ``[N, *batch, 1]``, online parameters, with
gradient) and, for ``"next_policy"`` when it does not fuse, ``request.next_input``
(the next-state critic input holding the action the loss drew from the policy,
detached). Losses that cannot serve a pair leave the request empty; the caller
then evaluates the pairs itself and says so (``source="extra_pass"``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

from tensordict import TensorDictBase
from torch import Tensor

__all__ = ["MemberValuesRequest", "MemberValuesMixin", "serves_member_values"]

#: Pairs a loss can be asked for.
MEMBER_VALUE_PAIRS = ("data", "next_policy")


@dataclass
class MemberValuesRequest:
    """What a regulariser asks of a loss for one forward call, and what it got back.

    Attributes:
        pairs: ``"data"`` (the dataset pairs ``Q_k(s, a)`` the critic loss
            already computes) or ``"next_policy"`` (``Q_k(s', a')`` with the
            action ``a' ~ pi(.|s')`` the target computation drew, online
            parameters).
        fuse: whether the loss may evaluate the ``"next_policy"`` input inside
            its own critic-loss call (one batched call of twice the batch). This
            changes the critic loss by float round-off only; ask for ``False``
            where the loss must stay bit-identical to its bare self.
        q: filled by the loss: ``[N, *batch]`` (or ``[N, *batch, 1]``) online
            values with gradient.
        next_input: filled by the loss for ``"next_policy"`` when it did not
            fuse: the next-state critic input with the drawn action (detached).
        source: how the loss served the request: ``"reused"`` (its own
            prediction), ``"fused"`` (evaluated in its own critic call), or
            ``"reused_sample"`` (only ``next_input`` was provided).
    """

    pairs: str
    fuse: bool = True
    q: Tensor | None = None
    next_input: TensorDictBase | None = None
    source: str | None = None


class MemberValuesMixin:
    """Bookkeeping of :class:`MemberValuesRequest` for a loss module.

    Subclasses set :attr:`member_value_pairs` and, in their critic computation,
    read :attr:`member_values_request` (``None`` outside a request) and fill it.
    """

    #: The pairs this loss can serve without an extra ensemble pass.
    member_value_pairs: tuple[str, ...] = ()

    @property
    def member_values_request(self) -> MemberValuesRequest | None:
        """The request active for the current forward call, or ``None``."""
        return self.__dict__.get("_member_values_request_", None)

    @contextlib.contextmanager
    def request_member_values(
        self, pairs: str, *, fuse: bool = True
    ) -> Iterator[MemberValuesRequest]:
        """Ask the next forward call inside the context for its per-member values.

        Raises:
            ValueError: if the loss cannot serve ``pairs``.
        """
        if pairs not in self.member_value_pairs:
            raise ValueError(
                f"{type(self).__name__} serves member values for pairs "
                f"{self.member_value_pairs}, not {pairs!r}."
            )
        request = MemberValuesRequest(pairs=pairs, fuse=bool(fuse))
        previous = self.__dict__.get("_member_values_request_", None)
        self.__dict__["_member_values_request_"] = request
        try:
            yield request
        finally:
            self.__dict__["_member_values_request_"] = previous


def serves_member_values(loss, pairs: str) -> bool:
    """Whether ``loss`` implements the protocol for ``pairs``."""
    return callable(getattr(type(loss), "request_member_values", None)) and pairs in getattr(
        loss, "member_value_pairs", ()
    )

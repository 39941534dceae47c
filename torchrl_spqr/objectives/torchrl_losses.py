"""TorchRL's ensemble losses, unchanged, plus the member-values protocol.

:class:`EnsembleSACLoss`, :class:`EnsembleREDQLoss` and :class:`EnsembleTD3Loss`
are thin subclasses of TorchRL's ``SACLoss``, ``REDQLoss`` and ``TD3Loss`` (as
TorchRL's own ``TQCLoss(SACLoss)`` is): same constructor, keys, outputs, values
and gradients. They add one thing: inside
``with loss.request_member_values(pairs) as req: loss(td)`` the loss hands its
per-member online Q-values to the caller (:class:`~torchrl_spqr.SPQRLoss`)
from its own critic computation, so the regulariser costs no extra ensemble
pass (see :mod:`torchrl_spqr.objectives.member_values`).

How: each subclass re-wraps, in its own ``_make_vmap`` (which TorchRL calls at
construction and again from ``set_vmap_randomness``), the vmapped critic
function its base calls, and listens to it only while its public critic
method runs (``SACLoss.qvalue_v2_loss``, ``TD3Loss.value_loss``,
``REDQLoss.forward``) with a request open. The calls it expects there are
checked (count, grad mode, batch); anything unexpected leaves the request
unserved and the caller falls back to an explicit pass, which it reports
(``spqr_source="extra_pass"``), never a silent substitution. The installed
TorchRL's call pattern is pinned by ``tests/objectives/test_torchrl_losses.py``.

Pairs served:

- ``EnsembleSACLoss`` (SAC v2, i.e. without a value network): ``"data"``
  (re-used) and ``"next_policy"`` (the next-state action the target drew,
  evaluated with the online critics in the critic loss's own call, or handed
  over unevaluated when fusing is not allowed);
- ``EnsembleREDQLoss``: ``"data"`` (the last ``N`` rows of REDQ's one fused
  call) and ``"next_policy"`` (the next-state sample, handed over);
- ``EnsembleTD3Loss``: ``"data"`` only; TD3's next action is the *target*
  policy's plus smoothing noise, not the policy's, so ``"next_policy"`` is
  left to the caller (an explicit actor call and ensemble pass).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from tensordict import TensorDictBase
from tensordict.nn import dispatch
from torchrl.objectives import REDQLoss, SACLoss, TD3Loss

from torchrl_spqr.objectives.member_values import MemberValuesMixin, MemberValuesRequest

__all__ = ["EnsembleREDQLoss", "EnsembleSACLoss", "EnsembleTD3Loss"]


class _Listener:
    """Stands in for one vmapped critic function; routes calls made inside a scope."""

    def __init__(self, fn, owner: _ListeningMixin, name: str) -> None:
        self.fn = fn
        self.owner = owner
        self.name = name

    def __call__(self, td: TensorDictBase, params: TensorDictBase, *args: Any, **kwargs: Any):
        scope = self.owner.__dict__.get("_member_scope_", None)
        if scope is None or args or kwargs:
            return self.fn(td, params, *args, **kwargs)
        return self.owner._on_critic_call(scope, self.fn, td, params)


class _Scope:
    """State of one request during one critic computation."""

    def __init__(self, request: MemberValuesRequest, batch_size: torch.Size) -> None:
        self.request = request
        self.batch_size = batch_size
        self.calls = 0


class _ListeningMixin(MemberValuesMixin):
    #: names of the base's vmapped critic functions to listen to
    _listened: tuple[str, ...] = ()

    def _make_vmap(self) -> None:
        super()._make_vmap()
        for name in self._listened:
            fn = self.__dict__.get(name, None)
            if fn is None:
                continue
            if isinstance(fn, _Listener):
                fn = fn.fn
            self.__dict__[name] = _Listener(fn, self, name)

    @contextlib.contextmanager
    def _listening(self, tensordict: TensorDictBase) -> Iterator[None]:
        """Routes the listened critic calls to :meth:`_on_critic_call` while a request is open."""
        request = self.member_values_request
        if request is None or request.q is not None:
            yield
            return
        self.__dict__["_member_scope_"] = _Scope(request, tensordict.batch_size)
        try:
            yield
        finally:
            self.__dict__["_member_scope_"] = None

    def _q_key(self):
        return self.tensor_keys.state_action_value

    def _q_in_keys(self) -> list:
        return list(self.qvalue_network.in_keys)

    def _next_input(self, td: TensorDictBase) -> TensorDictBase | None:
        q_in = self._q_in_keys()
        nxt = td.select(*q_in, strict=False)
        wanted = {k[0] if isinstance(k, tuple) and len(k) == 1 else k for k in q_in}
        if set(nxt.keys(True, True)) != wanted:
            return None
        nxt = nxt.clone(False)
        act = self.tensor_keys.action
        nxt.set(act, nxt.get(act).detach())
        return nxt

    def _on_critic_call(self, scope: _Scope, fn, td: TensorDictBase, params: TensorDictBase):
        raise NotImplementedError


class EnsembleSACLoss(_ListeningMixin, SACLoss):
    """TorchRL's :class:`~torchrl.objectives.SACLoss` that hands its member values to SPQR.

    Same constructor, keys, outputs, values and gradients as ``SACLoss``. For N
    independent critics, pass a list of separately built modules (e.g.
    ``QEnsemble(...).members()``) and ``num_qvalue_nets=N``.

    Inside ``qvalue_v2_loss`` TorchRL makes two vmapped critic calls: the
    target at ``(s', a' ~ pi)`` under ``no_grad``, then the online prediction
    at ``(s, a)``. With a request open, the first call's input is kept (its
    action is the policy sample the target used) and the second call's output
    is handed over (``"data"``), or the second call also evaluates the kept
    input (``"next_policy"`` with ``fuse=True``: one call of twice the batch).

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from tensordict import TensorDict
        >>> from tensordict.nn import NormalParamExtractor, TensorDictModule
        >>> from torchrl.data import Bounded
        >>> from torchrl.modules import ProbabilisticActor, TanhNormal
        >>> from torchrl_spqr import QEnsemble, make_q_member
        >>> from torchrl_spqr.objectives import EnsembleSACLoss
        >>> actor = ProbabilisticActor(
        ...     TensorDictModule(nn.Sequential(nn.Linear(4, 4), NormalParamExtractor()),
        ...                      in_keys=["observation"], out_keys=["loc", "scale"]),
        ...     in_keys=["loc", "scale"], distribution_class=TanhNormal,
        ...     spec=Bounded(-1.0, 1.0, (2,)), return_log_prob=True)
        >>> critics = QEnsemble(lambda: make_q_member(6, num_cells=(16,)), 5)
        >>> loss = EnsembleSACLoss(actor, critics.members(), num_qvalue_nets=5)
        >>> data = TensorDict({"observation": torch.randn(8, 4), "action": torch.rand(8, 2) * 2 - 1,
        ...     "next": {"observation": torch.randn(8, 4), "reward": torch.randn(8, 1),
        ...              "done": torch.zeros(8, 1, dtype=torch.bool),
        ...              "terminated": torch.zeros(8, 1, dtype=torch.bool)}}, [8])
        >>> with loss.request_member_values("data") as req:
        ...     out = loss(data)
        >>> req.q.shape, req.source
        (torch.Size([5, 8, 1]), 'reused')
    """

    _listened = ("_vmap_qnetworkN0",)

    @property
    def member_value_pairs(self) -> tuple[str, ...]:  # type: ignore[override]
        # SAC v1 (with a value network) evaluates the critics elsewhere: not served
        return ("data", "next_policy") if self._version == 2 else ()

    def qvalue_v2_loss(self, tensordict: TensorDictBase):
        with self._listening(tensordict):
            return super().qvalue_v2_loss(tensordict)

    def _on_critic_call(self, scope: _Scope, fn, td: TensorDictBase, params: TensorDictBase):
        scope.calls += 1
        req = scope.request
        if scope.calls == 1:
            # the target: (s', a' ~ pi) under no_grad
            # (with skip_done_states the done rows hold a zero action, not a policy sample:
            # leave those pairs to the caller's explicit draw)
            if (
                req.pairs == "next_policy"
                and not torch.is_grad_enabled()
                and not getattr(self, "skip_done_states", False)
            ):
                req.next_input = self._next_input(td)
                if req.next_input is not None:
                    req.source = "reused_sample"
            return fn(td, params)
        if scope.calls != 2 or td.batch_size != scope.batch_size:
            return fn(td, params)
        # the online prediction at (s, a)
        key = self._q_key()
        if req.pairs == "data":
            out = fn(td, params)
            req.q, req.source = out.get(key), "reused"
            return out
        nxt = req.next_input
        if req.fuse and nxt is not None and nxt.batch_size == td.batch_size:
            cur = td.select(*nxt.keys(True, True))
            out = fn(torch.cat([cur, nxt], 0), params)
            b = td.batch_size[0]
            req.q, req.source = out.get(key)[:, b:], "fused"
            req.next_input = None
            return out[:, :b]
        return fn(td, params)


class EnsembleREDQLoss(_ListeningMixin, REDQLoss):
    """TorchRL's :class:`~torchrl.objectives.REDQLoss` that hands its member values to SPQR.

    Same constructor, keys, outputs, values and gradients as TorchRL's
    ``REDQLoss`` (smooth-L1 by default, clamped alpha, actor at every call:
    TorchRL's semantics; :class:`~torchrl_spqr.objectives.ReferenceREDQLoss`
    follows the REDQ reference code instead).

    TorchRL's ``REDQLoss.forward`` makes one vmapped critic call over the
    parameters ``[online (detached) N | target subset M | online N]`` and the
    inputs ``[actor rows | next rows | data rows]``. With a request open, the
    last ``N`` outputs are handed over (``"data"``), or the next rows' input,
    whose action is the policy sample the target used (``"next_policy"``; the
    caller evaluates it with the online critics: fusing it into REDQ's call
    would copy all ``2N + M`` parameter sets at every update).
    """

    _listened = ("_vmap_qvalue_network00",)
    member_value_pairs = ("data", "next_policy")

    @dispatch
    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        with self._listening(tensordict):
            return super().forward(tensordict)

    def _on_critic_call(self, scope: _Scope, fn, td: TensorDictBase, params: TensorDictBase):
        scope.calls += 1
        n, m = self.num_qvalue_nets, self.sub_sample_len
        req = scope.request
        if (
            scope.calls != 1
            or params.batch_dims == 0
            or params.batch_size[0] != 2 * n + m
            or td.batch_size[1:] != scope.batch_size
        ):
            return fn(td, params)
        out = fn(td, params)
        if req.pairs == "data":
            req.q, req.source = out.get(self._q_key())[-n:], "reused"
        else:
            req.next_input = self._next_input(td[n])
            if req.next_input is not None:
                req.source = "reused_sample"
        return out


class EnsembleTD3Loss(_ListeningMixin, TD3Loss):
    """TorchRL's :class:`~torchrl.objectives.TD3Loss` that hands its member values to SPQR.

    Same constructor, keys, outputs, values and gradients as ``TD3Loss``.
    Inside ``value_loss`` TorchRL makes two vmapped critic calls: the target
    at the target policy's smoothed next action under ``no_grad``, then the
    online prediction at ``(s, a)``. With a request open, the second call's
    output is handed over (``"data"``). ``"next_policy"`` is not served: the
    target's next action is not the policy's.
    """

    _listened = ("_vmap_qvalue_network00",)
    member_value_pairs = ("data",)

    def value_loss(self, tensordict: TensorDictBase):
        with self._listening(tensordict):
            return super().value_loss(tensordict)

    def _on_critic_call(self, scope: _Scope, fn, td: TensorDictBase, params: TensorDictBase):
        scope.calls += 1
        if scope.calls != 2 or td.batch_size[1:] != scope.batch_size:
            return fn(td, params)
        out = fn(td, params)
        req = scope.request
        req.q, req.source = out.get(self._q_key()), "reused"
        return out

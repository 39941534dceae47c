"""``SPQRLoss``: the SPQR regulariser as a TorchRL :class:`~torchrl.objectives.LossModule`.

Two ways to use it:

1. **Wrapping** an ensemble loss (TorchRL's ``SACLoss``, ``REDQLoss``,
   ``TD3Loss`` or the package's own losses):
   ``SPQRLoss(SACLoss(...), beta=...)`` returns everything the wrapped loss
   returns plus ``loss_spqr`` (``beta * KL``) and detached ``spqr_*``
   diagnostics, so a training loop that sums the ``loss_*`` entries needs no
   change.
2. **Standalone**: ``SPQRLoss(qvalue_network=QEnsemble(...), actor_network=actor)``
   computes only the regulariser from a batch, for users who write their own
   critic loss.

Which Q-values are regularised (``pairs``):

- ``"next_policy"`` (default, the authors' choice): the online critics at next
  states with fresh policy actions, ``Q_k(s', a')``, ``a' ~ pi(.|s')``;
- ``"data"``: the dataset pairs ``Q_k(s, a)``;
- ``"policy"``: current states with fresh policy actions ``Q_k(s, a~pi(.|s))``.

The gradient of ``loss_spqr`` reaches every critic member and never the actor
(actions are detached) nor the target parameters.

Re-use of the wrapped loss's work (``reuse=True``): TorchRL's losses keep their
per-member predictions as local variables. While the wrapped loss runs,
``SPQRLoss`` listens to its vmapped critic calls (``_vmap_qnetworkN0``,
``_vmap_qvalue_networkN0``, ``_vmap_qvalue_network00``). With
``pairs="data"`` it keeps the online ``Q_k(s, a)`` the critic loss computed (no
extra critic call). With ``pairs="next_policy"`` it keeps the next-state input
of the target computation (whose action is the policy sample the target used)
and evaluates it with the online parameters *inside the same vmapped call*
as the critic loss's ``Q_k(s, a)``: one fused call of twice the batch instead of
a second ensemble pass and a second actor call. Where nothing can be re-used,
the Q-values are computed by an explicit extra pass. ``spqr_source`` in the
output says which path was taken at the last call (see
:attr:`SPQRLoss.last_source`).
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from tensordict import TensorDict, TensorDictBase
from tensordict.nn import TensorDictModuleBase, TensorDictParams
from tensordict.utils import NestedKey
from torch import Tensor
from torchrl.envs.utils import ExplorationType, set_exploration_type
from torchrl.objectives import LossModule
from torchrl.objectives.utils import _vmap_func

from torchrl_spqr import diagnostics as D
from torchrl_spqr import functional as F
from torchrl_spqr.ensemble import QEnsemble

__all__ = ["SPQRLoss"]

PAIRS = ("next_policy", "data", "policy")
_VMAP_NAMES = ("_vmap_qnetworkN0", "_vmap_qvalue_networkN0", "_vmap_qvalue_network00")


def _find_redq_cls() -> type | None:
    try:
        from torchrl.objectives import REDQLoss

        return REDQLoss
    except ImportError:  # pragma: no cover
        return None


class _Recorder:
    """Wraps a wrapped-loss vmapped critic call to capture or fuse the SPQR Q-values."""

    def __init__(self, fn: Callable, owner: SPQRLoss, name: str) -> None:
        self.fn = fn
        self.owner_ref = weakref.ref(owner)
        self.name = name
        # "00" functions take inputs already expanded along the ensemble dim.
        self.in_ens_dim = name.endswith("00")

    def __call__(self, td: TensorDictBase, params: TensorDictBase, *args: Any, **kwargs: Any):
        owner = self.owner_ref()
        if owner is None or owner._capture is None or args or kwargs:
            return self.fn(td, params, *args, **kwargs)
        return owner._on_vmap_call(self, td, params)


@dataclass
class _Capture:
    """Per-forward capture state."""

    mode: str
    fuse: bool
    next_input: TensorDictBase | None = None
    q: Tensor | None = None
    source: str = "extra_pass"


class SPQRLoss(LossModule):
    """SPQR regulariser for ensemble critics, as a TorchRL loss module.

    Args:
        loss_module: the ensemble loss to wrap (``SACLoss``, ``REDQLoss``,
            ``TD3Loss``, the package's losses...). ``None`` for standalone use.

    Keyword Args:
        qvalue_network: standalone mode: a :class:`~torchrl_spqr.QEnsemble`.
        actor_network: standalone mode: the policy (a probabilistic actor
            whose distribution has ``rsample``, or a deterministic actor that
            writes the action key). Needed for ``pairs`` other than ``"data"``.
        beta: weight of the KL, a float or a callable ``step -> float``
            (``step`` counts the calls of :meth:`forward` in training mode).
            SAC, CQL and TD3 sum their critic loss over members while REDQ
            averages it, so the same beta weighs differently against each.
        pairs: ``"next_policy"`` (default, authors), ``"data"`` or ``"policy"``.
        filling, density, rho, eps: see :func:`torchrl_spqr.functional.spqr_kl`.
        reduction: ``"mean"`` (default), ``"sum"`` or ``"none"``. Defaults to the
            wrapped loss's reduction.
        reuse: re-use (and fuse into) the wrapped loss's critic calls when
            possible (default ``True``).
        diagnostics_interval: compute the diagnostics every ``k`` training
            calls (``0`` disables them). Default 1: they cost well under a
            millisecond at N=10, B=256.
        level: level of the independence test (default 0.05).
        seed: seed of the generator used by ``filling="random"``.

    Output entries, in addition to the wrapped loss's: ``loss_spqr`` and,
    detached: ``spqr_kl``, ``spqr_beta``, ``spqr_spike`` (mean over the batch
    of the largest |eigenvalue|), ``spqr_accept_rate``, ``spqr_mp_ratio``,
    ``spqr_mean_pairwise_corr``, ``spqr_ensemble_std``.

    Target networks: a wrapped loss keeps its own target parameters; build the
    updater on it: ``SoftUpdate(spqr_loss.loss_module, tau=...)``.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from tensordict import TensorDict
        >>> from tensordict.nn import NormalParamExtractor, TensorDictModule
        >>> from torchrl.data import Bounded
        >>> from torchrl.modules import ProbabilisticActor, TanhNormal
        >>> from torchrl.objectives import SACLoss
        >>> from torchrl_spqr import QEnsemble, SPQRLoss, make_q_member
        >>> n_obs, n_act, N = 11, 3, 10
        >>> actor = ProbabilisticActor(
        ...     TensorDictModule(nn.Sequential(nn.Linear(n_obs, 2 * n_act), NormalParamExtractor()),
        ...                      in_keys=["observation"], out_keys=["loc", "scale"]),
        ...     in_keys=["loc", "scale"], distribution_class=TanhNormal,
        ...     spec=Bounded(-1.0, 1.0, (n_act,)), return_log_prob=True)
        >>> ens = QEnsemble(lambda: make_q_member(n_obs + n_act, num_cells=(32, 32)), N)
        >>> sac = SACLoss(actor, ens.members(), num_qvalue_nets=N, loss_function="l2")
        >>> loss = SPQRLoss(sac, beta=1.0)
        >>> B = 8
        >>> data = TensorDict({
        ...     "observation": torch.randn(B, n_obs), "action": torch.rand(B, n_act) * 2 - 1,
        ...     ("next", "observation"): torch.randn(B, n_obs),
        ...     ("next", "reward"): torch.randn(B, 1),
        ...     ("next", "done"): torch.zeros(B, 1, dtype=torch.bool),
        ...     ("next", "terminated"): torch.zeros(B, 1, dtype=torch.bool)}, [B])
        >>> out = loss(data)
        >>> sorted(k for k in out.keys() if k.startswith("loss_"))
        ['loss_actor', 'loss_alpha', 'loss_qvalue', 'loss_spqr']
        >>> total = sum(v for k, v in out.items() if k.startswith("loss_"))
        >>> total.backward()
        >>> # standalone: only the regulariser, for a custom critic loss
        >>> reg = SPQRLoss(qvalue_network=ens, actor_network=actor, beta=2.0)
        >>> reg(data)["loss_spqr"].shape
        torch.Size([])
    """

    @dataclass
    class _AcceptedKeys:
        """Tensordict keys read by :class:`SPQRLoss`.

        Attributes:
            action: the action key (dataset action, and where fresh policy
                actions are written). Defaults to ``"action"``.
            state_action_value: the critics' output key. Defaults to
                ``"state_action_value"``.
        """

        action: NestedKey = "action"
        state_action_value: NestedKey = "state_action_value"

    default_keys = _AcceptedKeys
    tensor_keys: _AcceptedKeys
    default_value_estimator = None
    _schedulable_buffers = frozenset({"beta"})

    def __init__(
        self,
        loss_module: LossModule | None = None,
        *,
        qvalue_network: QEnsemble | None = None,
        actor_network: TensorDictModuleBase | None = None,
        beta: float | Callable[[int], float] = 1.0,
        pairs: str = "next_policy",
        filling: F.Filling = "ordered",
        density: F.Density = "paper",
        rho: float = 0.5,
        eps: float = 0.01,
        reduction: str | None = None,
        reuse: bool = True,
        diagnostics_interval: int = 1,
        level: float = 0.05,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        if pairs not in PAIRS:
            raise ValueError(f"pairs must be one of {PAIRS}, got {pairs!r}.")
        if filling not in F.FILLINGS:
            raise ValueError(f"filling must be one of {F.FILLINGS}, got {filling!r}.")
        if density not in F.DENSITIES:
            raise ValueError(f"density must be one of {F.DENSITIES}, got {density!r}.")
        if diagnostics_interval < 0:
            raise ValueError(f"diagnostics_interval must be >= 0, got {diagnostics_interval}.")
        if not 0.0 < level < 1.0:
            raise ValueError(f"level must be in (0, 1), got {level}.")
        if (loss_module is None) == (qvalue_network is None):
            raise ValueError(
                "Pass either a loss module to wrap (SPQRLoss(SACLoss(...))) or, for standalone "
                "use, qvalue_network=QEnsemble(...) (with actor_network=...), not both."
            )
        self.pairs = pairs
        self.filling = filling
        self.density = density
        self.rho = float(rho)
        self.eps = float(eps)
        self.reuse = bool(reuse)
        self.diagnostics_interval = int(diagnostics_interval)
        self.level = float(level)
        self._capture: _Capture | None = None
        self.last_source: str | None = None
        self._generator: torch.Generator | None = None
        if seed is not None:
            self._generator = torch.Generator().manual_seed(int(seed))

        if loss_module is not None:
            if not isinstance(loss_module, LossModule):
                raise TypeError(
                    f"loss_module must be a torchrl LossModule, got {type(loss_module).__name__}."
                )
            params = getattr(loss_module, "qvalue_network_params", None)
            if params is None or getattr(loss_module, "qvalue_network", None) is None:
                raise ValueError(
                    f"{type(loss_module).__name__} has no ensemble critic "
                    "(qvalue_network / qvalue_network_params): SPQR regularises an ensemble of "
                    "Q-functions."
                )
            n = params.batch_size[0] if params.batch_dims else 1
            self.loss_module = loss_module
            self.num_members = int(n)
            if reduction is None:
                reduction = getattr(loss_module, "reduction", "mean")
            self.set_keys(
                action=getattr(loss_module.tensor_keys, "action", "action"),
                state_action_value=getattr(
                    loss_module.tensor_keys, "state_action_value", "state_action_value"
                ),
            )
        else:
            if not isinstance(qvalue_network, QEnsemble):
                raise TypeError(
                    "Standalone SPQRLoss needs qvalue_network=QEnsemble(...) (stacked members "
                    f"with the ensemble on the leading dim), got {type(qvalue_network).__name__}."
                )
            self.loss_module = None
            self.qvalue_network = qvalue_network
            self.num_members = qvalue_network.num_members
            self.set_keys(state_action_value=qvalue_network.out_keys[0])
            self.actor_network = actor_network
            if pairs != "data" and actor_network is None:
                raise ValueError(
                    f"pairs={pairs!r} needs policy actions: pass actor_network=... "
                    "(or use pairs='data')."
                )
        if self.num_members < 3:
            raise ValueError(
                f"SPQR needs an ensemble of at least 3 critics, but the "
                f"{'wrapped ' + type(loss_module).__name__ if loss_module is not None else 'qvalue_network'}"
                f" has N={self.num_members}. TorchRL's CQLLoss fixes 2 critics: use the package's "
                "N-critic losses, or SACLoss/REDQLoss with num_qvalue_nets >= 3."
            )
        self.reduction = reduction or "mean"
        if self.reduction not in F.REDUCTIONS:
            raise ValueError(f"reduction must be one of {F.REDUCTIONS}, got {self.reduction!r}.")
        self._beta_fn: Callable[[int], float] | None = None
        if callable(beta):
            self._beta_fn = beta
            beta0 = float(beta(0))
        else:
            beta0 = float(beta)
        if not math.isfinite(beta0) or beta0 < 0:
            raise ValueError(f"beta must be a finite non-negative number, got {beta0}.")
        self.register_buffer("beta", torch.tensor(beta0))
        self.register_buffer("step_count", torch.zeros((), dtype=torch.long))
        self._redq_cls = _find_redq_cls()
        # The fallback evaluator (an explicit ensemble pass) for wrapped losses.
        self._fallback_vmap = None

    # ------------------------------------------------------------------ keys
    @property
    def in_keys(self) -> list[NestedKey]:
        if self.loss_module is not None:
            keys = list(self.loss_module.in_keys)
        else:
            keys = list(self.qvalue_network.in_keys)
            if self.pairs != "data":
                keys += list(self.actor_network.in_keys)
        keys += self._own_in_keys()
        return list(dict.fromkeys(keys))

    def _own_in_keys(self) -> list[NestedKey]:
        q_in = self._q_in_keys()
        if self.pairs == "data":
            return q_in
        actor_in = self._actor_in_keys()
        if self.pairs == "policy":
            return actor_in + [k for k in q_in if k != self.tensor_keys.action]
        return [_next(k) for k in actor_in] + [
            _next(k) for k in q_in if k != self.tensor_keys.action
        ]

    @property
    def out_keys(self) -> list[str]:
        base = list(self.loss_module.out_keys) if self.loss_module is not None else []
        return base + [
            "loss_spqr",
            "spqr_kl",
            "spqr_beta",
            "spqr_spike",
            "spqr_accept_rate",
            "spqr_mp_ratio",
            "spqr_mean_pairwise_corr",
            "spqr_ensemble_std",
        ]

    def _forward_value_estimator_keys(self, **kwargs) -> None:
        pass

    def make_value_estimator(self, value_type=None, **hyperparams):
        """Delegates to the wrapped loss (standalone SPQR needs no value estimator)."""
        if self.loss_module is not None:
            self.loss_module.make_value_estimator(value_type, **hyperparams)
        return self

    # --------------------------------------------------------------- helpers
    def _q_in_keys(self) -> list[NestedKey]:
        net = (
            self.loss_module.qvalue_network if self.loss_module is not None else self.qvalue_network
        )
        return list(net.in_keys)

    def _actor_module(self) -> TensorDictModuleBase | None:
        owner = self.loss_module if self.loss_module is not None else self
        return getattr(owner, "actor_network", None)

    def _actor_in_keys(self) -> list[NestedKey]:
        actor = self._actor_module()
        return list(actor.in_keys) if actor is not None else []

    def current_beta(self) -> float:
        """The beta that the next training call uses (after the schedule)."""
        if self._beta_fn is not None:
            return float(self._beta_fn(int(self.step_count)))
        return float(self.beta)

    # ------------------------------------------------------- capture / fuse
    def _install_recorders(self) -> list[str]:
        base = self.loss_module
        installed = []
        for name in _VMAP_NAMES:
            fn = base.__dict__.get(name, None)
            if fn is None:
                continue
            if isinstance(fn, _Recorder) and fn.owner_ref() is self:
                installed.append(name)
                continue
            if isinstance(fn, _Recorder):  # recorder of another wrapper: unwrap
                fn = fn.fn
            base.__dict__[name] = _Recorder(fn, self, name)
            installed.append(name)
        return installed

    def _is_redq_fused(self, params: TensorDictBase) -> bool:
        base = self.loss_module
        if self._redq_cls is None or not isinstance(base, self._redq_cls):
            return False
        n, m = base.num_qvalue_nets, base.sub_sample_len
        return params.batch_dims > 0 and params.batch_size[0] == 2 * n + m

    def _on_vmap_call(self, rec: _Recorder, td: TensorDictBase, params: TensorDictBase):
        base = self.loss_module
        cap = self._capture
        n = self.num_members
        key = self.tensor_keys.state_action_value
        q_in = self._q_in_keys()
        act_key = self.tensor_keys.action
        if self._is_redq_fused(params):
            # REDQ's single call: params [online(detached) N | target subset M | online N],
            # inputs [actor-loss rows N | next rows M | data rows N].
            if cap.mode == "data" and cap.q is None:
                out = rec.fn(td, params)
                cap.q = out.get(key)[-n:]
                cap.source = "reused"
                return out
            # next_policy: keep the next-state rows' input (their action is the policy sample
            # the target used); SPQR evaluates it with the online critics in one separate
            # vmapped call. Fusing into this call would concatenate (copy) all 2N+M parameter
            # sets at every update, which measured slower than the separate call.
            if cap.mode == "next_policy" and cap.next_input is None:
                nxt = td[n].select(*q_in)
                cap.next_input = nxt.set(act_key, nxt.get(act_key).detach())
            return rec.fn(td, params)
        target = getattr(base, "target_qvalue_network_params", None)
        is_target = target is not None and params is target
        is_online = params is base.qvalue_network_params
        if is_target and cap.mode == "next_policy" and cap.next_input is None:
            nxt = td[0] if rec.in_ens_dim else td
            nxt = nxt.select(*q_in, strict=False)
            if set(q_in) <= set(nxt.keys(True, True)):
                nxt = nxt.clone(False)
                nxt.set(act_key, nxt.get(act_key).detach())
                cap.next_input = nxt
            return rec.fn(td, params)
        if is_online and cap.q is None:
            data_bs = self._data_batch_size
            in_bs = td.batch_size[1:] if rec.in_ens_dim else td.batch_size
            if in_bs != data_bs:
                return rec.fn(td, params)
            if cap.mode == "data":
                out = rec.fn(td, params)
                cap.q = out.get(key)
                cap.source = "reused"
                return out
            if cap.mode == "next_policy" and cap.fuse and cap.next_input is not None:
                nxt = cap.next_input
                if nxt.batch_size != data_bs:
                    return rec.fn(td, params)
                cur = td.select(*q_in, strict=False)
                if rec.in_ens_dim:
                    nxt_e = nxt.expand(n, *nxt.batch_size)
                    td_all = torch.cat([cur, nxt_e], 1)
                    out = rec.fn(td_all, params)
                    b = cur.batch_size[1]
                    cap.q = out.get(key)[:, b:]
                    cap.source = "fused"
                    return out[:, :b]
                td_all = torch.cat([cur, nxt], 0)
                out = rec.fn(td_all, params)
                b = cur.batch_size[0]
                cap.q = out.get(key)[:, b:]
                cap.source = "fused"
                return out[:, :b]
        return rec.fn(td, params)

    # ----------------------------------------------------- explicit compute
    def _policy_action(self, obs_td: TensorDictBase) -> Tensor:
        """A detached policy action at the observations of ``obs_td``."""
        actor = self._actor_module()
        if actor is None:
            raise ValueError(
                f"pairs={self.pairs!r} needs an actor to sample actions, but none is available."
            )
        params = (
            getattr(self.loss_module, "actor_network_params", None) if self.loss_module else None
        )
        with torch.no_grad(), set_exploration_type(ExplorationType.RANDOM):
            ctx = (
                params.to_module(actor, preserve_module_state=False)
                if params is not None
                else _nullcontext()
            )
            with ctx:
                if hasattr(actor, "get_dist"):
                    dist = actor.get_dist(obs_td.select(*actor.in_keys, strict=False).copy())
                    if not getattr(dist, "has_rsample", False):
                        raise ValueError(
                            f"The actor's distribution {type(dist).__name__} has no "
                            "reparameterised sample (rsample); SPQR follows the authors in using "
                            "reparameterised policy actions. Use a reparameterisable distribution "
                            "(e.g. TanhNormal) or pairs='data'."
                        )
                    action = dist.rsample()
                else:
                    out = actor(obs_td.select(*actor.in_keys, strict=False).copy())
                    action = out.get(self.tensor_keys.action)
        return action.detach()

    def _online_q(self, td: TensorDictBase) -> Tensor:
        """Explicit ensemble pass with online (trainable) parameters: ``[N, *batch, 1]``."""
        if self.loss_module is None:
            return self.qvalue_network(td).get(self.tensor_keys.state_action_value)
        base = self.loss_module
        if self._fallback_vmap is None:
            self._fallback_vmap = _vmap_func(
                base.qvalue_network, (None, 0), randomness=base.vmap_randomness
            )
        out = self._fallback_vmap(
            td.select(*self._q_in_keys(), strict=False), base.qvalue_network_params
        )
        return out.get(self.tensor_keys.state_action_value)

    def _pairs_td(self, tensordict: TensorDictBase) -> TensorDictBase:
        q_in = self._q_in_keys()
        act_key = self.tensor_keys.action
        if self.pairs == "data":
            return tensordict.select(*q_in, strict=False)
        src = tensordict if self.pairs == "policy" else tensordict.get("next")
        td = src.select(*q_in, *self._actor_in_keys(), strict=False).copy()
        td.set(act_key, self._policy_action(td))
        return td.select(*q_in, strict=False)

    def _check_keys(self, tensordict: TensorDictBase) -> None:
        present = set(tensordict.keys(True, True))
        missing = [k for k in self._own_in_keys() if _norm(k) not in present]
        if missing:
            raise KeyError(
                f"SPQRLoss(pairs={self.pairs!r}) needs keys {[_fmt(k) for k in missing]} in the "
                f"batch, which has {sorted(_fmt(k) for k in present)}."
            )

    # ---------------------------------------------------------------- forward
    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        self._check_keys(tensordict)
        beta = self.current_beta()
        if self._beta_fn is not None:
            self.beta.fill_(beta)
        training = self.training
        step = int(self.step_count)
        want_diag = self.diagnostics_interval > 0 and (
            not training or step % self.diagnostics_interval == 0
        )
        q = None
        cap = None
        if self.loss_module is not None:
            base = self.loss_module
            capture_ok = self.reuse and self.pairs in ("data", "next_policy")
            native = getattr(base, "supports_spqr_capture", False)
            if capture_ok:
                # fusing changes the batch of the critic-loss call (round-off only);
                # with beta == 0 the wrapped loss must be bit-identical: no fusing.
                self._capture = _Capture(mode=self.pairs, fuse=beta > 0)
                self._data_batch_size = tensordict.batch_size
                if native:  # the package's losses serve the request themselves
                    base._spqr_capture = self._capture
                else:
                    self._install_recorders()
            try:
                td_out = base(tensordict)
            finally:
                cap, self._capture = self._capture, None
                if native:
                    base._spqr_capture = None
            source = "extra_pass"
            if cap is not None and cap.q is not None:
                q, source = cap.q, cap.source
            if q is not None and beta == 0:
                q = q.detach()
        else:
            td_out = TensorDict(batch_size=[])
            source = "extra_pass"
        if q is None and (beta > 0 or want_diag):
            with self._rng_scope(beta, tensordict):
                if cap is not None and cap.next_input is not None and self.pairs == "next_policy":
                    # the policy sample the target computation drew: no extra actor call
                    q_td, source = cap.next_input, "reused_sample"
                else:
                    q_td = self._pairs_td(tensordict)
                q = self._eval_q(q_td, grad=beta > 0)
        self.last_source = source

        if q is not None:
            q_vals = self._validated(q)
            with self._rng_scope(beta, tensordict):
                positions = F.member_positions(
                    self.num_members, self.filling, generator=self._generator, device=q_vals.device
                )
            if self.filling == "ordered":
                F._warn_unused(self.num_members, positions.numel())
            if self.density == "paper" and F.matrix_side(self.num_members) >= 5:
                F._warn_paper_large(self.num_members)
            eig = F.spqr_eigenvalues(q_vals, self.filling, positions=positions)
            kl_el = F.spectral_kl(eig, rho=self.rho, eps=self.eps, density=self.density)
            kl = self._reduce(kl_el)
            loss_spqr = beta * kl if beta > 0 else kl.detach() * 0.0
        else:
            kl_el = None
            loss_spqr = torch.zeros((), device=self._device_hint(tensordict))

        if self.reduction == "none" and self.loss_module is None:
            td_out = TensorDict(batch_size=tensordict.batch_size)
        td_out.set("loss_spqr", loss_spqr)
        if kl_el is not None:
            self._write(td_out, "spqr_kl", self._reduce(kl_el.detach()))
        self._write(td_out, "spqr_beta", self.beta.detach().clone())
        if want_diag and q is not None:
            with torch.no_grad():
                qd = q_vals.detach()
                spike = eig.detach().abs().amax(-1)
                d = eig.shape[-1]
                pval = D.spike_pvalue(spike, d)
                accept = (pval >= self.level).to(qd.dtype)
                self._write(td_out, "spqr_spike", self._reduce(spike, mean_if_none=True))
                self._write(td_out, "spqr_accept_rate", accept.mean())
                if qd[0].numel() >= 2:
                    rc = D.residual_correlation(qd)
                    self._write(td_out, "spqr_mp_ratio", rc["mp_ratio"])
                    self._write(td_out, "spqr_mean_pairwise_corr", rc["mean_pairwise_corr"])
                self._write(td_out, "spqr_ensemble_std", qd.std(0).mean())
        if training:
            self.step_count += 1
        return td_out

    # TorchRL losses register some buffers lazily (``SACLoss``/``REDQLoss``/``CrossQLoss``'s
    # ``target_entropy`` and the default value estimator's ``gamma`` at the first forward);
    # ``SACLoss.load_state_dict`` materialises ``target_entropy`` first,
    # but a wrapper's ``load_state_dict`` reaches the base through ``_load_from_state_dict``,
    # so a fresh ``SPQRLoss`` could not load a trained one's state. Do the same here.
    _LAZY_BASE_ATTRS = ("target_entropy",)

    def _materialise_lazy_buffers(self) -> None:
        for attr in self._LAZY_BASE_ATTRS:
            if isinstance(getattr(type(self.loss_module), attr, None), property):
                # target_entropy="auto" without an action spec raises: the base raises the
                # same clear error at its first forward, and the state dict reports the key.
                with contextlib.suppress(RuntimeError, ValueError, AttributeError):
                    getattr(self.loss_module, attr)

    def state_dict(self, *args, **kwargs):
        self._materialise_lazy_buffers()
        return super().state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        self._materialise_lazy_buffers()
        base = self.loss_module
        if (
            base is not None
            and getattr(base, "_value_estimator", 0) is None
            and any(k.startswith("loss_module._value_estimator.") for k in state_dict)
        ):
            # the trained loss built its default value estimator at its first forward (its
            # gamma is a buffer); build the same default here so that the state can land
            base.value_estimator  # noqa: B018
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def _apply(self, fn):
        out = super()._apply(fn)
        # tensordict caches ``detach()`` of (locked) TensorDictParams and does not erase
        # that cache on dtype/device moves, so after a first forward ``.double()`` /
        # ``.to(device)`` left TorchRL's detached critic params (e.g. SACLoss's actor-loss
        # call) on the old dtype/device. Drop the stale copies.
        for module in self.modules():
            if isinstance(module, TensorDictParams):
                module._erase_cache()
            if isinstance(module, LossModule):
                module._erase_cache()
        return out

    def _rng_scope(self, beta: float, tensordict: TensorDictBase):
        """With ``beta == 0`` the SPQR-only work (policy samples, dropout masks and random
        filling drawn for the diagnostics) must not consume the global RNG: the
        wrapped loss's later random draws, hence training, stay exactly those of the
        bare loss."""
        if beta != 0:
            return contextlib.nullcontext()
        device = torch.device(self._device_hint(tensordict))
        if device.type == "cpu":
            return torch.random.fork_rng(devices=[])
        return torch.random.fork_rng(devices=[device], device_type=device.type)

    def _device_hint(self, tensordict: TensorDictBase) -> torch.device:
        return tensordict.device if tensordict.device is not None else self.beta.device

    def _eval_q(self, td: TensorDictBase, grad: bool) -> Tensor:
        if grad:
            return self._online_q(td)
        with torch.no_grad():
            return self._online_q(td)

    def _validated(self, q: Tensor) -> Tensor:
        try:
            return F.check_ensemble_values(q, name=_fmt(self.tensor_keys.state_action_value))
        except ValueError as err:
            raise ValueError(f"SPQRLoss(pairs={self.pairs!r}): {err}") from err

    def _reduce(self, x: Tensor, mean_if_none: bool = False) -> Tensor:
        if self.reduction == "mean" or (mean_if_none and self.reduction == "none"):
            return x.mean()
        if self.reduction == "sum":
            return x.sum()
        return x

    def _write(self, td_out: TensorDictBase, key: str, value: Tensor) -> None:
        value = value.detach() if isinstance(value, Tensor) else value
        if td_out.batch_dims and (
            not isinstance(value, Tensor) or value.shape != td_out.batch_size
        ):
            td_out.set_non_tensor(key, value)
        else:
            td_out.set(key, value)


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _next(key: NestedKey) -> tuple[str, ...]:
    return ("next", *key) if isinstance(key, tuple) else ("next", key)


def _norm(key: NestedKey) -> NestedKey:
    if isinstance(key, tuple) and len(key) == 1:
        return key[0]
    return key


def _fmt(key: NestedKey) -> str:
    return ".".join(key) if isinstance(key, tuple) else str(key)

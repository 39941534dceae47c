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

Re-use of the wrapped loss's work (``reuse=True``): a loss that implements the
public member-values protocol (:mod:`torchrl_spqr.objectives.member_values`:
the package's losses, and :class:`~torchrl_spqr.objectives.EnsembleSACLoss`,
``EnsembleREDQLoss``, ``EnsembleTD3Loss``, ``EnsembleCQLLoss``, TorchRL's
losses plus that protocol) hands over its per-member online ``Q_k(s, a)``
(``pairs="data"``: no extra critic call) or its next-state input with the
policy sample the target used (``pairs="next_policy"``: evaluated inside the
critic loss's own call where the loss allows it, otherwise in one separate
ensemble pass with no extra actor call). Any other loss (TorchRL's own
``SACLoss``, for instance) is left untouched: SPQR evaluates the requested
pairs itself from the loss's public ``qvalue_network`` /
``qvalue_network_params`` (and ``actor_network`` / ``actor_network_params``),
one extra ensemble pass, and says so once with a warning. ``spqr_source`` in
the output says which path was taken at the last call (see
:attr:`SPQRLoss.last_source`).

Transparency: a wrapping ``SPQRLoss`` is used where the wrapped loss was
(:class:`~torchrl_spqr.objectives.wrapper.LossWrapper`). Attributes it does not
define itself (``qvalue_network_params``, ``target_entropy``, ``num_qvalue_nets``,
...), ``tensor_keys`` / ``set_keys``, ``value_estimator`` /
``make_value_estimator``, ``set_vmap_randomness`` and
``reset_parameters_recursive`` are the wrapped loss's; ``SoftUpdate(spqr_loss)``
finds and updates the wrapped loss's target parameters; the call without a
tensordict (``loss(observation=..., ...)``, TorchRL's ``@dispatch``) works (a
diagnostic not computed at that call is NaN); a bare loss's ``state_dict`` loads
into the wrapper.

Long module: one class. ``SPQRLoss``'s documented arguments (the authors' choices
and where the package departs from them) and runnable example, its two modes
(wrapping, standalone) and the ``forward`` that serves both are read together; the
wrapper transparency (:mod:`torchrl_spqr.objectives.wrapper`), the member weighting
(:mod:`torchrl_spqr.objectives.member_weights`) and the key helpers
(:mod:`torchrl_spqr.objectives.utils`) live in their own modules.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tensordict import TensorDict, TensorDictBase, is_tensor_collection
from tensordict.nn import (
    CompositeDistribution,
    ProbabilisticTensorDictModule,
    ProbabilisticTensorDictSequential,
    TensorDictModuleBase,
    dispatch,
)
from tensordict.utils import NestedKey
from torch import Tensor
from torchrl.envs.utils import ExplorationType, set_exploration_type
from torchrl.objectives import LossModule

from torchrl_spqr import diagnostics as D
from torchrl_spqr import functional as F
from torchrl_spqr.modules.ensemble import QEnsemble
from torchrl_spqr.objectives import member_weights as W
from torchrl_spqr.objectives.member_values import serves_member_values
from torchrl_spqr.objectives.utils import (
    host_count,
    host_read,
    key_str,
    key_tuple,
    next_key,
    plain_key,
)
from torchrl_spqr.objectives.wrapper import LossWrapper

__all__ = ["PAIRS", "SPQRLoss"]

PAIRS = ("next_policy", "data", "policy")
#: Where ``add_to`` may put the penalty.
_DIAG_KEYS = (
    "spqr_spike",
    "spqr_accept_rate",
    "spqr_mp_ratio",
    "spqr_mean_pairwise_corr",
    "spqr_ensemble_std",
)


class SPQRLoss(LossWrapper):
    """SPQR regulariser for ensemble critics, as a TorchRL loss module.

    Args:
        loss_module: the ensemble loss to wrap (TorchRL's ``SACLoss``,
            ``REDQLoss``, ``TD3Loss``, their ``Ensemble*`` subclasses in
            :mod:`torchrl_spqr.objectives`, or the package's losses). ``None``
            for standalone use.

    Keyword Args:
        qvalue_network: standalone mode: a :class:`~torchrl_spqr.QEnsemble`.
        actor_network: standalone mode: the policy (a probabilistic actor
            whose distribution has ``rsample``, or a deterministic actor that
            writes the action key). Needed for ``pairs`` other than ``"data"``.
        beta: weight of the KL, a float or a callable ``step -> float``
            (``step`` counts the calls of :meth:`forward` in training mode).
            SAC, CQL and TD3 sum their critic loss over members while REDQ
            averages it, so the same beta weighs differently against each.
        member_weights: per-member multipliers of the penalty's *gradient*.
            ``None`` (default): every member's gradient is ``beta`` times
            ``d KL / d theta_k``. ``"authors"``: member ``k`` (0-based, in the
            ensemble's order) gets ``(N - k) * beta`` times it, which is what
            the authors' CQL-N update does (``dohyeoklee/SPQR``,
            ``SPQR-CQL-Min/rlkit/torch/sac/cql.py``): the shared term
            ``beta * rmt_loss`` is added to each of the N critics' losses
            (lines 378-380), and the critics' losses are back-propagated in
            the order ``qf1, qf2, qfs[0], ...``, each after zeroing only its
            own optimiser's gradients, all optimiser steps coming after the
            last backward (lines 388-407). Member ``k`` therefore keeps the
            shared term's gradient from losses ``k..N-1`` (``N - k`` copies)
            and loses those of ``0..k-1`` to its ``zero_grad``: for N = 6,
            beta = 2 the members get 12, 10, 8, 6, 4, 2 (mean 7). Its own
            TD and CQL terms reach it once. The weights are not normalised:
            Adam removes a common scale of a member's whole gradient but not
            the ratio of the SPQR part to the TD/CQL part, which is what the
            weighting changes. Or a sequence of ``N`` finite non-negative
            weights ``w_k`` (member ``k``'s gradient is ``w_k * beta * dKL``;
            ``[1] * N`` is the default). The weights act per member on the
            Q-values (``q_k`` keeps its value, its gradient from the penalty
            is scaled by ``w_k``), exact for critics with separate parameters
            (as :class:`~torchrl_spqr.QEnsemble` and TorchRL's stacked critics
            have). They index members, not matrix positions (with
            ``filling="random"`` too), and do not change any reported value:
            ``loss_spqr`` stays ``beta * KL`` and ``spqr_kl`` the KL.
        pairs: ``"next_policy"`` (default, authors), ``"data"`` or ``"policy"``.
        filling, density, rho, eps: see :func:`torchrl_spqr.functional.spqr_kl`
            (``0 < rho <= 1``, ``eps >= 0``; ``rho < 1`` and ``eps > 0`` for
            ``density="corrected"``).
        reduction: ``"mean"`` (default), ``"sum"`` or ``"none"``. Defaults to the
            wrapped loss's reduction. Priority weights and loss masks in the
            batch weigh the per-sample KL as they weigh TorchRL's losses.
        reuse: ask the wrapped loss for its member values when it serves them
            (default ``True``); ``False`` always evaluates them explicitly.
        add_to: ``None`` (default): the penalty is returned as ``loss_spqr``.
            The name of one of the wrapped loss's entries (e.g.
            ``"loss_qvalue"``): the penalty is added into that entry and no
            ``loss_spqr`` is returned, for training loops that back-propagate
            named entries (TorchRL's SOTA scripts read ``loss_qvalue``).
        diagnostics_interval: compute the diagnostics every ``k`` training
            calls. Default 1: they cost well under a millisecond at N=10,
            B=256 once the Q-values are there; with ``beta=0`` and a loss that
            does not hand over its member values they cost one ensemble pass.
            ``0`` disables every ``spqr_*`` entry (``spqr_kl`` and
            ``spqr_beta`` included) and makes ``beta=0`` free: with
            ``add_to`` as well, the output has exactly the wrapped loss's
            entries (a silent drop-in).
        level: level of the independence test (default 0.05).
        seed: seed of the generator used by ``filling="random"``.

    Output entries, in addition to the wrapped loss's: ``loss_spqr`` (always
    back-propagatable on its own, a zero at ``beta=0``) and, detached:
    ``spqr_kl``, ``spqr_beta``, ``spqr_spike`` (mean over the batch of the
    largest |eigenvalue|), ``spqr_accept_rate``, ``spqr_mp_ratio``,
    ``spqr_mean_pairwise_corr``, ``spqr_ensemble_std``.

    Degenerate ensembles: where the members coincide at a pair (spread within
    :data:`~torchrl_spqr.diagnostics.DEGENERATE_ULPS` of float resolution, e.g.
    critics built from one shared module) the independence test is undefined:
    those pairs are left out of ``spqr_accept_rate``, which is NaN when every
    pair of the batch is degenerate, and ``spqr_mp_ratio`` /
    ``spqr_mean_pairwise_corr`` are NaN when a member's residuals vanish (see
    :func:`~torchrl_spqr.diagnostics.residual_correlation`). NaN there reads
    "degenerate", never "independent"; ``spqr_ensemble_std`` is then 0.

    Inputs are checked: ``beta`` (and a schedule's values) must be real,
    finite and non-negative (``TypeError`` for ``beta="1"``, ``ValueError``
    in :meth:`forward` for a schedule that returns a negative or NaN value);
    ``rho``/``eps`` as in :func:`~torchrl_spqr.functional.check_density_params`;
    an empty batch raises a ``ValueError`` whenever SPQR computes anything; a
    Q-value tensor whose leading dim is not ``num_members`` is refused.
    float16/bfloat16 Q-values are regularised in float32 and ``loss_spqr`` is
    returned in their dtype.

    A wrapping ``SPQRLoss`` stands where the wrapped loss stood: its
    attributes, keys, parameter groups, value estimator and target parameters
    are reachable through it, and ``SoftUpdate(spqr_loss)`` updates the
    wrapped loss's targets.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from tensordict import TensorDict
        >>> from tensordict.nn import NormalParamExtractor, TensorDictModule
        >>> from torchrl.data import Bounded
        >>> from torchrl.modules import ProbabilisticActor, TanhNormal
        >>> from torchrl.objectives import SoftUpdate
        >>> from torchrl_spqr import QEnsemble, SPQRLoss, make_q_member
        >>> from torchrl_spqr.objectives import EnsembleSACLoss
        >>> n_obs, n_act, N = 11, 3, 10
        >>> actor = ProbabilisticActor(
        ...     TensorDictModule(nn.Sequential(nn.Linear(n_obs, 2 * n_act), NormalParamExtractor()),
        ...                      in_keys=["observation"], out_keys=["loc", "scale"]),
        ...     in_keys=["loc", "scale"], distribution_class=TanhNormal,
        ...     spec=Bounded(-1.0, 1.0, (n_act,)), return_log_prob=True)
        >>> ens = QEnsemble(lambda: make_q_member(n_obs + n_act, num_cells=(32, 32)), N)
        >>> sac = EnsembleSACLoss(actor, ens.members(), num_qvalue_nets=N, loss_function="l2")
        >>> loss = SPQRLoss(sac, beta=1.0)
        >>> updater = SoftUpdate(loss, tau=0.005)  # the wrapped loss's targets
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
        >>> loss.last_source
        'fused'
        >>> total = sum(v for k, v in out.items() if k.startswith("loss_"))
        >>> total.backward()
        >>> updater.step()
        >>> # standalone: only the regulariser, for a custom critic loss
        >>> reg = SPQRLoss(qvalue_network=ens, actor_network=actor, beta=2.0)
        >>> reg(data)["loss_spqr"].shape
        torch.Size([])
    """

    @dataclass
    class _AcceptedKeys:
        """Tensordict keys read by a standalone :class:`SPQRLoss`.

        A wrapping ``SPQRLoss`` has the wrapped loss's keys instead
        (``spqr_loss.tensor_keys is spqr_loss.loss_module.tensor_keys``) and
        reads its ``action`` and ``state_action_value`` entries.

        Attributes:
            action: the action key (dataset action, and where fresh policy
                actions are written). Defaults to ``"action"``.
            state_action_value: the critics' output key. Defaults to
                ``"state_action_value"``.
        """

        action: NestedKey = "action"
        state_action_value: NestedKey = "state_action_value"

    default_keys = _AcceptedKeys
    default_value_estimator = None
    _schedulable_buffers = frozenset({"beta"})

    def __init__(
        self,
        loss_module: LossModule | None = None,
        *,
        qvalue_network: QEnsemble | None = None,
        actor_network: TensorDictModuleBase | None = None,
        beta: float | Callable[[int], float] = 1.0,
        member_weights: str | Sequence[float] | None = None,
        pairs: str = "next_policy",
        filling: F.Filling = "ordered",
        density: F.Density = "paper",
        rho: float = 0.5,
        eps: float = 0.01,
        reduction: str | None = None,
        reuse: bool = True,
        add_to: str | None = None,
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
        self.rho, self.eps = F.check_density_params(rho, eps, density)
        self.reuse = bool(reuse)
        self.diagnostics_interval = int(diagnostics_interval)
        self.level = float(level)
        self.last_source: str | None = None
        self._out_keys_override: list | None = None
        self._generator: torch.Generator | None = None
        self._fallback_vmap = None
        self._warned_extra_pass = False
        if seed is not None:
            self._generator = torch.Generator().manual_seed(int(seed))

        if loss_module is not None:
            if not isinstance(loss_module, LossModule):
                raise TypeError(
                    f"loss_module must be a torchrl LossModule, got {type(loss_module).__name__}."
                )
            if isinstance(loss_module, SPQRLoss):
                raise TypeError("loss_module is already an SPQRLoss: wrap the inner loss once.")
            params = getattr(loss_module, "qvalue_network_params", None)
            if params is None or getattr(loss_module, "qvalue_network", None) is None:
                raise ValueError(
                    f"{type(loss_module).__name__} has no ensemble critic "
                    "(qvalue_network / qvalue_network_params): SPQR regularises an ensemble of "
                    "Q-functions."
                )
            n = params.batch_size[0] if params.batch_dims else 1
            self._wrap(loss_module)
            self.num_members = int(n)
            if reduction is None:
                reduction = getattr(loss_module, "reduction", "mean")
            if add_to is not None and add_to not in loss_module.out_keys:
                raise ValueError(
                    f"add_to={add_to!r} is not an output of {type(loss_module).__name__} "
                    f"(its entries: {list(loss_module.out_keys)})."
                )
        else:
            if not isinstance(qvalue_network, QEnsemble):
                raise TypeError(
                    "Standalone SPQRLoss needs qvalue_network=QEnsemble(...) (stacked members "
                    f"with the ensemble on the leading dim), got {type(qvalue_network).__name__}."
                )
            if add_to is not None:
                raise ValueError("add_to needs a wrapped loss; a standalone SPQRLoss has none.")
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
        self.add_to = add_to
        if self.num_members < 3:
            raise ValueError(
                f"SPQR needs an ensemble of at least 3 critics, but the "
                f"{'wrapped ' + type(loss_module).__name__ if loss_module is not None else 'qvalue_network'}"
                f" has N={self.num_members}. TorchRL's CQLLoss fixes 2 critics: use "
                "torchrl_spqr.objectives.EnsembleCQLLoss or the package's N-critic losses, or "
                "SACLoss/REDQLoss/TD3Loss with num_qvalue_nets >= 3."
            )
        self.reduction = reduction or "mean"
        if self.reduction not in F.REDUCTIONS:
            raise ValueError(f"reduction must be one of {F.REDUCTIONS}, got {self.reduction!r}.")
        self._beta_fn: Callable[[int], float] | None = None
        if callable(beta) and not isinstance(beta, torch.Tensor):
            self._beta_fn = beta
            beta0 = _beta_value(beta(0), "the beta schedule's value at step 0")
        else:
            beta0 = _beta_value(beta, "beta")
        if not math.isfinite(beta0) or beta0 < 0:
            raise ValueError(f"beta must be a finite non-negative number, got {beta0}.")
        self.register_buffer("beta", torch.tensor(beta0))
        self.register_buffer("step_count", torch.zeros((), dtype=torch.long))
        weights = W.member_weights(member_weights, self.num_members)
        #: the per-member gradient multipliers as floats (``None``: beta for every member)
        self.member_weights: tuple[float, ...] | None = (
            None if weights is None else tuple(weights.tolist())
        )
        # not in the state dict: set by the constructor, like pairs and filling
        self.register_buffer("_member_w", weights, persistent=False)

    def _make_vmap(self) -> None:
        self._fallback_vmap = None

    def reset_parameters_recursive(self) -> None:
        """Re-initialises the wrapped loss's (or the standalone ensemble's) parameters."""
        if self.wrapped:
            self.loss_module.reset_parameters_recursive()
        else:
            self.qvalue_network.reset_parameters()

    # ------------------------------------------------------------------ keys
    def _key(self, name: str) -> NestedKey:
        return getattr(self.tensor_keys, name, getattr(self._AcceptedKeys, name))

    @property
    def in_keys(self) -> list[NestedKey]:
        if self.wrapped:
            return list(self.loss_module.in_keys)
        keys = list(self.qvalue_network.in_keys)
        if self.pairs != "data":
            keys += list(self.actor_network.in_keys)
        keys += self._own_in_keys()
        return list(dict.fromkeys(keys))

    @in_keys.setter
    def in_keys(self, values) -> None:
        if self.wrapped:
            self.loss_module.in_keys = values
        else:
            raise AttributeError("The in_keys of a standalone SPQRLoss follow its networks.")

    def _own_in_keys(self) -> list[NestedKey]:
        q_in = self._q_in_keys()
        act = key_tuple(self._key("action"))
        if self.pairs == "data":
            return q_in
        actor_in = self._actor_in_keys()
        # the action (or, for a composite action, its entries) comes from the policy
        not_action = [k for k in q_in if key_tuple(k)[: len(act)] != act]
        if self.pairs == "policy":
            return actor_in + not_action
        return [next_key(k) for k in actor_in] + [next_key(k) for k in not_action]

    @property
    def out_keys(self) -> list[str]:
        if self._out_keys_override is not None:
            return list(self._out_keys_override)
        base = list(self.loss_module.out_keys) if self.wrapped else []
        own = [] if self.add_to is not None else ["loss_spqr"]
        if self.diagnostics_interval > 0:
            own += ["spqr_kl", "spqr_beta", *_DIAG_KEYS]
        return base + own

    @out_keys.setter
    def out_keys(self, values) -> None:
        self._out_keys_override = list(values) if values is not None else None

    # --------------------------------------------------------------- helpers
    def _q_in_keys(self) -> list[NestedKey]:
        net = self.loss_module.qvalue_network if self.wrapped else self.qvalue_network
        return list(net.in_keys)

    def _actor_module(self) -> TensorDictModuleBase | None:
        owner = self.loss_module if self.wrapped else self
        return getattr(owner, "actor_network", None)

    def _actor_in_keys(self) -> list[NestedKey]:
        actor = self._actor_module()
        if actor is None:
            return []
        # keys the actor writes itself (e.g. the ("params", ...) entries a composite policy's
        # module writes and its distribution reads as "params") are not inputs
        written = {
            key_tuple(k)
            for m in actor.modules()
            if isinstance(m, TensorDictModuleBase)
            for k in getattr(m, "out_keys", [])
        }

        def produced(key: NestedKey) -> bool:
            kt = key_tuple(key)
            return any(w[: len(kt)] == kt for w in written)

        return [k for k in actor.in_keys if not produced(k)]

    def current_beta(self) -> float:
        """The beta that the next training call uses (after the schedule)."""
        if self._beta_fn is not None:
            step = host_read(self, "step_count")
            return _beta_value(self._beta_fn(step), f"the beta schedule's value at step {step}")
        return host_read(self, "beta", float)

    # ----------------------------------------------------- explicit compute
    def _policy_action(self, obs_td: TensorDictBase) -> Tensor:
        """A detached policy action at the observations of ``obs_td``."""
        actor = self._actor_module()
        if actor is None:
            raise ValueError(
                f"pairs={self.pairs!r} needs an actor to sample actions, but none is available."
            )
        params = getattr(self.loss_module, "actor_network_params", None) if self.wrapped else None
        act_key = self._key("action")
        with torch.no_grad(), set_exploration_type(ExplorationType.RANDOM):
            ctx = (
                params.to_module(actor, preserve_module_state=False)
                if params is not None
                else contextlib.nullcontext()
            )
            with ctx:
                inputs = obs_td.select(*actor.in_keys, strict=False).copy()
                if isinstance(
                    actor, (ProbabilisticTensorDictModule, ProbabilisticTensorDictSequential)
                ):
                    dist = actor.get_dist(inputs)
                    if not _has_rsample(dist):
                        raise ValueError(
                            f"The actor's distribution {type(dist).__name__} has no "
                            "reparameterised sample (rsample); SPQR follows the authors in using "
                            "reparameterised policy actions. Use a reparameterisable distribution "
                            "(e.g. TanhNormal) or pairs='data'."
                        )
                    action = dist.rsample()
                    if is_tensor_collection(action) and action.get(act_key, None) is not None:
                        # a composite sample keyed by the full action key
                        action = action.get(act_key)
                else:  # a deterministic policy (e.g. TorchRL's Actor for TD3)
                    action = actor(inputs).get(act_key)
        return action.detach()

    def _online_q(self, td: TensorDictBase) -> Tensor:
        """Explicit ensemble pass with online (trainable) parameters: ``[N, *batch, 1]``."""
        key = self._key("state_action_value")
        if not self.wrapped:
            return self.qvalue_network(td).get(key)
        base = self.loss_module
        if self._fallback_vmap is None:
            net = base.qvalue_network

            def call(params: TensorDictBase, inputs: TensorDictBase) -> TensorDictBase:
                with params.to_module(net):
                    return net(inputs.copy())

            self._fallback_vmap = torch.vmap(call, (0, None), randomness=base.vmap_randomness)
        out = self._fallback_vmap(base.qvalue_network_params, td.select(*self._q_in_keys()))
        return out.get(key)

    def _pairs_td(self, tensordict: TensorDictBase) -> TensorDictBase:
        q_in = self._q_in_keys()
        act_key = self._key("action")
        if self.pairs == "data":
            return tensordict.select(*q_in, strict=False)
        src = tensordict if self.pairs == "policy" else tensordict.get("next")
        td = src.select(*q_in, *self._actor_in_keys(), strict=False).copy()
        td.set(act_key, self._policy_action(td))
        return td.select(*q_in, strict=False)

    def _check_keys(self, tensordict: TensorDictBase, need_q: bool = True) -> None:
        # leaves and sub-tensordicts (a composite action is a tensordict)
        present = set(tensordict.keys(True))
        # every critic loss evaluates its critics at the data pairs: their inputs are needed
        wanted = self._q_in_keys() + (self._own_in_keys() if need_q else [])
        missing = [k for k in dict.fromkeys(wanted) if plain_key(k) not in present]
        if missing:
            raise KeyError(
                f"SPQRLoss(pairs={self.pairs!r}) needs keys {[key_str(k) for k in missing]} in the "
                f"batch, which has {sorted(key_str(k) for k in present)}."
            )

    def _warn_extra_pass(self) -> None:
        if self._warned_extra_pass:
            return
        self._warned_extra_pass = True
        warnings.warn(
            f"SPQRLoss(pairs={self.pairs!r}): {type(self.loss_module).__name__} does not hand over "
            "its per-member Q-values (torchrl_spqr.objectives.member_values), so SPQR evaluates "
            "the online critics at those pairs itself, one extra ensemble pass per call "
            "(spqr_source='extra_pass'). torchrl_spqr.objectives.EnsembleSACLoss / "
            "EnsembleREDQLoss / EnsembleTD3Loss are TorchRL's losses that hand them over.",
            UserWarning,
            stacklevel=3,
        )

    # ---------------------------------------------------------------- forward
    def forward(self, *args: Any, **kwargs: Any) -> TensorDictBase | tuple[Tensor, ...]:
        """The loss entries for a batch: ``loss(tensordict)``, or TorchRL's keyword call.

        ``loss(tensordict)`` returns a tensordict with the wrapped loss's entries,
        ``loss_spqr`` and the ``spqr_*`` diagnostics computed at this call.
        ``loss(observation=..., action=..., next_reward=..., ...)`` (the ``in_keys``
        joined with ``_``, as TorchRL's ``@dispatch``) returns the ``out_keys`` as a
        tuple; an ``spqr_*`` entry that this call did not compute (diagnostics not
        due with ``diagnostics_interval > 1``, or needing more than one sample) is NaN.
        """
        if len(args) == 1 and not kwargs and is_tensor_collection(args[0]):
            return self._forward(args[0])
        return self._forward_keywords(*args, **kwargs)

    @dispatch
    def _forward_keywords(self, tensordict: TensorDictBase) -> TensorDictBase:
        td_out = self._forward(tensordict)
        present = set(td_out.keys())
        for key in ("spqr_kl", "spqr_beta", *_DIAG_KEYS):
            if key in self.out_keys and key not in present:
                self._write(td_out, key, torch.full((), float("nan"), device=self.beta.device))
        return td_out

    def _forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        beta = self.current_beta()
        if not math.isfinite(beta) or beta < 0:
            what = (
                f"The beta schedule returned {beta} at step {int(self.step_count)}"
                if self._beta_fn is not None
                else f"The beta buffer holds {beta}"
            )
            raise ValueError(f"{what}; beta must be a finite non-negative number.")
        if self._beta_fn is not None:
            self.beta.fill_(beta)
        training = self.training
        step = host_read(self, "step_count")
        want_diag = self.diagnostics_interval > 0 and (
            not training or step % self.diagnostics_interval == 0
        )
        need_q = beta > 0 or want_diag
        if need_q and tensordict.batch_dims and tensordict.batch_size.numel() == 0:
            raise ValueError(
                f"SPQRLoss got an empty batch (batch_size {tuple(tensordict.batch_size)}): the "
                "SPQR penalty and diagnostics over no state-action pairs are undefined (NaN). "
                "Skip the update for an empty batch."
            )
        q = None
        source = None
        next_input = None
        if need_q or self.wrapped:
            self._check_keys(tensordict, need_q)
        if self.wrapped:
            base = self.loss_module
            if need_q and self.reuse and serves_member_values(base, self.pairs):
                # fusing changes the critic-loss call's batch (round-off only); with
                # beta == 0 the wrapped loss must stay bit-identical: no fusing.
                with base.request_member_values(self.pairs, fuse=beta > 0) as req:
                    td_out = base(tensordict)
                q, source, next_input = req.q, req.source, req.next_input
            else:
                td_out = base(tensordict)
            if q is not None and beta == 0:
                q = q.detach()
        else:
            td_out = TensorDict(batch_size=[])
        if q is None and need_q:
            with self._rng_scope(beta, tensordict):
                if next_input is not None and self.pairs == "next_policy":
                    # the policy sample the target computation drew: no extra actor call
                    q_td, source = next_input, "reused_sample"
                else:
                    if self.wrapped and beta > 0:
                        self._warn_extra_pass()
                    q_td, source = self._pairs_td(tensordict), "extra_pass"
                q = self._eval_q(q_td, grad=beta > 0)
        self.last_source = source

        device = self._device_hint(tensordict)
        weights = self._priority_weights(tensordict)
        if q is not None:
            q_vals = self._validated(q)
            with self._rng_scope(beta, tensordict):
                positions = F.member_positions(
                    self.num_members, self.filling, generator=self._generator, device=q_vals.device
                )
            if self.filling == "ordered":
                F.warn_unused(self.num_members, positions.numel())
            if self.density == "paper" and F.matrix_side(self.num_members) >= 5:
                F.warn_paper_large(self.num_members)
            q_pen = q_vals
            if beta > 0 and self._member_w is not None:
                q_pen = W.weight_member_grads(q_vals, self._member_w)
            eig = F.spqr_eigenvalues(q_pen, self.filling, positions=positions)
            kl_el = F.spectral_kl(eig, rho=self.rho, eps=self.eps, density=self.density)
            kl = self._reduce_loss(kl_el, tensordict, weights=weights).to(q.dtype)
            loss_spqr = beta * kl if beta > 0 else self._zero_loss(tensordict, device)
        else:
            kl_el = None
            loss_spqr = self._zero_loss(tensordict, device)

        if self.reduction == "none" and not self.wrapped:
            td_out = TensorDict(batch_size=tensordict.batch_size)
        if self.add_to is None:
            td_out.set("loss_spqr", loss_spqr)
        elif beta > 0:  # at beta=0 the named entry stays exactly the wrapped loss's
            td_out.set(self.add_to, td_out.get(self.add_to) + loss_spqr)
        if self.diagnostics_interval > 0:
            if kl_el is not None:
                self._write(td_out, "spqr_kl", kl.detach())
            self._write(td_out, "spqr_beta", self.beta.detach().clone())
        if want_diag and q is not None:
            with torch.no_grad():
                qd = q_vals.detach()
                spike = eig.detach().abs().amax(-1)
                d = eig.shape[-1]
                pval = D.spike_pvalue(spike, d)
                # members that coincide at a pair: the test is undefined there (left out;
                # NaN when every pair is degenerate), never counted as "independent"
                valid = ~D.degenerate_mask(qd.to(q.dtype), num_members=self.num_members)
                accept = ((pval >= self.level) & valid).to(qd.dtype)
                spike_red = spike.mean() if self.reduction == "none" else self._reduce(spike)
                self._write(td_out, "spqr_spike", spike_red)
                self._write(td_out, "spqr_accept_rate", accept.sum() / valid.to(qd.dtype).sum())
                if qd[0].numel() >= 2:
                    rc = D.residual_correlation(qd, num_members=self.num_members)
                    self._write(td_out, "spqr_mp_ratio", rc["mp_ratio"])
                    self._write(td_out, "spqr_mean_pairwise_corr", rc["mean_pairwise_corr"])
                self._write(td_out, "spqr_ensemble_std", qd.std(0).mean())
        if training:
            host_count(self, "step_count")
        return td_out

    def _zero_loss(self, tensordict: TensorDictBase, device) -> Tensor:
        """A zero penalty that back-propagates on its own (no graph, no cost)."""
        shape = tensordict.batch_size if self.reduction == "none" else ()
        return torch.zeros(shape, device=device, requires_grad=True)

    def _priority_weights(self, tensordict: TensorDictBase) -> Tensor | None:
        key = getattr(self.tensor_keys, "priority_weight", None)
        use = (
            getattr(self.loss_module, "use_prioritized_weights", "auto") if self.wrapped else "auto"
        )
        if key is None or use not in (True, "auto"):
            return None
        return tensordict.get(key, None)

    def _rng_scope(self, beta: float, tensordict: TensorDictBase):
        """With ``beta == 0`` the SPQR-only work (policy samples, dropout masks and random
        filling drawn for the diagnostics) must not consume the global RNG: the
        wrapped loss's later random draws, hence training, stay exactly those of the
        bare loss."""
        if beta != 0 or F.cuda_graph_capturing():  # the RNG state cannot be read in a capture
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
        """``q`` as ``[N, *batch]`` (``N == num_members``), float16/bfloat16 in float32."""
        try:
            q = F.check_ensemble_values(
                q, name=key_str(self._key("state_action_value")), num_members=self.num_members
            )
        except ValueError as err:
            raise ValueError(f"SPQRLoss(pairs={self.pairs!r}): {err}") from err
        return F.upcast(q)

    def _reduce(self, x: Tensor) -> Tensor:
        if self.reduction == "sum":
            return x.sum()
        if self.reduction == "mean":
            return x.mean()
        return x

    def _write(self, td_out: TensorDictBase, key: str, value: Tensor) -> None:
        value = value.detach() if isinstance(value, Tensor) else value
        if td_out.batch_dims and (
            not isinstance(value, Tensor) or value.shape != td_out.batch_size
        ):
            td_out.set_non_tensor(key, value)
        else:
            td_out.set(key, value)


def _beta_value(value: Any, what: str) -> float:
    """A beta (or a schedule's value) as a float; TypeError for a non-number (e.g. ``"1"``)."""
    return F.real_number(
        what,
        value,
        hint="beta may also be a callable step -> number; pass e.g. beta=1.0, not a string.",
    )


def _has_rsample(dist) -> bool:
    """Whether ``dist`` has a reparameterised sample (a composite one: all its parts)."""
    if isinstance(dist, CompositeDistribution):
        return all(_has_rsample(d) for d in dist.values())
    return bool(getattr(dist, "has_rsample", False))

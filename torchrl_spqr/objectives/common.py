"""Ensemble actor-critic losses the SPQR paper builds on: SAC-N, REDQ, CQL-N, EDAC.

TorchRL deviates from the originals in places (its ``CQLLoss`` fixes 2
critics, it has no EDAC, its ``REDQLoss`` updates the actor at every gradient
step with smooth-L1 and a clamped alpha). The losses here follow the papers'
reference code and share one base:

- the critics are an ensemble of ``N`` independently initialised members
  (a :class:`~torchrl_spqr.QEnsemble` or a list of modules), stored as stacked
  parameters and evaluated with one vmapped call;
- target parameters live in ``target_qvalue_network_params`` so that
  TorchRL's :class:`~torchrl.objectives.SoftUpdate` works unchanged;
- the TD target comes from TorchRL's value-estimator registry
  (:meth:`~_EnsembleLoss.make_value_estimator`): the soft next value
  ``V(s') = agg_k Q_k(s', a') - alpha log pi(a'|s')`` is written at
  ``("next", value_key)`` and ``self.value_estimator.value_estimate`` turns it
  into the target. The default, TD(0), is ``r + gamma * (1 - terminated) * V(s')``:
  truncations (time limits) bootstrap, terminations do not. TD(1) and
  TD(lambda) are available for batches of consecutive transitions;
- reductions go through TorchRL's ``_reduce_loss``: prioritized-replay weights
  (``priority_weight``, see ``use_prioritized_weights``) and the validity masks
  TorchRL writes (``loss_mask_key``) apply to every per-element loss;
- ``deactivate_vmap=True`` evaluates the members in a Python loop instead of one
  batched / vmapped call (same values up to float round-off);
- ``forward`` accepts a tensordict or keyword arguments (``@dispatch``:
  ``loss(observation=..., action=..., next_reward=..., ...)`` returns the
  ``out_keys`` as a tuple);
- :meth:`~_EnsembleLoss.reset_parameters_recursive` re-draws every member on
  its own (with its own fan-in) and copies the result into the targets;
- per-member online Q-values are handed to :class:`~torchrl_spqr.SPQRLoss`
  through the public member-values protocol
  (:mod:`torchrl_spqr.objectives.member_values`), so the regulariser re-uses them
  (``pairs="data"``) or fuses ``Q_k(s', a')`` into the same vmapped call
  (``pairs="next_policy"``) with no extra actor call.

Output entries: ``loss_qvalue``, ``loss_actor``, ``loss_alpha`` (plus
``loss_cql`` / ``loss_alpha_prime`` for CQL-N and ``loss_diversity`` for EDAC)
that a training loop sums, and detached metadata (``alpha``, ``entropy``,
``q_mean``, ``target_value``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tensordict import TensorDict, TensorDictBase
from tensordict.nn import TensorDictModule, TensorDictModuleBase, TensorDictParams, dispatch
from tensordict.utils import NestedKey
from torch import Tensor
from torchrl.envs.utils import ExplorationType, set_exploration_type
from torchrl.objectives import LossModule
from torchrl.objectives.sac import compute_rsample_log_prob
from torchrl.objectives.utils import (
    ValueEstimators,
    _vmap_func,
    default_value_kwargs,
    dispatch_value_estimator,
)
from torchrl.objectives.value import ValueEstimatorBase

from torchrl_spqr.ensemble import BatchedMLP, QEnsemble
from torchrl_spqr.objectives.member_values import MemberValuesMixin

__all__ = [
    "MBPO_TARGET_ENTROPY",
    "mbpo_target_entropy",
    "SACNLoss",
    "ReferenceREDQLoss",
    "CQLNLoss",
    "EDACLoss",
]

#: Target entropies used by MBPO and the REDQ reference code, per environment family.
MBPO_TARGET_ENTROPY: dict[str, float] = {
    "Hopper": -1.0,
    "HalfCheetah": -3.0,
    "Walker2d": -3.0,
    "Ant": -4.0,
    "Humanoid": -2.0,
}


def mbpo_target_entropy(env_name: str, default: float | None = None) -> float:
    """MBPO / REDQ target entropy for a Gymnasium MuJoCo id such as ``"Hopper-v5"``.

    Environments outside the MBPO table raise ``KeyError`` unless ``default`` is given.
    """
    family = env_name.split("-")[0].split("/")[-1]
    if family not in MBPO_TARGET_ENTROPY:
        if default is not None:
            return float(default)
        raise KeyError(
            f"No MBPO target entropy for {env_name!r}; known families: {sorted(MBPO_TARGET_ENTROPY)}."
        )
    return MBPO_TARGET_ENTROPY[family]


def _as_members(qvalue_network, num_qvalue_nets: int | None) -> list[TensorDictModuleBase]:
    if isinstance(qvalue_network, QEnsemble):
        if num_qvalue_nets is not None and num_qvalue_nets != qvalue_network.num_members:
            raise ValueError(
                f"num_qvalue_nets={num_qvalue_nets} but the QEnsemble has "
                f"{qvalue_network.num_members} members."
            )
        return qvalue_network.members()
    if isinstance(qvalue_network, (list, tuple)):
        members = list(qvalue_network)
        if num_qvalue_nets is not None and num_qvalue_nets != len(members):
            raise ValueError(
                f"num_qvalue_nets={num_qvalue_nets} but {len(members)} critics were given."
            )
        ids = {id(p) for m in members for p in m.parameters()}
        if len(ids) != sum(1 for m in members for _ in m.parameters()):
            raise ValueError(
                "The critics share parameter tensors (e.g. [q] * N): pass independently "
                "built members (QEnsemble or [make_q() for _ in range(N)])."
            )
        return members
    raise TypeError(
        "qvalue_network must be a QEnsemble or a list of independently built critics; a single "
        "module would be expanded and resampled by TorchRL, which leaves constant tensors "
        "identical across members."
    )


class _EnsembleLoss(MemberValuesMixin, LossModule):
    """Shared machinery of the ensemble actor-critic losses (not for direct use)."""

    @dataclass
    class _AcceptedKeys:
        """Tensordict keys read by the ensemble losses.

        Attributes:
            action: the action. Defaults to ``"action"``.
            state_action_value: the critics' output. Defaults to ``"state_action_value"``.
            value: where the soft next-state value is written (under ``"next"``,
                in a shallow copy of the batch) for the value estimator.
                Defaults to ``"state_value"``.
            reward, done, terminated: read under ``"next"``. ``done`` is
                optional (it defaults to ``terminated``; TD(0) does not read it).
            priority: where the TD error is written. Defaults to ``"td_error"``.
            priority_weight: the importance weights of prioritized replay.
                Defaults to ``"priority_weight"``.
        """

        action: NestedKey = "action"
        state_action_value: NestedKey = "state_action_value"
        value: NestedKey = "state_value"
        reward: NestedKey = "reward"
        done: NestedKey = "done"
        terminated: NestedKey = "terminated"
        priority: NestedKey = "td_error"
        priority_weight: NestedKey = "priority_weight"

    default_keys = _AcceptedKeys
    tensor_keys: _AcceptedKeys
    default_value_estimator = ValueEstimators.TD0
    SUPPORTED_VALUE_ESTIMATORS = (
        ValueEstimators.TD0,
        ValueEstimators.TD1,
        ValueEstimators.TDLambda,
    )
    _schedulable_buffers = frozenset({"gamma"})
    #: ``out_keys`` beyond the common ones, per subclass (reduced outputs only).
    _extra_out_keys: tuple[str, ...] = ("entropy", "q_mean", "target_value")
    #: SPQRLoss asks for these pairs through :meth:`request_member_values` (no extra pass).
    member_value_pairs = ("data", "next_policy")

    actor_network: TensorDictModule
    qvalue_network: TensorDictModule
    actor_network_params: TensorDictParams
    qvalue_network_params: TensorDictParams
    target_actor_network_params: TensorDictParams
    target_qvalue_network_params: TensorDictParams

    def __init__(
        self,
        actor_network: TensorDictModuleBase,
        qvalue_network: QEnsemble | Sequence[TensorDictModuleBase],
        *,
        num_qvalue_nets: int | None = None,
        gamma: float = 0.99,
        alpha_init: float = 1.0,
        fixed_alpha: bool = False,
        target_entropy: str | float = "auto",
        action_spec=None,
        reduction: str = "mean",
        min_members: int = 2,
        deactivate_vmap: bool = False,
        use_prioritized_weights: str | bool = "auto",
    ) -> None:
        self._in_keys = None
        self._out_keys = None
        super().__init__()
        members = _as_members(qvalue_network, num_qvalue_nets)
        n = len(members)
        if n < min_members:
            raise ValueError(
                f"{type(self).__name__} needs at least {min_members} critics, got {n}."
            )
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}.")
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"gamma must be in [0, 1], got {gamma}.")
        self.num_qvalue_nets = n
        self.reduction = reduction
        self.deactivate_vmap = bool(deactivate_vmap)
        self.use_prioritized_weights = use_prioritized_weights
        self.convert_to_functional(actor_network, "actor_network", create_target_params=False)
        self.convert_to_functional(members, "qvalue_network", n, create_target_params=True)
        self.register_buffer("gamma", torch.tensor(float(gamma)))
        device = next(iter(self.qvalue_network_params.values(True, True))).device
        self.fixed_alpha = fixed_alpha
        log_alpha = torch.tensor(math.log(alpha_init), device=device)
        if fixed_alpha:
            self.register_buffer("log_alpha", log_alpha)
        else:
            self.log_alpha = torch.nn.Parameter(log_alpha)
        self._action_spec = action_spec
        self._target_entropy_arg = target_entropy
        self.register_buffer(
            "target_entropy", torch.tensor(self._resolve_target_entropy(), device=device)
        )
        self._make_vmap()

    # ----------------------------------------------------------- plumbing
    def _resolve_target_entropy(self) -> float:
        te = self._target_entropy_arg
        if te != "auto":
            return float(te)
        spec = self._action_spec
        if spec is None:
            spec = getattr(self.actor_network, "spec", None)
            if spec is not None and "action" in getattr(spec, "keys", lambda: [])():
                spec = spec["action"]
        if spec is None or not hasattr(spec, "shape"):
            raise ValueError(
                "target_entropy='auto' needs the action spec: pass action_spec=env.action_spec "
                "or a number."
            )
        return -float(math.prod(spec.shape[-1:]))

    def _make_vmap(self) -> None:
        """(Re)build the ensemble callers; honours ``deactivate_vmap`` and ``vmap_randomness``.

        Plain MLP critics run as batched matmuls (faster than vmap on CPU),
        except with ``deactivate_vmap`` (a Python loop over the members) or
        ``vmap_randomness == "same"`` (the batched path draws a fresh dropout
        mask per member, so it cannot share one across members); other critics
        use ``torch.vmap``, or the loop with ``deactivate_vmap``.
        """
        randomness = self.vmap_randomness
        use_batched = not self.deactivate_vmap and randomness != "same"
        self._batched_q = BatchedMLP.from_member(self.qvalue_network) if use_batched else None
        self._vmap_qvalue_networkN0 = _vmap_func(
            self.qvalue_network,
            (None, 0),
            randomness=randomness,
            pseudo_vmap=self.deactivate_vmap,
        )
        self._vmap_qvalue_network00 = _vmap_func(
            self.qvalue_network,
            (0, 0),
            randomness=randomness,
            pseudo_vmap=self.deactivate_vmap,
        )

    def set_vmap_randomness(self, value: str) -> None:
        """Set ``torch.vmap``'s randomness mode (``"error"``, ``"same"``, ``"different"``) and rebuild.

        With ``deactivate_vmap=True`` the members run one after another, which
        cannot reproduce ``"same"``.
        """
        if self.deactivate_vmap and value == "same":
            raise ValueError(
                "vmap_randomness='same' is not available with deactivate_vmap=True "
                "(the members are evaluated one after another)."
            )
        super().set_vmap_randomness(value)

    def train(self, mode: bool = True):
        """Also switch the functional actor and critic modules (dropout, etc.).

        TorchRL keeps them outside the registered submodules, so ``nn.Module.train``
        alone would leave e.g. critic dropout active in evaluation mode.
        """
        super().train(mode)
        for name in ("actor_network", "qvalue_network"):
            module = self.__dict__.get(name, None) or self._modules.get(name, None)
            if isinstance(module, torch.nn.Module):
                module.train(mode)
        return self

    # ------------------------------------------------------ value estimator
    def make_value_estimator(self, value_type: ValueEstimators = None, **hyperparams):
        """Choose how the TD target is computed from the soft next value.

        Args:
            value_type: ``ValueEstimators.TD0`` (default: the papers' one-step
                target ``r + gamma * (1 - terminated) * V(s')``), ``TD1`` or
                ``TDLambda``; or a :class:`~torchrl.objectives.value.ValueEstimatorBase`
                instance or subclass. TD(1) and TD(lambda) read the batch as
                consecutive transitions along its last dimension (e.g. ``[B, T]``
                slices from a ``SliceSampler``), with ``done`` cutting the
                trajectories; on a batch of independent transitions they are
                meaningless.
            **hyperparams: estimator hyperparameters (``gamma``, ``lmbda``, ...).

        The discount lives in the loss's ``gamma`` buffer (the constructor's
        ``gamma``; schedulable with ``loss.gamma = 0.98``; saved in the state
        dict). ``gamma=...`` here sets that buffer, as does passing an estimator
        instance (its ``gamma`` is adopted); the estimator always discounts
        with the loss's buffer. The estimator is not a registered submodule, so
        the state dict has the same keys whichever estimator is used.
        """
        if value_type is None:
            value_type = self.default_value_estimator
        if "gamma" in hyperparams:
            self._set_gamma(hyperparams["gamma"])
        if isinstance(value_type, ValueEstimatorBase):
            if "gamma" in value_type._buffers:
                self._set_gamma(value_type.gamma)
            estimator = value_type
            self.value_type = type(value_type)
        elif isinstance(value_type, type) and issubclass(value_type, ValueEstimatorBase):
            hp = {"gamma": float(self.gamma), **hyperparams}
            device = self._default_device
            if device is not None:
                hp.setdefault("device", device)
            estimator = value_type(**hp)
            self.value_type = value_type
        else:
            hp = dict(default_value_kwargs(value_type))
            hp.update(hyperparams)
            hp["gamma"] = float(self.gamma)
            hp.setdefault("value_network", None)
            estimator = dispatch_value_estimator(
                self,
                value_type,
                supported=self.SUPPORTED_VALUE_ESTIMATORS,
                deactivate_vmap=self.deactivate_vmap,
                **hp,
            )
        self._set_value_estimator(estimator)
        self._forward_value_estimator_keys()
        return self

    def _set_gamma(self, gamma) -> None:
        gamma = float(gamma)
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"gamma must be in [0, 1], got {gamma}.")
        self.gamma.fill_(gamma)

    def _set_value_estimator(self, estimator: ValueEstimatorBase | None) -> None:
        # kept out of the module tree: the state dict stays the same whether or
        # not (and whichever) estimator was built, so checkpoints load either way
        self._modules.pop("_value_estimator", None)
        self.__dict__["_value_estimator"] = estimator

    @property
    def value_estimator(self) -> ValueEstimatorBase:
        """The estimator turning the soft next value into the TD target (TD(0) by default)."""
        if self.__dict__.get("_value_estimator", None) is None:
            self.make_value_estimator(self.default_value_estimator)
        return self.__dict__["_value_estimator"]

    @value_estimator.setter
    def value_estimator(self, value: ValueEstimatorBase) -> None:
        self.make_value_estimator(value)

    def _forward_value_estimator_keys(self, **kwargs) -> None:
        estimator = self.__dict__.get("_value_estimator", None)
        if estimator is not None:
            estimator.set_keys(
                value=self.tensor_keys.value,
                reward=self.tensor_keys.reward,
                done=self.tensor_keys.done,
                terminated=self.tensor_keys.terminated,
            )
        self._in_keys = None

    def _td_target(self, tensordict: TensorDictBase, next_value: Tensor) -> Tensor:
        """TD target ``[*batch]`` from the soft next value ``[*batch]`` via the value estimator.

        The next value is written at ``("next", value_key)`` of a shallow copy of
        the batch (the input is not modified), as ``SACLoss._compute_target_v2``
        does. With TD(0): ``r + gamma * (1 - terminated) * V(s')``.
        """
        estimator = self.value_estimator
        if "gamma" in estimator._buffers and estimator.gamma is not self.gamma:
            estimator.gamma = self.gamma  # the loss's (schedulable) discount
        keys = estimator.tensor_keys
        td = tensordict.copy()
        reward = td.get(("next", keys.reward))
        terminated = td.get(("next", keys.terminated))
        if terminated.dtype != torch.bool:
            terminated = terminated.bool()
            td.set(("next", keys.terminated), terminated)
        done = td.get(("next", keys.done), None)
        if done is None:
            td.set(("next", keys.done), terminated)
        elif done.dtype != torch.bool:
            td.set(("next", keys.done), done.bool())
        td.set(("next", keys.value), next_value.reshape(reward.shape))
        return estimator.value_estimate(td).reshape(next_value.shape)

    # ----------------------------------------------------------- keys
    @property
    def in_keys(self) -> list[NestedKey]:
        """Entries read from the batch (``("next", done)`` is optional)."""
        if self._in_keys is None:
            keys = [
                self.tensor_keys.action,
                ("next", self.tensor_keys.reward),
                ("next", self.tensor_keys.done),
                ("next", self.tensor_keys.terminated),
                *self.actor_network.in_keys,
                *[_next(k) for k in self.actor_network.in_keys],
                *self.qvalue_network.in_keys,
            ]
            return list(dict.fromkeys(keys))
        return self._in_keys

    @in_keys.setter
    def in_keys(self, values) -> None:
        self._in_keys = values

    @property
    def out_keys(self) -> list[str]:
        """Entries of the output (in the order a keyword call returns them)."""
        if self._out_keys is None:
            keys = ["loss_actor", "loss_qvalue", "loss_alpha", *self._extra_loss_keys()]
            if self.reduction != "none":
                keys += ["alpha", *self._extra_out_keys]
            return keys
        return self._out_keys

    @out_keys.setter
    def out_keys(self, values) -> None:
        self._out_keys = values

    def _extra_loss_keys(self) -> list[str]:
        return []

    @property
    def _alpha(self) -> Tensor:
        return self.log_alpha.detach().exp()

    @property
    def _detached_qvalue_params(self) -> TensorDictBase:
        return self.qvalue_network_params.detach()

    def _reduce(self, x: Tensor, tensordict: TensorDictBase) -> Tensor:
        """TorchRL's reduction: priority weights and loss masks from ``tensordict``, then ``reduction``."""
        return self._reduce_loss(
            x, tensordict=tensordict, weights=self._maybe_get_priority_weight(tensordict)
        )

    def _check_batch(self, tensordict: TensorDictBase) -> None:
        present = set(tensordict.keys(True, True))
        optional = {_norm(("next", self.tensor_keys.done))}
        missing = [k for k in self.in_keys if _norm(k) not in present and _norm(k) not in optional]
        if missing:
            raise KeyError(
                f"{type(self).__name__} needs keys {[_fmt(k) for k in missing]} in the batch."
            )

    # ----------------------------------------------------------- reset
    def reset_parameters_recursive(self) -> None:
        """Re-initialise the actor and each critic member on its own; targets copy the critics.

        Every member is re-drawn by its layers' own ``reset_parameters`` with its
        own shapes (fan-in), as a freshly built member would be; re-initialising
        the stacked ``[N, ...]`` tensors at once would use the wrong fan-in and
        draw correlated members. The target critics are then set equal to the
        new online critics. ``log_alpha`` is left as is.
        """
        with torch.no_grad():
            self._reset_module_parameters("actor_network", self.actor_network)
            params = self.qvalue_network_params.data
            for k in range(self.num_qvalue_nets):
                member = params[k]  # views into the stacked storage
                with member.to_module(self.qvalue_network, preserve_module_state=False):
                    self.qvalue_network._reset_parameters(self.qvalue_network)
            self._modules["target_qvalue_network_params"].data.update_(params)

    def _sample(self, td: TensorDictBase, *, grad: bool) -> tuple[Tensor, Tensor]:
        """Reparameterised action and its log-prob from the current policy at ``td``."""
        ctx = torch.enable_grad() if grad else torch.no_grad()
        with (
            ctx,
            set_exploration_type(ExplorationType.RANDOM),
            self.actor_network_params.to_module(self.actor_network, preserve_module_state=False),
        ):
            dist = self.actor_network.get_dist(td.select(*self.actor_network.in_keys, strict=False))
            action, log_prob = compute_rsample_log_prob(dist)
        return action, log_prob

    def _q_in(self, td: TensorDictBase, action: Tensor) -> TensorDictBase:
        out = td.select(*self.qvalue_network.in_keys, strict=False).copy()
        out.set(self.tensor_keys.action, action)
        return out

    def _q(self, td: TensorDictBase, params: TensorDictBase) -> Tensor:
        """``[N', *batch]`` values of ``params`` (stacked, ``N'`` leading) at ``td``."""
        if self._batched_q is not None:
            inputs = [td.get(k) for k in self.qvalue_network.in_keys]
            return self._batched_q(params, inputs).squeeze(-1)
        out = self._vmap_qvalue_networkN0(td, params)
        return out.get(self.tensor_keys.state_action_value).squeeze(-1)

    def _min_q(self, td: TensorDictBase, params: TensorDictBase) -> Tensor:
        """``min_k Q_k`` at ``td`` with the gradient (to the inputs) of the arg-min member only.

        The min's gradient reaches only the arg-min member of each row, so the
        backward pass through all ``N`` members is mostly zeros. For batched MLP
        critics without active dropout, all members are evaluated without
        autograd to find the arg-min, then each row is re-evaluated through its
        arg-min member only (:meth:`BatchedMLP.select`, about ``1/N``-th of a
        pass when rows spread over members). Same value and gradient as
        ``self._q(td, params).min(0).values``, up to float round-off.
        """
        bq = self._batched_q
        if bq is None or not bq.deterministic:
            return self._q(td, params).min(0).values
        inputs = [td.get(k) for k in self.qvalue_network.in_keys]
        batch = inputs[0].shape[:-1]
        flat = [t.reshape(-1, t.shape[-1]) for t in inputs]
        rows = flat[0].shape[0]
        with torch.no_grad():
            index = bq(params, [t.detach() for t in flat]).squeeze(-1).min(0).indices
        if 2 * int(torch.bincount(index, minlength=params.batch_size[0]).max()) > rows:
            # rows concentrate on few members: padding would cost more than a full pass
            return self._q(td, params).min(0).values
        return bq.select(params, flat, index).squeeze(-1).reshape(batch)

    def _online_pred(self, td_sa: TensorDictBase, next_td: TensorDictBase | None) -> Tensor:
        """Online per-member ``Q_k(s, a)`` ``[N, *batch]`` with grad; serves SPQRLoss requests.

        ``next_td`` holds the next-state input with the policy sample the target used.
        """
        cap = self.member_values_request
        online = self.qvalue_network_params
        if cap is None:
            return self._q(td_sa, online)
        if cap.pairs == "data":
            pred = self._q(td_sa, online)
            cap.q, cap.source = pred, "reused"
            return pred
        if cap.pairs == "next_policy" and next_td is not None:
            nxt = next_td.select(*self.qvalue_network.in_keys, strict=False)
            nxt.set(self.tensor_keys.action, nxt.get(self.tensor_keys.action).detach())
            if cap.fuse:
                b = td_sa.batch_size[0]
                both = self._q(torch.cat([td_sa.select(*nxt.keys(True, True)), nxt], 0), online)
                cap.q, cap.source = both[:, b:], "fused"
                return both[:, :b]
            cap.next_input, cap.source = nxt, "reused_sample"
        return self._q(td_sa, online)

    def _alpha_loss(self, log_prob: Tensor) -> Tensor:
        if self.fixed_alpha:
            return torch.zeros_like(log_prob)
        return -self.log_alpha * (log_prob.detach() + self.target_entropy)

    def _actor_out(self, tensordict: TensorDictBase, aggregate: str) -> dict[str, Tensor]:
        """Actor and alpha losses with ``aggregate`` ('min' or 'mean') over the members."""
        action, log_prob = self._sample(tensordict, grad=True)
        q_in = self._q_in(tensordict, action)
        if aggregate == "min":
            q_agg = self._min_q(q_in, self._detached_qvalue_params)
        else:
            q_agg = self._q(q_in, self._detached_qvalue_params).mean(0)
        loss_actor = self._alpha * log_prob - q_agg
        return {
            "loss_actor": self._reduce(loss_actor, tensordict),
            "loss_alpha": self._reduce(self._alpha_loss(log_prob), tensordict),
            "entropy": -log_prob.detach().mean(),
        }

    def _critic_target(self, tensordict: TensorDictBase, subset: Tensor | None = None):
        """Soft TD target with min over all (or ``subset`` of) target members; returns (y, next_td)."""
        next_td = tensordict.get("next")
        with torch.no_grad():
            next_action, next_lp = self._sample(next_td, grad=False)
            next_in = self._q_in(next_td, next_action)
            params = self.target_qvalue_network_params
            if subset is not None:
                params = params[subset]
            q_next = self._q(next_in, params)
            v_next = q_next.min(0).values - self._alpha * next_lp
            y = self._td_target(tensordict, v_next)
        return y, next_in

    @staticmethod
    def _mse_sum_members(pred: Tensor, target: Tensor) -> Tensor:
        """Per-element sum over members of the squared error: ``[N, *batch] -> [*batch]``."""
        return (pred - target.unsqueeze(0)).pow(2).sum(0)

    def _critic_regression(
        self, tensordict: TensorDictBase, y: Tensor, next_in: TensorDictBase | None
    ) -> dict[str, Tensor]:
        """Every member regressed on the shared target ``y`` (summed squared error).

        Writes the priority (largest member TD error) into ``tensordict`` and returns
        ``loss_qvalue`` with the ``q_mean`` / ``target_value`` metadata.
        """
        td_sa = tensordict.select(*self.qvalue_network.in_keys, strict=False)
        pred = self._online_pred(td_sa, next_in)
        loss = self._mse_sum_members(pred, y)
        tensordict.set(
            self.tensor_keys.priority, (pred.detach() - y.unsqueeze(0)).abs().max(0).values
        )
        return {"loss_qvalue": self._reduce(loss, tensordict), **_critic_metadata(pred, y)}

    def _finish(self, tensordict: TensorDictBase, out: dict[str, Tensor]) -> TensorDictBase:
        bs = tensordict.batch_size if self.reduction == "none" else torch.Size([])
        td_out = TensorDict(batch_size=bs)
        for k, v in out.items():
            if k.startswith("loss_") or (self.reduction != "none" or v.shape == bs):
                td_out.set(k, v)
        if self.reduction != "none":
            td_out.set("alpha", self._alpha)
        return td_out


def _critic_metadata(pred: Tensor, y: Tensor) -> dict[str, Tensor]:
    return {"q_mean": pred.detach().mean(), "target_value": y.detach().mean()}


class SACNLoss(_EnsembleLoss):
    """SAC-N / SAC-Ens (An et al. 2021; Chen et al. 2021's SAC-Ens baseline).

    ``N`` critics, min over all ``N`` target members for the soft TD target and
    over all ``N`` online members for the actor, squared-error critic loss
    summed over members and averaged over the batch (as in the SAC-N reference
    code), automatic entropy tuning.

    Args:
        actor_network: a probabilistic actor (e.g. ``ProbabilisticActor`` with
            ``TanhNormal``).
        qvalue_network: a :class:`~torchrl_spqr.QEnsemble` or a list of
            independently built critics.

    Keyword Args:
        num_qvalue_nets: optional check of ``N``.
        gamma: discount (default 0.99). Kept in the ``gamma`` buffer (saved in
            the state dict, schedulable with ``loss.gamma = 0.98``) and used by
            whichever value estimator :meth:`make_value_estimator` set (TD(0) by
            default); ``make_value_estimator(gamma=...)`` also sets it.
        alpha_init, fixed_alpha, target_entropy, action_spec: entropy
            temperature settings (``target_entropy="auto"`` is ``-dim(A)``).
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (through TorchRL's
            ``_reduce_loss``: priority weights and loss masks apply).
        deactivate_vmap: evaluate the members in a Python loop instead of one
            batched / vmapped call (same values up to float round-off).
        use_prioritized_weights: ``"auto"`` (default) or ``True`` weighs the
            per-element losses with the batch's ``priority_weight`` entry when
            present (prioritized replay); ``False`` ignores it.

    A keyword call returns the ``out_keys`` as a tuple::

        loss_actor, loss_qvalue, loss_alpha, alpha, entropy, q_mean, target_value = loss(
            observation=obs, action=act, next_observation=obs2, next_reward=r,
            next_done=done, next_terminated=term)

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from tensordict import TensorDict
        >>> from tensordict.nn import NormalParamExtractor, TensorDictModule
        >>> from torchrl.data import Bounded
        >>> from torchrl.modules import ProbabilisticActor, TanhNormal
        >>> from torchrl_spqr import QEnsemble, make_q_member
        >>> from torchrl_spqr.objectives import SACNLoss
        >>> actor = ProbabilisticActor(
        ...     TensorDictModule(nn.Sequential(nn.Linear(4, 4), NormalParamExtractor()),
        ...                      in_keys=["observation"], out_keys=["loc", "scale"]),
        ...     in_keys=["loc", "scale"], distribution_class=TanhNormal,
        ...     spec=Bounded(-1.0, 1.0, (2,)), return_log_prob=True)
        >>> loss = SACNLoss(actor, QEnsemble(lambda: make_q_member(6, num_cells=(16,)), 5))
        >>> data = TensorDict({"observation": torch.randn(8, 4), "action": torch.rand(8, 2) * 2 - 1,
        ...     "next": {"observation": torch.randn(8, 4), "reward": torch.randn(8, 1),
        ...              "done": torch.zeros(8, 1, dtype=torch.bool),
        ...              "terminated": torch.zeros(8, 1, dtype=torch.bool)}}, [8])
        >>> out = loss(data)
        >>> sorted(k for k in out.keys() if k.startswith("loss_"))
        ['loss_actor', 'loss_alpha', 'loss_qvalue']
    """

    def _critic_out(self, tensordict: TensorDictBase) -> dict[str, Tensor]:
        y, next_in = self._critic_target(tensordict)
        return self._critic_regression(tensordict, y, next_in)

    @dispatch
    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        self._check_batch(tensordict)
        out = self._critic_out(tensordict)
        out.update(self._actor_out(tensordict, "min"))
        return self._finish(tensordict, out)


class ReferenceREDQLoss(_EnsembleLoss):
    """REDQ as in Chen et al. 2021 and its reference code.

    Mapping to the paper: ``N = num_qvalue_nets`` (10) critics; the soft TD
    target takes the min over a random subset of ``M = sub_sample_len`` (2)
    *target* critics, drawn afresh at each critic update; the critic loss is
    the squared error summed over members (the reference code multiplies the
    member-mean MSE by ``N``); the actor maximises the *mean* over all ``N``
    online critics; entropy is tuned automatically (MBPO target entropies via
    :func:`mbpo_target_entropy`). The update-to-data ratio ``G`` (20) is the
    number of calls per environment step, and the policy (and alpha) is
    updated once per ``policy_update_delay`` calls (set it to ``G``, as the
    reference code does).

    On the calls where the policy is not due, the forward runs the critic-only
    path: no actor loss, no critic pass at policy actions; ``loss_actor`` and
    ``loss_alpha`` are returned as zeros (no gradient), so summing the
    ``loss_*`` entries stays correct. ``actor_updated`` in the output says
    which path ran.

    Unlike TorchRL's ``REDQLoss``: squared error (not smooth-L1), no alpha
    clamping, the policy updated every ``G`` calls, and the next action drawn
    from the current policy (as in the reference code). Named ``REDQLoss``
    up to version 0.1 (the old name still works for one release, with a
    ``FutureWarning``); for TorchRL's semantics use
    :class:`torchrl.objectives.REDQLoss`.

    ``out_keys`` has no ``entropy``: the critic-only calls do not sample the
    policy (the tensordict output has ``entropy`` on the calls that update it).
    """

    _extra_out_keys = ("actor_updated", "q_mean", "target_value")

    def __init__(
        self,
        actor_network: TensorDictModuleBase,
        qvalue_network: QEnsemble | Sequence[TensorDictModuleBase],
        *,
        sub_sample_len: int = 2,
        policy_update_delay: int = 20,
        **kwargs,
    ) -> None:
        super().__init__(actor_network, qvalue_network, **kwargs)
        if not 1 <= sub_sample_len <= self.num_qvalue_nets:
            raise ValueError(
                f"sub_sample_len (M) must be in [1, N={self.num_qvalue_nets}], got {sub_sample_len}."
            )
        if policy_update_delay < 1:
            raise ValueError(f"policy_update_delay must be >= 1, got {policy_update_delay}.")
        self.sub_sample_len = int(sub_sample_len)
        self.policy_update_delay = int(policy_update_delay)
        self.register_buffer("update_count", torch.zeros((), dtype=torch.long))

    def _critic_out(self, tensordict: TensorDictBase) -> dict[str, Tensor]:
        subset = torch.randperm(self.num_qvalue_nets, device=self.update_count.device)[
            : self.sub_sample_len
        ]
        y, next_in = self._critic_target(tensordict, subset=subset)
        return self._critic_regression(tensordict, y, next_in)

    def actor_due(self) -> bool:
        """Whether the next training call updates the policy."""
        return (int(self.update_count) + 1) % self.policy_update_delay == 0

    @dispatch
    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        self._check_batch(tensordict)
        out = self._critic_out(tensordict)
        due = self.actor_due() or not self.training
        if due:
            out.update(self._actor_out(tensordict, "mean"))
        else:
            zero = torch.zeros((), device=out["loss_qvalue"].device)
            if self.reduction == "none":
                zero = zero.expand(tensordict.batch_size)
            out.update(loss_actor=zero, loss_alpha=zero)
        out["actor_updated"] = torch.tensor(due)
        if self.training:
            self.update_count += 1
        return self._finish(tensordict, out)


class EDACLoss(SACNLoss):
    """EDAC (An et al. 2021): SAC-N plus the ensemble gradient-diversity term.

    ``loss_diversity = eta / (N - 1) * sum_{i != j} <g_i, g_j>`` averaged over the
    batch, with ``g_k`` the unit-normalised gradient of ``Q_k`` with respect to
    the dataset action, as in the paper and its reference code (this equals
    ``eta * N`` times the mean pairwise cosine similarity; the published
    ``eta`` per dataset use this scale). The diversity term reaches only the
    critics.

    Args:
        eta: weight of the diversity term (paper: 1.0 for most Gym datasets).
    """

    def __init__(self, actor_network, qvalue_network, *, eta: float = 1.0, **kwargs) -> None:
        super().__init__(actor_network, qvalue_network, **kwargs)
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}.")
        self.eta = float(eta)

    def _extra_loss_keys(self) -> list[str]:
        return ["loss_diversity"]

    def _critic_out(self, tensordict: TensorDictBase) -> dict[str, Tensor]:
        out = super()._critic_out(tensordict)
        out["loss_diversity"] = self._reduce(self.eta * self.diversity(tensordict), tensordict)
        return out

    def diversity(self, tensordict: TensorDictBase) -> Tensor:
        """Per-element ``1/(N-1) * sum_{i != j}`` cosine of the members' action-gradients."""
        n = self.num_qvalue_nets
        td = tensordict.select(*self.qvalue_network.in_keys, strict=False)
        td = td.expand(n, *td.batch_size).clone()
        act = td.get(self.tensor_keys.action).detach().requires_grad_(True)
        td.set(self.tensor_keys.action, act)
        with torch.enable_grad():
            q = self._vmap_qvalue_network00(td, self.qvalue_network_params)
            q = q.get(self.tensor_keys.state_action_value)
            (grad,) = torch.autograd.grad(q.sum(), act, create_graph=True)
        grad = grad / (grad.norm(dim=-1, keepdim=True) + 1e-10)  # [N, *batch, A]
        g = grad.movedim(0, -2)  # [*batch, N, A]
        gram = g @ g.transpose(-1, -2)  # [*batch, N, N]
        off = gram.sum((-1, -2)) - gram.diagonal(dim1=-2, dim2=-1).sum(-1)
        return off / (n - 1)


class CQLNLoss(_EnsembleLoss):
    """Conservative Q-learning with ``N`` critics ("CQL-Min"), CQL(H) as in Kumar et al. 2020.

    Per member ``k`` the conservative term is (importance-sampled, the
    reference code's ``min_q_version=3``)::

        logsumexp_j( [Q_k(s, a_rand_j) - log(0.5^|A|),
                      Q_k(s, a~pi(s)_j) - log pi,
                      Q_k(s, a~pi(s')_j) - log pi] / T ) * T  -  Q_k(s, a_data)

    with ``num_random`` uniform actions and ``num_random`` policy samples per
    state, the logsumexp taken over all ``3 * num_random`` sampled actions per
    state, weighted by ``min_q_weight``, summed over members. With
    ``lagrange_thresh`` set, the weight is ``alpha' * min_q_weight`` and
    ``alpha'`` is tuned so the gap approaches ``lagrange_thresh``
    (``loss_alpha_prime``). The TD target takes the min over all ``N`` target
    members (``max_q_backup=True``: max over ``num_random`` next actions first,
    per member); ``backup_entropy`` adds ``-alpha log pi`` to it (off by
    default, as in the reference code). The actor maximises the min over all
    ``N`` critics, and for the first ``bc_steps`` actor updates imitates the
    data instead (``alpha log pi - log pi(a_data | s)``).
    """

    def __init__(
        self,
        actor_network,
        qvalue_network,
        *,
        min_q_weight: float = 5.0,
        temperature: float = 1.0,
        num_random: int = 10,
        lagrange_thresh: float | None = None,
        max_q_backup: bool = False,
        backup_entropy: bool = False,
        bc_steps: int = 0,
        **kwargs,
    ) -> None:
        super().__init__(actor_network, qvalue_network, **kwargs)
        if num_random < 1:
            raise ValueError(f"num_random must be >= 1, got {num_random}.")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}.")
        self.min_q_weight = float(min_q_weight)
        self.temperature = float(temperature)
        self.num_random = int(num_random)
        self.max_q_backup = bool(max_q_backup)
        self.backup_entropy = bool(backup_entropy)
        self.bc_steps = int(bc_steps)
        self.with_lagrange = lagrange_thresh is not None
        self.lagrange_thresh = float(lagrange_thresh) if lagrange_thresh is not None else None
        if self.with_lagrange:
            self.log_alpha_prime = torch.nn.Parameter(torch.zeros(()))
        self.register_buffer("actor_update_count", torch.zeros((), dtype=torch.long))

    def _extra_loss_keys(self) -> list[str]:
        return ["loss_cql", "loss_alpha_prime"] if self.with_lagrange else ["loss_cql"]

    @property
    def _extra_out_keys(self) -> tuple[str, ...]:
        keys = ("entropy", "q_mean", "target_value", "cql_gap")
        return (*keys, "alpha_prime") if self.with_lagrange else keys

    def _repeat(self, td: TensorDictBase) -> TensorDictBase:
        """Each batch element repeated ``num_random`` times: ``[B] -> [B, R]``."""
        return td.unsqueeze(-1).expand(*td.batch_size, self.num_random).clone()

    def _critic_target_cql(self, tensordict: TensorDictBase):
        if not self.max_q_backup:
            if self.backup_entropy:
                return self._critic_target(tensordict)
            next_td = tensordict.get("next")
            with torch.no_grad():
                next_action, _ = self._sample(next_td, grad=False)
                next_in = self._q_in(next_td, next_action)
                q_next = self._q(next_in, self.target_qvalue_network_params)
                y = self._td_target(tensordict, q_next.min(0).values)
            return y, next_in
        next_td = tensordict.get("next")
        with torch.no_grad():
            rep = self._repeat(next_td.select(*self.actor_network.in_keys, strict=False))
            a, lp = self._sample(rep, grad=False)
            q_next = self._q(self._q_in(rep, a), self.target_qvalue_network_params)  # [N, B, R]
            v = q_next.max(-1).values.min(0).values
            if self.backup_entropy:
                v = v - self._alpha * lp.gather(
                    -1, q_next.max(-1).indices.min(0).indices.unsqueeze(-1)
                ).squeeze(-1)
            y = self._td_target(tensordict, v)
        return y, self._q_in(next_td, a[..., 0, :])

    def conservative_term(self, tensordict: TensorDictBase, pred: Tensor) -> Tensor:
        """Per-member, per-element CQL(H) gap ``[N, *batch]`` (before weighting)."""
        obs = self._repeat(tensordict.select(*self.actor_network.in_keys, strict=False))
        next_obs = self._repeat(
            tensordict.get("next").select(*self.actor_network.in_keys, strict=False)
        )
        act_dim = tensordict.get(self.tensor_keys.action).shape[-1]
        with torch.no_grad():
            a_cur, lp_cur = self._sample(obs, grad=False)
            a_next, lp_next = self._sample(next_obs, grad=False)
        a_rand = torch.empty_like(a_cur).uniform_(-1, 1)
        # the critic is evaluated at current states for all three action sets
        q_in = torch.cat(
            [self._q_in(obs, a_rand), self._q_in(obs, a_cur), self._q_in(obs, a_next)], -1
        )
        q = self._q(q_in, self.qvalue_network_params)  # [N, B, 3R]
        log_density = torch.cat(
            [
                torch.full_like(lp_cur, act_dim * math.log(0.5)),
                lp_cur,
                lp_next,
            ],
            -1,
        )
        cat_q = q - log_density.unsqueeze(0)
        lse = torch.logsumexp(cat_q / self.temperature, dim=-1) * self.temperature
        return lse - pred

    @dispatch
    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        self._check_batch(tensordict)
        y, next_in = self._critic_target_cql(tensordict)
        td_sa = tensordict.select(*self.qvalue_network.in_keys, strict=False)
        pred = self._online_pred(td_sa, next_in)
        out: dict[str, Tensor] = {
            "loss_qvalue": self._reduce(self._mse_sum_members(pred, y), tensordict),
            **_critic_metadata(pred, y),
        }
        gap = self.conservative_term(tensordict, pred)  # [N, *batch]
        weighted = self.min_q_weight * gap
        if self.with_lagrange:
            # CQL reference code: alpha' * (min_q_weight * gap - threshold), alpha' in [0, 1e6]
            alpha_prime = self.log_alpha_prime.exp().clamp(0.0, 1e6)
            weighted = weighted - self.lagrange_thresh
            gap_per_member = weighted.detach().mean(tuple(range(1, gap.ndim)))  # [N]
            out["loss_alpha_prime"] = -(alpha_prime * gap_per_member).mean()
            out["alpha_prime"] = alpha_prime.detach()
            weighted = alpha_prime.detach() * weighted
        out["loss_cql"] = self._reduce(weighted.sum(0), tensordict)
        out["cql_gap"] = gap.detach().mean()
        bc = int(self.actor_update_count) < self.bc_steps
        if bc:
            action, log_prob = self._sample(tensordict, grad=True)
            with (
                set_exploration_type(ExplorationType.RANDOM),
                self.actor_network_params.to_module(
                    self.actor_network, preserve_module_state=False
                ),
            ):
                dist = self.actor_network.get_dist(
                    tensordict.select(*self.actor_network.in_keys, strict=False)
                )
                a_data = tensordict.get(self.tensor_keys.action).clamp(-1 + 1e-6, 1 - 1e-6)
                lp_data = dist.log_prob(a_data)
            out["loss_actor"] = self._reduce(self._alpha * log_prob - lp_data, tensordict)
            out["loss_alpha"] = self._reduce(self._alpha_loss(log_prob), tensordict)
            out["entropy"] = -log_prob.detach().mean()
        else:
            out.update(self._actor_out(tensordict, "min"))
        if self.training:
            self.actor_update_count += 1
        return self._finish(tensordict, out)


def _next(key: NestedKey) -> tuple[str, ...]:
    return ("next", *key) if isinstance(key, tuple) else ("next", key)


def _norm(key: NestedKey) -> NestedKey:
    return key[0] if isinstance(key, tuple) and len(key) == 1 else key


def _fmt(key: NestedKey) -> str:
    return ".".join(key) if isinstance(key, tuple) else str(key)

"""The shared base of the ensemble actor-critic losses the SPQR paper builds on.

The losses themselves live one per module: :mod:`~torchrl_spqr.objectives.sac_n`
(SAC-N), :mod:`~torchrl_spqr.objectives.redq` (REDQ),
:mod:`~torchrl_spqr.objectives.edac` (EDAC) and :mod:`~torchrl_spqr.objectives.cql_n`
(CQL-N).

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
  (:meth:`~EnsembleLossBase.make_value_estimator`): the soft next value
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
- :meth:`~EnsembleLossBase.reset_parameters_recursive` re-draws every member on
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
from tensordict.nn import TensorDictModule, TensorDictModuleBase, TensorDictParams
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

from torchrl_spqr.modules.ensemble import BatchedMLP, QEnsemble
from torchrl_spqr.objectives.member_values import MemberValuesMixin
from torchrl_spqr.objectives.min_q import MinQMixin
from torchrl_spqr.objectives.precision import CriticPrecisionMixin
from torchrl_spqr.objectives.utils import as_members, key_str, next_key, plain_key

__all__ = ["EnsembleLossBase", "critic_metadata"]


class EnsembleLossBase(MemberValuesMixin, CriticPrecisionMixin, MinQMixin, LossModule):
    """Shared machinery of the ensemble actor-critic losses: subclass it, do not use it directly.

    Subclasses implement ``forward`` from the documented pieces (``_critic_target``,
    ``_critic_regression``, ``_actor_out``, ``_finish``), as :class:`SACNLoss`,
    :class:`ReferenceREDQLoss`, :class:`EDACLoss` and :class:`CQLNLoss` do.
    """

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
        members = as_members(qvalue_network, num_qvalue_nets)
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
        self._keep_critic_precision()
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
                *[next_key(k) for k in self.actor_network.in_keys],
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
        optional = {plain_key(("next", self.tensor_keys.done))}
        missing = [
            k for k in self.in_keys if plain_key(k) not in present and plain_key(k) not in optional
        ]
        if missing:
            raise KeyError(
                f"{type(self).__name__} needs keys {[key_str(k) for k in missing]} in the batch."
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
        return {"loss_qvalue": self._reduce(loss, tensordict), **critic_metadata(pred, y)}

    def _finish(self, tensordict: TensorDictBase, out: dict[str, Tensor]) -> TensorDictBase:
        bs = tensordict.batch_size if self.reduction == "none" else torch.Size([])
        td_out = TensorDict(batch_size=bs)
        for k, v in out.items():
            if k.startswith("loss_") or (self.reduction != "none" or v.shape == bs):
                td_out.set(k, v)
        if self.reduction != "none":
            td_out.set("alpha", self._alpha)
        return td_out


def critic_metadata(pred: Tensor, y: Tensor) -> dict[str, Tensor]:
    """Detached ``q_mean`` (online prediction) and ``target_value`` (TD target) means."""
    return {"q_mean": pred.detach().mean(), "target_value": y.detach().mean()}

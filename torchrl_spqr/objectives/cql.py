"""N-critic CQL: TorchRL's :class:`~torchrl.objectives.CQLLoss` generalised to ``N`` critics.

TorchRL's ``CQLLoss`` hard-codes two critics (``num_qvalue_nets = 2``, the
``pred_q1`` / ``pred_q2`` and ``cql_q1_loss`` / ``cql_q2_loss`` splits, the
two-term Lagrange loss). :class:`EnsembleCQLLoss` subclasses it (TorchRL's own
precedent is ``TQCLoss(SACLoss)``) with the same constructor, keys, options and
output entries plus ``num_qvalue_nets``; at ``N = 2`` it gives the same values
and gradients as ``CQLLoss``.

Long module: one class that overrides ``CQLLoss``'s methods one by one (critic, CQL,
Lagrange, actor and value terms) and documents how each generalises to ``N``
critics; split, the overrides would be read apart from the class they override.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tensordict import TensorDict, TensorDictBase
from tensordict.nn import (
    ProbabilisticTensorDictSequential,
    TensorDictModule,
    TensorDictParams,
    dispatch,
)
from tensordict.utils import NestedKey, unravel_key
from torch import Tensor, nn
from torch.nn.parameter import Buffer
from torchrl.envs.utils import ExplorationType, set_exploration_type
from torchrl.modules.distributions.utils import rsample_and_log_prob
from torchrl.objectives import CQLLoss
from torchrl.objectives.utils import distance_loss

from torchrl_spqr.modules.ensemble import QEnsemble
from torchrl_spqr.objectives.member_values import MemberValuesMixin
from torchrl_spqr.objectives.utils import host_count, host_read

__all__ = ["EnsembleCQLLoss"]


class EnsembleCQLLoss(MemberValuesMixin, CQLLoss):
    """TorchRL's continuous CQL loss with ``N = num_qvalue_nets`` critics.

    Everything ``CQLLoss`` does with its two critics is done with ``N``: the
    critic loss sums the members' distances to one shared target; the target
    takes the min over the ``N`` target members (``max_q_backup``: max over
    ``num_random`` next actions first, then min over members;
    ``deterministic_backup=False`` subtracts ``alpha * log pi``); the
    conservative term is computed per member and summed over members; the
    Lagrange loss averages the ``N`` per-member terms; the actor maximises the
    min over the ``N`` (detached) critics. At ``N = 2`` values and gradients
    equal ``CQLLoss``'s (same parameters, same RNG state).

    The conservative term is TorchRL's, unchanged per member: for each of the
    ``num_random`` sampled actions, a logsumexp over the three proposals
    (uniform, ``pi(s)``, ``pi(s')`` evaluated at ``s'``), importance-weighted,
    minus ``Q_k(s, a_data)``, broadcast against the whole flattened sample and
    averaged over it. Under ``reduction="mean"`` or ``"sum"`` this equals the
    per-state form; under ``"none"`` each element mixes in the other states'
    samples, as in ``CQLLoss``. (The CQL-N of the SPQR authors,
    :class:`~torchrl_spqr.objectives.CQLNLoss`, differs: see its docstring.)

    Args:
        actor_network: a probabilistic actor, as for ``CQLLoss``.
        qvalue_network: the critics. A list of ``N`` independently built modules
            (stacked with ``TensorDict.from_modules``, each keeping its own
            initialisation) or a :class:`~torchrl_spqr.QEnsemble` (its
            ``members()``). A single module is accepted as TorchRL accepts it:
            its parameters are expanded ``N`` times and resampled uniformly
            within each tensor's range (buffers and parameters shared with the
            actor are copied as they are), so the members are *not*
            independently initialised; pass a list for independent members.

    Keyword Args:
        num_qvalue_nets: ``N`` (default 2), at least 1; must match the list
            length or the ``QEnsemble`` size.
        cql_variant: ``"torchrl"`` (default; ``CQLLoss``'s computations) or
            ``"reference"`` (the CQL reference code's, as in ``CQLNLoss``; see above).
        bc_steps: number of training calls (from construction) during which
            ``loss_actor`` is the behaviour-cloning loss ``loss_actor_bc``
            (default 0; counted in the ``actor_update_count`` buffer).
        loss_function, alpha_init, min_alpha, max_alpha, action_spec,
        fixed_alpha, target_entropy, delay_actor, delay_qvalue, gamma,
        temperature, min_q_weight, max_q_backup, deterministic_backup,
        num_random, with_lagrange, lagrange_thresh, reduction, deactivate_vmap,
        scalar_output_mode: as for :class:`~torchrl.objectives.CQLLoss`.
            ``reduction="none"`` with ``with_lagrange=True`` is refused (the
            base class fails in its forward on this combination).

    Keys written into the input tensordict (``set_keys`` remaps all of them):
    ``pred_q`` (new: ``[*batch, N]``, member ``k`` at index ``k`` of the last
    dim, with gradient) and ``cql_q_loss`` (new: the per-member conservative
    terms, ``[*batch, M, N]`` with ``M`` the flattened sample size) hold all
    ``N`` members; ``pred_q1`` / ``pred_q2`` and ``cql_q1_loss`` /
    ``cql_q2_loss`` keep ``CQLLoss``'s shapes and hold members 0 and 1 (only
    ``*1`` when ``N = 1``). ``td_error`` is the max over the ``N`` members.
    With ``cql_variant="reference"``, ``cql_q_loss`` is ``[*batch, N]`` (one
    term per state) and ``cql_q1_loss`` / ``cql_q2_loss`` are not written.

    The authors' CQL-N (:class:`~torchrl_spqr.objectives.CQLNLoss`, after the CQL
    reference code) is a configuration: ``cql_variant="reference"`` switches to
    the reference conservative term (:meth:`_cql_loss_reference`: one
    logsumexp over all ``3 * num_random`` sampled actions per state, all
    evaluated at ``s``), the reference Lagrange form (the conservative loss is
    ``alpha'.detach() * (min_q_weight * gap - lagrange_thresh)`` and
    ``loss_alpha_prime`` trains ``alpha'`` only; in TorchRL's form
    ``loss_alpha_prime`` also reaches the critics), one policy draw shared by
    ``loss_actor`` and ``loss_actor_bc`` (data action clamped inside
    ``(-1, 1)``) and a max-Q backup without TorchRL's unused extra draw.
    ``bc_steps`` (either variant) makes ``loss_actor`` the BC loss for the first
    ``bc_steps`` training calls. Then::

        CQLNLoss(actor, critics, num_qvalue_nets=N, gamma=g, min_q_weight=w,
                 temperature=T, num_random=R, lagrange_thresh=tau,
                 max_q_backup=m, backup_entropy=e, bc_steps=k, **alpha_kwargs)

    gives the same loss values and gradients (same parameters and RNG state)
    as::

        loss = EnsembleCQLLoss(actor, critics, num_qvalue_nets=N, cql_variant="reference",
                               loss_function="l2", min_q_weight=w, temperature=T,
                               num_random=R, with_lagrange=tau is not None,
                               lagrange_thresh=tau or 0.0, max_q_backup=m,
                               deterministic_backup=not e, bc_steps=k, **alpha_kwargs)
        loss.make_value_estimator(gamma=g)

    except with ``max_q_backup=True`` and ``backup_entropy=True`` together (CQLNLoss
    indexes the log-probs with a member index there) and the value (not the
    gradient) of ``loss_alpha`` under ``fixed_alpha=True`` (0 in CQLNLoss). The
    priority is the squared TD error (CQLNLoss: absolute) and the metadata
    entries follow ``CQLLoss`` (``alpha``, ``entropy``), not CQLNLoss.

    Member values (:mod:`torchrl_spqr.objectives.member_values`): inside
    ``with loss.request_member_values("data") as req: loss(td)``, ``req.q`` is the
    online ``[N, *batch]`` prediction ``Q_k(s, a_data)`` the critic loss itself
    regressed (same tensor, with gradient; ``req.source == "reused"``).

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from tensordict import TensorDict
        >>> from tensordict.nn import NormalParamExtractor, TensorDictModule
        >>> from torchrl.data import Bounded
        >>> from torchrl.modules import ProbabilisticActor, TanhNormal
        >>> from torchrl.objectives import SoftUpdate
        >>> from torchrl_spqr import make_q_member
        >>> from torchrl_spqr.objectives.cql import EnsembleCQLLoss
        >>> actor = ProbabilisticActor(
        ...     TensorDictModule(nn.Sequential(nn.Linear(4, 4), NormalParamExtractor()),
        ...                      in_keys=["observation"], out_keys=["loc", "scale"]),
        ...     in_keys=["loc", "scale"], distribution_class=TanhNormal,
        ...     spec=Bounded(-1.0, 1.0, (2,)))
        >>> critics = [make_q_member(6, num_cells=(16,)) for _ in range(5)]
        >>> loss = EnsembleCQLLoss(actor, critics, num_qvalue_nets=5, loss_function="l2")
        >>> loss.make_value_estimator(gamma=0.99)
        >>> updater = SoftUpdate(loss, tau=0.005)
        >>> data = TensorDict({"observation": torch.randn(8, 4), "action": torch.rand(8, 2) * 2 - 1,
        ...     "next": {"observation": torch.randn(8, 4), "reward": torch.randn(8, 1),
        ...              "done": torch.zeros(8, 1, dtype=torch.bool),
        ...              "terminated": torch.zeros(8, 1, dtype=torch.bool)}}, [8])
        >>> with loss.request_member_values("data") as req:
        ...     out = loss(data)
        >>> req.q.shape, req.source
        (torch.Size([5, 8]), 'reused')
        >>> sorted(k for k in out.keys() if k.startswith("loss_"))
        ['loss_actor', 'loss_actor_bc', 'loss_alpha', 'loss_cql', 'loss_qvalue']
        >>> sum(v for k, v in out.items() if k.startswith("loss_")).backward()
        >>> updater.step()
    """

    @dataclass
    class _AcceptedKeys(CQLLoss._AcceptedKeys):
        """``CQLLoss``'s keys plus the all-member ones.

        Attributes:
            pred_q: where the ``[*batch, N]`` online predictions are written.
                Defaults to ``"pred_q"``.
            cql_q_loss: where the ``[*batch, M, N]`` per-member conservative
                terms are written. Defaults to ``"cql_q_loss"``.
        """

        pred_q: NestedKey = "pred_q"
        cql_q_loss: NestedKey = "cql_q_loss"

    default_keys = _AcceptedKeys
    tensor_keys: _AcceptedKeys
    #: SPQRLoss may ask for these pairs through :meth:`request_member_values`.
    member_value_pairs = ("data",)

    def __init__(
        self,
        actor_network: ProbabilisticTensorDictSequential,
        qvalue_network: TensorDictModule | Sequence[TensorDictModule] | QEnsemble,
        *,
        loss_function: str = "smooth_l1",
        alpha_init: float = 1.0,
        min_alpha: float | None = None,
        max_alpha: float | None = None,
        action_spec=None,
        fixed_alpha: bool = False,
        target_entropy: str | float = "auto",
        delay_actor: bool = False,
        delay_qvalue: bool = True,
        gamma: float | None = None,
        temperature: float = 1.0,
        min_q_weight: float = 1.0,
        max_q_backup: bool = False,
        deterministic_backup: bool = True,
        num_random: int = 10,
        with_lagrange: bool = False,
        lagrange_thresh: float = 0.0,
        reduction: str | None = None,
        deactivate_vmap: bool = False,
        scalar_output_mode: str | None = None,
        num_qvalue_nets: int = 2,
        cql_variant: str = "torchrl",
        bc_steps: int = 0,
    ) -> None:
        if cql_variant not in ("torchrl", "reference"):
            raise ValueError(f"cql_variant must be 'torchrl' or 'reference', got {cql_variant!r}.")
        if bc_steps < 0:
            raise ValueError(f"bc_steps must be >= 0, got {bc_steps}.")
        if isinstance(num_qvalue_nets, bool) or not isinstance(num_qvalue_nets, int):
            raise TypeError(f"num_qvalue_nets must be an int, got {num_qvalue_nets!r}.")
        if num_qvalue_nets < 1:
            raise ValueError(f"num_qvalue_nets must be >= 1, got {num_qvalue_nets}.")
        if isinstance(qvalue_network, QEnsemble):
            if qvalue_network.num_members != num_qvalue_nets:
                raise ValueError(
                    f"num_qvalue_nets={num_qvalue_nets} but the QEnsemble has "
                    f"{qvalue_network.num_members} members."
                )
            qvalue_network = qvalue_network.members()
        elif isinstance(qvalue_network, (list, tuple)):
            qvalue_network = list(qvalue_network)
            if len(qvalue_network) != num_qvalue_nets:
                raise ValueError(
                    f"num_qvalue_nets={num_qvalue_nets} but {len(qvalue_network)} critics "
                    "were given."
                )
            if len({id(m) for m in qvalue_network}) != len(qvalue_network):
                raise ValueError(
                    "The same critic module appears more than once in the list (e.g. [q] * N): "
                    "build each member separately ([make_q() for _ in range(N)]), or pass the "
                    "single module to have TorchRL expand and resample it."
                )
            ids = [id(p) for m in qvalue_network for p in m.parameters()]
            if len(set(ids)) != len(ids):
                warnings.warn(
                    "Some critics share parameter tensors: TorchRL stores a shared tensor as "
                    "an expanded view (identical in every member, and not a parameter of "
                    "the loss). Build each member separately for independent critics.",
                    UserWarning,
                    stacklevel=2,
                )
        if reduction == "none" and with_lagrange:
            raise ValueError(
                "reduction='none' with with_lagrange=True is not supported (TorchRL's "
                "CQLLoss cannot put the scalar loss_alpha_prime in a batched output)."
            )
        # read by convert_to_functional below, called from CQLLoss.__init__
        self.__dict__["_ensemble_size"] = num_qvalue_nets
        super().__init__(
            actor_network,
            qvalue_network,
            loss_function=loss_function,
            alpha_init=alpha_init,
            min_alpha=min_alpha,
            max_alpha=max_alpha,
            action_spec=action_spec,
            fixed_alpha=fixed_alpha,
            target_entropy=target_entropy,
            delay_actor=delay_actor,
            delay_qvalue=delay_qvalue,
            gamma=gamma,
            temperature=temperature,
            min_q_weight=min_q_weight,
            max_q_backup=max_q_backup,
            deterministic_backup=deterministic_backup,
            num_random=num_random,
            with_lagrange=with_lagrange,
            lagrange_thresh=lagrange_thresh,
            reduction=reduction,
            deactivate_vmap=deactivate_vmap,
            scalar_output_mode=scalar_output_mode,
        )
        self.cql_variant = cql_variant
        self.bc_steps = int(bc_steps)
        self.register_buffer("actor_update_count", torch.zeros((), dtype=torch.long))

    def convert_to_functional(
        self,
        module,
        module_name: str,
        expand_dim: int | None = None,
        create_target_params: bool = False,
        compare_against=None,
        **kwargs,
    ) -> None:
        """As :meth:`LossModule.convert_to_functional`; the critics get ``N`` members.

        ``CQLLoss.__init__`` sets ``num_qvalue_nets = 2`` and converts the
        critics with it; here ``N`` replaces that 2 (the only change to the
        constructor).
        """
        if module_name == "qvalue_network":
            self.num_qvalue_nets = expand_dim = self.__dict__["_ensemble_size"]
        super().convert_to_functional(
            module,
            module_name,
            expand_dim,
            create_target_params=create_target_params,
            compare_against=compare_against,
            **kwargs,
        )
        if module_name == "qvalue_network" and isinstance(module, list) and len(module) == 1:
            # TensorDict.from_modules stores a one-module list as expanded views (no
            # parameters to train): stack the member's own tensors instead
            names = {name for name, _ in module[0].named_parameters()}
            stacked = TensorDict(batch_size=[1])
            for key, value in TensorDict.from_module(module[0]).items(True, True):
                value = value.detach().clone().unsqueeze(0)
                is_param = ".".join(key) in names
                stacked.set(key, nn.Parameter(value) if is_param else Buffer(value))
            self.qvalue_network_params = TensorDictParams(stacked, no_convert=True)

    def _write_pred(self, tensordict: TensorDictBase, q_pred: Tensor) -> None:
        """Store the ``[N, *batch, 1]`` predictions under ``pred_q`` (and ``pred_q1/2``)."""
        tensordict.set(self.tensor_keys.pred_q, q_pred.squeeze(-1).movedim(0, -1))
        tensordict.set(self.tensor_keys.pred_q1, q_pred[0])
        if self.num_qvalue_nets > 1:
            tensordict.set(self.tensor_keys.pred_q2, q_pred[1])

    def _clear_param_weakrefs(self, tensordict: TensorDictBase) -> None:
        """As ``CQLLoss`` does at the end of each term (for ``torch.compile``)."""
        self._clear_weakrefs(
            tensordict,
            "actor_network_params",
            "qvalue_network_params",
            "target_actor_network_params",
            "target_qvalue_network_params",
        )

    def q_loss(self, tensordict: TensorDictBase) -> tuple[Tensor, dict]:
        """``CQLLoss.q_loss`` with ``N`` members; serves ``"data"`` member-value requests."""
        target_value = self._get_value_v(
            tensordict.copy(),
            self._alpha,
            self.actor_network_params,
            self.target_qvalue_network_params,
        )
        tensordict_pred_q = tensordict.select(*self.qvalue_network.in_keys, strict=False)
        q_pred = self._vmap_qvalue_networkN0(tensordict_pred_q, self.qvalue_network_params).get(
            self.tensor_keys.state_action_value
        )
        self._write_pred(tensordict, q_pred)
        q_pred = q_pred.squeeze(-1)
        request = self.member_values_request
        if request is not None and request.pairs == "data":
            request.q, request.source = q_pred, "reused"
        loss_qval = distance_loss(
            q_pred,
            target_value.expand_as(q_pred),
            loss_function=self.loss_function,
        ).sum(0)
        loss_qval = self._reduce_loss(loss_qval, tensordict=tensordict)
        td_error = (q_pred - target_value).pow(2)
        metadata = {"td_error": td_error.detach()}
        self._clear_param_weakrefs(tensordict)
        return loss_qval, metadata

    def cql_loss(self, tensordict: TensorDictBase) -> tuple[Tensor, dict]:
        """``CQLLoss.cql_loss`` per member, summed over the ``N`` members.

        Reads ``pred_q`` (written by :meth:`q_loss`), writes ``cql_q_loss``
        (all members) and ``cql_q1_loss`` / ``cql_q2_loss`` (members 0, 1).
        """
        if self.cql_variant == "reference":
            return self._cql_loss_reference(tensordict)
        pred_q = self._pred_q(tensordict)
        n = self.num_qvalue_nets
        random_actions_tensor = pred_q.new_empty(
            (
                *tensordict.shape[:-1],
                tensordict.shape[-1] * self.num_random,
                tensordict[self.tensor_keys.action].shape[-1],
            )
        ).uniform_(-1, 1)
        curr_actions_td, curr_log_pis = self._get_policy_actions(
            tensordict.copy(), self.actor_network_params, num_actions=self.num_random
        )
        new_curr_actions_td, new_log_pis = self._get_policy_actions(
            tensordict.get("next").copy(), self.actor_network_params, num_actions=self.num_random
        )
        # all three action sets in one vmapped pass over 3N stacked member params
        qvalue_params = torch.cat([self.qvalue_network_params] * 3, 0)
        tensordict_q_random = tensordict.select(*self.actor_network.in_keys, strict=False)
        batch_size = tensordict_q_random.batch_size
        batch_size = list(batch_size[:-1]) + [batch_size[-1] * self.num_random]
        in_keys = [unravel_key(key) for key in self.actor_network.in_keys]
        ndim = tensordict_q_random.ndim

        def filter_and_repeat(name, x):
            if name in in_keys:
                return x.repeat_interleave(self.num_random, dim=ndim - 1)

        tensordict_q_random = tensordict_q_random.named_apply(
            filter_and_repeat, batch_size=batch_size, filter_empty=True
        )
        tensordict_q_random.set(self.tensor_keys.action, random_actions_tensor)
        shape = curr_actions_td.batch_size
        cql_tensordict = torch.cat(
            [
                tensordict_q_random.expand(n, *shape),
                curr_actions_td.expand(n, *shape),
                new_curr_actions_td.expand(n, *shape),
            ],
            0,
        ).contiguous()
        state_action_value = self._vmap_qvalue_network00(cql_tensordict, qvalue_params).get(
            self.tensor_keys.state_action_value
        )
        q_random, q_curr, q_new = state_action_value.split([n, n, n], dim=0)
        # importance-sampled version
        random_density = np.log(0.5 ** curr_actions_td[self.tensor_keys.action].shape[-1])
        cat_q = torch.cat(
            [
                q_random - random_density,
                q_new - new_log_pis.detach().unsqueeze(-1),
                q_curr - curr_log_pis.detach().unsqueeze(-1),
            ],
            -1,
        )  # [N, *sample, 3]
        min_qf_loss = (
            torch.logsumexp(cat_q / self.temperature, dim=-1) * self.min_q_weight * self.temperature
        )
        # CQLLoss: min_qf_loss.flatten() - pred_q * w, broadcast to [*batch, M] per member
        pred = pred_q.movedim(-1, 0).unsqueeze(-1)  # [N, *batch, 1]
        lse = min_qf_loss.reshape(n, *([1] * (pred.ndim - 2)), -1)
        cql_q_losses = lse - pred * self.min_q_weight  # [N, *batch, M]
        tensordict.set(self.tensor_keys.cql_q_loss, cql_q_losses.movedim(0, -1))
        tensordict.set(self.tensor_keys.cql_q1_loss, cql_q_losses[0])
        if n > 1:
            tensordict.set(self.tensor_keys.cql_q2_loss, cql_q_losses[1])
        cql_q_loss = cql_q_losses.sum(0).mean(-1)
        cql_q_loss = self._reduce_loss(cql_q_loss, tensordict=tensordict)
        self._clear_param_weakrefs(tensordict)
        return cql_q_loss, {}

    def _pred_q(self, tensordict: TensorDictBase) -> Tensor:
        pred_q = tensordict.get(self.tensor_keys.pred_q, None)
        if pred_q is None:
            raise KeyError(
                f"Couldn't find the predictions under {self.tensor_keys.pred_q} in the input "
                "tensordict. This could be caused by calling cql_loss before q_loss."
            )
        return pred_q

    def _cql_loss_reference(self, tensordict: TensorDictBase) -> tuple[Tensor, dict]:
        """The CQL reference code's CQL(H) term (``min_q_version=3``), per member.

        ``num_random`` actions per state from each of the uniform proposal,
        ``pi(.|s)`` and ``pi(.|s')`` (drawn in this order: ``pi(s)``, ``pi(s')``,
        uniform), all evaluated at ``s``; one importance-weighted logsumexp
        over the ``3 * num_random`` actions per state; minus ``Q_k(s, a_data)``;
        times ``min_q_weight``; summed over members. With ``with_lagrange``,
        each member's term becomes ``alpha' * (min_q_weight * gap - lagrange_thresh)``
        with ``alpha'`` detached (the Lagrange loss trains ``alpha'`` only).
        Writes ``cql_q_loss`` (``[*batch, N]``, the terms before ``alpha'``).
        """
        pred = self._pred_q(tensordict).movedim(-1, 0)  # [N, *batch]
        r, shape = self.num_random, tensordict.shape
        action_key = self.tensor_keys.action
        curr_td, curr_lp = self._get_policy_actions(
            tensordict.copy(), self.actor_network_params, num_actions=r
        )
        next_td, next_lp = self._get_policy_actions(
            tensordict.get("next").copy(), self.actor_network_params, num_actions=r
        )
        a_curr = curr_td.get(action_key)
        a_rand = torch.empty_like(a_curr).uniform_(-1, 1)
        q_in = torch.stack(
            [
                curr_td.clone(False).set(action_key, a_rand),
                curr_td,
                curr_td.clone(False).set(action_key, next_td.get(action_key)),
            ],
            0,
        )  # [3, *shape[:-1], shape[-1] * r], all at the current states
        q = self._vmap_qvalue_networkN0(q_in, self.qvalue_network_params).get(
            self.tensor_keys.state_action_value
        )
        q = q.reshape(self.num_qvalue_nets, 3, *shape, r).movedim(1, -2).flatten(-2)
        log_density = torch.stack(
            [
                torch.full_like(curr_lp, a_curr.shape[-1] * math.log(0.5)),
                curr_lp.detach(),
                next_lp.detach(),
            ],
            0,
        )
        log_density = log_density.reshape(3, *shape, r).movedim(0, -2).flatten(-2)
        lse = torch.logsumexp((q - log_density) / self.temperature, dim=-1) * self.temperature
        weighted = self.min_q_weight * (lse - pred)  # [N, *batch]
        if self.with_lagrange:
            weighted = weighted - self.target_action_gap
            alpha_prime = torch.clamp_max(self.log_alpha_prime.exp(), max=1000000.0)
            tensordict.set(self.tensor_keys.cql_q_loss, weighted.movedim(0, -1))
            weighted = alpha_prime.detach() * weighted
        else:
            tensordict.set(self.tensor_keys.cql_q_loss, weighted.movedim(0, -1))
        cql_q_loss = self._reduce_loss(weighted.sum(0), tensordict=tensordict)
        return cql_q_loss, {}

    def alpha_prime_loss(self, tensordict: TensorDictBase) -> tuple[Tensor, dict]:
        """``CQLLoss.alpha_prime_loss`` averaged over the ``N`` members' terms.

        With ``cql_variant="reference"`` the terms are detached: the loss trains
        ``alpha'`` only (``-alpha' * mean_k mean_batch term_k``).
        """
        cql_q_losses = tensordict.get(self.tensor_keys.cql_q_loss, None)
        if cql_q_losses is None:
            raise KeyError(
                f"Couldn't find the conservative terms under {self.tensor_keys.cql_q_loss} in "
                "the input tensordict. This could be caused by calling alpha_prime_loss "
                "before cql_loss."
            )
        alpha_prime = torch.clamp_max(self.log_alpha_prime.exp(), max=1000000.0)
        if self.cql_variant == "reference":
            terms = cql_q_losses.detach().movedim(-1, 0)
            per_member = terms.mean(tuple(range(1, terms.ndim)))
            return -(alpha_prime * per_member).mean(), {}
        loss = None
        for k in range(self.num_qvalue_nets):
            member = self._reduce_loss(
                cql_q_losses[..., k], tensordict=tensordict, reduction="mean"
            )
            term = alpha_prime * (member - self.target_action_gap)
            loss = -term if loss is None else loss - term
        alpha_prime_loss = loss / self.num_qvalue_nets
        self._clear_param_weakrefs(tensordict)
        return alpha_prime_loss, {}

    # ------------------------------------------------------------------ actor
    def _reference_actor_draw(self, tensordict: TensorDictBase) -> tuple[Tensor, Tensor, Tensor]:
        """One policy draw at ``s``: its log-prob, ``log pi(a_data|s)`` and ``min_k Q_k(s, a)``."""
        with (
            set_exploration_type(ExplorationType.RANDOM),
            self.actor_network_params.to_module(self.actor_network, preserve_module_state=False),
        ):
            dist = self.actor_network.get_dist(tensordict)
            action, log_prob = rsample_and_log_prob(dist)
            a_data = tensordict.get(self.tensor_keys.action).clamp(-1 + 1e-6, 1 - 1e-6)
            bc_log_prob = dist.log_prob(a_data)
        td_q = tensordict.select(*self.qvalue_network.in_keys, strict=False)
        td_q.set(self.tensor_keys.action, action)
        min_q = (
            self._vmap_qvalue_networkN0(td_q, self._cached_detach_qvalue_params)
            .get(self.tensor_keys.state_action_value)
            .min(0)[0]
            .squeeze(-1)
        )
        return log_prob, bc_log_prob, min_q

    def actor_bc_loss(self, tensordict: TensorDictBase) -> tuple[Tensor, dict]:
        """``CQLLoss.actor_bc_loss``; with ``cql_variant="reference"``, from the actor's draw.

        The reference variant draws one action for both actor losses (kept in
        the tensordict for :meth:`actor_loss`) and scores the data action
        clamped to ``[-1 + 1e-6, 1 - 1e-6]``, as the CQL reference code does.
        """
        if self.cql_variant == "torchrl":
            return super().actor_bc_loss(tensordict)
        log_prob, bc_log_prob, min_q = self._reference_actor_draw(tensordict)
        tensordict.set(_DRAW_LOG_PROB, log_prob)
        tensordict.set(_DRAW_MIN_Q, min_q)
        loss = self._reduce_loss(self._alpha * log_prob - bc_log_prob, tensordict=tensordict)
        return loss, {"bc_log_prob": bc_log_prob.mean().detach()}

    def actor_loss(self, tensordict: TensorDictBase) -> tuple[Tensor, dict]:
        """``CQLLoss.actor_loss`` (min over the ``N`` detached critics).

        With ``cql_variant="reference"`` it re-uses the draw of :meth:`actor_bc_loss`.
        """
        if self.cql_variant == "torchrl":
            return super().actor_loss(tensordict)
        if _DRAW_LOG_PROB in tensordict.keys():
            log_prob, min_q = tensordict.pop(_DRAW_LOG_PROB), tensordict.pop(_DRAW_MIN_Q)
        else:
            log_prob, _, min_q = self._reference_actor_draw(tensordict)
        loss = self._reduce_loss(self._alpha * log_prob - min_q, tensordict=tensordict)
        return loss, {self.tensor_keys.log_prob: log_prob.detach()}

    @dispatch
    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        """``CQLLoss.forward``; during the first ``bc_steps`` training calls ``loss_actor`` is
        ``loss_actor_bc`` (behaviour-cloning warm start)."""
        out = super().forward(tensordict)
        if host_read(self, "actor_update_count") < self.bc_steps:
            out.set("loss_actor", out.get("loss_actor_bc"))
        if self.training:
            host_count(self, "actor_update_count")
        return out

    # ----------------------------------------------------------- TD target
    def _get_value_v(self, tensordict, _alpha, actor_params, qval_params):
        """``CQLLoss._get_value_v``; the reference variant's max-Q backup differs.

        With ``cql_variant="reference"`` and ``max_q_backup=True``: no unused
        first draw, and ``deterministic_backup=False`` subtracts
        ``alpha * log pi`` of the action chosen by the backup (the max over
        actions of the min member).
        """
        if self.cql_variant == "torchrl" or not self.max_q_backup:
            return super()._get_value_v(tensordict, _alpha, actor_params, qval_params)
        tensordict = tensordict.clone(False)
        shape, r = tensordict.shape, self.num_random
        next_td, next_lp = self._get_policy_actions(
            tensordict.get("next").copy(), actor_params, num_actions=r
        )
        q = self._vmap_qvalue_networkN0(next_td, qval_params.data).get(
            self.tensor_keys.state_action_value
        )
        best = q.reshape(self.num_qvalue_nets, *shape, r).max(-1)
        value, member = best.values.min(0)
        if not self.deterministic_backup:
            chosen = best.indices.gather(0, member.unsqueeze(0)).squeeze(0)
            log_prob = next_lp.reshape(*shape, r).gather(-1, chosen.unsqueeze(-1)).squeeze(-1)
            value = value - _alpha * log_prob
        tensordict.set(("next", self.value_estimator.tensor_keys.value), value.unsqueeze(-1))
        return self.value_estimator.value_estimate(tensordict).squeeze(-1)


_DRAW_LOG_PROB = "_ensemble_cql_draw_log_prob"
_DRAW_MIN_Q = "_ensemble_cql_draw_min_q"

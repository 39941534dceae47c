"""SAC-N / SAC-Ens: ``N`` critics, min over all of them (An et al. 2021)."""

from __future__ import annotations

from tensordict import TensorDictBase
from tensordict.nn import dispatch
from torch import Tensor

from torchrl_spqr.objectives.common import EnsembleLossBase

__all__ = ["SACNLoss"]


class SACNLoss(EnsembleLossBase):
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

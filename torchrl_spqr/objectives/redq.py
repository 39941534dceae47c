"""REDQ as in Chen et al. 2021 and its reference code (``ReferenceREDQLoss``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tensordict import TensorDictBase
from tensordict.nn import TensorDictModuleBase, dispatch
from torch import Tensor

from torchrl_spqr.modules.ensemble import QEnsemble
from torchrl_spqr.objectives.common import EnsembleLossBase
from torchrl_spqr.objectives.utils import host_count, host_read

__all__ = ["MBPO_TARGET_ENTROPY", "ReferenceREDQLoss", "mbpo_target_entropy"]


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


class ReferenceREDQLoss(EnsembleLossBase):
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
        return (host_read(self, "update_count") + 1) % self.policy_update_delay == 0

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
            host_count(self, "update_count")
        return self._finish(tensordict, out)

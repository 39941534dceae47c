"""EDAC (An et al. 2021): SAC-N plus the ensemble gradient-diversity term."""

from __future__ import annotations

import torch
from tensordict import TensorDictBase
from torch import Tensor

from torchrl_spqr.objectives.sac_n import SACNLoss

__all__ = ["EDACLoss"]


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

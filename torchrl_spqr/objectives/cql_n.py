"""CQL-N ("CQL-Min"): conservative Q-learning with ``N`` critics, CQL(H) of Kumar et al. 2020."""

from __future__ import annotations

import math

import torch
from tensordict import TensorDictBase
from tensordict.nn import dispatch
from torch import Tensor
from torchrl.envs.utils import ExplorationType, set_exploration_type

from torchrl_spqr.objectives.common import EnsembleLossBase, critic_metadata
from torchrl_spqr.objectives.utils import host_count, host_read

__all__ = ["CQLNLoss"]


class CQLNLoss(EnsembleLossBase):
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
            **critic_metadata(pred, y),
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
        bc = host_read(self, "actor_update_count") < self.bc_steps
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
            host_count(self, "actor_update_count")
        return self._finish(tensordict, out)

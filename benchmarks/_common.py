"""Hopper-sized builders shared by the benchmarks (obs 11, act 3)."""

from __future__ import annotations

import copy

import torch
from tensordict import TensorDict
from tensordict.nn import NormalParamExtractor, TensorDictModule
from torch import nn
from torchrl.data import Bounded
from torchrl.modules import MLP, ProbabilisticActor, TanhNormal

from torchrl_spqr.functional import spqr_kl

OBS, ACT = 11, 3


def make_actor(hidden: int) -> ProbabilisticActor:
    """The scripts' policy (``training/builders.py``): ReLU MLP, TanhNormal (TorchRL's
    ``MLP`` defaults to Tanh, which the benchmarks used before 2026-12-03)."""
    net = nn.Sequential(
        MLP(
            in_features=OBS,
            out_features=2 * ACT,
            num_cells=[hidden, hidden],
            activation_class=nn.ReLU,
        ),
        NormalParamExtractor(),
    )
    return ProbabilisticActor(
        TensorDictModule(net, in_keys=["observation"], out_keys=["loc", "scale"]),
        in_keys=["loc", "scale"],
        spec=Bounded(-1.0, 1.0, (ACT,)),
        distribution_class=TanhNormal,
        return_log_prob=True,
    )


def make_batch(b: int) -> TensorDict:
    return TensorDict(
        {
            "observation": torch.randn(b, OBS),
            "action": torch.rand(b, ACT) * 1.98 - 0.99,
            "next": {
                "observation": torch.randn(b, OBS),
                "reward": torch.randn(b, 1),
                "done": torch.zeros(b, 1, dtype=torch.bool),
                "terminated": torch.zeros(b, 1, dtype=torch.bool),
            },
        },
        [b],
    )


def loss_step(loss, updater, opt):
    """One update of a TorchRL loss: sum the ``loss_*`` entries, backward, step, soft update."""

    def step(batch):
        out = loss(batch)
        total = sum(v for k, v in out.items() if k.startswith("loss_"))
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        updater.step()

    return step


class LoopEnsemble:
    """The original REDQ / SPQR code style: N critic modules, N Adam optimisers, Python loops.

    Target: min over ``m`` sub-sampled target critics (``m = N``: SAC-N); policy
    and temperature update every ``g`` critic updates with the ``actor_reduce``
    ("mean": REDQ, "min": SAC-N) of the N Q-values; ``spqr_beta > 0`` adds the
    SPQR KL on the online critics at ``(s', a' ~ pi)``. ``optim(params)`` builds
    each optimiser (default Adam, lr 3e-4).
    """

    def __init__(
        self,
        n: int,
        m: int,
        g: int,
        hidden: int,
        actor_reduce: str,
        spqr_beta: float = 0.0,
        optim=None,
    ) -> None:
        optim = optim or (lambda params: torch.optim.Adam(params, lr=3e-4))
        self.n, self.m, self.g = n, m, g
        self.actor_reduce, self.spqr_beta = actor_reduce, spqr_beta
        self.q = [
            MLP(
                in_features=OBS + ACT,
                out_features=1,
                num_cells=[hidden, hidden],
                activation_class=nn.ReLU,
            )
            for _ in range(n)
        ]
        self.q_targ = [copy.deepcopy(q).requires_grad_(False) for q in self.q]
        self.q_opt = [optim(q.parameters()) for q in self.q]
        self.actor = make_actor(hidden)
        self.pi_opt = optim(self.actor.parameters())
        self.log_alpha = torch.zeros((), requires_grad=True)
        self.a_opt = optim([self.log_alpha])
        self.i = 0

    def _sample(self, obs):
        dist = self.actor.get_dist(TensorDict({"observation": obs}, obs.shape[:-1]))
        a = dist.rsample()
        return a, dist.log_prob(a)

    def step(self, batch):
        s, a, r = batch["observation"], batch["action"], batch["next", "reward"]
        s2, term = batch["next", "observation"], batch["next", "terminated"].float()
        alpha = self.log_alpha.exp().detach()
        with torch.no_grad():
            a2, lp2 = self._sample(s2)
            idx = torch.randperm(self.n)[: self.m] if self.m < self.n else range(self.n)
            sa2 = torch.cat([s2, a2], -1)
            q_next = torch.cat([self.q_targ[int(k)](sa2) for k in idx], 1)
            y = r + 0.99 * (1 - term) * (
                q_next.min(1, keepdim=True).values - alpha * lp2.unsqueeze(-1)
            )
        sa = torch.cat([s, a], -1)
        pred = torch.cat([q(sa) for q in self.q], 1)
        q_loss = ((pred - y) ** 2).mean() * self.n
        if self.spqr_beta > 0:
            q_spqr = torch.stack([q(sa2) for q in self.q])  # [N, B, 1]
            q_loss = q_loss + self.spqr_beta * spqr_kl(q_spqr)
        for o in self.q_opt:
            o.zero_grad(set_to_none=True)
        q_loss.backward()
        if (self.i + 1) % self.g == 0:
            for q in self.q:
                q.requires_grad_(False)
            a_pi, lp = self._sample(s)
            q_all = torch.cat([q(torch.cat([s, a_pi], -1)) for q in self.q], 1)
            q_pi = q_all.mean(1) if self.actor_reduce == "mean" else q_all.min(1).values
            pi_loss = (alpha * lp - q_pi).mean()
            self.pi_opt.zero_grad(set_to_none=True)
            pi_loss.backward()
            self.pi_opt.step()
            for q in self.q:
                q.requires_grad_(True)
            a_loss = -(self.log_alpha * (lp.detach() - 1.0)).mean()
            self.a_opt.zero_grad(set_to_none=True)
            a_loss.backward()
            self.a_opt.step()
        for o in self.q_opt:
            o.step()
        with torch.no_grad():
            for q, qt in zip(self.q, self.q_targ):
                for p, pt in zip(q.parameters(), qt.parameters()):
                    pt.mul_(0.995).add_(p, alpha=0.005)
        self.i += 1


def parse_args_keeping_freed_memory(p):
    """``p.parse_args()`` for a benchmark that times updates as the scripts run them: warnings
    off, and glibc's malloc keeping freed memory (``retain_freed_memory``), else an error."""
    import warnings

    from torchrl_spqr.training.malloc import retain_freed_memory

    args = p.parse_args()
    warnings.filterwarnings("ignore")
    if not retain_freed_memory():
        p.error("this benchmark runs with glibc's malloc keeping freed memory (not glibc?)")
    return args

"""Two small problems with a known true Q, and an N-critic trainer, for experiments 2-4.

- :class:`ContextualBandit`: continuous states and actions, the true ``Q*(s, a)`` is
  the expected reward, the data come from a shifted behaviour policy with reward
  noise. No bootstrapping: every member regresses on the same noisy rewards.
- :class:`ChainMDP`: ``K`` states in a line (one-hot observations), a continuous
  action that sets the probability of stepping right, a fixed evaluation policy
  ``pi(s) = 0.5``; the true ``Q^pi`` is solved exactly. The critics learn it from
  a fixed dataset with the SAC-N target ``y = r + gamma * min_k Qbar_k(s', pi(s'))``
  (soft-updated target ensemble), one target shared by all members.

:func:`train_ensemble` trains a :class:`~torchrl_spqr.QEnsemble` with the squared
error summed over members (SAC / SAC-N convention) plus ``beta * spqr_kl``, using
only the package's public API, and :func:`ensemble_metrics` measures the trained
ensemble against the truth.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from tensordict import TensorDict

from torchrl_spqr import QEnsemble, make_q_member, spqr_kl
from torchrl_spqr.diagnostics import (
    acceptance_rate,
    ensemble_std,
    residual_correlation,
    spectral_spike,
)

__all__ = [
    "ChainMDP",
    "ContextualBandit",
    "METRIC_NAMES",
    "TrainConfig",
    "ensemble_metrics",
    "make_problem",
    "train_ensemble",
]

_PROBLEM_SEED = 1234  # the problem itself (weights, rewards) is fixed; run seeds vary the data


@dataclass
class EvalSet:
    """State-action pairs with their true values."""

    obs: torch.Tensor
    act: torch.Tensor
    q_true: torch.Tensor


@dataclass
class GreedyGrid:
    """States x candidate actions, for the regret of acting greedily on the ensemble's min."""

    obs: torch.Tensor  # [S, obs_dim]
    actions: torch.Tensor  # [A, act_dim]
    q_true: torch.Tensor  # [S, A]


class ContextualBandit:
    """``Q*(s, a) = sin(pi s_0) + 0.5 s_1 s_2 - 2 ||a - mu(s)||^2``, s in [-1, 1]^3, a in [-1, 1]^2.

    ``mu(s) = 0.6 tanh(W s)``. Behaviour data: ``a = clip(mu(s) + c + 0.3 eps)``
    with the offset ``c = (0.4, -0.4)``, so the best action is covered only thinly
    and the corners of the action box not at all; rewards carry Gaussian noise
    (std 0.5).
    """

    name = "bandit"
    obs_dim = 3
    act_dim = 2
    bootstrap = False
    gamma = 0.0

    def __init__(self, seed: int, num_data: int = 2000, noise: float = 0.5) -> None:
        g = torch.Generator().manual_seed(_PROBLEM_SEED)
        self.w = torch.randn(self.act_dim, self.obs_dim, generator=g)
        self.offset = torch.tensor([0.4, -0.4])
        g = torch.Generator().manual_seed(10_000 + seed)
        obs = torch.rand(num_data, self.obs_dim, generator=g) * 2 - 1
        act = self.behaviour(obs, g)
        rew = self.q_true(obs, act) + noise * torch.randn(num_data, generator=g)
        self.data = {"obs": obs, "act": act, "rew": rew}
        g = torch.Generator().manual_seed(_PROBLEM_SEED + 1)
        eo = torch.rand(1024, self.obs_dim, generator=g) * 2 - 1
        self.eval_sets = {
            "data": EvalSet(eo, self.behaviour(eo, g), None),
            "uniform": EvalSet(eo, torch.rand(1024, self.act_dim, generator=g) * 2 - 1, None),
        }
        for es in self.eval_sets.values():
            es.q_true = self.q_true(es.obs, es.act)
        grid1 = torch.linspace(-1, 1, 9)
        cand = torch.cartesian_prod(grid1, grid1)  # [81, 2]
        go = eo[:256]
        self.greedy = GreedyGrid(go, cand, self._q_grid(go, cand))

    def mu(self, obs: torch.Tensor) -> torch.Tensor:
        return 0.6 * torch.tanh(obs @ self.w.T)

    def behaviour(self, obs: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        noise = 0.3 * torch.randn(obs.shape[0], self.act_dim, generator=g)
        return (self.mu(obs) + self.offset + noise).clamp(-1, 1)

    def q_true(self, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        base = torch.sin(math.pi * obs[:, 0]) + 0.5 * obs[:, 1] * obs[:, 2]
        return base - 2 * (act - self.mu(obs)).pow(2).sum(-1)

    def _q_grid(self, obs: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
        s = obs.unsqueeze(1).expand(-1, cand.shape[0], -1).reshape(-1, self.obs_dim)
        a = cand.unsqueeze(0).expand(obs.shape[0], -1, -1).reshape(-1, self.act_dim)
        return self.q_true(s, a).view(obs.shape[0], cand.shape[0])


class ChainMDP:
    """``K`` states in a line, one-hot observations, action ``a`` in [-1, 1].

    From state ``i`` the agent steps right with probability ``(1 + a) / 2`` and
    left otherwise (walls reflect: it stays). Reward ``1[i = K-1] - 0.25 a^2``
    plus Gaussian noise (std 0.2). The evaluated policy is ``pi(s) = 0.5``;
    ``Q^pi`` solves the Bellman equation exactly (``gamma = 0.9``). Data: states
    and actions uniform, ``num_data`` transitions.
    """

    name = "chain"
    act_dim = 1
    bootstrap = True

    def __init__(
        self,
        seed: int,
        num_states: int = 10,
        num_data: int = 5000,
        noise: float = 0.2,
        gamma: float = 0.9,
        policy_action: float = 0.5,
    ) -> None:
        self.k = num_states
        self.obs_dim = num_states
        self.gamma = gamma
        self.pi_a = policy_action
        k = num_states
        # exact V^pi: V = r_pi + gamma P_pi V
        p_right = (1 + policy_action) / 2
        P = torch.zeros(k, k, dtype=torch.float64)
        for i in range(k):
            P[i, min(i + 1, k - 1)] += p_right
            P[i, max(i - 1, 0)] += 1 - p_right
        r_pi = self._mean_reward(torch.arange(k), torch.full((k,), policy_action)).double()
        self.v = torch.linalg.solve(torch.eye(k, dtype=torch.float64) - gamma * P, r_pi).float()
        g = torch.Generator().manual_seed(10_000 + seed)
        s = torch.randint(0, k, (num_data,), generator=g)
        a = torch.rand(num_data, generator=g) * 2 - 1
        s2 = self._step(s, a, g)
        r = self._mean_reward(s, a) + noise * torch.randn(num_data, generator=g)
        self.data = {
            "obs": self.one_hot(s),
            "act": a.unsqueeze(-1),
            "rew": r,
            "next_obs": self.one_hot(s2),
        }
        grid = torch.linspace(-1, 1, 41)
        states = torch.arange(k)
        ss = states.repeat_interleave(grid.numel())
        aa = grid.repeat(k)
        self.eval_sets = {
            "grid": EvalSet(self.one_hot(ss), aa.unsqueeze(-1), self.q_state(ss, aa)),
            "policy": EvalSet(
                self.one_hot(states),
                torch.full((k, 1), policy_action),
                self.q_state(states, torch.full((k,), policy_action)),
            ),
        }
        self.greedy = GreedyGrid(
            self.one_hot(states), grid.unsqueeze(-1), self.q_state(ss, aa).view(k, -1)
        )

    def one_hot(self, s: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.one_hot(s, self.k).float()

    def _mean_reward(self, s: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return (s == self.k - 1).float() - 0.25 * a.pow(2)

    def _step(self, s: torch.Tensor, a: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        right = torch.rand(s.shape, generator=g) < (1 + a) / 2
        return torch.where(right, (s + 1).clamp(max=self.k - 1), (s - 1).clamp(min=0))

    def q_state(self, s: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """Exact ``Q^pi(s, a)`` for integer states ``s`` and actions ``a``."""
        p = (1 + a) / 2
        v_next = p * self.v[(s + 1).clamp(max=self.k - 1)] + (1 - p) * self.v[(s - 1).clamp(min=0)]
        return self._mean_reward(s, a) + self.gamma * v_next

    def policy(self, obs: torch.Tensor) -> torch.Tensor:
        return torch.full((obs.shape[0], 1), self.pi_a)


def make_problem(name: str, seed: int, **kwargs):
    if name == "bandit":
        return ContextualBandit(seed, **kwargs)
    if name == "chain":
        return ChainMDP(seed, **kwargs)
    raise ValueError(f"unknown problem {name!r}: expected 'bandit' or 'chain'.")


@dataclass
class TrainConfig:
    num_members: int = 10
    beta: float = 0.0
    density: str = "paper"
    steps: int = 2000
    batch_size: int = 256
    hidden: tuple[int, ...] = (64, 64)
    lr: float = 1e-3
    tau: float = 0.05
    target: str = "min"  # chain only: aggregation of the target ensemble ("min" = SAC-N)
    extra: dict = field(default_factory=dict)


def _td(obs: torch.Tensor, act: torch.Tensor) -> TensorDict:
    return TensorDict({"observation": obs, "action": act}, [obs.shape[0]])


METRIC_NAMES = (
    "bias_min",
    "bias_mean",
    "rmse_mean",
    "spread",
    "err_corr",
    "resid_corr",
    "mp_ratio",
    "spqr_kl",
    "spike",
    "accept",
)


def ensemble_metrics(q: torch.Tensor, q_true: torch.Tensor, density: str = "paper") -> dict:
    """Bias, spread and dependence of ensemble values ``q`` ``[N, B]`` against the truth ``[B]``.

    - ``bias_min``: mean over pairs of ``min_k Q_k - Q*`` (the SAC-N estimate's bias);
      ``bias_mean``, ``rmse_mean``: of the ensemble mean;
    - ``spread``: mean over pairs of the std over members;
    - ``err_corr``: mean pairwise Pearson correlation, across pairs, of the members'
      errors ``Q_k - Q*`` (needs the truth; sees errors common to all members);
    - ``resid_corr``, ``mp_ratio``: :func:`~torchrl_spqr.diagnostics.residual_correlation`
      (deviations from the ensemble mean; independent members give ``-1/(N-1)`` and
      about 1);
    - ``spqr_kl``, ``spike``, ``accept``: the SPQR KL (with ``density``), the mean
      largest |eigenvalue| and the acceptance rate of the independence test at level 0.05.
    """
    q = q.detach().double()
    n = q.shape[0]
    err = q - q_true.double()
    e = err - err.mean(1, keepdim=True)
    z = e / e.pow(2).sum(1, keepdim=True).sqrt().clamp_min(1e-300)
    c = z @ z.T
    err_corr = (c.sum() - c.diagonal().sum()) / (n * (n - 1))
    rc = residual_correlation(q)
    qf = q.float()
    return {
        "bias_min": float(err.min(0).values.mean()),
        "bias_mean": float(err.mean(0).mean()),
        "rmse_mean": float(err.mean(0).pow(2).mean().sqrt()),
        "spread": float(ensemble_std(q)),
        "err_corr": float(err_corr),
        "resid_corr": float(rc["mean_pairwise_corr"]),
        "mp_ratio": float(rc["mp_ratio"]),
        "spqr_kl": float(spqr_kl(qf, density=density)),
        "spike": float(spectral_spike(qf).mean()),
        "accept": float(acceptance_rate(qf)),
    }


def diagnostic_density(num_members: int) -> str:
    """Density of the KL *diagnostic* (the same for every arm at a given N): the paper's
    for N <= 10, where both agree on the reachable range up to a constant floor, the
    corrected one for N >= 15."""
    return "corrected" if num_members >= 15 else "paper"


def _greedy_regret(ens: QEnsemble, grid: GreedyGrid) -> float:
    s, a = grid.obs.shape[0], grid.actions.shape[0]
    obs = grid.obs.unsqueeze(1).expand(-1, a, -1).reshape(s * a, -1)
    act = grid.actions.unsqueeze(0).expand(s, -1, -1).reshape(s * a, -1)
    with torch.no_grad():
        q = ens.q_values(_td(obs, act)).view(-1, s, a)
    pick = q.min(0).values.argmax(-1)
    chosen = grid.q_true.gather(1, pick.unsqueeze(1)).squeeze(1)
    return float((grid.q_true.max(1).values - chosen).mean())


def train_ensemble(problem, cfg: TrainConfig, seed: int) -> dict:
    """Train an ``N``-critic ensemble on ``problem``; returns metrics on each eval set.

    Critic loss: ``sum_k mean_b (Q_k(s, a) - y)^2 + beta * spqr_kl(Q(pairs))`` with
    ``y = r`` (bandit) or ``y = r + gamma * min_k Qbar_k(s', pi(s'))`` (chain). The
    SPQR pairs are the authors' default where it exists: the online critics at
    ``(s', pi(s'))`` on the chain; on the bandit (no next state) the data pairs.
    """
    torch.manual_seed(seed)
    n = cfg.num_members
    in_dim = problem.obs_dim + problem.act_dim

    def factory():
        return make_q_member(in_dim, num_cells=cfg.hidden)

    ens = QEnsemble(factory, n)
    target = None
    if problem.bootstrap:
        target = QEnsemble(factory, n)
        target.params.data.copy_(ens.params.data)
    opt = torch.optim.Adam(ens.parameters(), lr=cfg.lr)
    data = problem.data
    num = data["obs"].shape[0]
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    last = {}
    for _step in range(cfg.steps):
        idx = torch.randint(0, num, (cfg.batch_size,), generator=gen)
        obs, act, rew = data["obs"][idx], data["act"][idx], data["rew"][idx]
        b = obs.shape[0]
        if problem.bootstrap:
            nobs = data["next_obs"][idx]
            nact = problem.policy(nobs)
            with torch.no_grad():
                qn = target.q_values(_td(nobs, nact))
                agg = qn.min(0).values if cfg.target == "min" else qn.mean(0)
                y = rew + problem.gamma * agg
            if cfg.beta > 0:  # (s, a) and (s', pi(s')) in one ensemble call
                both = ens.q_values(_td(torch.cat([obs, nobs]), torch.cat([act, nact])))
                q, q_pairs = both[:, :b], both[:, b:]
            else:
                q = ens.q_values(_td(obs, act))
        else:
            y = rew
            q = q_pairs = ens.q_values(_td(obs, act))  # [N, B]
        loss_q = (q - y).pow(2).mean(1).sum()
        loss = loss_q
        if cfg.beta > 0:
            loss = loss + cfg.beta * spqr_kl(q_pairs, density=cfg.density)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if target is not None:
            target.params.data.lerp_(ens.params.data, cfg.tau)
        last = {"loss_q": float(loss_q)}
    wall = time.perf_counter() - t0

    # gradient of the KL relative to the critic loss's, on one batch, at the end
    idx = torch.randint(0, num, (cfg.batch_size,), generator=gen)
    obs, act, rew = data["obs"][idx], data["act"][idx], data["rew"][idx]
    if problem.bootstrap:
        nobs = data["next_obs"][idx]
        nact = problem.policy(nobs)
        with torch.no_grad():
            qn = target.q_values(_td(nobs, nact))
            y = rew + problem.gamma * (qn.min(0).values if cfg.target == "min" else qn.mean(0))
    else:
        y = rew
    params = [p for p in ens.parameters()]
    q = ens.q_values(_td(obs, act))
    g_q = torch.autograd.grad((q - y).pow(2).mean(1).sum(), params)
    q_pairs = ens.q_values(_td(nobs, nact)) if problem.bootstrap else ens.q_values(_td(obs, act))
    g_kl = torch.autograd.grad(spqr_kl(q_pairs, density=cfg.density), params)
    norm = lambda gs: math.sqrt(sum(float(g.pow(2).sum()) for g in gs))  # noqa: E731
    grad_ratio = norm(g_kl) / max(norm(g_q), 1e-30)

    out = {"train_loss_q": last.get("loss_q", math.nan), "wall_s": wall, "grad_ratio": grad_ratio}
    with torch.no_grad():
        for name, es in problem.eval_sets.items():
            qe = ens.q_values(_td(es.obs, es.act))
            for k, v in ensemble_metrics(qe, es.q_true, diagnostic_density(n)).items():
                out[f"{name}_{k}"] = v
    out["greedy_regret"] = _greedy_regret(ens, problem.greedy)
    return out

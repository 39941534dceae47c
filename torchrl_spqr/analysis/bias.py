"""Q-estimation bias of a saved ensemble, measured against Monte Carlo returns (REDQ's test).

Ensembles are there to curb overestimation, so the first question about a trained
ensemble is how far its Q-values are from the returns its policy actually gets. This
module measures it the way REDQ does (Chen, Wang, Zhou, Ross, ICLR 2021, and its code's
``redq/utils/bias_utils.py``):

1. Run the saved policy, **sampling** its actions (the soft Q-function is that of the
   stochastic policy), for whole episodes in the run's environment, and keep each
   action's log-probability.
2. For every visited pair, the discounted return with SAC's entropy bonus, computed
   backwards over the episode (:func:`soft_discounted_returns`):
   ``G_t = r_t + gamma * (G_{t+1} - alpha * log pi(a_{t+1} | s_{t+1}))`` and
   ``G_T = r_T`` at the episode's last step (termination or time limit).
3. Only the first ``cutoff`` pairs of each episode count (REDQ: 350 of 1000 steps), so
   that a time-limit cut at step 1000 changes their return by at most
   ``gamma ** 650 * |Q|`` (0.15% at gamma = 0.99); episodes are drawn until ``states``
   pairs are collected.
4. The estimate is the mean of the N members' Q-values (REDQ's "average Q"); the bias
   of each pair is ``Q - G``, normalised by ``max(|G|, 10)`` (:func:`normalized_bias`).
   Reported: the mean and the standard deviation over pairs of the normalised bias
   (REDQ's "average" and "std" of the normalised Q bias), and the same for the raw bias.

A positive mean is overestimation. The standard deviation says how unevenly the
estimate errs across states, which REDQ argues matters as much as the mean. The bias
of the members' minimum (the target that SAC-Ens uses) is reported beside it.

The first two functions are plain tensor math; :func:`q_estimation_bias` rebuilds a run's
agent with :func:`~torchrl_spqr.training.restore.load_agent` and rolls it out.

Example::

    >>> import torch
    >>> from torchrl_spqr.analysis.bias import soft_discounted_returns
    >>> soft_discounted_returns(torch.tensor([1.0, 1.0, 1.0]), torch.zeros(3), gamma=0.5)
    tensor([1.7500, 1.5000, 1.0000], dtype=torch.float64)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torchrl.envs.utils import ExplorationType, set_exploration_type

from torchrl_spqr.analysis.critics import _ensemble_q
from torchrl_spqr.analysis.stats import mean_sd_text

__all__ = [
    "BiasEstimate",
    "bias_rows",
    "bias_table",
    "normalized_bias",
    "q_estimation_bias",
    "soft_discounted_returns",
]

#: REDQ's floor of the normaliser ``max(|G|, 10)``: returns near 0 would blow the ratio up.
NORMALIZER_FLOOR = 10.0


def soft_discounted_returns(
    rewards: Tensor, log_probs: Tensor, gamma: float, alpha: float = 0.0
) -> Tensor:
    """Discounted returns with SAC's entropy bonus, for every step of one episode.

    ``G_t = r_t + gamma * (G_{t+1} - alpha * log_probs[t+1])``, ``G_T = r_T``: the soft
    return of the pair ``(s_t, a_t)`` (the entropy of the action at ``t`` is not part of
    ``Q(s_t, a_t)``). ``rewards`` and ``log_probs`` are ``[T]``; returns ``[T]`` in float64.
    """
    rewards, log_probs = rewards.reshape(-1), log_probs.reshape(-1)
    if rewards.shape != log_probs.shape:
        raise ValueError(
            f"rewards {tuple(rewards.shape)} and log_probs {tuple(log_probs.shape)} "
            "must have one entry per step of the episode."
        )
    if not (0.0 <= gamma <= 1.0):
        raise ValueError(f"gamma must be in [0, 1], got {gamma}.")
    r, lp = rewards.double(), log_probs.double()
    out = torch.empty_like(r)
    g = 0.0
    for t in range(r.shape[0] - 1, -1, -1):
        g = r[t] if t == r.shape[0] - 1 else r[t] + gamma * (g - alpha * lp[t + 1])
        out[t] = g
    return out


def normalized_bias(q: Tensor, returns: Tensor, floor: float = NORMALIZER_FLOOR) -> Tensor:
    """``(q - returns) / max(|returns|, floor)`` per pair (REDQ's normalised Q bias)."""
    if q.shape != returns.shape:
        raise ValueError(f"q {tuple(q.shape)} and returns {tuple(returns.shape)} differ.")
    return (q.double() - returns.double()) / returns.double().abs().clamp_min(floor)


@dataclass
class BiasEstimate:
    """The Q bias of one run's saved ensemble (see the module docstring)."""

    run: str
    frames: int | None
    states: int  # pairs measured
    episodes: int  # episodes rolled out
    mean_return: float  # mean soft MC return G over the pairs
    mean_q: float  # mean of the ensemble-mean Q over the pairs
    bias: float  # mean of Q - G
    bias_std: float
    norm_bias: float  # mean of (Q - G) / max(|G|, 10)
    norm_bias_std: float
    min_norm_bias: float  # the same with the members' minimum for Q
    min_norm_bias_std: float
    num_members: int
    alpha: float
    gamma: float
    meta: dict[str, Any] = field(default_factory=dict)


def _log_prob_key(td) -> Any:
    keys = [k for k in td.keys(True, True) if "log_prob" in (k if isinstance(k, str) else k[-1])]
    keys = [k for k in keys if not (isinstance(k, tuple) and k[0] == "next")]
    if not keys:
        raise ValueError(
            "the policy's rollout holds no log-probability (an actor built with "
            "return_log_prob=True writes one): the entropy term cannot be computed."
        )
    return keys[0]


def _alpha(base) -> float:
    log_alpha = getattr(base, "log_alpha", None)
    if log_alpha is None:
        raise ValueError(
            f"{type(base).__name__} has no log_alpha: the bias test needs SAC's entropy "
            "coefficient (SAC-Ens, REDQ, SAC-N, EDAC, CQL)."
        )
    return float(torch.as_tensor(log_alpha).detach().exp())


def q_estimation_bias(
    run_dir: str | Path,
    *,
    states: int = 1000,
    cutoff: int = 350,
    horizon: int = 1000,
    seed: int = 0,
) -> BiasEstimate:
    """Roll out the saved policy of ``run_dir`` and measure its ensemble's Q bias.

    Args:
        run_dir: a run folder with a checkpoint (``sota_scripts`` runs, a population's
            agent folders, the examples' runs), rebuilt by ``load_agent``.
        states: pairs to measure (REDQ: 1000); whole episodes are rolled out until the
            first ``cutoff`` pairs of each add up to at least this many.
        cutoff: pairs kept from the start of each episode (REDQ: 350).
        horizon: an episode ends at the environment's own end (termination or its time
            limit) or after this many steps (REDQ's ``max_ep_len``: 1000).
        seed: seed of the policy's samples and of the environment's resets.
    """
    from torchrl_spqr.training.restore import load_agent

    if min(states, cutoff, horizon) < 1:
        raise ValueError(
            f"states, cutoff and horizon must be >= 1, got {states}, {cutoff} and {horizon}."
        )
    run_dir = Path(run_dir)
    torch.manual_seed(seed)
    # dataset=True: an offline run acts in its dataset's environment (make arguments too)
    with load_agent(run_dir, dataset=True) as agent:
        base = agent.base
        alpha = _alpha(base)
        gamma = float(base.value_estimator.gamma)
        env = agent.env
        env.set_seed(seed)
        kept, returns, episodes = [], [], 0
        while sum(r.shape[0] for r in returns) < states:
            with torch.no_grad(), set_exploration_type(ExplorationType.RANDOM):
                ep = env.rollout(horizon, agent.actor, break_when_any_done=True)
            ep = ep.reshape(-1)
            lp_key = _log_prob_key(ep)
            g = soft_discounted_returns(ep["next", "reward"], ep[lp_key], gamma, alpha)
            n = min(cutoff, ep.shape[0])
            kept.append(ep[:n].select("observation", "action"))
            returns.append(g[:n])
            episodes += 1
    pairs = torch.cat(kept)[:states].float()
    g = torch.cat(returns)[:states]
    q = _ensemble_q(base, pairs).double()  # [N, B]
    q_mean, q_min = q.mean(0), q.min(0).values
    nb, nb_min = normalized_bias(q_mean, g), normalized_bias(q_min, g)
    raw = q_mean - g
    return BiasEstimate(
        run=str(run_dir),
        frames=agent.counters.get("frames"),
        states=int(g.shape[0]),
        episodes=episodes,
        mean_return=float(g.mean()),
        mean_q=float(q_mean.mean()),
        bias=float(raw.mean()),
        bias_std=_std(raw),
        norm_bias=float(nb.mean()),
        norm_bias_std=_std(nb),
        min_norm_bias=float(nb_min.mean()),
        min_norm_bias_std=_std(nb_min),
        num_members=int(q.shape[0]),
        alpha=alpha,
        gamma=gamma,
        meta={"algorithm": agent.algorithm, "env": agent.env_id, "beta": agent.beta},
    )


def _std(x: Tensor) -> float:
    return float(x.std()) if x.numel() > 1 else math.nan


#: The columns of ``bias.csv`` (``python -m torchrl_spqr.analysis ... --bias``).
CSV_FIELDS = (
    "arm", "run", "frames", "states", "episodes", "num_members", "alpha", "gamma",
    "mean_return", "mean_q", "bias", "bias_std", "norm_bias", "norm_bias_std",
    "min_norm_bias", "min_norm_bias_std",
)  # fmt: skip


def bias_rows(estimates: list[tuple[str, BiasEstimate]]) -> list[dict[str, Any]]:
    """One ``bias.csv`` row per ``(arm, estimate)``."""
    return [{"arm": arm, **{k: getattr(b, k) for k in CSV_FIELDS[1:]}} for arm, b in estimates]


def bias_table(estimates: list[tuple[str, BiasEstimate]]) -> str:
    """Markdown: per arm, the mean +- sd over its runs of the normalised bias (mean over
    pairs) and of its spread over pairs; then one line per run."""
    import statistics

    def sd(values: list[float], signed: bool = True) -> str:
        return mean_sd_text(values, 3, signed)

    arms: dict[str, list[BiasEstimate]] = {}
    for arm, b in estimates:
        arms.setdefault(arm, []).append(b)
    lines = [
        "| arm | runs | normalised bias, mean over pairs | its std over pairs "
        "| with the members' minimum | mean MC return | mean Q |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm, bs in arms.items():
        lines.append(
            f"| {arm} | {len(bs)} | {sd([b.norm_bias for b in bs])} "
            f"| {sd([b.norm_bias_std for b in bs], False)} | {sd([b.min_norm_bias for b in bs])} "
            f"| {statistics.mean(b.mean_return for b in bs):.1f} "
            f"| {statistics.mean(b.mean_q for b in bs):.1f} |"
        )
    lines += ["", "| run | frames | pairs (episodes) | normalised bias | std | minimum's | alpha |"]
    lines.append("|---|---|---|---|---|---|---|")
    for _, b in estimates:
        lines.append(
            f"| {b.run} | {b.frames} | {b.states} ({b.episodes}) | {b.norm_bias:+.3f} "
            f"| {b.norm_bias_std:.3f} | {b.min_norm_bias:+.3f} | {b.alpha:.4f} |"
        )
    return "\n".join(lines)

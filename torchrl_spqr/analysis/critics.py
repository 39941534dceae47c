"""Q-values of a saved ensemble: rebuild a run's agent and evaluate its critics on a batch.

The agent comes from :func:`torchrl_spqr.training.restore.load_agent` (``sota_scripts``
runs and the examples' runs, read without unpickling anything). The batch comes from the
saved replay buffer, else from the offline dataset named in the config, else from
rolling out the saved policy in the run's environment.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tensordict import TensorDict
from torchrl.envs.utils import ExplorationType, set_exploration_type

from torchrl_spqr.objectives.spqr import SPQRLoss
from torchrl_spqr.training.restore import load_agent

__all__ = ["EnsembleBatch", "checkpoint_q_values"]


@dataclass
class EnsembleBatch:
    """Q-values of a saved ensemble on a batch, and the SPQR settings of its run."""

    q: torch.Tensor  # [N, B]
    num_members: int
    filling: str
    density: str
    rho: float
    eps: float
    pairs: str
    source: str
    label: str
    meta: dict[str, Any] = field(default_factory=dict)
    inputs: Any = None  # the TensorDict of (observation, action) pairs the critics saw


def _rollout(env, policy, steps: int):
    """``steps`` environment steps of ``policy`` (sampling its actions), flattened."""
    with torch.no_grad(), set_exploration_type(ExplorationType.RANDOM):
        td = env.rollout(steps, policy, break_when_any_done=False)
    return td.reshape(-1)


def _ensemble_q(base, td) -> torch.Tensor:
    """``[N, B]`` Q-values of the online critics of ``base`` at the pairs in ``td``: one
    vmapped call over the stacked member parameters (as :class:`QEnsemble` evaluates)."""
    net, params = base.qvalue_network, base.qvalue_network_params.detach()
    key = net.out_keys[0]

    def member(x, p):
        with p.to_module(net, preserve_module_state=False):
            return net(x).get(key)

    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            q = torch.vmap(member, (None, 0))(td.select(*net.in_keys).copy(), params)
    finally:
        net.train(was_training)
    return q.reshape(params.batch_size[0], -1)


def _draw_states(agent, source: str, batch_size: int, rollout_steps: int, gen) -> tuple[Any, str]:
    """``(transitions, where they come from)``: up to ``batch_size`` of them, per ``source``."""
    buffer_td, data = agent.buffer, agent.data
    if source in ("auto", "buffer") and buffer_td is not None:
        n = buffer_td.shape[0]
        td = buffer_td[torch.randperm(n, generator=gen)[: min(batch_size, n)]]
        return td, f"replay buffer of the checkpoint ({n} transitions)"
    if source in ("auto", "dataset") and data is not None:
        return data.buffer.sample(batch_size), "offline dataset of the run"
    if source in ("auto", "rollout"):
        roll = _rollout(agent.env, agent.actor, rollout_steps)
        n = roll.shape[0]
        td = roll[torch.randperm(n, generator=gen)[: min(batch_size, n)]]
        return td, f"rollout of the saved policy ({n} steps)"
    raise ValueError(f"source={source!r} is not available for {agent.run_dir}.")


def checkpoint_q_values(
    run_dir: str | Path,
    *,
    batch_size: int = 512,
    rollout_steps: int = 300,
    pairs: str | None = None,
    source: str = "auto",
    seed: int = 0,
) -> EnsembleBatch:
    """Rebuild a run's agent from its checkpoint and evaluate its critics on a batch.

    Args:
        run_dir: a ``sota_scripts`` run folder (``checkpoint/state.pt`` with the
            config, rebuilt with :func:`torchrl_spqr.training.builders.make_agent`)
            or an ``examples/spqr_demo.py`` / ``examples/redq_spqr.py`` run folder
            (``checkpoint.pt``); see :func:`torchrl_spqr.training.restore.load_agent`.
        batch_size: number of state-action pairs (fewer if fewer are available).
        rollout_steps: environment steps rolled out with the saved (stochastic)
            policy when the states come from a rollout.
        pairs: ``"data"`` (stored or rolled-out ``(s, a)``), ``"next_policy"``
            (``(s', a' ~ pi(s'))``, the authors' SPQR pairs) or ``"policy"``
            (``(s, a ~ pi(s))``); default: the run's ``spqr.pairs``.
        source: ``"auto"`` (replay buffer if saved, else offline dataset, else
            rollout), ``"buffer"``, ``"dataset"`` or ``"rollout"``.
        seed: seed of the batch draw and of the policy's samples.
    """
    if pairs not in (None, "data", "next_policy", "policy"):
        raise ValueError(f"pairs must be 'data', 'next_policy' or 'policy', got {pairs!r}.")
    if source not in ("auto", "buffer", "dataset", "rollout"):
        raise ValueError(
            f"source must be 'auto', 'buffer', 'dataset' or 'rollout', got {source!r}."
        )
    run_dir = Path(run_dir)
    torch.manual_seed(seed)
    with load_agent(run_dir, buffer=True, dataset=True) as agent:
        gen = torch.Generator().manual_seed(seed)
        td, src = _draw_states(agent, source, batch_size, rollout_steps, gen)
    pairs = pairs or agent.spqr["pairs"]
    policy = agent.actor  # td -> td, the trained weights in place
    td = td.to("cpu")
    if pairs == "data":
        q_td = td.select("observation", "action", strict=False)
    else:
        obs = td.get(("next", "observation") if pairs == "next_policy" else "observation")
        q_td = TensorDict({"observation": obs.float()}, batch_size=obs.shape[:1])
        with torch.no_grad(), set_exploration_type(ExplorationType.RANDOM):
            q_td = policy(q_td)
    q_td = q_td.select("observation", "action").float()
    q = _ensemble_q(agent.base, q_td)
    spqr_mod = agent.loss if isinstance(agent.loss, SPQRLoss) else None
    meta = {"algorithm": agent.algorithm, "env": agent.env_id, "beta": agent.beta}
    return EnsembleBatch(
        q=q,
        num_members=q.shape[0],
        filling=agent.spqr["filling"],
        density=agent.spqr["density"],
        rho=spqr_mod.rho if spqr_mod else 0.5,
        eps=spqr_mod.eps if spqr_mod else 0.01,
        pairs=pairs,
        source=src,
        label=run_dir.name,
        meta={**meta, **agent.counters},
        inputs=q_td,
    )

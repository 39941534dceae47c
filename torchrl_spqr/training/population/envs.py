"""The ``K`` agents' training environments, stepped together: :class:`PopulationEnvs`.

Each agent acts in its own environment, built and seeded as its single run builds it.
Two ways to step them, with the same transitions:

* in process (default): the ``K`` environments one after another;
* ``parallel=True``: TorchRL's :class:`~torchrl.envs.ParallelEnv`, one worker process
  per agent, each worker building its environment with the same builder and seed. For
  machines with spare cores (a GPU machine stepping 8 agents while the GPU updates
  them); on a 2-core machine the workers only compete with the update.

Either way the loop sees ``[K]`` tensordicts: :meth:`reset`, :meth:`random_actions`
(each agent's uniform warm-up action, drawn from its own in-process environment's
action spec in agent order, so the draws do not depend on the mode) and
:meth:`step` (``step_and_maybe_reset``: the transitions ``[K]`` and the next steps
``[K]``). :meth:`evaluate` runs every agent's evaluation episodes at once, one
batched policy call per step, each environment stepped only until its agent has its
episodes (so each evaluation environment is reset exactly ``episodes`` times, as a
single run's evaluation resets it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from tensordict import TensorDict, TensorDictBase
from torchrl.envs import EnvBase, ParallelEnv
from torchrl.envs.utils import ExplorationType, set_exploration_type, step_mdp

from torchrl_spqr.training.common import evaluate_policy, return_stats
from torchrl_spqr.training.stop import workers_ignore_stop_signals

__all__ = ["PopulationEnvs"]


class PopulationEnvs:
    """The agents' training environments as one ``[K]`` environment.

    Args:
        envs: the ``K`` in-process environments, as the agents' builders made them
            (their action specs give the warm-up actions; in process they are stepped).
        make_envs: with ``parallel=True``, one zero-argument callable per agent that
            builds (and seeds) that agent's environment exactly as ``envs[k]`` was
            built; it must be picklable (e.g. ``functools.partial`` of a module-level
            builder), since it runs in a worker process.
        parallel: step the agents' environments in a :class:`~torchrl.envs.ParallelEnv`
            (one worker per agent) instead of one after another in this process.

    Examples:
        >>> from functools import partial
        >>> from torchrl.envs import GymEnv
        >>> def make(seed):
        ...     env = GymEnv("Pendulum-v1")
        ...     env.set_seed(seed)
        ...     return env
        >>> envs = PopulationEnvs([make(0), make(1)])
        >>> td = envs.reset()
        >>> td.set("action", envs.random_actions())  # doctest: +ELLIPSIS
        TensorDict(...)
        >>> data, td = envs.step(td)
        >>> data.batch_size, data["next", "reward"].shape
        (torch.Size([2]), torch.Size([2, 1]))
        >>> envs.close()
    """

    def __init__(
        self,
        envs: Sequence[EnvBase],
        make_envs: Sequence[Callable[[], EnvBase]] | None = None,
        *,
        parallel: bool = False,
    ) -> None:
        self.envs = list(envs)
        if not self.envs:
            raise ValueError("PopulationEnvs needs at least one environment, got none.")
        self.parallel = bool(parallel)
        self._penv: ParallelEnv | None = None
        if self.parallel:
            if make_envs is None or len(make_envs) != len(self.envs):
                raise ValueError(
                    f"parallel=True needs one environment builder per agent ({len(self.envs)}), "
                    f"got {None if make_envs is None else len(make_envs)}."
                )
            self._penv = ParallelEnv(len(self.envs), list(make_envs), serial_for_single=True)

    @property
    def num_agents(self) -> int:
        return len(self.envs)

    def reset(self) -> TensorDictBase:
        """Every agent's first step, ``[K]`` (new episodes)."""
        if self._penv is not None:
            with self._workers_start():
                return self._penv.reset()
        return torch.stack([env.reset() for env in self.envs])

    def random_actions(self) -> torch.Tensor:
        """Each agent's uniform random action, ``[K, *action_shape]``, drawn in agent order."""
        return torch.stack([env.action_spec.rand() for env in self.envs])

    def step(self, td: TensorDictBase) -> tuple[TensorDictBase, TensorDictBase]:
        """``step_and_maybe_reset`` of every agent on its row of ``td`` (``[K]``, with actions).

        Returns the transitions ``[K]`` (with ``"next"``) and the agents' next steps
        ``[K]`` (reset where an episode ended).
        """
        if td.batch_size[:1] != torch.Size([self.num_agents]):
            raise ValueError(
                f"step expects a [K={self.num_agents}] tensordict, got {list(td.batch_size)}."
            )
        if self._penv is not None:
            with self._workers_start():
                return self._penv.step_and_maybe_reset(td)
        steps = [env.step_and_maybe_reset(row) for env, row in zip(self.envs, td.unbind(0))]
        data = torch.stack([transition for transition, _ in steps])
        return data, torch.stack([next_td for _, next_td in steps])

    def evaluate(
        self,
        policy: Callable[[TensorDictBase], TensorDictBase],
        episodes: int,
        max_steps: int = 1_000_000,
    ) -> list[list[float]]:
        """Every agent's returns over ``episodes`` episodes, all agents stepped together.

        ``policy`` maps the agents' current steps ``[K]`` to a tensordict holding their
        ``"action"`` ``[K, ...]`` (e.g. :meth:`PopulationUpdate.act` under a
        deterministic exploration type); it is called once per step for all agents.
        Agent ``k``'s environment is reset at the start of each of its episodes and
        stepped until the episode ends (or ``max_steps``), and no more once it has its
        ``episodes`` returns. Returns ``K`` lists of ``episodes`` returns.
        """
        if episodes < 1:
            raise ValueError(f"episodes must be >= 1, got {episodes}.")
        k = self.num_agents
        returns: list[list[float]] = [[] for _ in range(k)]
        running = torch.zeros(k, dtype=torch.float64)
        steps = torch.zeros(k, dtype=torch.long)
        active = torch.ones(k, dtype=torch.bool)
        td = self.reset()
        while bool(active.any()):
            action = policy(td)["action"].to(td.device)
            td.set("action", action)
            out = self._step_rows(td, active)
            reward = out.get(("next", "reward")).reshape(k, -1).sum(-1).double()
            done = out.get(("next", "done")).reshape(k, -1).any(-1)
            running += torch.where(active, reward, torch.zeros_like(reward))
            steps += active.long()
            ended = active & (done | (steps >= max_steps))
            for i in ended.nonzero().flatten().tolist():
                returns[i].append(float(running[i]))
                running[i], steps[i] = 0.0, 0
                if len(returns[i]) == episodes:
                    active[i] = False
            td = step_mdp(out, exclude_action=False)
            restart = ended & active
            if bool(restart.any()):
                td = self._reset_rows(td, restart)
        return returns

    def _step_rows(self, td: TensorDictBase, rows: torch.Tensor) -> TensorDictBase:
        """``env.step`` of the agents in ``rows`` (a ``[K]`` mask); other rows' ``"next"``
        is a placeholder (ignored by :meth:`evaluate`)."""
        if self._penv is not None:
            td.set("_step", rows.clone())
            with self._workers_start():
                out = self._penv.step(td)
            td.del_("_step")
            return out.exclude("_step")
        stepped = {i: self.envs[i].step(td[i].clone()) for i in rows.nonzero().flatten().tolist()}
        template = next(iter(stepped.values()))
        return torch.stack(
            [stepped[i] if i in stepped else template.clone() for i in range(self.num_agents)]
        )

    def _reset_rows(self, td: TensorDictBase, rows: torch.Tensor) -> TensorDictBase:
        """``td`` with the agents in ``rows`` (a ``[K]`` mask) at a fresh episode's start."""
        out = td.clone()
        if self._penv is not None:
            with self._workers_start():
                fresh = self._penv.reset(
                    TensorDict(
                        {"_reset": rows.reshape(-1, 1).clone()}, batch_size=[self.num_agents]
                    )
                )
            for key in fresh.keys(True, True):
                if key in out.keys(True, True):
                    value = out.get(key)
                    mask = rows.reshape(-1, *([1] * (value.dim() - 1)))
                    out.set(key, torch.where(mask, fresh.get(key).to(value.dtype), value))
            return out
        for i in rows.nonzero().flatten().tolist():
            fresh = self.envs[i].reset()
            for key in fresh.keys(True, True):
                if key in out.keys(True, True):
                    out.get(key)[i] = fresh.get(key)
        return out

    @contextmanager
    def _workers_start(self) -> Iterator[None]:
        """Around a call to the ``ParallelEnv``: its first call starts the worker processes,
        which then leave Ctrl-C and SIGTERM to this process (``workers_ignore_stop_signals``)."""
        if self._penv is not None and self._penv.is_closed:
            with workers_ignore_stop_signals():
                yield
        else:
            yield

    def close(self) -> None:
        """Stop the worker processes (parallel) and close the environments."""
        if self._penv is not None and not self._penv.is_closed:
            self._penv.close()
        for env in self.envs:
            if not env.is_closed:
                env.close()


class PopulationEvaluator:
    """Each agent's evaluation return (mean, sd over ``episodes`` deterministic episodes).

    ``batched=False`` (default): agent ``k`` alone, as its single run evaluates: its
    networks written into its own actor (``population.write_agent``), then
    :func:`~torchrl_spqr.training.common.evaluate_policy` on its evaluation environment.
    ``batched=True``: at the first agent's call for a given ``at`` (the run's
    ``(frames, updates)``), every agent's episodes at once (:meth:`PopulationEnvs.evaluate`:
    one vmapped policy call per step, each environment reset and stepped as the single
    evaluation would), the other agents' calls at the same ``at`` reading the results.
    The same returns up to the float round-off of the vmapped policy (which, over long
    episodes, can move a return). ``parallel=True`` steps the evaluation environments
    in worker processes (needs ``make_envs``, as :class:`PopulationEnvs`).
    ``evaluate_one(env, actor, episodes)`` is the one-agent evaluation (default
    :func:`~torchrl_spqr.training.common.evaluate_policy`).
    """

    def __init__(
        self,
        population,
        eval_envs: Sequence[EnvBase],
        actors: Sequence[torch.nn.Module],
        losses: Sequence[torch.nn.Module],
        episodes: int,
        *,
        batched: bool = False,
        make_envs: Sequence[Callable[[], EnvBase]] | None = None,
        parallel: bool = False,
        evaluate_one: Callable[..., tuple[float, float]] = evaluate_policy,
    ) -> None:
        self.population, self.episodes = population, int(episodes)
        self.evaluate_one = evaluate_one
        self.eval_envs, self.actors, self.losses = list(eval_envs), list(actors), list(losses)
        self.envs = PopulationEnvs(eval_envs, make_envs, parallel=parallel) if batched else None
        self._at: object = None
        self._results: list[tuple[float, float]] = []

    def __call__(self, k: int, at: object = None) -> tuple[float, float]:
        if self.envs is None:
            self.population.write_agent(k, self.losses[k])  # agent k's networks, its actor
            return self.evaluate_one(self.eval_envs[k], self.actors[k], self.episodes)
        if self._at is None or self._at != at:
            device = self.population.device
            with torch.no_grad(), set_exploration_type(ExplorationType.DETERMINISTIC):
                returns = self.envs.evaluate(
                    lambda td: self.population.act(td.to(device)), self.episodes
                )
            self._results = [return_stats(r) for r in returns]
            self._at = at
        return self._results[k]

    def close(self) -> None:
        if self.envs is not None:
            self.envs.close()

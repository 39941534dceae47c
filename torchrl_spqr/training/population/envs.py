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
``[K]``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from tensordict import TensorDictBase
from torchrl.envs import EnvBase, ParallelEnv

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
            return self._penv.step_and_maybe_reset(td)
        steps = [env.step_and_maybe_reset(row) for env, row in zip(self.envs, td.unbind(0))]
        data = torch.stack([transition for transition, _ in steps])
        return data, torch.stack([next_td for _, next_td in steps])

    def close(self) -> None:
        """Stop the worker processes (parallel) and close the environments."""
        if self._penv is not None and not self._penv.is_closed:
            self._penv.close()
        for env in self.envs:
            if not env.is_closed:
                env.close()

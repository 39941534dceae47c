"""Episodes: roll a policy out in a Gymnasium env, or cut a replay buffer / dataset into episodes.

The builder's raw material (:class:`Episode`: float32 observations, actions and rewards,
terminations and time-limit truncations kept apart), the uniform random policy of the
``random`` recipe and of ``ref_min_score``, and mean returns for reference scores.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from torchrl_spqr.data.errors import _unavailable
from torchrl_spqr.data.store import (
    _check_hdf5,
    _corrupted,
    _exists_locally,
    _guess_build_command,
    _local_h5,
    minari_datasets_path,
)

if TYPE_CHECKING:  # pragma: no cover
    from tensordict import TensorDictBase

__all__ = ["Episode", "episodes_from_replay"]

_RANDOM_REF_SEED = 123_456  # fixed: every split of one env gets the same ref_min_score


class _UniformPolicy:
    """Uniform random actions from ``space``, seeded once: the ``random`` recipe's policy."""

    def __init__(self, space, seed: int) -> None:
        self.space = space
        self.space.seed(seed)

    def __call__(self, obs):
        return self.space.sample()


@dataclass
class Episode:
    """One episode: ``T`` transitions and the ``T + 1`` observations they pass through."""

    observations: np.ndarray  # [T + 1, obs_dim] float32
    actions: np.ndarray  # [T, act_dim] float32
    rewards: np.ndarray  # [T] float32
    terminations: np.ndarray  # [T] bool
    truncations: np.ndarray  # [T] bool
    seed: int | None = None

    def __len__(self) -> int:
        return int(self.rewards.shape[0])


def _make_env(env_id: str, max_episode_steps: int | None, env_kwargs: dict | None = None):
    import gymnasium as gym

    kwargs = dict(env_kwargs or {})
    if max_episode_steps:
        kwargs["max_episode_steps"] = int(max_episode_steps)
    return gym.make(env_id, **kwargs)


def _rollout_steps(
    env,
    policy: Callable,
    steps: int,
    seed: int,
    noise: float = 0.0,
) -> list[Episode]:
    """Exactly ``steps`` transitions; the trailing incomplete episode is marked truncated."""
    rng = np.random.default_rng(seed)
    low, high = env.action_space.low, env.action_space.high
    episodes: list[Episode] = []
    total, first = 0, True
    while total < steps:
        ep_seed = seed if first else None
        obs, _ = env.reset(seed=ep_seed)
        first = False
        Ob, A, R, Te, Tr = [obs], [], [], [], []
        while True:
            a = np.asarray(policy(obs), dtype=np.float32)
            if noise > 0:
                a = np.clip(a + noise * rng.standard_normal(a.shape), low, high).astype(np.float32)
            obs, r, term, trunc, _ = env.step(a)
            Ob.append(obs)
            A.append(a)
            R.append(r)
            Te.append(bool(term))
            Tr.append(bool(trunc) and not term)
            total += 1
            if term or trunc:
                break
            if total >= steps:
                Tr[-1] = True  # D4RL's timeouts flag on the cut-off last episode
                break
        episodes.append(
            Episode(
                np.asarray(Ob, dtype=np.float32),
                np.asarray(A, dtype=np.float32),
                np.asarray(R, dtype=np.float32),
                np.asarray(Te, dtype=bool),
                np.asarray(Tr, dtype=bool),
                ep_seed,
            )
        )
    return episodes


def _mean_return(env, policy: Callable, episodes: int, seed: int) -> float:
    returns = []
    for i in range(episodes):
        obs, _ = env.reset(seed=seed + i)
        ret, done = 0.0, False
        while not done:
            obs, r, term, trunc, _ = env.step(np.asarray(policy(obs), dtype=np.float32))
            ret += float(r)
            done = term or trunc
        returns.append(ret)
    return float(np.mean(returns))


def _random_ref_score(env, episodes: int) -> float:
    return _mean_return(
        env, _UniformPolicy(env.action_space, _RANDOM_REF_SEED), episodes, _RANDOM_REF_SEED
    )


def episodes_from_replay(
    data: TensorDictBase, meta: Mapping[str, Any], steps: int | None = None
) -> list[Episode]:
    """The transitions of a replay buffer (an online run's) as chronological episodes.

    ``data`` is the buffer's storage (``[len, ...]`` transitions, TorchRL's layout) and
    ``meta`` its ``len`` and writer ``cursor`` (a run's checkpoint records both).

    Order: the ring buffer is unrolled from its writer cursor (oldest first). Boundaries:
    ``("next", "done" | "terminated" | "truncated")``, a change of
    ``("collector", "traj_ids")`` and any break in ``next.observation[t] ==
    observation[t + 1]``; a boundary that is not a termination is a truncation (so the
    trailing incomplete episode is marked truncated). ``steps`` keeps the first ``steps``
    transitions (D4RL's medium-replay stops where the run reached "medium").
    """
    n = int(meta["len"])
    cursor = int(meta.get("cursor", n))
    if n and cursor % n:  # a full ring buffer: the oldest transition sits at the cursor
        order = torch.cat([torch.arange(cursor % n, n), torch.arange(0, cursor % n)])
    else:
        order = torch.arange(n)
    traj = None
    if ("collector", "traj_ids") in data.keys(include_nested=True):
        traj = data.get(("collector", "traj_ids")).reshape(n)[order]
        perm = torch.sort(traj, stable=True).indices  # several envs: group per trajectory
        order, traj = order[perm], traj[perm]
    if steps is not None:
        order = order[: int(steps)]
        traj = None if traj is None else traj[: int(steps)]
    m = order.numel()

    def col(key, dtype):
        return data.get(key)[order].reshape(m, -1).to(dtype).numpy()

    obs = col("observation", torch.float32)
    nxt = col(("next", "observation"), torch.float32)
    act = col("action", torch.float32)
    rew = col(("next", "reward"), torch.float32).reshape(m)
    keys = data.keys(include_nested=True)
    term = (
        col(("next", "terminated"), torch.bool).reshape(m)
        if ("next", "terminated") in keys
        else np.zeros(m, bool)
    )
    trunc = (
        col(("next", "truncated"), torch.bool).reshape(m)
        if ("next", "truncated") in keys
        else np.zeros(m, bool)
    )
    done = (
        col(("next", "done"), torch.bool).reshape(m) if ("next", "done") in keys else term | trunc
    )
    boundary = done | term | trunc
    if m > 1:
        broken = ~np.all(np.isclose(nxt[:-1], obs[1:], rtol=0, atol=1e-6), axis=-1)
        boundary[:-1] |= broken
        if traj is not None:
            t = traj.numpy()
            boundary[:-1] |= t[1:] != t[:-1]
    if m:
        boundary[-1] = True
    trunc = boundary & ~term
    episodes = []
    start = 0
    for end in np.flatnonzero(boundary):
        sl = slice(start, end + 1)
        episodes.append(
            Episode(
                np.concatenate([obs[sl], nxt[end : end + 1]], axis=0),
                act[sl],
                rew[sl],
                term[sl].copy(),
                trunc[sl].copy(),
            )
        )
        start = end + 1
    return episodes


def _episodes_from_minari(dataset_id: str) -> tuple[list[Episode], dict[str, Any]]:
    import minari

    if not _exists_locally(dataset_id):
        raise _unavailable(
            dataset_id,
            [f"local Minari dataset {minari_datasets_path() / dataset_id}: not found"],
            [f"build it first: {_guess_build_command(dataset_id)}"],
        )
    _check_hdf5(dataset_id)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = minari.load_dataset(dataset_id)
            raw = list(ds.iterate_episodes())
    except (OSError, KeyError, ValueError, TypeError) as err:
        raise _corrupted(dataset_id, _local_h5(dataset_id), err) from err
    episodes = []
    for ep in raw:
        if not isinstance(ep.observations, np.ndarray):
            raise ValueError(f"{dataset_id}: medium-expert needs array observations.")
        episodes.append(
            Episode(
                np.asarray(ep.observations, np.float32),
                np.asarray(ep.actions, np.float32),
                np.asarray(ep.rewards, np.float32),
                np.asarray(ep.terminations, bool),
                np.asarray(ep.truncations, bool),
            )
        )
    return episodes, dict(ds.storage.metadata)

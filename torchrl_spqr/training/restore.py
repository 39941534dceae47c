"""Rebuild a trained agent from a run folder: :func:`load_agent`, and policies built on it.

Two kinds of run folders hold an agent:

- the ``sota_scripts`` runs: ``checkpoint/`` (``state.pt`` holds the run's config, the
  loss's state dict and counters; ``buffer/`` the replay buffer), verified against its
  manifest and read by :mod:`torchrl_spqr.training.checkpoint`. The agent is rebuilt
  from the saved config with the builders of :mod:`torchrl_spqr.training.builders`. An
  agent of a population keeps no buffer of its own: its transitions are its slice of the
  population's buffer, in the population checkpoint beside its folder;
- the runs of ``examples/spqr_demo.py`` and ``examples/redq_spqr.py``: ``checkpoint.pt``
  holds the actor's and the loss's state dicts and the script's arguments (``"args"``).
  Checkpoints written before the examples saved their arguments are read from the run
  folder's name, the only place those kept them.

Nothing is unpickled: state files are read with ``torch.load(weights_only=True)``
(:func:`torchrl_spqr.safe_io.load_state`), the replay buffer as a memmap of plain tensors.
"""

from __future__ import annotations

import contextlib
import os
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:  # pragma: no cover
    from torchrl_spqr.data.episodes import Episode

__all__ = [
    "RestoredAgent",
    "RunFolders",
    "load_agent",
    "load_policy_from_run",
    "run_config",
    "run_episodes",
]

#: Offset of the seed of the environment a restored agent gets (not one the run used).
ENV_SEED_OFFSET = 20_000

#: Run-folder names of the examples' checkpoints that predate their saved ``"args"``.
_EXAMPLE_NAMES = {
    "examples/spqr_demo.py": re.compile(
        r"spqr_sac_ens_(?P<env>.+)_N(?P<ensemble>\d+)_beta(?P<beta>[^_]+)_seed(?P<seed>\d+)"
    ),
    "examples/redq_spqr.py": re.compile(
        r"redq_spqr_(?P<env>.+)_N(?P<ensemble>\d+)_M(?P<subset>\d+)_G(?P<utd>\d+)"
        r"_beta(?P<beta>[^_]+)_seed(?P<seed>\d+)"
    ),
}
#: Buffers the examples' losses register at their first update (absent from early saves).
_LAZY_KEYS = ("target_entropy", "_value_estimator")


@dataclass
class RestoredAgent:
    """A trained agent rebuilt from its run folder (see :func:`load_agent`).

    Attributes:
        actor: the policy module with the trained weights in place (the loss's actor).
        loss: the run's loss module with its saved state (an ``SPQRLoss`` when the run
            wrapped its loss, else the algorithm's loss).
        base: the algorithm's loss (``loss`` itself when not wrapped): its
            ``actor_network_params`` / ``qvalue_network_params`` are the trained ones.
        config: the run's settings: the Hydra config (plain dict) of a ``sota_scripts``
            run, ``{"script": ..., "args": {...}}`` of an example run.
        env_id: the Gymnasium id the agent acts in.
        env: that environment (TorchRL ``EnvBase``), seeded apart from the run's seeds;
            :meth:`close` it when done.
        script: ``"sota_scripts"``, ``"examples/spqr_demo.py"`` or ``"examples/redq_spqr.py"``.
        algorithm: a label of the algorithm (``"sac_ens"``, ``"redq M=2 G=20 (...)"``, ...).
        spqr: SPQR's ``pairs``, ``filling`` and ``density`` settings of the run.
        counters: ``frames`` / ``updates`` at the checkpoint (empty when not saved).
        buffer: the saved replay buffer's transitions (``load_agent(buffer=True)``), or None.
        data: the run's offline dataset (``OfflineData``) when it was loaded, or None.
        run_dir: the run folder.
    """

    actor: Any
    loss: Any
    base: Any
    config: dict[str, Any]
    env_id: str
    env: Any
    script: str
    algorithm: str
    spqr: dict[str, str]
    counters: dict[str, Any] = field(default_factory=dict)
    buffer: Any = None
    data: Any = None
    run_dir: Path | None = None

    @property
    def beta(self) -> float | None:
        """SPQR's weight of the run (None when the run did not wrap its loss)."""
        beta = getattr(self.loss, "beta", None)
        return None if beta is None else float(beta)

    def close(self) -> None:
        """Close the environment."""
        if self.env is not None and not self.env.is_closed:
            self.env.close()

    def __enter__(self) -> RestoredAgent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load_agent(
    run_dir: str | os.PathLike,
    *,
    device: torch.device | str = "cpu",
    buffer: bool = False,
    dataset: bool = False,
) -> RestoredAgent:
    """Rebuild the agent saved in ``run_dir`` (a ``sota_scripts`` or an examples' run folder).

    Args:
        run_dir: the run folder: it holds ``checkpoint/`` (``sota_scripts``) or
            ``checkpoint.pt`` (``examples/spqr_demo.py``, ``examples/redq_spqr.py``).
        device: where the loss (and so the actor) is put; the environment steps on CPU.
        buffer: also read the saved replay buffer (``sota_scripts`` runs) into ``.buffer``;
            for an agent of a population (``sac_ens_spqr_population.py``), its transitions
            in the population's buffer, if that checkpoint is at the agent's step.
        dataset: also load the run's offline dataset (``dataset.id`` of its config) into
            ``.data``. It is loaded in any case when the config names no ``env.name``
            (the dataset names the environment).

    Raises:
        FileNotFoundError: no checkpoint in ``run_dir``.
        ValueError: the checkpoint holds no settings to rebuild the agent from, or its
            state dict does not fit the agent those settings describe.
    """
    from torchrl_spqr.training.checkpoint import has_checkpoint

    run_dir = Path(run_dir)
    if has_checkpoint(run_dir):  # the newest complete one is chosen (and verified) on load
        agent = _load_sota(run_dir, buffer=buffer, dataset=dataset)
    elif (run_dir / "checkpoint.pt").is_file():
        agent = _load_example(run_dir, run_dir / "checkpoint.pt")
    else:
        raise FileNotFoundError(
            f"No checkpoint in {run_dir}: expected checkpoint/state.pt (sota_scripts runs) or "
            "checkpoint.pt (examples/spqr_demo.py, examples/redq_spqr.py)."
        )
    agent.run_dir = run_dir
    agent.loss.to(device)
    net = agent.base.actor_network  # the trained weights put in place for good
    agent.base.actor_network_params.detach().to_module(net)
    agent.actor = net
    return agent


def _spqr_settings(loss: Any) -> dict[str, str]:
    from torchrl_spqr.objectives.spqr import SPQRLoss

    if isinstance(loss, SPQRLoss):
        return {"pairs": loss.pairs, "filling": loss.filling, "density": loss.density}
    return {"pairs": "next_policy", "filling": "ordered", "density": "paper"}


def _load_sota(run_dir: Path, *, buffer: bool, dataset: bool) -> RestoredAgent:
    """The agent of a ``sota_scripts`` run, rebuilt from the config in its checkpoint."""
    from torchrl_spqr.training import builders as B
    from torchrl_spqr.training.checkpoint import load_checkpoint_data
    from torchrl_spqr.training.config import resolve_config

    # verified against its manifest; the buffer read without unpickling anything
    state, buffer_td, ck_dir = load_checkpoint_data(run_dir, buffer=buffer)
    cfg = state.get("config")
    if not cfg:
        raise ValueError(f"{ck_dir}/state.pt holds no 'config': cannot rebuild the agent.")
    if cfg.get("algorithm") == "masac":
        raise ValueError(
            f"{run_dir} is a multi-agent (masac) run: load_agent rebuilds single-agent runs "
            "(sota_scripts sac_ens, redq, sac_n, edac, cql) and the examples' runs."
        )
    rcfg = resolve_config(cfg, "any", check=False)  # types converted, defaults filled
    env_name = rcfg.env.name
    dataset_id = rcfg.dataset.id if "dataset" in rcfg else None
    if not env_name and not dataset_id:
        raise ValueError(f"{run_dir}: the config names neither env.name nor dataset.id.")
    data, env_kwargs = None, None
    if not env_name or (dataset and dataset_id):
        from torchrl_spqr.training.offline import make_offline_data

        try:  # offline run: the dataset holds the states (and names the environment)
            data = make_offline_data(rcfg)
        except Exception as err:
            if not env_name:
                raise ValueError(
                    f"{run_dir}: the config names no env.name and the dataset "
                    f"{dataset_id!r} could not be loaded ({err})."
                ) from err
        else:
            env_kwargs = getattr(data, "env_kwargs", None)
    seed = int(rcfg.seed) + ENV_SEED_OFFSET
    if env_name and env_kwargs is None:
        env = B.make_environment(rcfg, seed)
    else:
        env_name = env_name or data.env_id
        env_cfg = {"env": {"name": env_name, "max_episode_steps": rcfg.env.max_episode_steps}}
        env = B.make_environment(env_cfg, seed, env_kwargs=env_kwargs)
    try:
        # no optimisers: a restored agent is not trained further, and its config may lack them
        actor = B.make_actor(rcfg, env)
        loss, base = B.make_loss_module(rcfg, actor, B.make_critics(rcfg, env), env.action_spec)
        loss.load_state_dict(state["loss"])
    except Exception:
        env.close()
        raise
    counters = state.get("counters", {})
    if buffer and buffer_td is None:
        buffer_td = _population_buffer(run_dir, counters)
    return RestoredAgent(
        actor=actor,
        loss=loss,
        base=base,
        config=cfg,
        env_id=str(env_name),
        env=env,
        script="sota_scripts",
        algorithm=str(rcfg.algorithm),
        spqr={name: str(rcfg.spqr[name]) for name in ("pairs", "filling", "density")},
        counters={k: counters[k] for k in ("frames", "updates") if k in counters},
        buffer=buffer_td,
        data=data,
    )


def _population_buffer(run_dir: Path, counters: dict[str, Any]) -> Any:
    """A population agent's transitions: its slice ``[:, k]`` of the population's buffer.

    The population checkpoint (``run_dir.parent/checkpoint``) lists its agents by folder
    name, in the order of the buffer's agent dimension. None when ``run_dir`` is not one of
    them or that checkpoint holds no buffer; also None, with a warning, when the
    population checkpoint is not at the agent's step (a run stopped between the two
    writes).
    """
    from torchrl_spqr.training.checkpoint import has_checkpoint, load_checkpoint_data

    folder = run_dir.resolve()
    if not has_checkpoint(folder.parent):
        return None
    state, data, ck_dir = load_checkpoint_data(folder.parent, buffer=True)
    agents = state.get("agents")
    if data is None or not isinstance(agents, dict) or folder.name not in agents:
        return None
    saved = (agents[folder.name] or {}).get("counters", {})
    if saved.get("frames") != counters.get("frames"):
        warnings.warn(
            f"{run_dir}: the population checkpoint {ck_dir} is at frame {saved.get('frames')}, "
            f"the agent's at {counters.get('frames')}: its replay buffer is not used.",
            UserWarning,
            stacklevel=3,
        )
        return None
    return data[:, list(agents).index(folder.name)]


def _example_settings(run_dir: Path, path: Path, state: dict) -> tuple[str, dict[str, Any]]:
    """``(script, args)`` of an examples' checkpoint: its saved ``"args"``, else its folder name."""
    args = state.get("args")
    if isinstance(args, dict) and args:
        script = "examples/redq_spqr.py" if "subset" in args else "examples/spqr_demo.py"
        missing = [k for k in ("env", "ensemble", "beta", "seed", "hidden") if k not in args]
        if script.endswith("redq_spqr.py"):
            missing += [k for k in ("subset", "utd") if k not in args]
        if missing:
            raise ValueError(f"{path}: its saved arguments lack {missing}.")
        return script, dict(args)
    found = [(sc, pat.fullmatch(run_dir.name)) for sc, pat in _EXAMPLE_NAMES.items()]
    found = [(sc, m) for sc, m in found if m is not None]
    if not found:
        raise ValueError(
            f"{path} looks like a checkpoint of the examples but holds no saved arguments, and "
            f"the folder name {run_dir.name!r} matches neither "
            "spqr_sac_ens_<env>_N<N>_beta<b>_seed<s> (examples/spqr_demo.py) nor "
            "redq_spqr_<env>_N<N>_M<M>_G<G>_beta<b>_seed<s> (examples/redq_spqr.py), which is "
            "where they kept their settings."
        )
    script, m = found[0]
    args: dict[str, Any] = dict(m.groupdict())
    actor_w = [v for k, v in state["actor"].items() if k.endswith("weight")]
    args["hidden"] = int(actor_w[0].shape[0])  # not in the name: read from the weights
    return script, args


def _load_example(run_dir: Path, path: Path) -> RestoredAgent:
    """The agent of an ``examples/spqr_demo.py`` or ``examples/redq_spqr.py`` run."""
    from torchrl_spqr.modules import QEnsemble, make_q_member
    from torchrl_spqr.objectives import EnsembleSACLoss, ReferenceREDQLoss
    from torchrl_spqr.objectives.spqr import SPQRLoss
    from torchrl_spqr.safe_io import load_state
    from torchrl_spqr.training import builders as B

    state = load_state(path)  # torch.load(weights_only=True), a clear error if damaged
    if not isinstance(state, dict) or not {"actor", "loss"} <= state.keys():
        raise ValueError(f"{path} is not a checkpoint of the examples (no 'actor' / 'loss').")
    script, args = _example_settings(run_dir, path, state)
    hidden, n = int(args["hidden"]), int(args["ensemble"])
    cfg = {  # sac_ens's network defaults are the examples' actor (TorchRL init, softplus scale)
        "algorithm": "sac_ens",
        "env": {"name": str(args["env"])},
        "network": {"hidden_sizes": [hidden, hidden], "ensemble_size": n},
    }
    env = B.make_environment(cfg, int(args["seed"]) + ENV_SEED_OFFSET)
    try:
        actor = B.make_actor(cfg, env)
        n_in = env.observation_spec["observation"].shape[-1] + env.action_spec.shape[-1]
        critics = QEnsemble(lambda: make_q_member(n_in, num_cells=(hidden, hidden)), n)
        if script.endswith("redq_spqr.py"):
            base = ReferenceREDQLoss(
                actor,
                critics,
                sub_sample_len=int(args["subset"]),
                policy_update_delay=int(args["utd"]),
                target_entropy=-float(env.action_spec.shape[-1]),  # the state dict's replaces it
                action_spec=env.action_spec,
            )
            algorithm = f"redq M={args['subset']} G={args['utd']} ({script})"
        else:
            base = EnsembleSACLoss(
                actor, critics.members(), num_qvalue_nets=n, loss_function="l2",
                action_spec=env.action_spec,
            )  # fmt: skip
            base.make_value_estimator(gamma=0.99)  # as the demo; gamma itself is in the state
            algorithm = f"sac_ens ({script})"
        loss = SPQRLoss(base, beta=float(args["beta"])) if n >= 3 else base
        res = loss.load_state_dict(state["loss"], strict=False)
    except Exception:
        env.close()
        raise
    bad = [
        k for k in (*res.missing_keys, *res.unexpected_keys) if not any(s in k for s in _LAZY_KEYS)
    ]
    if bad:
        env.close()
        raise ValueError(f"{path}: state dict does not match the {script} agent ({bad[:5]}).")
    counters = {k: state[k] for k in ("frames", "updates") if k in state}
    return RestoredAgent(
        actor=actor,
        loss=loss,
        base=base,
        config={"script": script, "args": args},
        env_id=str(args["env"]),
        env=env,
        script=script,
        algorithm=algorithm,
        spqr=_spqr_settings(loss),
        counters=counters,
    )


def load_policy_from_run(run_dir: str | os.PathLike) -> Callable[[np.ndarray], np.ndarray]:
    """The deterministic actor (tanh of the Gaussian mean) of a run, as ``obs -> action``.

    The agent is rebuilt by :func:`load_agent`. Accepts one observation ``[obs_dim]`` or a
    batch ``[..., obs_dim]``; returns float32 actions clipped to the action space. The
    callable carries ``run_dir`` and ``env_id``.
    """
    from tensordict import TensorDict
    from torchrl.envs.utils import ExplorationType, set_exploration_type

    with load_agent(run_dir) as agent:
        spec = agent.env.action_spec
        low = spec.space.low.cpu().numpy()
        high = spec.space.high.cpu().numpy()
        obs_dim = int(agent.env.observation_spec["observation"].shape[-1])
    net = agent.actor
    net.eval()

    def full(x: torch.Tensor) -> torch.Tensor:
        td = TensorDict({"observation": x}, batch_size=x.shape[:-1])
        with set_exploration_type(ExplorationType.DETERMINISTIC):
            return net(td)["action"]

    # The TanhNormal actor's deterministic action is low + (high - low) * (tanh(loc) + 1) / 2
    # (its transforms applied to the Gaussian mean). Calling the MLP directly is ~10x faster
    # per observation than the ProbabilisticActor; it is used only if it matches exactly.
    forward = full
    with contextlib.suppress(Exception), torch.no_grad():
        mlp = net.module[0].module
        lo_t, hi_t = torch.as_tensor(low), torch.as_tensor(high)

        def fast(x: torch.Tensor) -> torch.Tensor:
            loc = mlp(x)[0]
            return (hi_t + lo_t) / 2 + (hi_t - lo_t) / 2 * torch.tanh(loc)

        probe = 3 * torch.randn(16, obs_dim)
        if torch.allclose(fast(probe), full(probe), rtol=1e-5, atol=1e-6):
            forward = fast

    def policy(obs: np.ndarray) -> np.ndarray:
        x = torch.as_tensor(np.asarray(obs), dtype=torch.float32)
        with torch.no_grad():
            action = forward(x)
        return np.clip(action.numpy().astype(np.float32), low, high)

    policy.run_dir = str(run_dir)  # type: ignore[attr-defined]
    policy.env_id = agent.env_id  # type: ignore[attr-defined]
    return policy


# ------------------------------------------------------------------ run folders as dataset sources
def run_config(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The config saved in a ``sota_scripts`` run's checkpoint (empty when none was saved)."""
    from torchrl_spqr.training.checkpoint import load_checkpoint

    return dict(load_checkpoint(Path(run_dir)).get("config") or {})


def run_episodes(run_dir: str | os.PathLike, steps: int | None = None) -> list[Episode]:
    """The replay buffer saved with a run's checkpoint, as chronological episodes.

    Read from the newest complete checkpoint (verified; nothing unpickled) and cut into
    episodes by :func:`torchrl_spqr.data.episodes_from_replay`: the first ``steps``
    transitions when given.
    """
    from torchrl_spqr.data.episodes import episodes_from_replay
    from torchrl_spqr.training.checkpoint import load_checkpoint_data

    run_dir = Path(run_dir)
    state, data, ck = load_checkpoint_data(run_dir)
    if data is None:
        raise ValueError(f"{run_dir} holds no replay buffer (expected {ck / 'buffer'}).")
    return episodes_from_replay(data, state.get("buffer_meta") or {}, steps)


class RunFolders:
    """The dataset builder's reader of run folders (a :class:`torchrl_spqr.data.RunReader`).

    ``build_dataset(..., policy=RUN_DIR, runs=RunFolders())`` (and ``source_run`` /
    ``expert_run``): the policy is :func:`load_policy_from_run`, the config
    :func:`run_config`, the replay buffer :func:`run_episodes`.
    """

    def policy(self, run_dir: str | os.PathLike) -> Callable[[np.ndarray], np.ndarray]:
        """The run's deterministic actor: :func:`load_policy_from_run`."""
        return load_policy_from_run(run_dir)

    def config(self, run_dir: str | os.PathLike) -> dict[str, Any]:
        """The run's saved config: :func:`run_config`."""
        return run_config(run_dir)

    def episodes(self, run_dir: str | os.PathLike, steps: int | None = None) -> list[Episode]:
        """The run's replay buffer as episodes: :func:`run_episodes`."""
        return run_episodes(run_dir, steps)

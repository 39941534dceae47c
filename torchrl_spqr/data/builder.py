"""Build D4RL-style offline datasets locally, written as Minari datasets.

D4RL's recipes (:data:`~torchrl_spqr.data.scores.KINDS`) on Gymnasium MuJoCo envs, written
with ``minari.create_dataset_from_buffers`` (h5py is enough): ``random`` (uniform random
actions), ``medium`` / ``expert`` (roll out a policy), ``medium-replay`` / ``full-replay``
(the replay buffer of an online run), ``medium-expert`` (two local datasets concatenated).
The command line is :mod:`torchrl_spqr.data.cli` (``python -m torchrl_spqr.data build``).

Each built dataset records ``ref_min_score`` (mean return of a uniform random policy over
``ref_episodes`` episodes, unless given) and ``ref_max_score`` (given; else the mean return
of the expert policy for ``expert`` / ``full-replay`` / ``expert_run``; else D4RL's
published expert score for the env family) in its Minari metadata, and its recipe in the
description.

Every argument is checked before anything is built, and an error names the value and what
to pass instead. The dataset is written aside and swapped in only once complete
(:mod:`torchrl_spqr.data.store`): ``overwrite`` replaces exactly the one dataset named, and
a build killed at any instant leaves the id holding either its previous dataset or the
complete new one.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from torchrl_spqr.data.episodes import (
    _RANDOM_REF_SEED,
    _episodes_from_minari,
    _make_env,
    _mean_return,
    _random_ref_score,
    _rollout_steps,
    _UniformPolicy,
)
from torchrl_spqr.data.errors import _unavailable
from torchrl_spqr.data.runs import RunReader, _check_reader, _check_run_dir, _run_error
from torchrl_spqr.data.scores import (
    D4RL_ENV_IDS,
    D4RL_REF_SCORES,
    KINDS,
    _family_of_env,
    _opt_float,
)
from torchrl_spqr.data.store import (
    _check_dataset_id,
    _check_hdf5,
    _check_replaceable,
    _exists_locally,
    _file_lock,
    _fsync_tree,
    _guess_build_command,
    _id_lock,
    _minari_eval_env,
    _minari_store,
    _new_stage,
    _recover_interrupted_builds,
    _settle_stage,
    _swap_in,
    _write_minari_dataset,
    minari_datasets_path,
)

if TYPE_CHECKING:  # pragma: no cover
    import minari

__all__ = ["build_dataset"]


def _int_arg(name: str, value: Any, minimum: int, what: str) -> int:
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    if isinstance(value, float) and value.is_integer():
        ok, value = True, int(value)
    if not ok or int(value) < minimum:
        raise ValueError(f"{name}={value!r}: expected an integer >= {minimum} ({what}).")
    return int(value)


def _float_arg(name: str, value: Any, what: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = math.nan
    if isinstance(value, bool) or not math.isfinite(v):
        raise ValueError(f"{name}={value!r}: expected a finite number ({what}).")
    return v


def _check_env_id(env_id: Any) -> str:
    import gymnasium as gym

    if not isinstance(env_id, str) or not env_id:
        raise ValueError(f"env_id={env_id!r} (--env): expected a Gymnasium id such as Hopper-v5.")
    try:
        gym.spec(env_id)
    except gym.error.Error as err:
        known = ", ".join(gym_id for gym_id, _ in D4RL_ENV_IDS.values())
        raise ValueError(
            f"env_id={env_id!r} (--env) is not a registered Gymnasium environment "
            f"({type(err).__name__}: {err}). Pass a Gymnasium id such as {known}."
        ) from err
    return env_id


def _check_build_args(
    kind: Any,
    env_id: Any,
    steps: Any,
    policy: Any,
    seed: Any,
    ref_min_score: Any,
    ref_max_score: Any,
    source_run: Any,
    expert_run: Any,
    parts: Any,
    max_episode_steps: Any,
    noise: Any,
    ref_episodes: Any,
    runs: Any = None,
) -> dict[str, Any]:
    """Every argument of :func:`build_dataset` checked before anything is built or written.

    Returns the normalised values; raises ValueError (or DatasetUnavailableError for a
    missing part) naming the argument, its value and what to pass instead.
    """
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} (--kind): expected one of {', '.join(KINDS)}.")
    out: dict[str, Any] = {}
    out["steps"] = (
        None if steps is None else _int_arg("steps", steps, 1, "--steps: transitions to collect")
    )
    out["seed"] = _int_arg("seed", seed, 0, "--seed")
    out["ref_episodes"] = _int_arg(
        "ref_episodes", ref_episodes, 1, "--ref-episodes: episodes averaged for a reference score"
    )
    out["max_episode_steps"] = (
        None
        if max_episode_steps is None
        else _int_arg("max_episode_steps", max_episode_steps, 1, "--max-episode-steps")
    )
    out["noise"] = _float_arg("noise", noise, "--noise: Gaussian action noise std")
    if out["noise"] < 0:
        raise ValueError(f"noise={noise!r} (--noise): expected a standard deviation >= 0.")
    lo = hi = None
    if ref_min_score is not None:
        lo = _float_arg("ref_min_score", ref_min_score, "--ref-min-score")
    if ref_max_score is not None:
        hi = _float_arg("ref_max_score", ref_max_score, "--ref-max-score")
    if lo is not None and hi is not None and not hi > lo:
        raise ValueError(
            f"ref_min_score={lo} and ref_max_score={hi}: the normalised score "
            "100 * (R - min) / (max - min) needs ref_max_score > ref_min_score."
        )
    out["ref_min_score"], out["ref_max_score"] = lo, hi
    if env_id is not None:
        out["env_id"] = _check_env_id(env_id)
    else:
        out["env_id"] = None

    # arguments the recipe would ignore: an error, not a silent no-op
    ignored = []
    if policy is not None and kind not in ("medium", "expert"):
        ignored.append("policy (--policy-run)")
    if parts is not None and kind != "medium-expert":
        ignored.append("parts (--parts)")
    if source_run is not None and kind not in ("medium-replay", "full-replay"):
        ignored.append("source_run (--source-run)")
    if out["noise"] and kind not in ("medium", "expert"):
        ignored.append("noise (--noise)")
    if steps is not None and kind == "medium-expert":
        ignored.append("steps (--steps)")
    if ignored:
        raise ValueError(
            f"kind={kind!r} does not use {', '.join(ignored)}: drop "
            f"{'it' if len(ignored) == 1 else 'them'}, or pick the kind that reads "
            f"{'it' if len(ignored) == 1 else 'them'} (policy: medium / expert; source_run: "
            "medium-replay / full-replay; parts: medium-expert)."
        )

    if kind in ("random", "medium", "expert") and out["env_id"] is None:
        raise ValueError(f"kind={kind!r} needs env_id (--env), e.g. Hopper-v5.")
    if kind in ("medium", "expert"):
        if policy is None:
            raise ValueError(
                f"kind={kind!r} needs a policy: --policy-run RUN_DIR (an online run folder) "
                "or policy=<callable obs -> action>."
            )
        if isinstance(policy, (str, os.PathLike)):
            _check_reader(runs, "policy", "--policy-run", policy)
            _check_run_dir(policy, "--policy-run")
        elif not callable(policy):
            raise ValueError(f"policy={policy!r}: expected a run folder or a callable.")
    if kind == "medium-replay" and source_run is None:
        raise ValueError("kind='medium-replay' needs source_run (--source-run RUN_DIR).")
    if kind == "full-replay" and source_run is None and expert_run is None:
        raise ValueError("kind='full-replay' needs expert_run (--expert-run RUN_DIR).")
    if source_run is not None:
        _check_reader(runs, "source_run", "--source-run", source_run)
        _check_run_dir(source_run, "--source-run")
    if expert_run is not None:
        _check_reader(runs, "expert_run", "--expert-run", expert_run)
        _check_run_dir(expert_run, "--expert-run")
    if kind == "medium-expert":
        if isinstance(parts, str) or not isinstance(parts, Sequence) or len(parts) != 2:
            raise ValueError(
                f"parts={parts!r}: kind='medium-expert' needs two dataset ids, "
                "--parts MEDIUM_ID EXPERT_ID."
            )
        for p in parts:
            _check_dataset_id(p)
            if not _exists_locally(p):
                raise _unavailable(
                    p,
                    [f"local Minari dataset {minari_datasets_path() / p}: not found"],
                    [f"build it first: {_guess_build_command(p)}"],
                )
            _check_hdf5(p)
        out["parts"] = list(parts)
    else:
        out["parts"] = None
    return out


def build_dataset(
    dataset_id: str,
    env_id: str | None,
    kind: str,
    *,
    steps: int | None = None,
    policy: Callable[[np.ndarray], np.ndarray] | str | os.PathLike | None = None,
    seed: int = 0,
    ref_min_score: float | None = None,
    ref_max_score: float | None = None,
    source_run: str | None = None,
    expert_run: str | None = None,
    parts: list[str] | None = None,
    max_episode_steps: int | None = None,
    noise: float = 0.0,
    ref_episodes: int = 10,
    overwrite: bool = False,
    runs: RunReader | None = None,
) -> minari.MinariDataset:
    """Create the Minari dataset ``dataset_id`` locally with D4RL's recipe ``kind``.

    Args:
        dataset_id: Minari id, e.g. ``"local/hopper/medium-v0"``.
        env_id: Gymnasium id (``"Hopper-v5"``); ``None`` takes it from the source run's
            config (replay kinds) or from the first part (``medium-expert``).
        kind: one of :data:`KINDS`:

            - ``random``: uniform random actions, ``steps`` transitions;
            - ``medium`` / ``expert``: roll out ``policy`` (``obs -> action``, or a run
              folder read by ``runs``) for ``steps`` transitions, plus
              Gaussian noise of std ``noise``;
            - ``medium-replay``: the replay buffer of the online run ``source_run``
              (the first ``steps`` transitions if given);
            - ``full-replay``: the whole replay buffer of the expert run ``expert_run``
              (or ``source_run``);
            - ``medium-expert``: the episodes of ``parts = [medium_id, expert_id]``.

        steps: transitions to collect (default 1,000,000 as in D4RL; whole buffer for the
            replay kinds).
        ref_min_score: default: mean return of a uniform random policy over
            ``ref_episodes`` episodes (fixed seed, so all splits of an env agree).
        ref_max_score: default: the mean return of the expert policy (``expert`` kind,
            ``expert_run``), the expert part's value (``medium-expert``), else D4RL's
            expert reference for the env family (with a warning).
        max_episode_steps: time limit of the env (default: the env's, or the run's).
        overwrite: replace an existing local dataset with the same id: the new one is
            written aside and swapped in only when complete (see the module docstring).
        runs: reads the run folders given as ``policy``, ``source_run`` or ``expert_run``
            (:class:`~torchrl_spqr.data.runs.RunReader`; the package's runs:
            ``torchrl_spqr.training.restore.RunFolders()``). Needed only for those.

    Raises:
        ValueError: a malformed id (expected ``namespace/name-vN``), an argument out of
            range or unused by ``kind``, an unknown env id, a run folder that is missing or
            holds no checkpoint / replay buffer, reference scores that are not finite or
            with ``ref_max_score <= ref_min_score``. Nothing is written.
        FileExistsError: the id exists and ``overwrite`` is False.
        DatasetUnavailableError / DatasetCorruptedError: a ``parts`` dataset is missing or
            unreadable.

    Terminations and time-limit truncations are stored apart; an episode cut off by
    ``steps`` ends with a truncation. Observations, actions and rewards are float32.
    """
    import gymnasium as gym
    import minari
    from minari.data_collector import EpisodeBuffer

    t0 = time.perf_counter()
    # Everything is checked before anything is built; nothing is written before the end.
    target = _check_dataset_id(dataset_id)
    args = _check_build_args(
        kind, env_id, steps, policy, seed, ref_min_score, ref_max_score, source_run,
        expert_run, parts, max_episode_steps, noise, ref_episodes, runs,
    )  # fmt: skip
    steps, seed, noise = args["steps"], args["seed"], args["noise"]
    env_id, parts, max_episode_steps = args["env_id"], args["parts"], args["max_episode_steps"]
    ref_min_score, ref_max_score = args["ref_min_score"], args["ref_max_score"]
    ref_episodes = args["ref_episodes"]
    store = minari_datasets_path().expanduser().resolve()
    existing = next(p for p in (store, *store.parents) if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(
            f"The Minari store {store} is not writable ({existing} is read-only): point "
            "MINARI_DATASETS_PATH at a writable folder."
        )
    _recover_interrupted_builds()
    if target.exists() or target.is_symlink():
        if not overwrite:
            raise FileExistsError(
                f"Minari dataset {dataset_id!r} already exists at {target} (pass overwrite=True "
                "or --overwrite to replace it)."
            )
        _check_replaceable(dataset_id, target)

    notes: list[str] = []
    ref_max_src = "given" if ref_max_score is not None else None
    ref_min_src = "given" if ref_min_score is not None else None
    env_kwargs: dict[str, Any] = {}

    if kind in ("medium-replay", "full-replay"):
        run = source_run if kind == "medium-replay" else (expert_run or source_run)
        if run is None:
            raise ValueError(
                f"kind={kind!r} needs {'source_run' if kind == 'medium-replay' else 'expert_run'}."
            )
        flag = "--source-run" if run is source_run else "--expert-run"
        try:
            cfg = runs.config(Path(run))
        except Exception as err:  # any failure to read the run, named with its flag
            raise _run_error(flag, run, err, "cannot read its checkpoint") from err
        env_section = cfg.get("env") or {}
        if env_id is None and env_section.get("name"):
            env_id = _check_env_id(env_section.get("name"))
        if max_episode_steps is None and env_section.get("max_episode_steps"):
            max_episode_steps = int(env_section["max_episode_steps"])
        try:
            episodes = runs.episodes(run, steps)
        except Exception as err:  # any failure to read the run, named with its flag
            raise _run_error(flag, run, err, "cannot read its replay buffer") from err
        notes.append(f"replay buffer of the online run {Path(run).resolve()}")
        if kind == "full-replay" and ref_max_score is None:
            expert_run = expert_run or run
    elif kind == "medium-expert":
        if not parts or len(parts) != 2:
            raise ValueError("kind='medium-expert' needs parts=[medium_id, expert_id].")
        episodes, metas, counts = [], [], []
        for p in parts:
            eps, meta = _episodes_from_minari(p)
            episodes += eps
            metas.append(meta)
            counts.append(len(eps))
        if env_id is None:
            env_id, env_kwargs = _minari_eval_env(metas[0])
            max_episode_steps = env_kwargs.pop("max_episode_steps", max_episode_steps)
        if ref_min_score is None and _opt_float(metas[0].get("ref_min_score")) is not None:
            ref_min_score, ref_min_src = float(metas[0]["ref_min_score"]), f"from {parts[0]}"
        if ref_max_score is None:
            for p, meta in zip(reversed(parts), reversed(metas)):
                if _opt_float(meta.get("ref_max_score")) is not None:
                    ref_max_score, ref_max_src = float(meta["ref_max_score"]), f"from {p}"
                    break
        notes.append(
            f"concatenation of {parts[0]} ({counts[0]} episodes) and {parts[1]} "
            f"({counts[1]} episodes)"
        )
    else:
        if env_id is None:
            raise ValueError(f"kind={kind!r} needs env_id.")
        steps = 1_000_000 if steps is None else int(steps)
        if steps < 1:
            raise ValueError(f"steps={steps} must be >= 1.")
        env = _make_env(env_id, max_episode_steps)
        if kind == "random":
            pol: Callable = _UniformPolicy(env.action_space, seed)
            notes.append("uniform random actions")
        else:
            if policy is None:
                raise ValueError(f"kind={kind!r} needs a policy (callable or run folder).")
            if isinstance(policy, (str, os.PathLike)):
                notes.append(f"deterministic actor of the online run {Path(policy).resolve()}")
                try:
                    policy = runs.policy(policy)
                except Exception as err:  # any failure to read the run, named with its flag
                    raise _run_error("--policy-run", policy, err, "cannot load its actor") from err
            else:
                notes.append(
                    "policy "
                    + (f"of run {policy.run_dir}" if hasattr(policy, "run_dir") else repr(policy))
                )
            pol = policy
            if noise > 0:
                notes.append(f"Gaussian action noise std {noise}")
            if kind == "expert" and ref_max_score is None:
                ref_max_score = _mean_return(env, pol, ref_episodes, _RANDOM_REF_SEED)
                ref_max_src = f"mean return of this policy over {ref_episodes} episodes"
        episodes = _rollout_steps(env, pol, steps, seed, noise)
        env.close()

    if env_id is None:
        raise ValueError("Could not determine the environment id: pass env_id.")
    if not episodes:
        raise ValueError(f"No transitions to write for {dataset_id!r}.")
    env = _make_env(env_id, max_episode_steps, env_kwargs)
    obs_dim = int(np.prod(env.observation_space.shape))
    act_dim = int(np.prod(env.action_space.shape))
    if episodes[0].observations.shape[-1] != obs_dim or episodes[0].actions.shape[-1] != act_dim:
        raise ValueError(
            f"Data has obs/action dims {episodes[0].observations.shape[-1]}/"
            f"{episodes[0].actions.shape[-1]} but {env_id} has {obs_dim}/{act_dim}."
        )
    if ref_min_score is None:
        ref_min_score = _random_ref_score(env, ref_episodes)
        ref_min_src = f"mean return of a uniform random policy over {ref_episodes} episodes"
    if ref_max_score is None and expert_run is not None:
        try:
            expert = runs.policy(expert_run)
        except Exception as err:  # any failure to read the run, named with its flag
            raise _run_error("--expert-run", expert_run, err, "cannot load its actor") from err
        ref_max_score = _mean_return(env, expert, ref_episodes, _RANDOM_REF_SEED)
        ref_max_src = f"mean return of the expert run {expert_run} over {ref_episodes} episodes"
    if ref_max_score is None and _family_of_env(env_id) is not None:
        ref_max_score = D4RL_REF_SCORES[_family_of_env(env_id)][1]
        ref_max_src = "D4RL's published expert score (d4rl/infos.py REF_MAX_SCORE)"
        warnings.warn(
            f"{dataset_id}: no ref_max_score given; using D4RL's expert reference "
            f"{ref_max_score} for {env_id}.",
            stacklevel=2,
        )
    for name, value, src in (
        ("ref_min_score", ref_min_score, ref_min_src),
        ("ref_max_score", ref_max_score, ref_max_src),
    ):
        if value is not None and not math.isfinite(float(value)):
            raise ValueError(
                f"{dataset_id}: {name}={value} ({src}) is not finite: the normalised scores "
                f"would be NaN. Give --{name.replace('_', '-')} explicitly."
            )
    if ref_max_score is not None and not float(ref_max_score) > float(ref_min_score):
        raise ValueError(
            f"{dataset_id}: ref_max_score={ref_max_score} ({ref_max_src}) is not above "
            f"ref_min_score={ref_min_score} ({ref_min_src}): normalised scores "
            "100 * (R - min) / (max - min) would be undefined or inverted. Give "
            "--ref-min-score / --ref-max-score explicitly (or a better --expert-run)."
        )

    obs_space = gym.spaces.Box(
        env.observation_space.low.astype(np.float32),
        env.observation_space.high.astype(np.float32),
        env.observation_space.shape,
        np.float32,
    )
    buffers = [
        EpisodeBuffer(
            id=i,
            seed=ep.seed,
            observations=ep.observations,
            actions=ep.actions,
            rewards=ep.rewards,
            terminations=ep.terminations,
            truncations=ep.truncations,
        )
        for i, ep in enumerate(episodes)
    ]
    n_steps = sum(len(ep) for ep in episodes)
    recipe = {
        "kind": kind,
        "env_id": env_id,
        "max_episode_steps": env.spec.max_episode_steps if env.spec else None,
        "steps": n_steps,
        "episodes": len(episodes),
        "seed": seed,
        "noise": noise,
        "source_run": str(source_run) if source_run else None,
        "expert_run": str(expert_run) if expert_run else None,
        "parts": list(parts) if parts else None,
        "ref_min_score_source": ref_min_src,
        "ref_max_score_source": ref_max_src,
    }
    description = (
        f"D4RL-style '{kind}' dataset on {env_id} built by torchrl_spqr.data: "
        + "; ".join(notes)
        + f". {n_steps} transitions in {len(episodes)} episodes, seed {seed}. "
        f"ref_min_score: {ref_min_src}; ref_max_score: {ref_max_src}. "
        f"Recipe: {json.dumps(recipe)}"
    )
    kw: dict[str, Any] = {}
    if ref_max_score is not None:  # Minari records the reference scores only with a max
        kw.update(ref_min_score=float(ref_min_score), ref_max_score=float(ref_max_score))
    extra = {"torchrl_spqr_recipe": json.dumps(recipe)}
    if ref_max_score is None:
        extra["ref_min_score"] = float(ref_min_score)
    # Written aside (a private store in the hidden staging folder), then swapped in.
    stage, stage_lock = _new_stage(dataset_id)
    try:
        with _minari_store(stage / "new"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _write_minari_dataset(
                dataset_id,
                buffers,
                env=env.spec,
                eval_env=env.spec,
                algorithm_name=f"torchrl_spqr.data/{kind}",
                author="torchrl_spqr",
                author_email="n/a",
                code_permalink="torchrl_spqr/data/builder.py",
                action_space=env.action_space,
                observation_space=obs_space,
                description=description,
                extra_metadata=extra,
                **kw,
            )
        _fsync_tree(stage / "new")
        (stage / "complete").write_text(dataset_id)
        with _file_lock(_id_lock(dataset_id)):
            try:
                _swap_in(dataset_id, target, stage, overwrite)
            finally:
                _settle_stage(stage, dataset_id, target, roll_forward=False)
    finally:
        if target.exists() or not (stage / "old").exists():  # else: left for recovery
            shutil.rmtree(stage, ignore_errors=True)  # a no-op after _settle_stage
        stage_lock.close()
        env.close()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = minari.load_dataset(dataset_id)
    ds.build_time_s = time.perf_counter() - t0  # type: ignore[attr-defined]
    return ds

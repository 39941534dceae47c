"""Range checks of the training scripts' configs: each names the field, the value and the fix.

:func:`validate_single_agent` (the online and offline scripts) and
:func:`validate_multiagent` (the MASAC script) check ranges, choices and the
relations between fields (batch vs buffer size, random vs total frames, ensemble
size vs SPQR and REDQ's subset, the device vs ``compile.cudagraphs``).
:func:`~torchrl_spqr.training.config.resolve_config` runs them after the schema of
:mod:`torchrl_spqr.training.config` (names, types, defaults); they read through the
``cfg_*`` readers of :mod:`torchrl_spqr.training.fields`, so they also accept a raw
config (a plain dict, an OmegaConf ``DictConfig``).
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch

from torchrl_spqr.functional import DENSITIES, FILLINGS
from torchrl_spqr.modules import INIT_SCHEMES
from torchrl_spqr.modules.multiagent import ACTIVATIONS as _NETWORK_ACTIVATIONS
from torchrl_spqr.modules.relu_mlp import MATMUL_DTYPES as _KERNEL_MATMUL_DTYPES
from torchrl_spqr.objectives.member_weights import member_weights
from torchrl_spqr.objectives.spqr import PAIRS
from torchrl_spqr.training.fields import (
    ConfigError,
    _bad,
    _get,
    _raw,
    _show,
    cfg_bool,
    cfg_choice,
    cfg_device,
    cfg_float,
    cfg_int,
    cfg_sizes,
)

__all__ = [
    "ACTIVATIONS",
    "COLLECTOR_BACKENDS",
    "LOGGER_BACKENDS",
    "SINGLE_AGENT_ALGORITHMS",
    "validate_multiagent",
    "validate_runtime",
    "validate_single_agent",
    "validate_spqr",
]

#: the single-agent algorithms (``algorithm``), each with its script in ``sota_scripts/``.
SINGLE_AGENT_ALGORITHMS = ("cql", "edac", "redq", "sac_ens", "sac_n")

#: ``network.matmul_dtype`` values (besides null): the critics' lower-precision products.
MATMUL_DTYPES = tuple(str(d).removeprefix("torch.") for d in _KERNEL_MATMUL_DTYPES)

#: ``network.activation`` values of the multi-agent networks.
ACTIVATIONS = tuple(sorted(_NETWORK_ACTIVATIONS))  # elu, relu, silu, tanh

#: ``collector.backend`` values and the TorchRL engine behind each.
COLLECTOR_BACKENDS = {
    "single": "torchrl.collectors.Collector (in the training process)",
    "multi_sync": "torchrl.collectors.MultiSyncCollector (worker processes, batches gathered from all)",
    "multi_async": (
        "torchrl.collectors.MultiAsyncCollector (worker processes, first batch ready; a batch"
        " the learner has not taken within 1 s is discarded, docs/sweeps.md)"
    ),
    "ray": "torchrl.collectors.distributed.RayCollector (Ray actors, local or on a cluster)",
}


#: interval field -> (what it spaces, a note on the end of the run)
_INTERVALS = {
    "logger.log_interval": ("training-metric rows", ""),
    "logger.eval_interval": ("evaluations", " (the run also evaluates at its end)"),
    "checkpoint.interval": ("checkpoints", " (a checkpoint is also written at exit)"),
}

#: ``logger.backend`` values.
LOGGER_BACKENDS = ("csv", "tensorboard", "wandb", "none")


def validate_runtime(cfg: Any, intervals: dict[str, str]) -> torch.device:
    """The fields every script shares: seed, device, threads, logging, checkpoints, compile.

    ``intervals`` maps each interval field to what it counts (``"frames"`` / ``"updates"``).
    Returns the device the run will use.
    """
    cfg_int(cfg, "seed", 0)
    cfg_bool(cfg, "resume", False)
    device = cfg_device(cfg)
    cfg_int(cfg, "threads", 1, lo=1, hint="set threads=1 or more (torch threads of the learner)")
    cfg_bool(cfg, "retain_freed_memory", True)
    backend = _get(cfg, "logger.backend", "csv")
    if backend not in ("", *LOGGER_BACKENDS):
        raise _bad("logger.backend", backend, "one of " + ", ".join(LOGGER_BACKENDS))
    cfg_bool(cfg, "logger.progress", True)
    cfg_int(
        cfg,
        "logger.eval_episodes",
        1,
        lo=1,
        hint="set logger.eval_episodes=1 or more (a mean over zero episodes is NaN)",
    )
    for field, unit in intervals.items():
        what = _INTERVALS.get(field, ("events", ""))
        cfg_int(
            cfg,
            field,
            1,
            lo=1,
            hint=f"set {field} to the number of {unit} between {what[0]}, 1 or more{what[1]}",
        )
    cfg_bool(cfg, "compile.compile", False)
    if cfg_bool(cfg, "compile.cudagraphs", False) and device.type != "cuda":
        raise ConfigError(
            f"compile.cudagraphs=true with device={_show(_get(cfg, 'device', 'auto'))} "
            f"(runs on {device.type}): CUDA graphs need a CUDA device; set compile.cudagraphs=false "
            "or device=cuda on a machine with a GPU."
        )
    return device


def validate_spqr(cfg, ensemble_size: int, min_members: int = 3) -> float:
    """``spqr.*``: beta, pairs, filling, density, diagnostics interval; returns beta."""
    beta = cfg_float(
        cfg, "spqr.beta", 0.0, lo=0.0, hint="set spqr.beta to a number >= 0 (0: the baseline)"
    )
    if beta > 0 and ensemble_size < min_members:
        raise ConfigError(
            f"network.ensemble_size={ensemble_size} with spqr.beta={beta:g}: SPQR needs at least "
            f"{min_members} critics; set network.ensemble_size>={min_members} or spqr.beta=0."
        )
    cfg_choice(cfg, "spqr.pairs", PAIRS, "next_policy")
    cfg_choice(cfg, "spqr.filling", FILLINGS, "ordered")
    cfg_choice(cfg, "spqr.density", DENSITIES, "paper")
    cfg_int(
        cfg,
        "spqr.diagnostics_interval",
        1,
        lo=0,
        hint="set spqr.diagnostics_interval to k >= 1 (every k-th update) or 0 (off)",
    )
    _validate_member_weights(cfg, ensemble_size)
    return beta


def _validate_member_weights(cfg, ensemble_size: int) -> None:
    """``spqr.member_weights``: null, ``authors`` or N non-negative numbers (SPQRLoss's check)."""
    value = _raw(cfg, "spqr.member_weights", None)
    if value is None:
        return
    try:
        member_weights(value if isinstance(value, str) else _plain(value), ensemble_size)
    except (TypeError, ValueError) as err:
        raise _bad(
            "spqr.member_weights",
            value,
            f"null, authors or a list of network.ensemble_size={ensemble_size} finite "
            f"non-negative numbers ({err})",
            hint="e.g. spqr.member_weights=authors (member k gets (N - k) * beta, as the "
            "authors' N optimisers) or null (beta for every member)",
        ) from None


def _plain(value: Any) -> Any:
    """An OmegaConf list as a plain list (other values unchanged)."""
    try:
        from omegaconf import ListConfig, OmegaConf
    except ImportError:  # pragma: no cover - omegaconf ships with hydra
        return value
    return OmegaConf.to_container(value) if isinstance(value, ListConfig) else value


def _validate_optim_common(cfg) -> None:
    """Learning rates, discount, soft-update rate and the initial temperature."""
    lr = cfg_float(cfg, "optim.lr", lo=0.0, lo_open=True)
    for field in ("optim.actor_lr", "optim.critic_lr", "optim.alpha_lr"):
        cfg_float(cfg, field, lr, lo=0.0, lo_open=True)
    critic_lr = cfg_float(cfg, "optim.critic_lr", lr, lo=0.0, lo_open=True)
    cfg_float(cfg, "optim.lagrange_lr", critic_lr, lo=0.0, lo_open=True)
    cfg_float(cfg, "optim.weight_decay", 0.0, lo=0.0)
    cfg_float(cfg, "optim.gamma", lo=0.0, hi=1.0, lo_open=True)
    cfg_float(cfg, "optim.tau", lo=0.0, hi=1.0, lo_open=True)
    cfg_float(cfg, "optim.alpha_init", 1.0, lo=0.0, lo_open=True)


def validate_single_agent(cfg: Any, *, online: bool = True) -> None:
    """Stop before training on a single-agent config value that cannot work, naming the field.

    Checks every field the online (``online=True``) or offline scripts read: type
    (a whole number, a finite number, true / false, one of a set of names), range,
    and the relations between fields (batch size vs buffer size, random frames vs
    total frames, ensemble size vs SPQR and REDQ's subset size, the device vs
    ``compile.cudagraphs``). Each error names the field, the value and the fix.
    """
    algo = _get(cfg, "algorithm")
    if algo not in SINGLE_AGENT_ALGORITHMS:
        raise _bad("algorithm", algo, "one of " + ", ".join(SINGLE_AGENT_ALGORITHMS))
    if online:
        import gymnasium as gym

        name = _get(cfg, "env.name")
        try:
            gym.spec(name)
        except Exception as err:  # gymnasium raises NameNotFound / VersionNotFound / Error
            raise ConfigError(
                f"env.name={name!r} is not a registered Gymnasium id ({err}); pick an env "
                "config (env=hopper, env=walker2d, ...) or a registered id."
            ) from err
    else:
        name = _get(cfg, "env.name")
        if name is not None and not isinstance(name, str):
            raise _bad("env.name", name, "a Gymnasium id or null (the dataset's own env)")
    if _get(cfg, "env.max_episode_steps") is not None:
        cfg_int(
            cfg,
            "env.max_episode_steps",
            lo=1,
            hint="set env.max_episode_steps to 1 or more, or null for the environment's own limit",
        )
    te = _get(cfg, "env.target_entropy", "auto")
    if te != "auto":
        cfg_float(cfg, "env.target_entropy", hint="set env.target_entropy=auto or a number")
    unit = "frames" if online else "updates"
    validate_runtime(
        cfg,
        {
            "logger.log_interval": unit,
            "logger.eval_interval": unit,
            "checkpoint.interval": unit,
        },
    )
    n = cfg_int(
        cfg,
        "network.ensemble_size",
        lo=2,
        hint="set network.ensemble_size to a whole number of critics, 2 or more (3 or more "
        "with spqr.beta > 0)",
    )
    validate_spqr(cfg, n)
    cfg_sizes(cfg, "network.hidden_sizes")
    if _get(cfg, "network.actor_hidden_sizes") is not None:
        cfg_sizes(cfg, "network.actor_hidden_sizes")
    layer_norm = cfg_bool(cfg, "network.layer_norm", False)
    dropout = cfg_float(cfg, "network.dropout", 0.0, lo=0.0, hi=1.0, hi_open=True)
    if _get(cfg, "network.matmul_dtype") is not None:
        cfg_choice(cfg, "network.matmul_dtype", MATMUL_DTYPES)
        if layer_norm or dropout > 0:
            raise ConfigError(
                f"network.matmul_dtype={_get(cfg, 'network.matmul_dtype')} needs plain ReLU "
                f"critics (the fused kernel), but network.layer_norm={layer_norm} and "
                f"network.dropout={dropout:g}: set network.matmul_dtype=null, or "
                "network.layer_norm=false and network.dropout=0."
            )
    init = cfg_choice(cfg, "network.init", INIT_SCHEMES, "default")
    cfg_choice(cfg, "network.actor_init", INIT_SCHEMES, init)
    _validate_log_std_clamp(cfg)
    _validate_optim_common(cfg)
    bs = cfg_int(cfg, "optim.batch_size", lo=1)
    if algo == "redq":
        cfg_int(
            cfg,
            "network.sub_sample_len",
            2,
            lo=1,
            hi=n,
            hint=f"set network.sub_sample_len (REDQ's M) between 1 and network.ensemble_size={n}",
        )
        cfg_int(cfg, "optim.policy_update_delay", 20, lo=1)
    if algo == "edac":
        cfg_float(cfg, "optim.eta", 1.0, lo=0.0)
    if algo == "cql":
        cfg_float(cfg, "optim.min_q_weight", 5.0, lo=0.0)
        cfg_float(cfg, "optim.temperature", 1.0, lo=0.0, lo_open=True)
        cfg_int(cfg, "optim.num_random", 10, lo=1)
        if _get(cfg, "optim.lagrange_thresh") not in (None, "null"):
            cfg_float(
                cfg,
                "optim.lagrange_thresh",
                hint="set a number (< 0: a fixed CQL weight) or null",
            )
        cfg_bool(cfg, "optim.max_q_backup", False)
        cfg_bool(cfg, "optim.backup_entropy", False)
        cfg_int(cfg, "optim.bc_steps", 0, lo=0)
    if online:
        cfg_int(cfg, "optim.utd_ratio", 1, lo=1)
        size = cfg_int(cfg, "replay_buffer.size", lo=1)
        if bs > size:
            raise ConfigError(
                f"optim.batch_size={bs} is larger than replay_buffer.size={size}; lower "
                "optim.batch_size or raise replay_buffer.size."
            )
        cfg_choice(cfg, "replay_buffer.storage", ("lazy_tensor", "lazy_memmap"), "lazy_tensor")
        if cfg_bool(cfg, "replay_buffer.prb", False):
            raise ConfigError(
                "replay_buffer.prb=true: prioritized replay needs torchrl's C++ extension, which "
                "does not load against this torch build; set replay_buffer.prb=false."
            )
        total = cfg_int(cfg, "collector.total_frames", lo=1)
        init_random = cfg_int(cfg, "collector.init_random_frames", 0, lo=0)
        if init_random > total:
            raise ConfigError(
                f"collector.init_random_frames={init_random} is more than "
                f"collector.total_frames={total}: no gradient update would run; set "
                "collector.init_random_frames below collector.total_frames (or raise "
                "total_frames)."
            )
        _validate_collector(cfg, total)
    else:
        did = _get(cfg, "dataset.id")
        if not isinstance(did, str) or not did.strip():
            raise ConfigError(
                f"dataset.id={_show(did)}: expected a Minari or D4RL dataset id; choose a dataset "
                "config (e.g. dataset=hopper_medium) or set dataset.id=D4RL/hopper/medium-v0."
            )
        cfg_int(cfg, "optim.num_updates", lo=1)
        cfg_choice(cfg, "dataset.source", ("minari", "d4rl"), "minari")
        cfg_bool(cfg, "dataset.download", True)
        scale = cfg_float(
            cfg,
            "dataset.reward_scale",
            1.0,
            hint="set dataset.reward_scale to a finite, non-zero number (1: unchanged rewards)",
        )
        if scale == 0.0:
            raise _bad(
                "dataset.reward_scale",
                _get(cfg, "dataset.reward_scale"),
                "a finite, non-zero number",
                "scale 0 erases every reward; set dataset.reward_scale=1 for unchanged rewards",
            )
        cfg_float(
            cfg,
            "dataset.reward_shift",
            0.0,
            hint="set dataset.reward_shift to a finite number (0: unchanged rewards)",
        )


def _validate_log_std_clamp(cfg) -> None:
    value = _raw(cfg, "network.actor_log_std_clamp", None)
    if value is None:
        return
    try:
        pair = [v for v in value] if not isinstance(value, (str, bytes)) else None
    except TypeError:
        pair = None
    ok = (
        pair is not None
        and len(pair) == 2
        and all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in pair)
        and all(math.isfinite(float(v)) for v in pair)
        and float(pair[0]) < float(pair[1])
    )
    if not ok:
        raise _bad(
            "network.actor_log_std_clamp",
            value,
            "null or [low, high], two finite numbers with low < high",
            hint="e.g. network.actor_log_std_clamp=[-20,2] (REDQ) or [-5,2] (EDAC / CORL)",
        )


def _validate_collector(cfg, total: int) -> None:
    backend = cfg_choice(cfg, "collector.backend", tuple(COLLECTOR_BACKENDS), "single")
    fpb = cfg_int(cfg, "collector.frames_per_batch", 1, lo=1)
    if total % fpb:
        raise ConfigError(
            f"collector.total_frames={total} is not a multiple of collector.frames_per_batch={fpb}; "
            "make total_frames a multiple of frames_per_batch."
        )
    workers = cfg_int(cfg, "collector.num_workers", 1, lo=1)
    if backend == "single" and workers != 1:
        raise ConfigError(
            f"collector.num_workers={workers} with collector.backend=single: choose "
            "multi_sync, multi_async or ray for several workers."
        )
    sync = cfg_bool(cfg, "collector.ray.sync", True)
    synced = backend == "multi_sync" or (backend == "ray" and sync)
    if synced and fpb % workers:
        raise ConfigError(
            f"collector.frames_per_batch={fpb} is not a multiple of collector.num_workers={workers}: "
            f"a {backend} batch takes the same number of frames from every worker."
        )
    if backend == "ray":
        import importlib.util

        if _get(cfg, "collector.ray.num_cpus") is not None:
            cfg_int(cfg, "collector.ray.num_cpus", lo=1)
        cfg_float(cfg, "collector.ray.cpus_per_worker", 1.0, lo=0.0, lo_open=True)
        cfg_bool(cfg, "collector.ray.log_to_driver", False)
        if importlib.util.find_spec("ray") is None:
            raise ConfigError("collector.backend=ray needs Ray: pip install 'torchrl-spqr[ray]'.")


def validate_multiagent(cfg: Any) -> None:
    """The MASAC script's checks: VMAS scenario, vectorised copies vs frames, sizes, rates.

    Checks the type and range of every field the script reads and their relations
    (frames per batch vs vectorised copies, total frames, random frames, batch vs
    buffer size, the device); each error names the field, the value and the fix.
    """
    algo = _get(cfg, "algorithm")
    if algo != "masac":
        raise ConfigError(
            f"algorithm={algo!r}: this script runs 'masac'; set algorithm=masac (the single-agent "
            "algorithms have their own scripts in sota_scripts/)."
        )
    scenario = _get(cfg, "env.scenario_name")
    try:
        import vmas
    except ImportError as err:
        raise ConfigError(
            "VMAS is not installed: pip install 'torchrl-spqr[multiagent]' (or pip install vmas)."
        ) from err
    known = sorted(vmas.scenarios)
    if scenario not in known:
        raise ConfigError(
            f"env.scenario_name={scenario!r} is not a VMAS scenario; choose one of: "
            f"{', '.join(known)}."
        )
    if not cfg_bool(cfg, "env.continuous_actions", True):
        raise ConfigError(
            "env.continuous_actions=false: this script implements continuous-action MASAC "
            "(SACLoss with a Tanh-Gaussian policy); set env.continuous_actions=true."
        )
    if _get(cfg, "env.scenario.n_agents") is not None:
        cfg_int(cfg, "env.scenario.n_agents", lo=1)
    validate_runtime(
        cfg,
        {
            "logger.log_interval": "frames",
            "logger.eval_interval": "frames",
            "checkpoint.interval": "frames",
        },
    )
    cfg_int(cfg, "env.max_steps", lo=1)
    num_envs = cfg_int(cfg, "env.num_envs", lo=1)
    fpb = cfg_int(cfg, "collector.frames_per_batch", lo=1)
    total = cfg_int(cfg, "collector.total_frames", lo=1)
    if fpb % num_envs:
        raise ConfigError(
            f"collector.frames_per_batch={fpb} must be a multiple of env.num_envs={num_envs} "
            "(each iteration steps every vectorised copy the same number of times); set "
            "frames_per_batch to num_envs * steps per iteration."
        )
    if total < fpb:
        raise ConfigError(
            f"collector.total_frames={total} must be >= collector.frames_per_batch={fpb}: "
            "raise total_frames or lower frames_per_batch."
        )
    init_random = cfg_int(cfg, "collector.init_random_frames", 0, lo=0)
    if init_random >= total:
        raise ConfigError(
            f"collector.init_random_frames={init_random} is not below "
            f"collector.total_frames={total}: no gradient update would run; set "
            "collector.init_random_frames below collector.total_frames (or raise total_frames)."
        )
    n = cfg_int(
        cfg,
        "network.ensemble_size",
        lo=3,
        hint="SPQR (and its diagnostics) needs an ensemble of at least 3 critics: set "
        "network.ensemble_size to a whole number >= 3",
    )
    validate_spqr(cfg, n)
    cfg_choice(cfg, "network.activation", ACTIVATIONS, "tanh")
    cfg_sizes(cfg, "network.hidden_sizes")
    if _get(cfg, "network.actor_hidden_sizes") is not None:
        cfg_sizes(cfg, "network.actor_hidden_sizes")
    cfg_bool(cfg, "network.centralised_critic", True)
    cfg_bool(cfg, "network.shared_parameters", True)
    size = cfg_int(cfg, "replay_buffer.size", lo=1)
    bs = cfg_int(cfg, "optim.batch_size", lo=1)
    if bs > size:
        raise ConfigError(
            f"optim.batch_size={bs} must be in [1, replay_buffer.size={size}]: lower "
            "optim.batch_size or raise replay_buffer.size."
        )
    cfg_choice(cfg, "replay_buffer.storage", ("lazy_tensor", "lazy_memmap"), "lazy_tensor")
    if cfg_bool(cfg, "replay_buffer.prb", False):
        raise ConfigError(
            "replay_buffer.prb=true: prioritized replay needs torchrl's C++ extension, which "
            "does not load against this torch build; set replay_buffer.prb=false."
        )
    cfg_int(cfg, "optim.num_epochs", 1, lo=1)
    _validate_optim_common(cfg)
    if _get(cfg, "optim.max_grad_norm") is not None:
        cfg_float(
            cfg,
            "optim.max_grad_norm",
            lo=0.0,
            hint="set optim.max_grad_norm to a number > 0 (clip), or 0 / null (no clipping)",
        )

"""``make_*`` builders shared by the SOTA-style scripts (TorchRL ``sota-implementations`` layout).

Each takes the script's config (an OmegaConf ``DictConfig`` or any object with
attribute access) and returns a stock TorchRL piece.
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import Any

import torch
from tensordict.nn import NormalParamExtractor, TensorDictModule
from torch import nn
from torchrl.collectors import BaseCollector, Collector, MultiAsyncCollector, MultiSyncCollector
from torchrl.data import LazyMemmapStorage, LazyTensorStorage, TensorDictReplayBuffer
from torchrl.envs import Compose, DoubleToFloat, GymEnv, RewardSum, StepCounter, TransformedEnv
from torchrl.modules import MLP, ProbabilisticActor, TanhNormal
from torchrl.objectives import SoftUpdate

from torchrl_spqr.ensemble import INIT_SCHEMES, QEnsemble, init_linear_stack_, make_q_member
from torchrl_spqr.loss import SPQRLoss
from torchrl_spqr.objectives import CQLNLoss, EDACLoss, ReferenceREDQLoss, SACNLoss

__all__ = [
    "ConfigError",
    "ALGORITHMS",
    "validate_config",
    "validate_runtime",
    "validate_spqr",
    "get_device",
    "make_environment",
    "make_actor",
    "make_critics",
    "make_loss_module",
    "make_optimizers",
    "make_replay_buffer",
    "COLLECTOR_BACKENDS",
    "make_collector",
    "make_worker_environment",
    "shutdown_collector",
    "make_target_updater",
    "make_agent",
]

#: algorithm name -> (loss class, min ensemble size)
ALGORITHMS = {
    "sac_ens": SACNLoss,
    "sac_n": SACNLoss,
    "redq": ReferenceREDQLoss,
    "edac": EDACLoss,
    "cql": CQLNLoss,
}


#: ``collector.backend`` values and the TorchRL engine behind each.
COLLECTOR_BACKENDS = {
    "single": "torchrl.collectors.Collector (in the training process)",
    "multi_sync": "torchrl.collectors.MultiSyncCollector (worker processes, batches gathered from all)",
    "multi_async": "torchrl.collectors.MultiAsyncCollector (worker processes, first batch ready)",
    "ray": "torchrl.collectors.distributed.RayCollector (Ray actors, local or on a cluster)",
}


class ConfigError(ValueError):
    """A config value that cannot work; the message names the field, the value and the fix."""


def _get(cfg, dotted: str, default: Any = None) -> Any:
    cur = cfg
    for part in dotted.split("."):
        if cur is None:
            return default
        cur = cur.get(part, None) if hasattr(cur, "get") else getattr(cur, part, None)
    return default if cur is None else cur


# ------------------------------------------------------------------ value checks
# Each check reads one field, converts it, and raises a ConfigError naming the field, the
# value and what to set instead. The scripts' config files hold every field, so ``default``
# only matters for fields a user deleted (``~field``) or set to null.

_REQUIRED = object()


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return repr(value) if isinstance(value, str) else str(value)


def _raw(cfg, field: str, default: Any) -> Any:
    value = _get(cfg, field, None)
    if value is None:
        if default is _REQUIRED:
            raise ConfigError(f"{field} is not set: give it a value ({field}=...).")
        return default
    return value


def _bad(field: str, value: Any, need: str, hint: str | None = None) -> ConfigError:
    hint = hint or f"set it on the command line ({field}=...) or in the script's config.yaml"
    return ConfigError(f"{field}={_show(value)}: expected {need}; {hint}.")


def _range_text(kind: str, lo, hi, lo_open: bool, hi_open: bool) -> str:
    if lo is not None and hi is not None:
        return f"{kind} in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{kind} {'>' if lo_open else '>='} {lo:g}"
    if hi is not None:
        return f"{kind} {'<' if hi_open else '<='} {hi:g}"
    return kind


def cfg_int(
    cfg, field: str, default: Any = _REQUIRED, *, lo=None, hi=None, hint: str | None = None
) -> int:
    """``field`` as a whole number in ``[lo, hi]`` (``3.0`` is 3; ``3.5``, ``true``, ``'abc'`` fail)."""
    value = _raw(cfg, field, default)
    need = _range_text("an integer", lo, hi, False, False)
    n = None
    if isinstance(value, int) and not isinstance(value, bool):
        n = value
    elif isinstance(value, float) and math.isfinite(value) and value.is_integer():
        n = int(value)
    elif isinstance(value, str):
        try:
            n = int(value.strip())
        except ValueError:
            n = None
    if n is None:
        raise _bad(field, value, need, hint)
    if (lo is not None and n < lo) or (hi is not None and n > hi):
        raise _bad(field, value, need, hint)
    return n


def cfg_float(
    cfg,
    field: str,
    default: Any = _REQUIRED,
    *,
    lo=None,
    hi=None,
    lo_open: bool = False,
    hi_open: bool = False,
    hint: str | None = None,
) -> float:
    """``field`` as a finite number in the given range (``'abc'``, ``nan``, ``inf`` fail)."""
    value = _raw(cfg, field, default)
    need = _range_text("a finite number", lo, hi, lo_open, hi_open)
    v = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        v = float(value)
    elif isinstance(value, str):
        try:
            v = float(value.strip())
        except ValueError:
            v = None
    if v is None or not math.isfinite(v):
        raise _bad(field, value, need, hint)
    if lo is not None and (v < lo or (lo_open and v == lo)):
        raise _bad(field, value, need, hint)
    if hi is not None and (v > hi or (hi_open and v == hi)):
        raise _bad(field, value, need, hint)
    return v


def cfg_bool(cfg, field: str, default: Any = False) -> bool:
    """``field`` as true / false (not any truthy string: ``resume=yes please`` fails)."""
    value = _raw(cfg, field, default)
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise _bad(field, value, "true or false")


def cfg_choice(cfg, field: str, choices, default: Any = _REQUIRED) -> str:
    """``field`` as one of ``choices``."""
    value = _raw(cfg, field, default)
    if not isinstance(value, str) or value not in choices:
        raise _bad(field, value, "one of " + ", ".join(map(str, choices)))
    return value


def cfg_sizes(cfg, field: str, default: Any = _REQUIRED) -> list[int]:
    """``field`` as a list of layer widths ``[w1, w2, ...]``, each an integer >= 1."""
    value = _raw(cfg, field, default)
    need = "a list of layer widths, each an integer >= 1 (e.g. [256,256])"
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise _bad(field, value, need)
    sizes = list(value)
    for w in sizes:
        if isinstance(w, bool) or not isinstance(w, int) or w < 1:
            raise _bad(field, sizes, need)
    return sizes


def cfg_device(cfg, field: str = "device", default: str = "auto") -> torch.device:
    """``field`` as a torch device this machine has (``auto``: CUDA when available, else CPU)."""
    value = _raw(cfg, field, default)
    name = str(value).strip()
    if name == "auto":
        return get_device("auto")
    hint = "use device=auto (CUDA when there is a GPU, else CPU) or device=cpu"
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise _bad(field, value, "auto, cpu, cuda, cuda:K or mps", hint) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"{field}={_show(value)}: CUDA is not available here (torch {torch.__version__}, "
                f"torch.cuda.is_available() is False); {hint}."
            )
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ConfigError(
                f"{field}={_show(value)}: this machine has {count} CUDA device(s) "
                f"(cuda:0 to cuda:{count - 1}); choose one of them or {hint}."
            )
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigError(f"{field}={_show(value)}: MPS is not available here; {hint}.")
    elif dev.type != "cpu":
        raise _bad(field, value, "auto, cpu, cuda, cuda:K or mps", hint)
    return dev


#: interval field -> (what it spaces, a note on the end of the run)
_INTERVALS = {
    "logger.log_interval": ("training-metric rows", ""),
    "logger.eval_interval": ("evaluations", " (the run also evaluates at its end)"),
    "checkpoint.interval": ("checkpoints", " (a checkpoint is also written at exit)"),
}

#: ``logger.backend`` values.
LOGGER_BACKENDS = ("csv", "tensorboard", "wandb", "none")


def validate_runtime(cfg, intervals: dict[str, str]) -> torch.device:
    """The fields every script shares: seed, device, threads, logging, checkpoints, compile.

    ``intervals`` maps each interval field to what it counts (``"frames"`` / ``"updates"``).
    Returns the device the run will use.
    """
    cfg_int(cfg, "seed", 0)
    cfg_bool(cfg, "resume", False)
    device = cfg_device(cfg)
    cfg_int(cfg, "threads", 1, lo=1, hint="set threads=1 or more (torch threads of the learner)")
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
    from torchrl_spqr.functional import DENSITIES, FILLINGS
    from torchrl_spqr.loss import PAIRS

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
    from torchrl_spqr.loss import _member_weights

    value = _raw(cfg, "spqr.member_weights", None)
    if value is None:
        return
    try:
        _member_weights(value if isinstance(value, str) else _plain(value), ensemble_size)
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


def validate_config(cfg, *, online: bool = True) -> None:
    """Stop before training on a config value that cannot work, naming the field.

    Checks every field the online (``online=True``) or offline scripts read: type
    (a whole number, a finite number, true / false, one of a set of names), range,
    and the relations between fields (batch size vs buffer size, random frames vs
    total frames, ensemble size vs SPQR and REDQ's subset size, the device vs
    ``compile.cudagraphs``). Each error names the field, the value and the fix.
    """
    algo = _get(cfg, "algorithm")
    if algo not in ALGORITHMS:
        raise _bad("algorithm", algo, "one of " + ", ".join(sorted(ALGORITHMS)))
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
    cfg_bool(cfg, "network.layer_norm", False)
    cfg_float(cfg, "network.dropout", 0.0, lo=0.0, hi=1.0, hi_open=True)
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


def get_device(name: str = "auto") -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def make_environment(
    cfg, seed: int, device: torch.device | str = "cpu", env_kwargs: dict | None = None
) -> TransformedEnv:
    """A Gymnasium MuJoCo env with float32 observations, step counter and episode return."""
    kwargs = dict(env_kwargs or {})
    max_steps = _get(cfg, "env.max_episode_steps")
    if max_steps:
        kwargs["max_episode_steps"] = int(max_steps)
    name = _get(cfg, "env.name")
    _register_robotics_if_needed(name)
    env = GymEnv(name, device=device, **kwargs)
    env = TransformedEnv(env, Compose(DoubleToFloat(), StepCounter(), RewardSum()))
    env.set_seed(seed)
    return env


def _register_robotics_if_needed(name: str) -> None:
    """Kitchen / AntMaze ids live in Gymnasium-Robotics (extra ``robotics``)."""
    import gymnasium as gym

    if name in gym.registry:
        return
    try:
        import gymnasium_robotics  # noqa: F401  (registers its environments)
    except ImportError as err:
        if any(k in name for k in ("Kitchen", "AntMaze", "PointMaze", "Adroit")):
            raise ConfigError(
                f"env.name={name!r} comes from Gymnasium-Robotics: pip install 'torchrl-spqr[robotics]'."
            ) from err


class ClampedLogStd(nn.Module):
    """``[loc, log_std]`` -> ``(loc, exp(clamp(log_std, low, high)))``.

    The policy head of REDQ (``log_std`` clamped to [-20, 2], ``redq/algos/core.py``
    l. 7-8, 218) and EDAC / CORL ([-5, 2]). No parameters: swapping it for
    ``NormalParamExtractor`` keeps the actor's state dict keys.
    """

    def __init__(self, low: float, high: float) -> None:
        super().__init__()
        self.low, self.high = float(low), float(high)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loc, log_std = x.chunk(2, -1)
        return loc, log_std.clamp(self.low, self.high).exp()

    def extra_repr(self) -> str:
        return f"low={self.low:g}, high={self.high:g}"


def make_actor(cfg, env) -> ProbabilisticActor:
    """Tanh-Gaussian policy MLP (SAC / REDQ defaults).

    ``network.actor_init`` (default ``network.init``) picks the weight init
    (:func:`~torchrl_spqr.ensemble.init_linear_stack_`; the policy's output layer
    uses EDAC's +-1e-3). ``network.actor_log_std_clamp: [low, high]`` makes the
    scale ``exp(clamp(log_std))`` as in REDQ / EDAC; ``null`` (default) keeps
    TorchRL's ``biased_softplus_1.0`` scale (lower bound 1e-4).
    """
    n_obs = env.observation_spec["observation"].shape[-1]
    n_act = env.action_spec.shape[-1]
    hidden = list(_get(cfg, "network.actor_hidden_sizes", _get(cfg, "network.hidden_sizes")))
    mlp = MLP(in_features=n_obs, out_features=2 * n_act, num_cells=hidden, activation_class=nn.ReLU)
    init = str(_get(cfg, "network.actor_init", _get(cfg, "network.init", "default")))
    init_linear_stack_(
        [m for m in mlp.modules() if isinstance(m, nn.Linear)], init, output_bound=1e-3
    )
    clamp = _get(cfg, "network.actor_log_std_clamp")
    if clamp is None:
        head = NormalParamExtractor(scale_mapping="biased_softplus_1.0", scale_lb=1e-4)
    else:
        head = ClampedLogStd(*clamp)
    net = nn.Sequential(mlp, head)
    spec = env.action_spec
    return ProbabilisticActor(
        TensorDictModule(net, in_keys=["observation"], out_keys=["loc", "scale"]),
        in_keys=["loc", "scale"],
        spec=spec,
        distribution_class=TanhNormal,
        distribution_kwargs={"low": spec.space.low, "high": spec.space.high},
        return_log_prob=True,
    )


def make_critics(cfg, env) -> QEnsemble:
    """``network.ensemble_size`` independently initialised critics."""
    n_in = env.observation_spec["observation"].shape[-1] + env.action_spec.shape[-1]
    hidden = tuple(_get(cfg, "network.hidden_sizes"))
    layer_norm = bool(_get(cfg, "network.layer_norm", False))
    dropout = float(_get(cfg, "network.dropout", 0.0))
    init = str(_get(cfg, "network.init", "default"))
    return QEnsemble(
        lambda: make_q_member(
            n_in, num_cells=hidden, layer_norm=layer_norm, dropout=dropout, init=init
        ),
        int(_get(cfg, "network.ensemble_size")),
    )


def make_loss_module(cfg, actor, critics, action_spec=None) -> tuple[SPQRLoss | Any, Any]:
    """The algorithm's loss wrapped in :class:`SPQRLoss` (``spqr.beta=0``: baseline, same code).

    Returns ``(loss, base_loss)``; the target updater is built on ``base_loss``.
    """
    algo = _get(cfg, "algorithm")
    cls = ALGORITHMS[algo]
    kwargs: dict[str, Any] = {
        "gamma": float(_get(cfg, "optim.gamma")),
        "alpha_init": float(_get(cfg, "optim.alpha_init", 1.0)),
        "action_spec": action_spec,
    }
    te = _get(cfg, "env.target_entropy", "auto")
    kwargs["target_entropy"] = te if te == "auto" else float(te)
    if algo == "redq":
        kwargs["sub_sample_len"] = int(_get(cfg, "network.sub_sample_len", 2))
        kwargs["policy_update_delay"] = int(_get(cfg, "optim.policy_update_delay", 20))
    if algo == "edac":
        kwargs["eta"] = float(_get(cfg, "optim.eta", 1.0))
    if algo == "cql":
        thresh = _get(cfg, "optim.lagrange_thresh")
        kwargs.update(
            min_q_weight=float(_get(cfg, "optim.min_q_weight", 5.0)),
            temperature=float(_get(cfg, "optim.temperature", 1.0)),
            num_random=int(_get(cfg, "optim.num_random", 10)),
            lagrange_thresh=None
            if thresh in (None, "null") or float(thresh) < 0
            else float(thresh),
            max_q_backup=bool(_get(cfg, "optim.max_q_backup", False)),
            backup_entropy=bool(_get(cfg, "optim.backup_entropy", False)),
            bc_steps=int(_get(cfg, "optim.bc_steps", 0)),
        )
    base = cls(actor, critics, **kwargs)
    if int(_get(cfg, "network.ensemble_size")) < 3:
        return base, base
    return make_spqr_loss(cfg, base), base


def make_spqr_loss(cfg, base) -> SPQRLoss:
    """``SPQRLoss`` around ``base`` with the config's ``spqr.*`` settings."""
    return SPQRLoss(
        base,
        beta=float(_get(cfg, "spqr.beta", 0.0)),
        member_weights=_plain(_get(cfg, "spqr.member_weights")),
        pairs=str(_get(cfg, "spqr.pairs", "next_policy")),
        filling=str(_get(cfg, "spqr.filling", "ordered")),
        density=str(_get(cfg, "spqr.density", "paper")),
        diagnostics_interval=int(_get(cfg, "spqr.diagnostics_interval", 1)),
    )


def make_optimizers(cfg, base) -> dict[str, torch.optim.Optimizer]:
    """Separate Adam optimisers for the actor, the critics and the temperatures."""
    lr = float(_get(cfg, "optim.lr"))
    actor_lr = float(_get(cfg, "optim.actor_lr", lr))
    critic_lr = float(_get(cfg, "optim.critic_lr", lr))
    alpha_lr = float(_get(cfg, "optim.alpha_lr", lr))
    wd = float(_get(cfg, "optim.weight_decay", 0.0))
    opts = {
        "actor": torch.optim.Adam(list(base.actor_network_params.values(True, True)), lr=actor_lr),
        "critic": torch.optim.Adam(
            list(base.qvalue_network_params.values(True, True)), lr=critic_lr, weight_decay=wd
        ),
    }
    named = [(name, p) for name, p in base.named_parameters() if name.startswith("log_alpha")]
    temps = [p for name, p in named if not name.startswith("log_alpha_prime")]
    primes = [p for name, p in named if name.startswith("log_alpha_prime")]
    if primes:  # CQL's Lagrange multiplier: the critics' lr, as the CQL / SPQR authors and CORL
        lagrange_lr = float(_get(cfg, "optim.lagrange_lr", critic_lr))
        groups = [{"params": temps, "lr": alpha_lr}] if temps else []
        opts["alpha"] = torch.optim.Adam([*groups, {"params": primes, "lr": lagrange_lr}])
    elif temps:
        opts["alpha"] = torch.optim.Adam(temps, lr=alpha_lr)
    return opts


def make_replay_buffer(cfg, run_dir=None) -> TensorDictReplayBuffer:
    size = int(_get(cfg, "replay_buffer.size"))
    kind = _get(cfg, "replay_buffer.storage", "lazy_tensor")
    if kind == "lazy_memmap":
        scratch = _get(cfg, "replay_buffer.scratch_dir") or (
            None if run_dir is None else str(run_dir) + "/buffer_scratch"
        )
        storage = LazyMemmapStorage(size, scratch_dir=scratch)
    elif kind == "lazy_tensor":
        storage = LazyTensorStorage(size)
    else:
        raise ConfigError(
            f"replay_buffer.storage={kind!r}: expected 'lazy_tensor' or 'lazy_memmap'."
        )
    if bool(_get(cfg, "replay_buffer.prb", False)):
        raise ConfigError(
            "replay_buffer.prb=true: prioritized replay needs torchrl's C++ extension, which does "
            "not load against this torch build."
        )
    return TensorDictReplayBuffer(storage=storage, batch_size=int(_get(cfg, "optim.batch_size")))


def make_worker_environment(cfg, seed: int, threads: int = 1) -> TransformedEnv:
    """Environment factory run inside a collector worker (process or Ray actor).

    Seeds the worker's torch / numpy generators (exploration noise and random
    actions differ between workers) and limits it to ``threads`` threads.
    """
    import numpy as np

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))
    return make_environment(cfg, seed)


def _plain_cfg(cfg) -> Any:
    """A picklable plain-dict copy of an OmegaConf config (workers re-build their env from it)."""
    try:
        from omegaconf import OmegaConf

        if OmegaConf.is_config(cfg):
            return OmegaConf.to_container(cfg, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    return cfg


def make_collector(
    cfg, env, actor, *, total_frames: int, init_random_frames: int, seed: int = 0
) -> BaseCollector:
    """The TorchRL collector named by ``collector.backend`` (see :data:`COLLECTOR_BACKENDS`).

    ``collector.frames_per_batch`` is the number of frames in each batch the
    training loop receives, summed over workers (TorchRL's convention): with
    ``multi_sync`` / synchronous ``ray`` each of the ``collector.num_workers``
    workers contributes ``frames_per_batch / num_workers``; with ``multi_async``
    / asynchronous ``ray`` each batch comes whole from one worker. ``single``
    steps ``env`` in this process; the other backends build their own
    environments in the workers from the config, worker ``i`` seeded with
    ``seed + i``, and need ``update_policy_weights_()`` after each policy update
    (the online loop does it).
    """
    backend = _get(cfg, "collector.backend", "single")
    common = {
        "frames_per_batch": int(_get(cfg, "collector.frames_per_batch", 1)),
        "total_frames": total_frames,
        "init_random_frames": init_random_frames,
    }
    if backend == "single":
        return Collector(env, actor, **common, auto_register_policy_transforms=False)
    workers = int(_get(cfg, "collector.num_workers", 1))
    plain = _plain_cfg(cfg)
    env_fns = [
        functools.partial(make_worker_environment, plain, seed + i, 1) for i in range(workers)
    ]
    if backend in ("multi_sync", "multi_async"):
        cls = MultiSyncCollector if backend == "multi_sync" else MultiAsyncCollector
        return cls(
            env_fns,
            actor,
            **common,
            num_threads=int(_get(cfg, "threads", 1)),  # the learner's share; workers get 1
            num_sub_threads=1,
            auto_register_policy_transforms=False,
        )
    if backend == "ray":
        from torchrl.collectors.distributed import RayCollector

        address = _get(cfg, "collector.ray.address")
        init: dict[str, Any] = {
            "address": None if address in (None, "", "local") else str(address),
            "include_dashboard": False,
            "log_to_driver": bool(_get(cfg, "collector.ray.log_to_driver", False)),
        }
        num_cpus = _get(cfg, "collector.ray.num_cpus")
        if init["address"] is None and num_cpus is not None:
            init["num_cpus"] = int(num_cpus)  # size of a local Ray instance
        collector = RayCollector(
            env_fns,
            actor,
            **common,
            sync=bool(_get(cfg, "collector.ray.sync", True)),
            ray_init_config=init,
            remote_configs={"num_cpus": float(_get(cfg, "collector.ray.cpus_per_worker", 1))},
            collector_kwargs={"auto_register_policy_transforms": False},
        )
        try:  # connect the weight channel (and send the initial weights) before collecting
            collector.update_policy_weights_()
        except BaseException:
            shutdown_collector(collector)
            raise
        return collector
    raise ConfigError(
        f"collector.backend={backend!r}: expected one of {sorted(COLLECTOR_BACKENDS)}."
    )


def shutdown_collector(collector: BaseCollector | None) -> None:
    """Stop a collector's workers (processes or Ray actors); safe to call twice or on error."""
    if collector is None:
        return
    try:
        collector.shutdown()
    except Exception as err:  # never mask the error that brought us here
        import warnings

        warnings.warn(f"collector shutdown failed: {err!r}", RuntimeWarning, stacklevel=2)


def make_agent(cfg, env, device: torch.device | str = "cpu"):
    """Actor, critics, the (SPQR-wrapped) loss, its optimisers and target updater for ``env``.

    Returns ``(actor, loss, base_loss, optimizers, updater)``.
    """
    actor = make_actor(cfg, env)
    loss, base = make_loss_module(cfg, actor, make_critics(cfg, env), env.action_spec)
    loss.to(device)
    return actor, loss, base, make_optimizers(cfg, base), make_target_updater(cfg, base)


def make_target_updater(cfg, base) -> SoftUpdate:
    return SoftUpdate(base, tau=float(_get(cfg, "optim.tau")))

"""``make_*`` builders shared by the SOTA-style scripts (TorchRL ``sota-implementations`` layout).

Each takes the script's config (an OmegaConf ``DictConfig`` or any object with
attribute access) and returns a stock TorchRL piece.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from tensordict.nn import NormalParamExtractor, TensorDictModule
from torch import nn
from torchrl.collectors import Collector
from torchrl.data import LazyMemmapStorage, LazyTensorStorage, TensorDictReplayBuffer
from torchrl.envs import Compose, DoubleToFloat, GymEnv, RewardSum, StepCounter, TransformedEnv
from torchrl.modules import MLP, ProbabilisticActor, TanhNormal
from torchrl.objectives import SoftUpdate

from torchrl_spqr.ensemble import QEnsemble, make_q_member
from torchrl_spqr.loss import SPQRLoss
from torchrl_spqr.objectives import CQLNLoss, EDACLoss, REDQLoss, SACNLoss

__all__ = [
    "ConfigError",
    "ALGORITHMS",
    "validate_config",
    "get_device",
    "make_environment",
    "make_actor",
    "make_critics",
    "make_loss_module",
    "make_optimizers",
    "make_replay_buffer",
    "make_collector",
    "make_target_updater",
    "make_agent",
]

#: algorithm name -> (loss class, min ensemble size)
ALGORITHMS = {
    "sac_ens": SACNLoss,
    "sac_n": SACNLoss,
    "redq": REDQLoss,
    "edac": EDACLoss,
    "cql": CQLNLoss,
}


class ConfigError(ValueError):
    """A config value that cannot work; the message names the field."""


def _get(cfg, dotted: str, default: Any = None) -> Any:
    cur = cfg
    for part in dotted.split("."):
        if cur is None:
            return default
        cur = cur.get(part, None) if hasattr(cur, "get") else getattr(cur, part, None)
    return default if cur is None else cur


def validate_config(cfg, *, online: bool = True) -> None:
    """Stop before training on a config value that cannot work, naming the field."""
    algo = _get(cfg, "algorithm")
    if algo not in ALGORITHMS:
        raise ConfigError(f"algorithm={algo!r}: expected one of {sorted(ALGORITHMS)}.")
    if online:
        import gymnasium as gym

        name = _get(cfg, "env.name")
        try:
            gym.spec(name)
        except Exception as err:  # gymnasium raises NameNotFound / VersionNotFound / Error
            raise ConfigError(
                f"env.name={name!r} is not a registered Gymnasium id ({err})."
            ) from err
    beta = float(_get(cfg, "spqr.beta", 0.0))
    if not math.isfinite(beta) or beta < 0:
        raise ConfigError(f"spqr.beta={beta} must be a finite number >= 0.")
    n = int(_get(cfg, "network.ensemble_size", 0))
    if n < 2:
        raise ConfigError(f"network.ensemble_size={n}: an ensemble needs at least 2 critics.")
    if beta > 0 and n < 3:
        raise ConfigError(
            f"network.ensemble_size={n} with spqr.beta={beta}: SPQR needs at least 3 critics."
        )
    utd = int(_get(cfg, "optim.utd_ratio", 1))
    if utd < 1:
        raise ConfigError(f"optim.utd_ratio={utd} must be >= 1.")
    bs = int(_get(cfg, "optim.batch_size"))
    size = int(_get(cfg, "replay_buffer.size", 0))
    if online and bs > size:
        raise ConfigError(f"optim.batch_size={bs} is larger than replay_buffer.size={size}.")
    if online:
        total = int(_get(cfg, "collector.total_frames"))
        if total < 1:
            raise ConfigError(f"collector.total_frames={total} must be >= 1.")
    if not online:
        if not _get(cfg, "dataset.id"):
            raise ConfigError("dataset.id is empty: name a Minari or D4RL dataset id.")
        nu = int(_get(cfg, "optim.num_updates", 0))
        if nu < 1:
            raise ConfigError(f"optim.num_updates={nu} must be >= 1.")
        src = _get(cfg, "dataset.source", "minari")
        if src not in ("minari", "d4rl"):
            raise ConfigError(f"dataset.source={src!r}: expected 'minari' or 'd4rl'.")
    for field in ("optim.lr", "optim.gamma", "optim.tau"):
        v = float(_get(cfg, field))
        if not (v > 0) or (field != "optim.lr" and v > 1):
            raise ConfigError(f"{field}={v} is out of range.")


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


def make_actor(cfg, env) -> ProbabilisticActor:
    """Tanh-Gaussian policy MLP (SAC / REDQ defaults)."""
    n_obs = env.observation_spec["observation"].shape[-1]
    n_act = env.action_spec.shape[-1]
    hidden = list(_get(cfg, "network.actor_hidden_sizes", _get(cfg, "network.hidden_sizes")))
    net = nn.Sequential(
        MLP(in_features=n_obs, out_features=2 * n_act, num_cells=hidden, activation_class=nn.ReLU),
        NormalParamExtractor(scale_mapping="biased_softplus_1.0", scale_lb=1e-4),
    )
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
    return QEnsemble(
        lambda: make_q_member(n_in, num_cells=hidden, layer_norm=layer_norm, dropout=dropout),
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
    loss = SPQRLoss(
        base,
        beta=float(_get(cfg, "spqr.beta", 0.0)),
        pairs=str(_get(cfg, "spqr.pairs", "next_policy")),
        filling=str(_get(cfg, "spqr.filling", "ordered")),
        density=str(_get(cfg, "spqr.density", "paper")),
        diagnostics_interval=int(_get(cfg, "spqr.diagnostics_interval", 1)),
    )
    return loss, base


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
    temps = [p for name, p in base.named_parameters() if name.startswith("log_alpha")]
    if temps:
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


def make_collector(cfg, env, actor, *, total_frames: int, init_random_frames: int) -> Collector:
    return Collector(
        env,
        actor,
        frames_per_batch=int(_get(cfg, "collector.frames_per_batch", 1)),
        total_frames=total_frames,
        init_random_frames=init_random_frames,
        auto_register_policy_transforms=False,
    )


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

"""``make_*`` builders shared by the SOTA-style scripts (TorchRL ``sota-implementations`` layout).

Each takes the script's config (an OmegaConf ``DictConfig`` or any object with
attribute access) and returns a stock TorchRL piece.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from tensordict.nn import NormalParamExtractor, TensorDictModule
from torch import nn
from torchrl.collectors import BaseCollector, Collector, MultiAsyncCollector, MultiSyncCollector
from torchrl.data import LazyMemmapStorage, LazyTensorStorage, TensorDictReplayBuffer
from torchrl.envs import Compose, DoubleToFloat, GymEnv, RewardSum, StepCounter, TransformedEnv
from torchrl.modules import MLP, ProbabilisticActor, TanhNormal
from torchrl.objectives import SoftUpdate

from torchrl_spqr.modules.ensemble import QEnsemble, init_linear_stack_, make_q_member
from torchrl_spqr.objectives import CQLNLoss, EDACLoss, ReferenceREDQLoss, SACNLoss
from torchrl_spqr.objectives.spqr import SPQRLoss
from torchrl_spqr.training.config import resolve_config, validate_config
from torchrl_spqr.training.fields import (  # noqa: F401  (cfg_*: re-exported, old location)
    ConfigError,
    _get,
    cfg_bool,
    cfg_choice,
    cfg_device,
    cfg_float,
    cfg_int,
    cfg_sizes,
    get_device,
)
from torchrl_spqr.training.validation import (  # noqa: F401  (LOGGER_BACKENDS: re-exported)
    COLLECTOR_BACKENDS,
    LOGGER_BACKENDS,
    _plain,
    validate_runtime,
    validate_spqr,
)

__all__ = [
    "ConfigError",
    "ALGORITHMS",
    "validate_config",
    "validate_runtime",
    "validate_spqr",
    "get_device",
    "resolve_config",
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
    (:func:`~torchrl_spqr.modules.ensemble.init_linear_stack_`; the policy's output layer
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

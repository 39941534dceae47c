"""``make_*`` builders shared by the SOTA-style scripts (TorchRL ``sota-implementations`` layout).

Each takes the run's config and returns a stock TorchRL piece. The config is read
through :func:`~torchrl_spqr.training.config.resolve_config` (names, types and
defaults of the script's schema; the range checks ran when the run started), so a
builder reads ``cfg.optim.lr`` and never repeats a default. The checks themselves
(``ConfigError``, ``validate_config``, ``cfg_*``) live in
:mod:`torchrl_spqr.training.config`, ``.fields`` and ``.validation`` and are
re-exported here from their old location.
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
from torchrl_spqr.modules.relu_mlp import matmul_slowdown
from torchrl_spqr.objectives import CQLNLoss, EDACLoss, ReferenceREDQLoss, SACNLoss
from torchrl_spqr.objectives.spqr import SPQRLoss
from torchrl_spqr.training.config import EnvConfig, resolve_config, validate_config
from torchrl_spqr.training.fields import (  # noqa: F401  (cfg_*: re-exported, old location)
    ConfigError,
    cfg_bool,
    cfg_choice,
    cfg_device,
    cfg_float,
    cfg_int,
    cfg_sizes,
    get_device,
)
from torchrl_spqr.training.stop import keep_stop_handlers, workers_ignore_stop_signals
from torchrl_spqr.training.typecheck import convert_section, to_plain
from torchrl_spqr.training.validation import (  # noqa: F401  (LOGGER_BACKENDS: re-exported)
    COLLECTOR_BACKENDS,
    LOGGER_BACKENDS,
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
    "tanh_bounds",
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


def _resolved(cfg: Any) -> Any:
    """``cfg`` with every field of its algorithm's schema (types converted, defaults filled)."""
    return resolve_config(cfg, "any", check=False)


def make_environment(
    cfg: Any, seed: int, device: torch.device | str = "cpu", env_kwargs: dict | None = None
) -> TransformedEnv:
    """A Gymnasium MuJoCo env with float32 observations, step counter and episode return.

    Reads only ``cfg.env`` (``name``, ``max_episode_steps``), so ``{"env": {...}}`` is
    enough; ``env_kwargs`` are passed to ``GymEnv``.
    """
    plain = to_plain(cfg)
    env_cfg = convert_section(plain.get("env") or {}, EnvConfig, "env")
    kwargs = dict(env_kwargs or {})
    if env_cfg["max_episode_steps"]:
        kwargs["max_episode_steps"] = env_cfg["max_episode_steps"]
    name = env_cfg["name"]
    if not name:
        raise ConfigError(
            "env.name is not set: give it a Gymnasium id (env.name=...) or an env config "
            "(env=hopper, ...)."
        )
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


def tanh_bounds(spec, device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """TanhNormal's ``distribution_kwargs`` for a bounded action ``spec``: its ``low`` and
    ``high`` on ``device`` (``None``: where the spec has them). They are not module state,
    so moving the loss leaves them behind; on the CPU under a CUDA loss they would be
    copied at every forward pass, which a CUDA graph capture refuses."""
    low, high = spec.space.low, spec.space.high
    if device is not None:
        low, high = low.to(device), high.to(device)
    return {"low": low, "high": high}


def make_actor(cfg: Any, env, device: torch.device | str | None = None) -> ProbabilisticActor:
    """Tanh-Gaussian policy MLP (SAC / REDQ defaults).

    ``network.actor_init`` (null: ``network.init``) picks the weight init
    (:func:`~torchrl_spqr.modules.ensemble.init_linear_stack_`; the policy's output layer
    uses EDAC's +-1e-3). ``network.actor_log_std_clamp: [low, high]`` makes the
    scale ``exp(clamp(log_std))`` as in REDQ / EDAC; ``null`` keeps TorchRL's
    ``biased_softplus_1.0`` scale (lower bound 1e-4).

    ``device``: where the loss will live. The weights are drawn on the CPU (the same
    initialisation on every device) and moved with the loss; the action bounds are put
    on ``device`` here (:func:`tanh_bounds`, as TorchRL's sota-implementations build
    them from a spec on the device).
    """
    net_cfg = _resolved(cfg).network
    n_obs = env.observation_spec["observation"].shape[-1]
    n_act = env.action_spec.shape[-1]
    hidden = list(net_cfg.actor_hidden_sizes or net_cfg.hidden_sizes)
    mlp = MLP(in_features=n_obs, out_features=2 * n_act, num_cells=hidden, activation_class=nn.ReLU)
    init_linear_stack_(
        [m for m in mlp.modules() if isinstance(m, nn.Linear)],
        net_cfg.actor_init or net_cfg.init,
        output_bound=1e-3,
    )
    clamp = net_cfg.actor_log_std_clamp
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
        distribution_kwargs=tanh_bounds(spec, device),
        return_log_prob=True,
    )


def make_critics(cfg: Any, env) -> QEnsemble:
    """``network.ensemble_size`` independently initialised critics."""
    net_cfg = _resolved(cfg).network
    n_in = env.observation_spec["observation"].shape[-1] + env.action_spec.shape[-1]
    hidden = tuple(net_cfg.hidden_sizes)
    return QEnsemble(
        lambda: make_q_member(
            n_in,
            num_cells=hidden,
            layer_norm=net_cfg.layer_norm,
            dropout=net_cfg.dropout,
            init=net_cfg.init,
        ),
        net_cfg.ensemble_size,
    )


def make_loss_module(cfg: Any, actor, critics, action_spec=None) -> tuple[SPQRLoss | Any, Any]:
    """The algorithm's loss wrapped in :class:`SPQRLoss` (``spqr.beta=0``: baseline, same code).

    Returns ``(loss, base_loss)``; the target updater is built on ``base_loss``.
    """
    cfg = _resolved(cfg)
    algo, optim = cfg.algorithm, cfg.optim
    cls = ALGORITHMS[algo]
    te = cfg.env.target_entropy
    kwargs: dict[str, Any] = {
        "gamma": optim.gamma,
        "alpha_init": optim.alpha_init,
        "action_spec": action_spec,
        "target_entropy": te if te == "auto" else float(te),
    }
    if algo == "redq":
        kwargs["sub_sample_len"] = cfg.network.sub_sample_len
        kwargs["policy_update_delay"] = optim.policy_update_delay
    if algo == "edac":
        kwargs["eta"] = optim.eta
    if algo == "cql":
        thresh = optim.lagrange_thresh
        kwargs.update(
            min_q_weight=optim.min_q_weight,
            temperature=optim.temperature,
            num_random=optim.num_random,
            lagrange_thresh=None if thresh is None or thresh < 0 else thresh,
            max_q_backup=optim.max_q_backup,
            backup_entropy=optim.backup_entropy,
            bc_steps=optim.bc_steps,
        )
    base = cls(actor, critics, **kwargs)
    if cfg.network.matmul_dtype is not None:
        base.critic_matmul_dtype = getattr(torch, cfg.network.matmul_dtype)
        if get_device(cfg.device).type == "cpu":
            warn_if_matmul_dtype_is_slow(cfg.network.matmul_dtype)
    if cfg.network.ensemble_size < 3:
        return base, base
    return make_spqr_loss(cfg, base), base


def warn_if_matmul_dtype_is_slow(name: str, limit: float = 1.0) -> float:
    """Warn when ``network.matmul_dtype=<name>`` products are slower than float32 on this
    CPU (:func:`~torchrl_spqr.modules.relu_mlp.matmul_slowdown` above ``limit``): without
    AMX or AVX512-BF16 PyTorch emulates them, and the option slows the update down instead
    of speeding it up. Returns the measured ratio.

    A warning, not an error: resuming a run made with that setting elsewhere needs it.
    """
    ratio = matmul_slowdown(getattr(torch, name))
    if ratio > limit:
        import warnings

        warnings.warn(
            f"network.matmul_dtype={name}: on this CPU a {name} product takes {ratio:.1f}x "
            f"as long as a float32 one (torch CPU capability "
            f"{torch.backends.cpu.get_cpu_capability()}; no native {name} instructions such "
            f"as AMX or AVX512-BF16), so the option slows the update down. Use "
            "network.matmul_dtype=null unless you resume a run made with it.",
            UserWarning,
            stacklevel=2,
        )
    return ratio


def make_spqr_loss(cfg: Any, base) -> SPQRLoss:
    """``SPQRLoss`` around ``base`` with the config's ``spqr.*`` settings."""
    spqr = _resolved(cfg).spqr
    weights = spqr.member_weights
    return SPQRLoss(
        base,
        beta=spqr.beta,
        member_weights=to_plain(weights),
        pairs=spqr.pairs,
        filling=spqr.filling,
        density=spqr.density,
        diagnostics_interval=spqr.diagnostics_interval,
    )


def make_optimizers(cfg: Any, base) -> dict[str, torch.optim.Optimizer]:
    """Separate Adam optimisers for the actor, the critics and the temperatures.

    ``optim.actor_lr`` / ``critic_lr`` / ``alpha_lr`` (null: ``optim.lr``); CQL's
    Lagrange multiplier gets ``optim.lagrange_lr`` (null: the critics' lr).
    """
    optim = _resolved(cfg).optim
    lr = optim.lr
    critic_lr = optim.critic_lr or lr
    alpha_lr = optim.alpha_lr or lr
    opts = {
        "actor": torch.optim.Adam(
            list(base.actor_network_params.values(True, True)), lr=optim.actor_lr or lr
        ),
        "critic": torch.optim.Adam(
            list(base.qvalue_network_params.values(True, True)),
            lr=critic_lr,
            weight_decay=optim.weight_decay,
        ),
    }
    named = [(name, p) for name, p in base.named_parameters() if name.startswith("log_alpha")]
    temps = [p for name, p in named if not name.startswith("log_alpha_prime")]
    primes = [p for name, p in named if name.startswith("log_alpha_prime")]
    if primes:  # CQL's Lagrange multiplier: the critics' lr, as the CQL / SPQR authors and CORL
        lagrange_lr = optim.get("lagrange_lr") or critic_lr
        groups = [{"params": temps, "lr": alpha_lr}] if temps else []
        opts["alpha"] = torch.optim.Adam([*groups, {"params": primes, "lr": lagrange_lr}])
    elif temps:
        opts["alpha"] = torch.optim.Adam(temps, lr=alpha_lr)
    return opts


def make_replay_buffer(cfg: Any, run_dir=None) -> TensorDictReplayBuffer:
    """``replay_buffer.size`` transitions in TorchRL's lazy tensor or memmap storage.

    ``lazy_memmap`` writes to ``replay_buffer.scratch_dir`` (null: ``<run_dir>/buffer_scratch``).
    """
    cfg = _resolved(cfg)
    rb = cfg.replay_buffer
    if rb.storage == "lazy_memmap":
        scratch = rb.scratch_dir or (None if run_dir is None else str(run_dir) + "/buffer_scratch")
        storage = LazyMemmapStorage(rb.size, scratch_dir=scratch)
    elif rb.storage == "lazy_tensor":
        storage = LazyTensorStorage(rb.size)
    else:
        raise ConfigError(
            f"replay_buffer.storage={rb.storage!r}: expected 'lazy_tensor' or 'lazy_memmap'."
        )
    if rb.prb:
        raise ConfigError(
            "replay_buffer.prb=true: prioritized replay needs torchrl's C++ extension, which does "
            "not load against this torch build."
        )
    return TensorDictReplayBuffer(storage=storage, batch_size=cfg.optim.batch_size)


def make_worker_environment(cfg: Any, seed: int, threads: int = 1) -> TransformedEnv:
    """Environment factory run inside a collector worker (process or Ray actor).

    Seeds the worker's torch / numpy generators (exploration noise and random
    actions differ between workers) and limits it to ``threads`` threads.
    """
    import numpy as np

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))
    return make_environment(cfg, seed)


def _collector_devices(env, actor) -> dict[str, torch.device]:
    """The collector's devices when the actor lives elsewhere than the environment (a CUDA
    actor, CPU MuJoCo): observations cast to the actor's device for acting, actions back to
    the environment's, the frames stored on the environment's (the replay buffer's side).
    Empty when they agree (TorchRL's defaults: nothing cast)."""
    actor_device = next((p.device for p in actor.parameters()), None)
    env_device = env.device if env.device is not None else torch.device("cpu")
    if actor_device is None or actor_device == env_device:
        return {}
    return {"policy_device": actor_device, "env_device": env_device, "storing_device": env_device}


def make_collector(
    cfg: Any, env, actor, *, total_frames: int, init_random_frames: int, seed: int = 0
) -> BaseCollector:
    """The TorchRL collector named by ``collector.backend`` (see :data:`COLLECTOR_BACKENDS`).

    ``collector.frames_per_batch`` is the number of frames in each batch the
    training loop receives, summed over workers (TorchRL's convention): with
    ``multi_sync`` / synchronous ``ray`` each of the ``collector.num_workers``
    workers contributes ``frames_per_batch / num_workers``; with ``multi_async``
    / asynchronous ``ray`` each batch comes whole from one worker (TorchRL's
    ``MultiAsyncCollector`` discards a worker's batch that the learner has not taken
    within 1 s, so its workers step their environments more often than the run
    counts; ``docs/sweeps.md``). ``single``
    steps ``env`` in this process; the other backends build their own
    environments in the workers from the config, worker ``i`` seeded with
    ``seed + i``, and need ``update_policy_weights_()`` after each policy update
    (the online loop does it). The multi-agent config has no backend: ``single``.
    """
    cfg = _resolved(cfg)
    col = cfg.collector
    backend = col.get("backend", "single")  # the multi-agent collector section has none
    common = {
        "frames_per_batch": col.frames_per_batch,
        "total_frames": total_frames,
        "init_random_frames": init_random_frames,
        **_collector_devices(env, actor),
    }
    if backend == "single":
        return Collector(env, actor, **common, auto_register_policy_transforms=False)
    plain = to_plain(cfg)  # picklable: the workers re-build their env from it
    env_fns = [
        functools.partial(make_worker_environment, plain, seed + i, 1)
        for i in range(col.num_workers)
    ]
    if backend in ("multi_sync", "multi_async"):
        cls = MultiSyncCollector if backend == "multi_sync" else MultiAsyncCollector
        # the workers leave Ctrl-C and SIGTERM to the main process, which stops at a step
        # boundary and shuts them down (torchrl_spqr.training.stop)
        with workers_ignore_stop_signals():
            return cls(
                env_fns,
                actor,
                **common,
                num_threads=cfg.threads,  # the learner's share; workers get 1
                num_sub_threads=1,
                auto_register_policy_transforms=False,
            )
    if backend == "ray":
        from torchrl.collectors.distributed import RayCollector

        ray = col.ray
        init: dict[str, Any] = {
            "address": None if ray.address in (None, "", "local") else ray.address,
            "include_dashboard": False,
            "log_to_driver": ray.log_to_driver,
        }
        if init["address"] is None and ray.num_cpus is not None:
            init["num_cpus"] = ray.num_cpus  # size of a local Ray instance
        # ray.init() (inside) replaces the SIGTERM handler of the scripts' stop_signals
        # with sys.exit: put it back, so that SIGTERM stops a Ray run at a step boundary
        with keep_stop_handlers():
            collector = RayCollector(
                env_fns,
                actor,
                **common,
                sync=ray.sync,
                ray_init_config=init,
                remote_configs={"num_cpus": ray.cpus_per_worker},
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


def make_agent(cfg: Any, env, device: torch.device | str = "cpu"):
    """Actor, critics, the (SPQR-wrapped) loss, its optimisers and target updater for ``env``.

    Returns ``(actor, loss, base_loss, optimizers, updater)``.
    """
    cfg = _resolved(cfg)
    actor = make_actor(cfg, env, device=device)
    loss, base = make_loss_module(cfg, actor, make_critics(cfg, env), env.action_spec)
    loss.to(device)
    return actor, loss, base, make_optimizers(cfg, base), make_target_updater(cfg, base)


def make_target_updater(cfg: Any, base) -> SoftUpdate:
    """TorchRL's ``SoftUpdate`` of ``base``'s target parameters at rate ``optim.tau``."""
    return SoftUpdate(base, tau=_resolved(cfg).optim.tau)

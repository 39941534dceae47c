"""The training scripts' configs as Hydra structured configs: types and defaults in one place.

One dataclass per section (``env``, ``collector``, ``replay_buffer``, ``network``,
``optim``, ``spqr``, ``logger``, ``checkpoint``, ``compile``, ``dataset``) and one root
per script (:data:`SCHEMAS`: ``sac_ens`` and ``redq`` online, ``sac_n``, ``edac`` and
``cql`` offline, ``masac`` multi-agent; :data:`POPULATION_SCHEMAS`: the population
scripts, ``sac_ens_population`` and ``redq_population``). A field's annotation is its type and its
default is the value a run gets when the field is left out (or set to null, unless
null is allowed: ``Optional``).

:func:`resolve_config` is the one entry point of the scripts: it merges a plain dict
or an OmegaConf config onto the script's schema, refuses an unknown field or a value
of the wrong type by name, fills in the defaults, runs the range checks of
:mod:`torchrl_spqr.training.validation` and returns a ``DictConfig`` read by
attribute (``cfg.optim.lr``). Importing this module registers every root in Hydra's
``ConfigStore`` as ``<algorithm>_schema`` (e.g. ``sac_ens_schema``); each script's
``config.yaml`` names it first in its ``defaults`` list, so Hydra itself refuses a
misspelt field on the command line or in a config file. The registered nodes keep
the field names and defaults but accept any value (``Any``): a value of the wrong
type reaches :func:`resolve_config`, whose error says what to set, and the scripts
print it as one line (exit code 2) instead of Hydra's traceback.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torchrl_spqr.training.fields import ConfigError, _show
from torchrl_spqr.training.typecheck import convert_section, hydra_node, to_plain
from torchrl_spqr.training.validation import validate_multiagent, validate_single_agent

__all__ = [
    "FAMILIES",
    "SCHEMAS",
    "CheckpointConfig",
    "CollectorConfig",
    "CompileConfig",
    "ConfigError",
    "DatasetConfig",
    "EnvConfig",
    "LoggerConfig",
    "MultiAgentCollectorConfig",
    "MultiAgentEnvConfig",
    "MultiAgentLoggerConfig",
    "MultiAgentNetworkConfig",
    "MultiAgentOptimConfig",
    "MultiAgentReplayBufferConfig",
    "NetworkConfig",
    "OptimConfig",
    "POPULATION_SCHEMAS",
    "PopulationConfig",
    "RayConfig",
    "REDQPopulationConfig",
    "ReplayBufferConfig",
    "SACEnsPopulationConfig",
    "SPQRConfig",
    "register_configs",
    "resolve_config",
    "schema_name",
    "validate_config",
]


# ---------------------------------------------------------------------------- sections
@dataclass
class EnvConfig:
    """``env``: the Gymnasium environment (online: trained on; offline: evaluated in)."""

    name: str | None = None  # online: an env config sets it; offline null: the dataset's own
    max_episode_steps: int | None = 1000  # null: the environment's own limit
    target_entropy: Any = "auto"  # "auto" (-dim(A)) or a number


@dataclass
class RayConfig:
    """``collector.ray``: the Ray instance and actors of ``collector.backend=ray``."""

    address: str | None = None  # null: a local instance; auto / ray://HOST:10001: a cluster
    num_cpus: int | None = None  # CPUs of a local instance (null: all)
    cpus_per_worker: float = 1.0
    sync: bool = True  # every batch holds frames from every actor
    log_to_driver: bool = False


@dataclass
class CollectorConfig:
    """``collector``: frames, random warm-up and the TorchRL collector backend (online)."""

    total_frames: int = 100_000
    init_random_frames: int = 5_000
    frames_per_batch: int = 1  # summed over workers
    backend: str = "single"  # single | multi_sync | multi_async | ray
    num_workers: int = 1
    ray: RayConfig = field(default_factory=RayConfig)


@dataclass
class ReplayBufferConfig:
    """``replay_buffer`` (online)."""

    size: int = 1_000_000
    storage: str = "lazy_tensor"  # or lazy_memmap
    prb: bool = False  # prioritized replay needs torchrl's C++ extension
    scratch_dir: str | None = None  # lazy_memmap's folder (null: <run>/buffer_scratch)


@dataclass
class NetworkConfig:
    """``network``: the critic ensemble and the policy (single-agent)."""

    ensemble_size: int = 10
    hidden_sizes: list[int] = field(default_factory=lambda: [256, 256])
    actor_hidden_sizes: list[int] | None = None  # null: hidden_sizes
    layer_norm: bool = False
    dropout: float = 0.0
    init: str = "default"  # INIT_SCHEMES: default | edac | redq
    actor_init: str | None = None  # null: network.init
    actor_log_std_clamp: list[float] | None = None  # null: TorchRL's softplus scale
    # null | bfloat16 | float16: the critics' products below the last layer in this dtype
    # (plain ReLU critics; parameters, Q-values and gradients stay float32)
    matmul_dtype: str | None = None


@dataclass
class REDQNetworkConfig(NetworkConfig):
    """``network`` of REDQ: adds the target subset size M."""

    init: str = "redq"
    actor_init: str | None = "redq"
    actor_log_std_clamp: list[float] | None = field(default_factory=lambda: [-20.0, 2.0])
    sub_sample_len: int = 2


@dataclass
class OptimConfig:
    """``optim``: batch, learning rates, discount, soft updates, temperature."""

    batch_size: int = 256
    lr: float = 3.0e-4
    actor_lr: float | None = None  # null: lr
    critic_lr: float | None = None  # null: lr
    alpha_lr: float | None = None  # null: lr
    weight_decay: float = 0.0  # critics' Adam
    gamma: float = 0.99
    tau: float = 0.005
    alpha_init: float = 1.0


@dataclass
class OnlineOptimConfig(OptimConfig):
    """``optim`` of the online scripts: adds the update-to-data ratio G."""

    utd_ratio: int = 1


@dataclass
class REDQOptimConfig(OnlineOptimConfig):
    """``optim`` of REDQ: G = 20 and the policy updated once per G critic updates."""

    utd_ratio: int = 20
    policy_update_delay: int = 20


@dataclass
class OfflineOptimConfig(OptimConfig):
    """``optim`` of the offline scripts: the number of gradient updates."""

    num_updates: int = 3_000_000


@dataclass
class EDACOptimConfig(OfflineOptimConfig):
    """``optim`` of EDAC: the gradient-diversity weight eta."""

    eta: float = 1.0


@dataclass
class CQLOptimConfig(OfflineOptimConfig):
    """``optim`` of CQL-N: the conservative penalty, its Lagrange variant and BC warm start."""

    actor_lr: float | None = 1.0e-4  # CQL: policy lr 1e-4, critic lr 3e-4
    critic_lr: float | None = 3.0e-4
    alpha_lr: float | None = 1.0e-4  # the temperature's Adam uses the policy lr
    lagrange_lr: float | None = 3.0e-4  # null: critic_lr
    min_q_weight: float = 5.0
    temperature: float = 1.0
    num_random: int = 10
    lagrange_thresh: float | None = -1.0  # < 0 or null: fixed weight
    max_q_backup: bool = False
    backup_entropy: bool = False
    bc_steps: int = 40_000  # behaviour cloning for the first policy steps


@dataclass
class SPQRConfig:
    """``spqr``: the regulariser (``SPQRLoss``'s arguments); ``beta=0`` is the baseline."""

    beta: float = 1.0
    member_weights: Any = None  # null | authors | N non-negative numbers
    pairs: str = "next_policy"
    filling: str = "ordered"
    density: str = "paper"
    diagnostics_interval: int = 1


@dataclass
class LoggerConfig:
    """``logger``: TorchRL logger backend, metric rows, evaluations, progress bar."""

    backend: str | None = "csv"  # csv | tensorboard | wandb | none
    log_interval: int = 1_000
    eval_interval: int = 5_000
    eval_episodes: int = 5
    progress: bool = True
    wandb_mode: str = "offline"


@dataclass
class CheckpointConfig:
    """``checkpoint``: frames (online) or updates (offline) between checkpoints.

    ``history``: also keep each checkpoint's networks (the loss state, counters and
    config; no optimiser, no replay buffer) in ``history/<step>/`` of the run folder (of
    each agent's folder in a population), to study the agent over training:
    ``analysis.q_estimation_bias``, ``analysis.checkpoint_q_values`` and ``load_agent``
    read each as a run folder.
    """

    interval: int = 10_000
    history: bool = False


@dataclass
class CompileConfig:
    """``compile``: ``torch.compile`` of the update and its capture as a CUDA graph."""

    compile: bool = False
    cudagraphs: bool = False


@dataclass
class DatasetConfig:
    """``dataset``: the offline data (a Minari or D4RL id) and its reward transform."""

    id: str | None = None  # the dataset/*.yaml group sets it
    source: str = "minari"  # minari | d4rl
    root: str | None = None  # null: TorchRL's cache folder
    download: bool = True
    reward_scale: float = 1.0
    reward_shift: float = 0.0


@dataclass
class MultiAgentEnvConfig:
    """``env`` of MASAC: the VMAS scenario."""

    scenario_name: str = "balance"
    scenario: dict[str, Any] = field(default_factory=lambda: {"n_agents": 3})  # VMAS kwargs
    max_steps: int = 100
    num_envs: int = 20
    continuous_actions: bool = True


@dataclass
class MultiAgentCollectorConfig:
    """``collector`` of MASAC (TorchRL's single-process collector on the vectorised env)."""

    total_frames: int = 1_000_000
    frames_per_batch: int = 2_000
    init_random_frames: int = 0


@dataclass
class MultiAgentReplayBufferConfig(ReplayBufferConfig):
    """``replay_buffer`` of MASAC: the single-agent fields (same builder), a smaller size."""

    size: int = 100_000


@dataclass
class MultiAgentNetworkConfig:
    """``network`` of MASAC: per-agent policy and the (centralised) critic ensemble."""

    ensemble_size: int = 10
    hidden_sizes: list[int] = field(default_factory=lambda: [64, 64])
    actor_hidden_sizes: list[int] | None = None  # null: hidden_sizes
    activation: str = "tanh"  # elu | relu | silu | tanh
    centralised_critic: bool = True  # false: ISAC
    shared_parameters: bool = True


@dataclass
class MultiAgentOptimConfig(OptimConfig):
    """``optim`` of MASAC: the single-agent fields (same optimisers), epochs and clipping."""

    num_epochs: int = 4
    gamma: float = 0.9
    max_grad_norm: float | None = 2.0  # null or 0: no clipping


@dataclass
class MultiAgentLoggerConfig:
    """``logger`` of MASAC (evaluations and checkpoints counted in frames)."""

    backend: str | None = "csv"
    log_interval: int = 2_000  # frames between training rows (config.yaml: every iteration)
    eval_interval: int = 20_000
    eval_episodes: int = 32
    progress: bool = True
    wandb_mode: str = "offline"


# ---------------------------------------------------------------------------- roots
def _init_network(init: str, clamp: list[float], **kwargs: Any) -> NetworkConfig:
    """A reference initialisation: ``init`` for critics and policy, log-std clamped to ``clamp``."""
    return NetworkConfig(init=init, actor_init=init, actor_log_std_clamp=clamp, **kwargs)


def _offline_network(ensemble_size: int) -> NetworkConfig:
    """EDAC / CORL networks (3 x 256, their initialisation and log-std clamp [-5, 2])."""
    return _init_network(
        "edac", [-5.0, 2.0], ensemble_size=ensemble_size, hidden_sizes=[256, 256, 256]
    )


@dataclass
class _RunConfig:
    """The fields every script has at the top level."""

    seed: int = 0
    resume: bool = False
    device: str = "auto"
    threads: int = 1  # torch threads of the learner
    # glibc malloc keeps freed memory for reuse (no page faults on each update's new
    # tensors; torchrl_spqr/training/malloc.py); no effect on other systems
    retain_freed_memory: bool = True


@dataclass
class SACEnsConfig(_RunConfig):
    """``sota_scripts/sac_ens_spqr``: online SAC with N critics."""

    algorithm: str = "sac_ens"
    env: EnvConfig = field(default_factory=EnvConfig)
    collector: CollectorConfig = field(default_factory=CollectorConfig)
    replay_buffer: ReplayBufferConfig = field(default_factory=ReplayBufferConfig)
    network: NetworkConfig = field(default_factory=lambda: _init_network("redq", [-20.0, 2.0]))
    optim: OnlineOptimConfig = field(default_factory=OnlineOptimConfig)
    spqr: SPQRConfig = field(default_factory=SPQRConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    compile: CompileConfig = field(default_factory=CompileConfig)


@dataclass
class REDQConfig(SACEnsConfig):
    """``sota_scripts/redq_spqr``: online REDQ (N critics, target subset M, UTD G)."""

    algorithm: str = "redq"
    network: REDQNetworkConfig = field(default_factory=REDQNetworkConfig)
    optim: REDQOptimConfig = field(default_factory=REDQOptimConfig)


@dataclass
class SACNConfig(_RunConfig):
    """``sota_scripts/sac_n_spqr``: offline SAC-N."""

    algorithm: str = "sac_n"
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    network: NetworkConfig = field(default_factory=lambda: _offline_network(10))
    optim: OfflineOptimConfig = field(default_factory=OfflineOptimConfig)
    spqr: SPQRConfig = field(default_factory=SPQRConfig)
    logger: LoggerConfig = field(
        default_factory=lambda: LoggerConfig(eval_interval=10_000, eval_episodes=10)
    )
    checkpoint: CheckpointConfig = field(default_factory=lambda: CheckpointConfig(50_000))
    compile: CompileConfig = field(default_factory=CompileConfig)


@dataclass
class EDACConfig(SACNConfig):
    """``sota_scripts/edac_spqr``: offline EDAC."""

    algorithm: str = "edac"
    optim: EDACOptimConfig = field(default_factory=EDACOptimConfig)


@dataclass
class CQLConfig(SACNConfig):
    """``sota_scripts/cql_spqr``: offline CQL-N."""

    algorithm: str = "cql"
    network: NetworkConfig = field(default_factory=lambda: _offline_network(6))
    optim: CQLOptimConfig = field(default_factory=CQLOptimConfig)
    spqr: SPQRConfig = field(default_factory=lambda: SPQRConfig(beta=2.0))


@dataclass
class MASACConfig(_RunConfig):
    """``sota_scripts/masac_spqr``: multi-agent SAC on VMAS."""

    algorithm: str = "masac"
    device: str = "cpu"  # VMAS runs on the same device
    env: MultiAgentEnvConfig = field(default_factory=MultiAgentEnvConfig)
    collector: MultiAgentCollectorConfig = field(default_factory=MultiAgentCollectorConfig)
    replay_buffer: MultiAgentReplayBufferConfig = field(
        default_factory=MultiAgentReplayBufferConfig
    )
    network: MultiAgentNetworkConfig = field(default_factory=MultiAgentNetworkConfig)
    optim: MultiAgentOptimConfig = field(default_factory=MultiAgentOptimConfig)
    spqr: SPQRConfig = field(default_factory=SPQRConfig)
    logger: MultiAgentLoggerConfig = field(default_factory=MultiAgentLoggerConfig)
    checkpoint: CheckpointConfig = field(default_factory=lambda: CheckpointConfig(100_000))


@dataclass
class PopulationConfig:
    """``population``: the agents of a population run, one per (beta, seed) pair.

    The agents are the product ``beta x seeds`` (``seeds=[0,1,2] beta=[0,1]``: 6 agents);
    each is initialised and its environments seeded as the single run with that
    ``seed`` and ``spqr.beta``. ``pairs`` is shared by every agent (one batched call has
    one control flow).
    """

    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3])
    beta: list[float] = field(default_factory=lambda: [0.0, 1.0])
    pairs: str | None = None  # null: spqr.pairs
    # step the agents' training environments in one worker process each (TorchRL's
    # ParallelEnv; the same transitions as stepping them in process, one after another)
    parallel_envs: bool = False
    # evaluate every agent at once (one batched policy call per step; each evaluation env
    # reset and stepped as its single run's evaluation; returns equal up to float round-off)
    batched_eval: bool = False


@dataclass
class SACEnsPopulationConfig(SACEnsConfig):
    """``sota_scripts/sac_ens_spqr/sac_ens_spqr_population.py``: K SAC-Ens agents, one update.

    Every other section is the single run's; ``seed`` seeds the population's shared
    random draws (replay sampling, exploration, random warm-up actions).
    """

    population: PopulationConfig = field(default_factory=PopulationConfig)


@dataclass
class REDQPopulationConfig(REDQConfig):
    """``sota_scripts/redq_spqr/redq_spqr_population.py``: K REDQ agents, one update."""

    population: PopulationConfig = field(default_factory=PopulationConfig)


#: population script -> its root schema (registered as ``<name>_schema``, like :data:`SCHEMAS`).
POPULATION_SCHEMAS: dict[str, type] = {
    "sac_ens_population": SACEnsPopulationConfig,
    "redq_population": REDQPopulationConfig,
}

#: ``algorithm`` -> the root schema of its script.
SCHEMAS: dict[str, type] = {
    "sac_ens": SACEnsConfig,
    "redq": REDQConfig,
    "sac_n": SACNConfig,
    "edac": EDACConfig,
    "cql": CQLConfig,
    "masac": MASACConfig,
}

#: a kind of script -> the algorithms it runs (``resolve_config(cfg, kind)``).
FAMILIES: dict[str, tuple[str, ...]] = {
    "online": ("redq", "sac_ens"),
    "offline": ("cql", "edac", "sac_n"),
    "multiagent": ("masac",),
    "any": tuple(SCHEMAS),
}


_FAMILY_TEXT = {
    "online": "the online scripts",
    "offline": "the offline scripts",
    "multiagent": "the multi-agent script",
    "any": "the scripts' algorithms",
}


def schema_name(algorithm: str) -> str:
    """The ``ConfigStore`` name of ``algorithm``'s schema (``sac_ens`` -> ``sac_ens_schema``)."""
    return f"{algorithm}_schema"


# ---------------------------------------------------------------------------- resolution
def resolve_config(cfg: Any, kind: str, *, check: bool = True) -> Any:
    """``cfg`` checked against the schema of ``kind`` and completed: a ``DictConfig``.

    Args:
        cfg: a plain dict, an OmegaConf ``DictConfig`` (a Hydra script's ``cfg``) or an
            already resolved config. A top-level ``hydra`` node is ignored.
        kind: an algorithm (a key of :data:`SCHEMAS`) or a kind of script (``online``,
            ``offline``, ``multiagent``, or ``any``: the schema is then ``cfg.algorithm``'s,
            which must be one of that kind's algorithms).
        check: run the range checks too (``False``: only names, types and defaults, for a
            builder handed a config that was checked before the run started).

    Returns:
        An OmegaConf ``DictConfig`` in struct mode holding every field of the schema:
        values converted to the field's type (``"3"`` -> 3 for an integer, ``4`` -> 4.0
        for a float), null or absent fields replaced by their defaults (a field that
        allows null keeps it), read by attribute (``cfg.optim.lr``).

    Raises:
        ConfigError: naming the field, for an unknown field (with the closest names),
            a value of the wrong type (``optim.lr='abc': expected a float; ...``), a
            required field that is not set, or a value out of range or inconsistent
            with another field (the checks of :mod:`torchrl_spqr.training.validation`).
    """
    from omegaconf import OmegaConf

    plain = to_plain(cfg)
    if not isinstance(plain, Mapping):
        raise ConfigError(f"a config must be a mapping of fields, got {type(cfg).__name__}.")
    plain = {k: v for k, v in plain.items() if k != "hydra"}
    if kind in FAMILIES:
        choices = FAMILIES[kind]
        algo = plain.get("algorithm")
        if algo not in choices:
            raise ConfigError(
                f"algorithm={_show(algo) if algo is not None else 'null'}: expected one of "
                f"{', '.join(choices)} ({_FAMILY_TEXT[kind]}); set algorithm to one of them (each "
                "algorithm has its own script in sota_scripts/)."
            )
        kind = algo
    if kind not in SCHEMAS:
        raise ValueError(
            f"kind={kind!r}: expected an algorithm ({', '.join(SCHEMAS)}) or a kind of script "
            f"({', '.join(FAMILIES)})."
        )
    values = convert_section(plain, SCHEMAS[kind], "")
    if values.get("algorithm") != kind:
        raise ConfigError(
            f"algorithm={_show(values.get('algorithm'))}: this config is checked as {kind!r}; "
            f"set algorithm={kind}."
        )
    if check and kind == "masac":
        validate_multiagent(values)
    elif check:
        validate_single_agent(values, online=kind in FAMILIES["online"])
    out = OmegaConf.create(values)
    OmegaConf.set_struct(out, True)
    return out


def validate_config(cfg: Any, *, online: bool = True) -> None:
    """Stop before training on a config that cannot work: :func:`resolve_config`'s checks.

    ``online`` selects the online (``sac_ens``, ``redq``) or offline (``sac_n``,
    ``edac``, ``cql``) scripts; the schema is ``cfg.algorithm``'s.
    """
    resolve_config(cfg, "online" if online else "offline")


def register_configs() -> bool:
    """Register every root of :data:`SCHEMAS` in Hydra's ``ConfigStore`` (as :func:`schema_name`).

    Returns False when Hydra is not installed (the library works without it).
    """
    try:
        from hydra.core.config_store import ConfigStore
    except ImportError:
        return False
    store = ConfigStore.instance()
    for algo, cls in {**SCHEMAS, **POPULATION_SCHEMAS}.items():
        store.store(name=schema_name(algo), node=hydra_node(cls))
    return True


register_configs()

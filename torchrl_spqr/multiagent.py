"""Multi-agent SAC (MASAC / ISAC) with an SPQR-regularised ensemble critic, on VMAS.

Mirrors TorchRL's ``sota-implementations/multiagent/sac.py`` (continuous
actions): VMAS scenarios through :class:`~torchrl.envs.libs.vmas.VmasEnv`
vectorised over many environments, a Tanh-Gaussian policy
(:class:`~torchrl.modules.models.multiagent.MultiAgentMLP`, per-agent or shared
parameters), TorchRL's :class:`~torchrl.objectives.SACLoss` with its keys set
to the ``"agents"`` group, TD(0) targets and a soft target update. What
changes: the critic is an ensemble of ``N`` independently initialised members
(:class:`~torchrl_spqr.QEnsemble`, one vectorised call for all members) and
the loss is wrapped in :class:`~torchrl_spqr.SPQRLoss` (``spqr.beta=0``: the
ensemble MASAC baseline, same code).

Axes. A sampled batch has batch size ``[B]`` and per-agent entries of shape
``[B, n_agents, ...]``. The ensemble's Q-values, as SACLoss's vmapped calls
produce them, are ``[N, B, n_agents, 1]``:

- dim 0 is the **ensemble** (members);
- dims 1.. are **batch** dims, the agent dim included: SPQR builds one
  ``d x d`` matrix from the ``N`` member values at every ``(sample, agent)``
  and averages the KL over samples *and* agents. Agents are never put on the
  ensemble axis: the regulariser of agent ``i`` only sees agent ``i``'s ``N``
  Q-values (``tests/test_multiagent.py`` checks this against
  :func:`~torchrl_spqr.functional.spqr_kl` on each agent's slice).

With a centralised critic and shared parameters (MASAC's default) every agent
reads the same joint Q-value, so the ``n_agents`` matrices of one sample are
equal and the KL equals the per-sample one. The correlation diagnostics
(``spqr_mp_ratio``, ``spqr_mean_pairwise_corr``) pool samples and agents.

Critic members. TorchRL's ``MultiAgentMLP`` keeps its parameters in a nested
``TensorDictParams`` that it swaps into a meta-device shell at every call; a
list of such members cannot be stacked and called functionally (SACLoss and
QEnsemble raise "Cannot unlock a tensordict that is part of a locked graph",
and ``QEnsemble.members()`` cannot materialise it). :class:`MultiAgentQNet`
is the same network (centralised or not, shared or per-agent parameters) as a
plain module, so it stacks and vmaps like any critic.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tensordict import TensorDictBase
from tensordict.nn import NormalParamExtractor, TensorDictModule
from torch import nn
from torchrl.collectors import Collector
from torchrl.data import LazyTensorStorage, TensorDictReplayBuffer
from torchrl.envs import Compose, RewardSum, StepCounter, TransformedEnv
from torchrl.envs.utils import ExplorationType, set_exploration_type
from torchrl.modules import ProbabilisticActor, TanhNormal
from torchrl.modules.models.multiagent import MultiAgentMLP
from torchrl.objectives import SACLoss, SoftUpdate, ValueEstimators

from torchrl_spqr.ensemble import QEnsemble
from torchrl_spqr.loss import SPQRLoss
from torchrl_spqr.objectives import EnsembleSACLoss
from torchrl_spqr.training.builders import (
    ConfigError,
    _get,
    cfg_bool,
    cfg_choice,
    cfg_float,
    cfg_int,
    cfg_sizes,
    get_device,
    make_spqr_loss,
    validate_runtime,
    validate_spqr,
)
from torchrl_spqr.training.common import (
    RunContext,
    _plot,
    _progress,
    _scalar_metrics,
    seed_everything,
)

__all__ = [
    "GROUP",
    "MultiAgentQNet",
    "expand_done_to_agents",
    "validate_config",
    "make_environment",
    "make_actor",
    "make_critics",
    "make_loss_module",
    "make_optimizers",
    "make_replay_buffer",
    "make_collector",
    "evaluate",
    "train_masac",
]

#: The agent group of VMAS environments in TorchRL.
GROUP = "agents"
_ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "elu": nn.ELU, "silu": nn.SiLU}


# ============================================================================ critic member
class _AgentLinear(nn.Module):
    """``n_agents`` independent linear maps applied to ``[*batch, n_agents, in]``.

    Each agent's weights and biases are drawn as :class:`torch.nn.Linear` draws
    them (``U(-1/sqrt(in), 1/sqrt(in))``), independently per agent.
    """

    def __init__(self, n_agents: int, in_features: int, out_features: int) -> None:
        super().__init__()
        self.n_agents, self.in_features, self.out_features = n_agents, in_features, out_features
        self.weight = nn.Parameter(torch.empty(n_agents, out_features, in_features))
        self.bias = nn.Parameter(torch.empty(n_agents, out_features))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.in_features)
        with torch.no_grad():
            for a in range(self.n_agents):
                nn.init.kaiming_uniform_(self.weight[a], a=math.sqrt(5))
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("...ai,aoi->...ao", x, self.weight) + self.bias

    def extra_repr(self) -> str:
        return f"n_agents={self.n_agents}, in={self.in_features}, out={self.out_features}"


class MultiAgentQNet(nn.Module):
    """``Q(o, a)`` for a group of agents: ``[*batch, n_agents, d_i]`` inputs -> ``[*batch, n_agents, 1]``.

    The inputs (observation and action of every agent) are concatenated on the
    last dim. ``centralised=True`` (MASAC): each agent's value reads every
    agent's observation and action; ``False`` (ISAC): only its own.
    ``share_params=True``: one network for all agents; ``False``: one per agent
    (independently initialised). Same semantics as TorchRL's
    ``MultiAgentMLP(n_agent_outputs=1)``, with plain parameters so that an
    ensemble of it stacks and vmaps (see the module docstring).

    Examples:
        >>> net = MultiAgentQNet(3, 18 + 2, num_cells=(32, 32), centralised=True, share_params=False)
        >>> net(torch.randn(7, 3, 18), torch.randn(7, 3, 2)).shape
        torch.Size([7, 3, 1])
    """

    def __init__(
        self,
        n_agents: int,
        n_agent_inputs: int,
        *,
        num_cells: Sequence[int] = (256, 256),
        activation_class: type[nn.Module] = nn.Tanh,
        centralised: bool = True,
        share_params: bool = True,
    ) -> None:
        super().__init__()
        self.n_agents = int(n_agents)
        self.centralised = bool(centralised)
        self.share_params = bool(share_params)
        prev = n_agent_inputs * (self.n_agents if self.centralised else 1)
        layers: list[nn.Module] = []
        for width in [*num_cells, 1]:
            layers.append(
                nn.Linear(prev, width)
                if self.share_params
                else _AgentLinear(self.n_agents, prev, width)
            )
            layers.append(activation_class())
            prev = width
        self.net = nn.Sequential(*layers[:-1])

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        x = torch.cat(inputs, -1) if len(inputs) > 1 else inputs[0]
        if x.shape[-2] != self.n_agents:
            raise ValueError(
                f"MultiAgentQNet expects inputs [*batch, n_agents={self.n_agents}, features], "
                f"got shape {tuple(x.shape)}."
            )
        if not self.centralised:
            return self.net(x)
        joint = x.flatten(-2)  # [*batch, n_agents * features]
        if self.share_params:
            # one joint value, read by every agent
            return self.net(joint).unsqueeze(-2).expand(*x.shape[:-1], 1)
        return self.net(joint.unsqueeze(-2).expand(*x.shape[:-1], joint.shape[-1]))


def expand_done_to_agents(td: TensorDictBase, reward_key=(GROUP, "reward")) -> TensorDictBase:
    """Copy ``("next", "done" / "terminated")`` to the agent group, shaped like the reward.

    VMAS reports done flags per environment ``[*batch, 1]`` and rewards per
    agent ``[*batch, n_agents, 1]``; the TD target needs them aligned (as
    TorchRL's multi-agent examples' ``DoneTransform``).
    """
    shape = td.get(("next", *reward_key)).shape
    for key in ("done", "terminated"):
        td.set(("next", reward_key[0], key), td.get(("next", key)).unsqueeze(-1).expand(shape))
    return td


# ============================================================================ config
def validate_config(cfg) -> None:
    """Stop before training on a config value that cannot work, naming the field.

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
    validate_runtime(cfg, {"logger.eval_interval": "frames", "checkpoint.interval": "frames"})
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
    cfg_choice(cfg, "network.activation", tuple(sorted(_ACTIVATIONS)), "tanh")
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
    cfg_int(cfg, "optim.num_epochs", 1, lo=1)
    cfg_float(cfg, "optim.lr", lo=0.0, lo_open=True)
    cfg_float(cfg, "optim.gamma", lo=0.0, lo_open=True, hi=1.0)
    cfg_float(cfg, "optim.tau", lo=0.0, lo_open=True, hi=1.0)
    cfg_float(cfg, "optim.alpha_init", 1.0, lo=0.0, lo_open=True)
    if _get(cfg, "optim.max_grad_norm") is not None:
        cfg_float(
            cfg,
            "optim.max_grad_norm",
            lo=0.0,
            hint="set optim.max_grad_norm to a number > 0 (clip), or 0 / null (no clipping)",
        )


# ============================================================================ builders
def make_environment(cfg, seed: int, num_envs: int | None = None, device="cpu") -> TransformedEnv:
    """A vectorised VMAS env (``num_envs`` copies) with per-agent episode returns.

    The time limit ``env.max_steps`` is a :class:`~torchrl.envs.StepCounter`
    truncation, not VMAS's own ``max_steps`` (which reports the time limit as
    ``terminated``): the TD target bootstraps through time limits and stops only
    at the scenario's terminal states. TorchRL's multi-agent example passes
    ``max_steps`` to VMAS, i.e. treats time limits as terminal.
    """
    from torchrl.envs.libs.vmas import VmasEnv

    scenario_kwargs = dict(_get(cfg, "env.scenario", {}) or {})
    env = VmasEnv(
        scenario=str(_get(cfg, "env.scenario_name")),
        num_envs=int(num_envs if num_envs is not None else _get(cfg, "env.num_envs")),
        continuous_actions=True,
        max_steps=None,
        device=device,
        seed=int(seed),
        **scenario_kwargs,
    )
    return TransformedEnv(
        env,
        Compose(
            StepCounter(int(_get(cfg, "env.max_steps"))),
            RewardSum(in_keys=[env.reward_key], out_keys=[(GROUP, "episode_reward")]),
        ),
    )


def _sizes(env) -> tuple[int, int, int]:
    obs = env.full_observation_spec_unbatched[GROUP, "observation"].shape[-1]
    act = env.full_action_spec_unbatched[GROUP, "action"].shape[-1]
    return env.n_agents, obs, act


def make_actor(cfg, env) -> ProbabilisticActor:
    """Tanh-Gaussian policy on each agent's own observation (shared or per-agent MLP)."""
    n_agents, obs, act = _sizes(env)
    hidden = list(_get(cfg, "network.actor_hidden_sizes", _get(cfg, "network.hidden_sizes")))
    net = nn.Sequential(
        MultiAgentMLP(
            n_agent_inputs=obs,
            n_agent_outputs=2 * act,
            n_agents=n_agents,
            centralised=False,
            share_params=bool(_get(cfg, "network.shared_parameters", True)),
            depth=len(hidden),
            num_cells=hidden,
            activation_class=_ACTIVATIONS[str(_get(cfg, "network.activation", "tanh"))],
        ),
        NormalParamExtractor(),
    )
    spec = env.full_action_spec_unbatched
    return ProbabilisticActor(
        TensorDictModule(
            net, in_keys=[(GROUP, "observation")], out_keys=[(GROUP, "loc"), (GROUP, "scale")]
        ),
        spec=spec,
        in_keys=[(GROUP, "loc"), (GROUP, "scale")],
        out_keys=[env.action_key],
        distribution_class=TanhNormal,
        distribution_kwargs={
            "low": spec[GROUP, "action"].space.low,
            "high": spec[GROUP, "action"].space.high,
        },
        return_log_prob=True,
    )


def make_critics(cfg, env) -> QEnsemble:
    """``network.ensemble_size`` independently initialised multi-agent critics."""
    n_agents, obs, act = _sizes(env)
    hidden = tuple(_get(cfg, "network.hidden_sizes"))
    centralised = bool(_get(cfg, "network.centralised_critic", True))
    share = bool(_get(cfg, "network.shared_parameters", True))
    activation = _ACTIVATIONS[str(_get(cfg, "network.activation", "tanh"))]

    def member() -> TensorDictModule:
        return TensorDictModule(
            MultiAgentQNet(
                n_agents,
                obs + act,
                num_cells=hidden,
                activation_class=activation,
                centralised=centralised,
                share_params=share,
            ),
            in_keys=[(GROUP, "observation"), env.action_key],
            out_keys=[(GROUP, "state_action_value")],
        )

    return QEnsemble(member, int(_get(cfg, "network.ensemble_size")))


def make_loss_module(cfg, actor, critics: QEnsemble, env) -> tuple[SPQRLoss, SACLoss]:
    """TorchRL's SACLoss on the agent group (min over all N critics), wrapped in SPQRLoss.

    ``EnsembleSACLoss`` is that loss handing its per-member Q-values to SPQR.
    """
    base = EnsembleSACLoss(
        actor,
        critics.members(),
        num_qvalue_nets=critics.num_members,
        delay_qvalue=True,
        alpha_init=float(_get(cfg, "optim.alpha_init", 1.0)),
        action_spec=env.full_action_spec_unbatched,
    )
    base.set_keys(
        state_action_value=(GROUP, "state_action_value"),
        action=env.action_key,
        reward=env.reward_key,
        done=(GROUP, "done"),
        terminated=(GROUP, "terminated"),
    )
    base.make_value_estimator(ValueEstimators.TD0, gamma=float(_get(cfg, "optim.gamma")))
    # SACLoss registers its target-entropy buffer lazily (at the first forward): create it
    # now, so that a fresh loss loads a trained loss's state dict (resume).
    _ = base.target_entropy
    return make_spqr_loss(cfg, base), base


def make_optimizers(cfg, base: SACLoss) -> dict[str, torch.optim.Optimizer]:
    lr = float(_get(cfg, "optim.lr"))
    opts = {
        "actor": torch.optim.Adam(list(base.actor_network_params.values(True, True)), lr=lr),
        "critic": torch.optim.Adam(list(base.qvalue_network_params.values(True, True)), lr=lr),
    }
    temps = [p for name, p in base.named_parameters() if name.startswith("log_alpha")]
    if temps:
        opts["alpha"] = torch.optim.Adam(temps, lr=lr)
    return opts


def make_replay_buffer(cfg) -> TensorDictReplayBuffer:
    return TensorDictReplayBuffer(
        storage=LazyTensorStorage(int(_get(cfg, "replay_buffer.size"))),
        batch_size=int(_get(cfg, "optim.batch_size")),
    )


def make_collector(cfg, env, actor, *, total_frames: int) -> Collector:
    return Collector(
        env,
        actor,
        frames_per_batch=int(_get(cfg, "collector.frames_per_batch")),
        total_frames=total_frames,
        auto_register_policy_transforms=False,
    )


@torch.no_grad()
def evaluate(env, actor, max_steps: int) -> tuple[float, float]:
    """Deterministic policy on all of ``env``'s vectorised copies for one episode each.

    Returns the mean and std over episodes of the return (summed over time,
    averaged over agents), as TorchRL's multi-agent examples report it.
    """
    with set_exploration_type(ExplorationType.DETERMINISTIC):
        td = env.rollout(max_steps, actor, break_when_any_done=False, auto_cast_to_device=True)
    reward = td.get(("next", GROUP, "reward"))  # [envs, T, n_agents, 1]
    done = td.get(("next", "done")).squeeze(-1)  # [envs, T]
    # only the first episode of each env (VMAS resets envs that finish early)
    first = (done.cumsum(1) - done.long()) == 0
    returns = (reward.mean((-2, -1)) * first).sum(1)
    return float(returns.mean()), float(returns.std(unbiased=False)) if returns.numel() > 1 else 0.0


# ============================================================================ training
def _update(loss, batch, optims, updater, max_grad_norm: float) -> TensorDictBase:
    out = loss(batch)
    total = sum(v for k, v in out.items() if k.startswith("loss_"))
    for o in optims.values():
        o.zero_grad(set_to_none=True)
    total.backward()
    if max_grad_norm > 0:
        for o in optims.values():
            torch.nn.utils.clip_grad_norm_(
                [p for g in o.param_groups for p in g["params"]], max_grad_norm
            )
    for o in optims.values():
        o.step()
    updater.step()
    return out.detach()


def train_masac(cfg, run_dir: str | Path) -> dict[str, float]:
    """Train MASAC (+ SPQR) per ``cfg`` in ``run_dir``; returns final and best evaluation.

    One iteration: collect ``collector.frames_per_batch`` environment steps
    (``env.num_envs`` VMAS copies in parallel; a frame is one step of one env,
    all agents together), add them to the buffer, then run
    ``optim.num_epochs * frames_per_batch // optim.batch_size`` gradient updates
    on samples from the buffer (``replay_buffer.size`` most recent frames).
    Logs every iteration (``fps`` and ``time_s`` count collection and updates,
    not evaluation or checkpoints), evaluates every
    ``logger.eval_interval`` frames, checkpoints every ``checkpoint.interval``
    frames and at exit (Ctrl-C included); ``resume=true`` continues a run.
    """
    validate_config(cfg)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(int(_get(cfg, "threads", 1)))
    seed = int(_get(cfg, "seed", 0))
    seed_everything(seed)
    device = get_device(str(_get(cfg, "device", "auto")))

    env = make_environment(cfg, seed, device=device)
    eval_env = make_environment(
        cfg, seed + 10_000, num_envs=int(_get(cfg, "logger.eval_episodes", 16)), device=device
    )
    actor = make_actor(cfg, env)
    loss, base = make_loss_module(cfg, actor, make_critics(cfg, env), env)
    loss.to(device)
    optims = make_optimizers(cfg, base)
    updater = SoftUpdate(base, tau=float(_get(cfg, "optim.tau")))
    buffer = make_replay_buffer(cfg)

    total = int(_get(cfg, "collector.total_frames"))
    fpb = int(_get(cfg, "collector.frames_per_batch"))
    init_random = int(_get(cfg, "collector.init_random_frames", 0))
    bs = int(_get(cfg, "optim.batch_size"))
    n_upd_iter = max(1, int(_get(cfg, "optim.num_epochs", 1)) * fpb // bs)
    max_grad_norm = float(_get(cfg, "optim.max_grad_norm", 0.0) or 0.0)
    eval_every = int(_get(cfg, "logger.eval_interval", fpb))
    ckpt_every = int(_get(cfg, "checkpoint.interval", 10 * fpb))
    max_steps = int(_get(cfg, "env.max_steps"))

    run = RunContext(cfg, run_dir, loss, optims, step_field="frames", buffer=buffer)
    st = run.state
    if run.maybe_resume():
        print(f"resumed from {run_dir / 'checkpoint'} at frame {st['frames']}")
    remaining = total - st["frames"]
    pbar = _progress(total, st["frames"], bool(_get(cfg, "logger.progress", True)))
    try:
        if remaining > 0:
            collector = make_collector(cfg, env, actor, total_frames=remaining)
            t_prev = time.perf_counter()
            for data in collector:
                t_collected = time.perf_counter()
                data = expand_done_to_agents(data.reshape(-1))
                buffer.extend(data.to("cpu"))
                n = data.numel()
                st["frames"] += n
                done = data.get(("next", "done")).squeeze(-1)
                row: dict[str, Any] = {}
                if done.any():
                    ep = data.get(("next", GROUP, "episode_reward"))[done].mean((-2, -1))
                    row["train_return"] = float(ep.mean())
                    st["episodes"] += int(done.sum())
                out = None
                if st["frames"] > init_random:
                    for _ in range(n_upd_iter):
                        batch = buffer.sample().to(device)
                        out = _update(loss, batch, optims, updater, max_grad_norm)
                        st["updates"] += 1
                    collector.update_policy_weights_()
                now = time.perf_counter()
                st["time_s"] += now - t_prev
                if out is not None:
                    row.update(_scalar_metrics(out))
                    row["updates_per_s"] = n_upd_iter / max(now - t_collected, 1e-9)
                row["fps"] = n / max(now - t_prev, 1e-9)
                if st["frames"] % eval_every < n or st["frames"] >= total:
                    mean, std = evaluate(eval_env, actor, max_steps)
                    st["last_eval"] = mean
                    st["best_eval"] = max(st["best_eval"], mean)
                    row.update(
                        eval_return=mean, eval_return_std=std, best_eval_return=st["best_eval"]
                    )
                run.log(row)
                if st["frames"] % ckpt_every < n:
                    run.checkpoint()
                if pbar is not None:
                    pbar.update(n)
                    pbar.set_postfix(ret=f"{st['last_eval']:.3g}", kl=row.get("spqr_kl", ""))
                # time_s and fps count collection and updates, not evaluation or checkpoints
                t_prev = time.perf_counter()
            collector.shutdown()
    finally:  # Ctrl-C or an error: keep what was logged and checkpoint the state
        if pbar is not None:
            pbar.close()
        run.close()
    _plot(run_dir)
    return {
        "frames": st["frames"],
        "updates": st["updates"],
        "final_eval_return": st["last_eval"],
        "best_eval_return": st["best_eval"],
    }

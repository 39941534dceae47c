"""Builders for multi-agent SAC (MASAC / ISAC) with an SPQR-regularised ensemble critic, on VMAS.

The pieces of TorchRL's ``sota-implementations/multiagent/sac.py`` (continuous
actions): VMAS scenarios through :class:`~torchrl.envs.libs.vmas.VmasEnv`
vectorised over many environments, a Tanh-Gaussian policy
(:class:`~torchrl.modules.models.multiagent.MultiAgentMLP`, per-agent or shared
parameters), TorchRL's :class:`~torchrl.objectives.SACLoss` with its keys set
to the ``"agents"`` group, TD(0) targets and a soft target update. What
changes: the critic is an ensemble of ``N`` independently initialised
:class:`~torchrl_spqr.modules.MultiAgentQNet` members
(:class:`~torchrl_spqr.modules.QEnsemble`, one vectorised call for all members)
and the loss is wrapped in :class:`~torchrl_spqr.objectives.spqr.SPQRLoss`
(``spqr.beta=0``: the ensemble MASAC baseline, same code). The training loop is
``sota_scripts/masac_spqr/masac_spqr.py``.

Axes. A sampled batch has batch size ``[B]`` and per-agent entries of shape
``[B, n_agents, ...]``. The ensemble's Q-values, as SACLoss's vmapped calls
produce them, are ``[N, B, n_agents, 1]``: dim 0 is the **ensemble**; dims 1..
are **batch** dims, the agent dim included. SPQR builds one ``d x d`` matrix
from the ``N`` member values at every ``(sample, agent)`` and averages the KL
over samples *and* agents: the regulariser of agent ``i`` only sees agent
``i``'s ``N`` Q-values. With a centralised critic and shared parameters
(MASAC's default) every agent reads the same joint Q-value, so the ``n_agents``
matrices of one sample are equal and the KL equals the per-sample one. The
correlation diagnostics (``spqr_mp_ratio``, ``spqr_mean_pairwise_corr``) pool
samples and agents.

The optimisers, the replay buffer, the target updater and the collector are the
single-agent builders of :mod:`torchrl_spqr.training.builders` (same config
keys, same objects).
"""

from __future__ import annotations

from typing import Any

import torch
from tensordict import TensorDictBase
from tensordict.nn import NormalParamExtractor, TensorDictModule
from torch import nn
from torchrl.collectors import Collector
from torchrl.envs import Compose, RewardSum, StepCounter, TransformedEnv
from torchrl.envs.utils import ExplorationType, set_exploration_type
from torchrl.modules import ProbabilisticActor, TanhNormal
from torchrl.modules.models.multiagent import MultiAgentMLP
from torchrl.objectives import SACLoss, ValueEstimators

from torchrl_spqr.modules import QEnsemble
from torchrl_spqr.modules.multiagent import ACTIVATIONS, GROUP, MultiAgentQNet
from torchrl_spqr.objectives import EnsembleSACLoss
from torchrl_spqr.objectives.spqr import SPQRLoss
from torchrl_spqr.training import builders as B
from torchrl_spqr.training.builders import (
    make_optimizers,
    make_replay_buffer,
    make_spqr_loss,
    make_target_updater,
)
from torchrl_spqr.training.config import resolve_config

__all__ = [
    "GROUP",
    "ACTIVATIONS",
    "expand_done_to_agents",
    "validate_config",
    "make_environment",
    "make_actor",
    "make_critics",
    "make_loss_module",
    "make_optimizers",
    "make_target_updater",
    "make_replay_buffer",
    "make_collector",
    "evaluate",
]


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
def validate_config(cfg: Any) -> None:
    """Stop before training on a config value that cannot work, naming the field.

    :func:`~torchrl_spqr.training.config.resolve_config` with the MASAC schema: an
    unknown field or a wrong type is refused by name, then the range checks of
    :func:`~torchrl_spqr.training.validation.validate_multiagent` (VMAS scenario,
    frames per batch vs vectorised copies, total and random frames, batch vs buffer
    size, the device) name the field, the value and the fix.
    """
    resolve_config(cfg, "multiagent")


def _resolved(cfg: Any) -> Any:
    """``cfg`` with every field of the MASAC schema (types converted, defaults filled)."""
    return resolve_config(cfg, "multiagent", check=False)


# ============================================================================ builders
def make_environment(
    cfg: Any, seed: int, num_envs: int | None = None, device: torch.device | str = "cpu"
) -> TransformedEnv:
    """A vectorised VMAS env (``num_envs`` copies) with per-agent episode returns.

    The time limit ``env.max_steps`` is a :class:`~torchrl.envs.StepCounter`
    truncation, not VMAS's own ``max_steps`` (which reports the time limit as
    ``terminated``): the TD target bootstraps through time limits and stops only
    at the scenario's terminal states. TorchRL's multi-agent example passes
    ``max_steps`` to VMAS, i.e. treats time limits as terminal.
    """
    from omegaconf import OmegaConf
    from torchrl.envs.libs.vmas import VmasEnv

    env_cfg = _resolved(cfg).env
    env = VmasEnv(
        scenario=env_cfg.scenario_name,
        num_envs=int(num_envs if num_envs is not None else env_cfg.num_envs),
        continuous_actions=True,
        max_steps=None,
        device=device,
        seed=int(seed),
        **OmegaConf.to_container(env_cfg.scenario),  # the scenario's kwargs
    )
    return TransformedEnv(
        env,
        Compose(
            StepCounter(env_cfg.max_steps),
            RewardSum(in_keys=[env.reward_key], out_keys=[(GROUP, "episode_reward")]),
        ),
    )


def _sizes(env) -> tuple[int, int, int]:
    obs = env.full_observation_spec_unbatched[GROUP, "observation"].shape[-1]
    act = env.full_action_spec_unbatched[GROUP, "action"].shape[-1]
    return env.n_agents, obs, act


def make_actor(cfg: Any, env, device: torch.device | str | None = None) -> ProbabilisticActor:
    """Tanh-Gaussian policy on each agent's own observation (shared or per-agent MLP).

    ``device``: where the loss will live; TanhNormal's action bounds are put there
    (:func:`~torchrl_spqr.training.builders.tanh_bounds`).
    """
    n_agents, obs, act = _sizes(env)
    net_cfg = _resolved(cfg).network
    hidden = list(net_cfg.actor_hidden_sizes or net_cfg.hidden_sizes)
    net = nn.Sequential(
        MultiAgentMLP(
            n_agent_inputs=obs,
            n_agent_outputs=2 * act,
            n_agents=n_agents,
            centralised=False,
            share_params=net_cfg.shared_parameters,
            depth=len(hidden),
            num_cells=hidden,
            activation_class=ACTIVATIONS[net_cfg.activation],
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
        distribution_kwargs=B.tanh_bounds(spec[GROUP, "action"], device),
        return_log_prob=True,
    )


def make_critics(cfg: Any, env) -> QEnsemble:
    """``network.ensemble_size`` independently initialised multi-agent critics."""
    n_agents, obs, act = _sizes(env)
    net_cfg = _resolved(cfg).network
    hidden = tuple(net_cfg.hidden_sizes)
    activation = ACTIVATIONS[net_cfg.activation]

    def member() -> TensorDictModule:
        return TensorDictModule(
            MultiAgentQNet(
                n_agents,
                obs + act,
                num_cells=hidden,
                activation_class=activation,
                centralised=net_cfg.centralised_critic,
                share_params=net_cfg.shared_parameters,
            ),
            in_keys=[(GROUP, "observation"), env.action_key],
            out_keys=[(GROUP, "state_action_value")],
        )

    return QEnsemble(member, net_cfg.ensemble_size)


def make_loss_module(cfg: Any, actor, critics: QEnsemble, env) -> tuple[SPQRLoss, SACLoss]:
    """TorchRL's SACLoss on the agent group (min over all N critics), wrapped in SPQRLoss.

    ``EnsembleSACLoss`` is that loss handing its per-member Q-values to SPQR.
    Returns ``(spqr_loss, sac_loss)``.
    """
    optim = _resolved(cfg).optim
    base = EnsembleSACLoss(
        actor,
        critics.members(),
        num_qvalue_nets=critics.num_members,
        delay_qvalue=True,
        alpha_init=optim.alpha_init,
        action_spec=env.full_action_spec_unbatched,
    )
    base.set_keys(
        state_action_value=(GROUP, "state_action_value"),
        action=env.action_key,
        reward=env.reward_key,
        done=(GROUP, "done"),
        terminated=(GROUP, "terminated"),
    )
    base.make_value_estimator(ValueEstimators.TD0, gamma=optim.gamma)
    # SACLoss registers its target-entropy buffer lazily (at the first forward): create it
    # now, so that a fresh loss loads a trained loss's state dict (resume).
    _ = base.target_entropy
    return make_spqr_loss(cfg, base), base


def make_collector(cfg: Any, env, actor, *, total_frames: int) -> Collector:
    """A single-process collector of ``collector.frames_per_batch`` frames over ``env``'s copies.

    The single-agent builder with the ``single`` backend; the policy acts from
    the first frame (``collector.init_random_frames`` only delays the updates).
    """
    return B.make_collector(cfg, env, actor, total_frames=total_frames, init_random_frames=0)


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

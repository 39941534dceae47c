"""A population of SPQR-SAC-Ens agents on Gymnasium MuJoCo: K agents, one batched update.

    python sota_scripts/sac_ens_spqr/sac_ens_spqr_population.py               # beta {0,1} x seeds 0-3
    python sota_scripts/sac_ens_spqr/sac_ens_spqr_population.py population.seeds=[0,1,2] population.beta=[0,1]
    python sota_scripts/sac_ens_spqr/sac_ens_spqr_population.py resume=true hydra.run.dir=RUN_DIR
    python -m torchrl_spqr.analysis RUN_DIR --effects RUN_DIR/effects         # curves, SPQR vs beta 0

The agents are ``population.beta x population.seeds``. Agent ``(b, s)`` is built as the
single run ``sac_ens_spqr.py seed=s spqr.beta=b`` builds it (same initial networks and
environment seeds) and writes that run's folder, ``RUN_DIR/beta<b>_N<n>_seed<s>/``
(``metrics.csv`` with the same columns, ``learning_curve.png``, TorchRL logs, a
``checkpoint/`` of its networks). Each step every agent takes one step in its own
environment (random actions for the first ``collector.init_random_frames`` frames, then
all K policies in one vmapped call), its transition goes to its own replay buffer, and
``optim.utd_ratio`` population updates follow: every agent's SAC + ``beta`` x SPQR loss
on its own batch, all K x N critics and K actors in one batched call, one Adam step over
the stacked parameters (per-agent Adam states stay separate: Adam is elementwise), the
soft target update. Each agent is evaluated on its own evaluation environment every
``logger.eval_interval`` frames. Shared by the agents: every setting other than the
seed and beta (network sizes, optimiser, ``spqr.pairs``, budgets) and the population's
random stream (``seed``). One checkpoint (``RUN_DIR/checkpoint/``) holds the whole
population; Ctrl-C saves it, ``resume=true`` continues every agent (first the updates
an interrupted step still owed, so the counts of an uninterrupted run are kept; the
environments start new episodes, as a resumed single run's do).
"""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from tensordict import TensorDictBase
from torchrl.envs.utils import ExplorationType, set_exploration_type
from utils import (
    evaluate_policy,
    learning_curves_at_exit,
    make_actor,
    make_critics,
    make_environment,
    make_loss_module,
    make_target_updater,
)

from torchrl_spqr.training.cli import run_script
from torchrl_spqr.training.common import seed_everything
from torchrl_spqr.training.population import (
    PopulationEnvs,
    PopulationEvaluator,
    PopulationReplayBuffer,
    PopulationUpdate,
)
from torchrl_spqr.training.population.run import (
    AgentRun,
    PopulationRun,
    agent_configs,
    prepare_population_run,
)


def update(batch: TensorDictBase, population: PopulationUpdate) -> TensorDictBase:
    """One gradient step of every agent on its row of ``batch`` (``[K, B]``); ``[K]`` outputs.

    The K losses (SAC's critic, actor and temperature terms over N critics, plus
    ``beta_k`` times SPQR's KL) in one vmapped call, summed and back-propagated, one Adam
    step over the stacked parameters, the Polyak update of every agent's target critics.
    """
    return population(batch)


def build_agent(agent, device: torch.device):
    """Agent ``(b, s)`` as its single run builds it: seeded, envs, actor, critics, loss.

    Also returns its environments' builders (for worker processes: population.parallel_envs).
    """
    seed_everything(agent.seed)
    make_train = partial(make_environment, agent.cfg, agent.seed)
    make_eval = partial(make_environment, agent.cfg, agent.seed + 10_000)
    train_env, eval_env = make_train(), make_eval()
    actor = make_actor(agent.cfg, train_env, device=device)
    critics = make_critics(agent.cfg, train_env)
    loss, base = make_loss_module(agent.cfg, actor, critics, train_env.action_spec)
    # TorchRL's SoftUpdate registers the target critics' updater with the loss; the
    # population performs the same Polyak step on every agent's stacked targets
    make_target_updater(agent.cfg, base)
    if hasattr(loss, "diagnostics_interval"):
        loss.diagnostics_interval = 0  # the batched update computes no diagnostics
    return (make_train, make_eval), train_env, eval_env, actor, loss.to(device)


def train(cfg: DictConfig, run_dir: str | Path) -> dict[str, dict[str, float]]:
    """Train the population per ``cfg`` in ``run_dir``; returns each agent's summary."""
    cfg, run_dir, device = prepare_population_run(cfg, run_dir)
    agents = agent_configs(cfg)  # beta x seeds, each with its single-run config
    total_frames = cfg.collector.total_frames
    init_random_frames = cfg.collector.init_random_frames

    # Each agent's environments, actor and loss; then the population: one batched update
    built = map(list, zip(*(build_agent(a, device) for a in agents)))
    builders, envs, eval_envs, actors, losses = built
    # stepped in process, or in one worker process per agent (population.parallel_envs)
    train_envs = PopulationEnvs(
        envs, [b[0] for b in builders], parallel=cfg.population.parallel_envs
    )
    optim = cfg.optim
    population = PopulationUpdate(
        losses,
        lr={
            "critic": optim.critic_lr or optim.lr,
            "actor": optim.actor_lr or optim.lr,
            "alpha": optim.alpha_lr or optim.lr,
        },
        tau=optim.tau,
        compile=cfg.compile.compile,
        cudagraphs=cfg.compile.cudagraphs,
    )
    for loss in losses:  # the agents' own losses compute the diagnostics of logged rows
        if hasattr(loss, "diagnostics_interval"):
            loss.diagnostics_interval = cfg.spqr.diagnostics_interval
            loss.eval()
    buffer = PopulationReplayBuffer(len(agents), cfg.replay_buffer.size, device=device)
    seed_everything(cfg.seed)  # the population's shared draws

    # each agent on its own (as its single run), or all at once (population.batched_eval)
    evaluator = PopulationEvaluator(
        population,
        eval_envs,
        actors,
        losses,
        cfg.logger.eval_episodes,
        batched=cfg.population.batched_eval,
        make_envs=[b[1] for b in builders],
        parallel=cfg.population.parallel_envs,
        evaluate_one=evaluate_policy,
    )

    def evaluate(k: int) -> tuple[float, float]:
        return evaluator(k, at=(run.frames, run.updates))

    def diagnostics(k: int) -> dict[str, torch.Tensor]:
        """SPQR's diagnostics of agent k on its last batch, for its logged row (after that
        update's step; a single run reports those computed inside it, before its step)."""
        if last_batch is None or getattr(losses[k], "diagnostics_interval", 0) == 0:
            return {}
        with torch.no_grad():
            out = population.write_agent(k, losses[k])(last_batch[k])
        return {key: v for key, v in out.items() if key.startswith("spqr_") and v.numel() == 1}

    # The runs: one folder per agent (rows, owed rows, logs) and one population checkpoint
    agent_runs = [
        AgentRun(
            a.cfg,
            run_dir / a.name,
            losses[k],
            {},
            step_field="frames",
            total=total_frames,
            evaluate=lambda k=k: evaluate(k),
        )
        for k, a in enumerate(agents)
    ]
    run = PopulationRun(cfg, run_dir, agents, agent_runs, population, buffer, losses)
    if run.start():
        print(f"resumed from {run_dir / 'checkpoint'} at frame {run.frames}")

    def updates_due(frames: int) -> int:
        """Population updates owed after ``frames`` frames (``optim.utd_ratio`` per frame
        from frame ``collector.init_random_frames`` on, as the single run counts them)."""
        return cfg.optim.utd_ratio * max(0, frames - max(init_random_frames, 1) + 1)

    last_batch = None
    tds = train_envs.reset()  # each agent's current step, [K]
    try:
        # first the rows an interrupted run owed; at every exit a checkpoint, then each
        # agent's learning curve, drawn from its metrics.csv (after a stop or an error too)
        with learning_curves_at_exit(*(run_dir / a.name for a in agents)), run:
            while True:
                # the updates of the frames collected (after a resume: the interrupted step's rest)
                while run.updates < updates_due(run.frames):
                    last_batch = buffer.sample(cfg.optim.batch_size)
                    t0 = time.perf_counter()
                    out = update(last_batch, population)
                    run.updated(out, time.perf_counter() - t0)
                run.end_step(diagnostics)  # each agent's row (evaluating), the checkpoint when due
                if run.frames >= total_frames:
                    break
                if run.frames < init_random_frames:  # uniform random actions, per agent
                    tds.set("action", train_envs.random_actions())
                else:  # the K policies in one vmapped call
                    with set_exploration_type(ExplorationType.RANDOM):
                        tds.set("action", population.act(tds.to(device))["action"].cpu())
                data, tds = train_envs.step(tds)  # [K] transitions, [K] next steps
                buffer.extend(data.unsqueeze(1).to(device))
                run.collected(data)  # one frame, and finished episodes' returns, per agent
    finally:
        train_envs.close()
        evaluator.close()
    return run.summary()


@hydra.main(version_base="1.3", config_path="", config_name="population")
def main(cfg: DictConfig) -> None:
    run_dir = HydraConfig.get().runtime.output_dir
    results = run_script(train, cfg, run_dir)  # a bad config: one line, exit 2
    for name, r in results.items():
        print(
            f"{name}: frames {r['frames']}, updates {r['updates']}, "
            f"final eval return {r['final_eval_return']:.1f}, "
            f"best eval return {r['best_eval_return']:.1f}"
        )
    print(f"run folder: {run_dir}")


if __name__ == "__main__":
    main()

"""SPQR-MASAC on VMAS: multi-agent SAC with an ensemble of N critics + SPQR, per agent.

    python sota_scripts/masac_spqr/masac_spqr.py                                   # balance, 3 agents
    python sota_scripts/masac_spqr/masac_spqr.py spqr.beta=0 seed=1                 # baseline, same code
    python sota_scripts/masac_spqr/masac_spqr.py network.centralised_critic=false   # ISAC
    python sota_scripts/masac_spqr/masac_spqr.py env.scenario_name=navigation       # another scenario
    python sota_scripts/masac_spqr/masac_spqr.py resume=true hydra.run.dir=RUN_DIR  # continue a run
    python sota_scripts/masac_spqr/masac_spqr.py -m seed=0,1 spqr.beta=0,1          # sweep

Axes: Q-values are [N, batch, n_agents, 1]; dim 0 is the ensemble, the agent dim is a batch
dim, so SPQR's matrices are built per (sample, agent) and never mix agents.

One iteration: collect ``collector.frames_per_batch`` environment steps (``env.num_envs`` VMAS
copies in parallel; a frame is one step of one env, all agents together), add them to the
buffer, then run ``optim.num_epochs * frames_per_batch // optim.batch_size`` gradient updates
on samples from the buffer (``replay_buffer.size`` most recent frames). A row every
``logger.log_interval`` frames (config.yaml: every iteration), evaluation of the deterministic
policy every ``logger.eval_interval`` frames, a checkpoint every ``checkpoint.interval`` frames
and at every exit (Ctrl-C included); ``resume=true`` continues a run, writing first the row that
was due when it stopped. The collector is shut down on every exit path.
Writes metrics.csv, learning_curve.png, TorchRL logs and checkpoint/ into the run folder.
"""

from __future__ import annotations

from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from tensordict import TensorDictBase
from torchrl.objectives import LossModule, SoftUpdate
from utils import (
    GROUP,
    RunContext,
    evaluate,
    expand_done_to_agents,
    learning_curves_at_exit,
    make_actor,
    make_collector,
    make_critics,
    make_environment,
    make_loss_module,
    make_optimizers,
    make_replay_buffer,
    make_target_updater,
    open_run_folder,
    resolve_config,
    shutdown_collector,
)

from torchrl_spqr.training.cli import run_script


def update(
    batch: TensorDictBase,
    loss_module: LossModule,
    optimizers: dict[str, torch.optim.Optimizer],
    target_updater: SoftUpdate,
    max_grad_norm: float,
) -> TensorDictBase:
    """One gradient step on a sampled multi-agent batch; returns the loss's (detached) output.

    Every ``loss_*`` term (critic, actor, temperature, SPQR per agent) is summed and
    back-propagated, each optimiser's gradients are clipped to ``max_grad_norm`` (0: no
    clipping) and it steps, and the target critics move towards the online ones (``optim.tau``).
    """
    loss_td = loss_module(batch)
    loss = sum(value for key, value in loss_td.items() if key.startswith("loss_"))
    for optimizer in optimizers.values():
        optimizer.zero_grad(set_to_none=True)
    loss.backward()
    for optimizer in optimizers.values():
        if max_grad_norm > 0:
            params = [p for group in optimizer.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
    target_updater.step()
    return loss_td.detach()


def train(cfg: DictConfig, run_dir: str | Path) -> dict[str, float]:
    """Train MASAC (+ SPQR) per ``cfg`` in ``run_dir``; returns the counts and final and best evaluation."""
    # typed, defaults filled; a bad config stops here, before anything is written
    cfg = resolve_config(cfg, "multiagent")
    cfg, run_dir, device = open_run_folder(cfg, run_dir)  # folder, threads, malloc, seeds
    total_frames = cfg.collector.total_frames
    init_random_frames = cfg.collector.init_random_frames  # updates start after these
    # per iteration: num_epochs passes' worth of minibatches of the frames collected
    num_updates = max(
        1, cfg.optim.num_epochs * cfg.collector.frames_per_batch // cfg.optim.batch_size
    )
    max_grad_norm = cfg.optim.max_grad_norm or 0.0  # null or 0: no clipping

    # Environments: env.num_envs VMAS copies to collect, logger.eval_episodes copies to evaluate
    train_env = make_environment(cfg, cfg.seed, device=device)
    eval_env = make_environment(
        cfg, cfg.seed + 10_000, num_envs=cfg.logger.eval_episodes, device=device
    )

    # Agent: per-agent policy, N multi-agent critics, SACLoss on the agent group in SPQRLoss
    actor = make_actor(cfg, train_env, device=device)
    critics = make_critics(cfg, train_env)
    loss_module, base_loss = make_loss_module(cfg, actor, critics, train_env)
    loss_module.to(device)
    optimizers = make_optimizers(cfg, base_loss)
    target_updater = make_target_updater(cfg, base_loss)
    replay_buffer = make_replay_buffer(cfg, run_dir)

    # The run: metrics.csv and TorchRL logger, owed rows, checkpoints, resume
    run = RunContext(
        cfg,
        run_dir,
        loss_module,
        optimizers,
        step_field="frames",
        total=total_frames,
        buffer=replay_buffer,
        evaluate=lambda: evaluate(eval_env, actor, cfg.env.max_steps),
    )
    if run.start():
        print(f"resumed from {run_dir / 'checkpoint'} at frame {run.counters['frames']}")
    done_frames = run.counters["frames"]

    collector = None
    try:
        if done_frames < total_frames:
            collector = make_collector(
                cfg, train_env, actor, total_frames=total_frames - done_frames
            )
        # first the row an interrupted run owed; at every exit a checkpoint, then the
        # learning curve, drawn from metrics.csv (after a stop or an error too)
        with learning_curves_at_exit(run_dir), run:
            if collector is not None:
                for data in collector:
                    # [envs, steps] -> frames; done flags copied to the agents (TD targets)
                    data = expand_done_to_agents(data.reshape(-1))
                    replay_buffer.extend(data.to("cpu"))
                    # an episode's return: summed over time, averaged over the agents
                    agents_return = data.get(("next", GROUP, "episode_reward"))
                    data.set(("next", "episode_reward"), agents_return.mean(-2))
                    run.collected(data)  # frames, episodes, training returns
                    if run.counters["frames"] > init_random_frames:
                        for _ in range(num_updates):
                            batch = replay_buffer.sample().to(device)
                            run.updated(
                                update(
                                    batch, loss_module, optimizers, target_updater, max_grad_norm
                                )
                            )
                        collector.update_policy_weights_()
                    run.end_step()  # log (evaluating when due) and checkpoint when due
    finally:  # the end, an error or Ctrl-C: stop the collector
        shutdown_collector(collector)
    return run.summary()


@hydra.main(version_base="1.3", config_path="", config_name="config")
def main(cfg: DictConfig) -> None:
    run_dir = HydraConfig.get().runtime.output_dir
    result = run_script(train, cfg, run_dir)  # a bad config: one line, exit 2
    print(
        f"frames {result['frames']}, updates {result['updates']}, "
        f"final eval return {result['final_eval_return']:.3f}, "
        f"best eval return {result['best_eval_return']:.3f}\nrun folder: {run_dir}"
    )


if __name__ == "__main__":
    main()

"""SPQR-REDQ on Gymnasium MuJoCo: REDQ (N=10, M=2, UTD G=20, policy delay G) + SPQR.

    python sota_scripts/redq_spqr/redq_spqr.py                              # Hopper-v5, paper defaults
    python sota_scripts/redq_spqr/redq_spqr.py env=walker2d seed=1 spqr.beta=0   # baseline, same code
    python sota_scripts/redq_spqr/redq_spqr.py resume=true hydra.run.dir=RUN_DIR # continue a run
    python sota_scripts/redq_spqr/redq_spqr.py -m seed=0,1,2 spqr.beta=0,1       # sweep

Collect ``collector.frames_per_batch`` frames (random actions for the first
``collector.init_random_frames``), store them, then ``optim.utd_ratio`` (G) updates per
collected frame: REDQ's critic loss (target: minimum over a random subset of M of the N
critics), its actor loss (mean over all N, every ``optim.policy_update_delay`` updates) and
temperature loss, plus ``spqr.beta`` times SPQR's KL between the critics' spectrum and
Wigner's semicircle. Evaluate the deterministic policy every ``logger.eval_interval`` frames.
Writes metrics.csv, learning_curve.png, TorchRL logs and checkpoint/ into the run folder.
"""

from __future__ import annotations

import functools
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from tensordict import TensorDictBase
from torchrl.collectors import Collector
from torchrl.objectives import LossModule, SoftUpdate
from utils import (
    RunContext,
    cuda_graph_update,
    evaluate_policy,
    learning_curves_at_exit,
    make_actor,
    make_collector,
    make_critics,
    make_environment,
    make_loss_module,
    make_optimizers,
    make_replay_buffer,
    make_target_updater,
    prepare_run,
    shutdown_collector,
)

from torchrl_spqr.training.cli import run_script


def update(
    batch: TensorDictBase,
    loss_module: LossModule,
    optimizers: dict[str, torch.optim.Optimizer],
    target_updater: SoftUpdate,
) -> TensorDictBase:
    """One gradient step on a sampled batch; returns the loss's (detached) output.

    Every ``loss_*`` term (critic, actor, temperature, SPQR) is summed and back-propagated,
    each optimiser steps, and the target critics move towards the online ones (Polyak,
    ``optim.tau``).
    """
    loss_td = loss_module(batch)
    loss = sum(value for key, value in loss_td.items() if key.startswith("loss_"))
    for optimizer in optimizers.values():
        optimizer.zero_grad(set_to_none=True)
    loss.backward()
    for optimizer in optimizers.values():
        optimizer.step()
    target_updater.step()
    return loss_td.detach()


def train(cfg: DictConfig, run_dir: str | Path) -> dict[str, float]:
    """Train per ``cfg`` in ``run_dir``; returns the counts and the final and best evaluation."""
    # typed, defaults filled (a bad config stops here, before anything is written)
    cfg, run_dir, device = prepare_run(cfg, run_dir, kind="online")
    seed = cfg.seed
    total_frames = cfg.collector.total_frames
    init_random_frames = cfg.collector.init_random_frames

    # Environments, agent (actor, N critics, SPQR-wrapped loss), optimisers, replay buffer
    train_env = make_environment(cfg, seed)
    eval_env = make_environment(cfg, seed + 10_000)
    actor = make_actor(cfg, train_env, device=device)
    critics = make_critics(cfg, train_env)
    loss_module, base_loss = make_loss_module(cfg, actor, critics, train_env.action_spec)
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
        evaluate=lambda: evaluate_policy(eval_env, actor, cfg.logger.eval_episodes),
    )
    if run.start():
        print(f"resumed from {run_dir / 'checkpoint'} at frame {run.counters['frames']}")

    # The update, compiled (compile.compile) and captured as a CUDA graph (compile.cudagraphs)
    # on request (after a resume: the optimisers' loaded states become capturable); the
    # config check refused CUDA graphs on a device without CUDA
    step = functools.partial(
        update, loss_module=loss_module, optimizers=optimizers, target_updater=target_updater
    )
    if cfg.compile.compile:
        step = torch.compile(step)
    if cfg.compile.cudagraphs:
        step = cuda_graph_update(step, optimizers)
    done_frames = run.counters["frames"]

    collector = None
    try:
        if done_frames < total_frames:  # random actions for the first init_random_frames
            collector = make_collector(
                cfg,
                train_env,
                actor,
                total_frames=total_frames - done_frames,
                init_random_frames=max(0, init_random_frames - done_frames),
                seed=seed,
            )
        # first the row an interrupted run owed; at every exit a checkpoint, then the
        # learning curve, drawn from metrics.csv (after a stop or an error too)
        with learning_curves_at_exit(run_dir), run:
            if collector is not None:
                remote_policy = type(collector) is not Collector  # workers act with a copy
                for data in collector:
                    data = data.reshape(-1)  # (workers, steps) -> frames
                    replay_buffer.extend(data)
                    frames = run.collected(data)  # frames, episodes, training returns
                    if run.counters["frames"] >= init_random_frames:
                        for _ in range(cfg.optim.utd_ratio * frames):
                            run.updated(step(replay_buffer.sample().to(device)))
                        if remote_policy:
                            collector.update_policy_weights_()
                    run.end_step()  # log (evaluating) and checkpoint when due
                    if run.counters["frames"] >= total_frames:
                        break  # asynchronous workers may still be running
    finally:  # the end, an error or Ctrl-C: stop the workers
        shutdown_collector(collector)
    return run.summary()


@hydra.main(version_base="1.3", config_path="", config_name="config")
def main(cfg: DictConfig) -> None:
    run_dir = HydraConfig.get().runtime.output_dir
    result = run_script(train, cfg, run_dir)  # a bad config: one line, exit 2
    print(
        f"frames {result['frames']}, updates {result['updates']}, "
        f"final eval return {result['final_eval_return']:.1f}, "
        f"best eval return {result['best_eval_return']:.1f}\nrun folder: {run_dir}"
    )


if __name__ == "__main__":
    main()

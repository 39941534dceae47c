"""SPQR-EDAC (offline): SAC-N plus the ensemble gradient-diversity term (eta), + SPQR. spqr.beta=0: EDAC.

    python sota_scripts/edac_spqr/edac_spqr.py                                     # locally built Hopper-v5 medium-replay
    python sota_scripts/edac_spqr/edac_spqr.py dataset=hopper_medium_replay        # D4RL (needs network)
    python sota_scripts/edac_spqr/edac_spqr.py spqr.beta=0 seed=1                   # the baseline, same code
    python sota_scripts/edac_spqr/edac_spqr.py resume=true hydra.run.dir=RUN_DIR    # continue a run

Sample a batch of the dataset's transitions, then one update: SAC-N's critic, actor and
temperature losses (minimum over all N critics), EDAC's ensemble gradient-diversity term
(``optim.eta``) and ``spqr.beta`` times SPQR's KL between the critics' spectrum and Wigner's
semicircle. Evaluate the deterministic policy every ``logger.eval_interval`` updates in the
dataset's environment (return and D4RL normalised score).
Writes metrics.csv (returns and normalised scores, final and best), learning_curve.png,
TorchRL logs and checkpoint/ into the run folder.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from tensordict import TensorDictBase
from torchrl.objectives import LossModule, SoftUpdate
from utils import (
    RunContext,
    cuda_graph_update,
    evaluate_policy,
    learning_curves_at_exit,
    make_actor,
    make_critics,
    make_environment,
    make_loss_module,
    make_offline_data,
    make_optimizers,
    make_target_updater,
    prepare_run,
    record_dataset_transform,
)

from torchrl_spqr.training.cli import run_script


def update(
    batch: TensorDictBase,
    loss_module: LossModule,
    optimizers: dict[str, torch.optim.Optimizer],
    target_updater: SoftUpdate,
) -> TensorDictBase:
    """One gradient step on a batch of dataset transitions; returns the loss's (detached) output.

    Every ``loss_*`` term (critic, actor, temperature, diversity, SPQR) is summed and back-
    propagated, each optimiser steps, and the target critics move towards the online ones
    (Polyak, ``optim.tau``).
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
    """Train per ``cfg`` in ``run_dir``; returns the update count and the final and best
    evaluation return and normalised score."""
    # typed, defaults filled (a bad config stops here, before anything is written)
    cfg, run_dir, device = prepare_run(cfg, run_dir, kind="offline")
    num_updates = cfg.optim.num_updates

    # The dataset (a TorchRL replay buffer of its transitions) and the environment of its
    # evaluation (env.name or the dataset's own), in the environment's own reward
    data = make_offline_data(cfg)
    record_dataset_transform(run_dir, data)  # dataset_transform.json: the reward transform
    eval_cfg = {
        "env": {"name": cfg.env.name or data.env_id, "max_episode_steps": cfg.env.max_episode_steps}
    }
    eval_env = make_environment(eval_cfg, cfg.seed + 10_000, env_kwargs=data.env_kwargs)

    # Agent (actor, N critics, SPQR-wrapped loss), optimisers, target updater
    actor = make_actor(cfg, eval_env, device=device)
    critics = make_critics(cfg, eval_env)
    loss_module, base_loss = make_loss_module(cfg, actor, critics, eval_env.action_spec)
    loss_module.to(device)
    optimizers = make_optimizers(cfg, base_loss)
    target_updater = make_target_updater(cfg, base_loss)

    # The run: metrics.csv and TorchRL logger, owed rows, checkpoints, resume; each
    # evaluation also logs the normalised score (the dataset's reference scores)
    has_scores = data.ref_min_score is not None and data.ref_max_score is not None
    run = RunContext(
        cfg,
        run_dir,
        loss_module,
        optimizers,
        step_field="updates",
        total=num_updates,
        evaluate=lambda: evaluate_policy(eval_env, actor, cfg.logger.eval_episodes),
        score=data.normalized_score if has_scores else None,
    )
    if run.start():
        print(f"resumed from {run_dir / 'checkpoint'} at update {run.counters['updates']}")

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

    # first the row an interrupted run owed; at every exit a checkpoint, then the
    # learning curve, drawn from metrics.csv (after a stop or an error too)
    with learning_curves_at_exit(run_dir), run:
        while run.counters["updates"] < num_updates:
            batch = data.buffer.sample().to(device)
            run.updated(step(batch))
            run.end_step()  # log (evaluating) and checkpoint when due
    return run.summary()


@hydra.main(version_base="1.3", config_path="", config_name="config")
def main(cfg: DictConfig) -> None:
    run_dir = HydraConfig.get().runtime.output_dir
    r = run_script(train, cfg, run_dir)  # a bad config: one line, exit 2
    final, best = (
        r.get("final_normalized_score", math.nan),
        r.get("best_normalized_score", math.nan),
    )
    print(
        f"updates {r['updates']}, final eval return {r['final_eval_return']:.1f} "
        f"(normalised {final:.1f}), best eval return "
        f"{r['best_eval_return']:.1f} (normalised {best:.1f})\nrun folder: {run_dir}"
    )


if __name__ == "__main__":
    main()

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
on samples from the buffer (``replay_buffer.size`` most recent frames). Every iteration logs a
row (``fps`` and ``time_s`` count collection and updates, not evaluation or checkpoints);
evaluation every ``logger.eval_interval`` frames, a checkpoint every ``checkpoint.interval``
frames and at exit (Ctrl-C included); ``resume=true`` continues a run, writing first the row
that was due when it stopped. The collector is shut down on every exit path.
Writes metrics.csv, learning_curve.png, TorchRL logs and checkpoint/ into the run folder.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from tensordict import TensorDictBase
from utils import (
    GROUP,
    evaluate,
    expand_done_to_agents,
    get_device,
    make_actor,
    make_collector,
    make_critics,
    make_environment,
    make_loss_module,
    make_optimizers,
    make_replay_buffer,
    make_target_updater,
    validate_config,
)

from torchrl_spqr.training.builders import shutdown_collector
from torchrl_spqr.training.cli import run_script
from torchrl_spqr.training.common import (
    RunContext,
    _plot,
    _progress,
    _scalar_metrics,
    seed_everything,
)


def update(loss, batch: TensorDictBase, optims, updater, max_grad_norm: float) -> TensorDictBase:
    """One gradient step of every optimiser on ``batch`` (SAC + SPQR losses), then the target update."""
    out = loss(batch)
    total = sum(v for k, v in out.items() if k.startswith("loss_"))
    for o in optims.values():
        o.zero_grad(set_to_none=True)
    total.backward()
    if max_grad_norm > 0:
        for o in optims.values():
            params = [p for g in o.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    for o in optims.values():
        o.step()
    updater.step()
    return out.detach()


def train(cfg, run_dir: str | Path) -> dict[str, float]:
    """Train MASAC (+ SPQR) per ``cfg`` in ``run_dir``; returns final and best evaluation."""
    validate_config(cfg)  # every field checked before anything is built
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(int(cfg.threads))
    seed_everything(int(cfg.seed))
    device = get_device(str(cfg.device))

    # Environments: env.num_envs VMAS copies for collection, one episode per copy for evaluation
    env = make_environment(cfg, cfg.seed, device=device)
    eval_env = make_environment(
        cfg, cfg.seed + 10_000, num_envs=cfg.logger.eval_episodes, device=device
    )

    # Agent: per-agent policy, N multi-agent critics, SACLoss on the agent group in SPQRLoss
    actor = make_actor(cfg, env)
    loss, base = make_loss_module(cfg, actor, make_critics(cfg, env), env)
    loss.to(device)
    optims = make_optimizers(cfg, base)
    updater = make_target_updater(cfg, base)
    buffer = make_replay_buffer(cfg)

    total = int(cfg.collector.total_frames)
    fpb = int(cfg.collector.frames_per_batch)
    init_random = int(cfg.collector.init_random_frames)
    n_updates = max(1, int(cfg.optim.num_epochs) * fpb // int(cfg.optim.batch_size))
    max_grad_norm = float(cfg.optim.max_grad_norm or 0.0)
    eval_every = int(cfg.logger.eval_interval)
    ckpt_every = int(cfg.checkpoint.interval)
    max_steps = int(cfg.env.max_steps)

    # The run: metrics.csv + TorchRL logger, checkpoints, resume, the row owed at a stop
    run = RunContext(cfg, run_dir, loss, optims, step_field="frames", buffer=buffer)
    st = run.state
    if run.maybe_resume():
        print(f"resumed from {run_dir / 'checkpoint'} at frame {st['frames']}")
    pbar = _progress(total, st["frames"], bool(cfg.logger.progress))

    collector = None
    n, last_out, returns = 0, None, []  # this iteration's frames, last update, episode returns
    t_prev = t_collected = time.perf_counter()

    def train_part() -> dict[str, Any]:
        """The training metrics of this iteration's row."""
        now = time.perf_counter()
        row: dict[str, Any] = {"fps": n / max(now - t_prev, 1e-9)}
        if returns:
            row["train_return"] = sum(returns) / len(returns)
        if last_out is not None:
            row.update(_scalar_metrics(last_out))
            row["updates_per_s"] = n_updates / max(now - t_collected, 1e-9)
        return row

    def eval_part(row: dict[str, Any]) -> None:
        mean, std = evaluate(eval_env, actor, max_steps)
        st["last_eval"] = mean
        st["best_eval"] = max(st["best_eval"], mean)
        row.update(eval_return=mean, eval_return_std=std, best_eval_return=st["best_eval"])

    try:
        if run.owed is not None:  # the row due when the run stopped
            run.write_owed(eval_part)
        if total > st["frames"]:
            collector = make_collector(cfg, env, actor, total_frames=total - st["frames"])
            t_prev = time.perf_counter()
            for data in collector:
                # Collect: [envs, steps] -> frames, done flags copied to the agents
                t_collected = time.perf_counter()
                data = expand_done_to_agents(data.reshape(-1))
                buffer.extend(data.to("cpu"))
                n = data.numel()
                st["frames"] += n
                due_eval = st["frames"] % eval_every < n or st["frames"] >= total
                run.owe(evaluate=due_eval, train=True)  # every iteration logs a row
                done = data.get(("next", "done")).squeeze(-1)
                episode_rewards = data.get(("next", GROUP, "episode_reward"))[done]
                returns = episode_rewards.mean((-2, -1)).tolist()  # mean over agents
                st["episodes"] += len(returns)

                # Update: num_epochs passes' worth of minibatches from the buffer
                last_out = None
                if st["frames"] > init_random:
                    for _ in range(n_updates):
                        last_out = update(
                            loss, buffer.sample().to(device), optims, updater, max_grad_norm
                        )
                        st["updates"] += 1
                    collector.update_policy_weights_()
                st["time_s"] += time.perf_counter() - t_prev

                # Log (and evaluate when due), checkpoint
                run.write_owed(eval_part, train_part)
                if st["frames"] % ckpt_every < n:
                    run.checkpoint()
                if pbar is not None:
                    pbar.update(n)
                    pbar.set_postfix(ret=f"{st['last_eval']:.3g}")
                # time_s and fps count collection and updates, not evaluation or checkpoints
                t_prev = time.perf_counter()
    finally:  # Ctrl-C or an error too: the owed row keeps its metrics, stop, checkpoint
        run.keep_owed_train(train_part)
        shutdown_collector(collector)
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


@hydra.main(version_base="1.3", config_path="", config_name="config")
def main(cfg) -> None:
    run_dir = HydraConfig.get().runtime.output_dir
    result = run_script(train, cfg, run_dir)  # a bad config: one line, exit 2
    print(
        f"frames {result['frames']}, updates {result['updates']}, "
        f"final eval return {result['final_eval_return']:.3f}, "
        f"best eval return {result['best_eval_return']:.3f}\nrun folder: {run_dir}"
    )


if __name__ == "__main__":
    main()

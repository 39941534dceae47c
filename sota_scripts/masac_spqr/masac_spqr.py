"""SPQR-MASAC on VMAS: multi-agent SAC with an ensemble of N critics + SPQR, per agent.

    python sota_scripts/masac_spqr/masac_spqr.py                                   # balance, 3 agents
    python sota_scripts/masac_spqr/masac_spqr.py spqr.beta=0 seed=1                 # baseline, same code
    python sota_scripts/masac_spqr/masac_spqr.py network.centralised_critic=false   # ISAC
    python sota_scripts/masac_spqr/masac_spqr.py env.scenario_name=navigation       # another scenario
    python sota_scripts/masac_spqr/masac_spqr.py resume=true hydra.run.dir=RUN_DIR  # continue a run
    python sota_scripts/masac_spqr/masac_spqr.py -m seed=0,1 spqr.beta=0,1          # sweep

Axes: Q-values are [N, batch, n_agents, 1]; dim 0 is the ensemble, the agent dim is a batch
dim, so SPQR's matrices are built per (sample, agent) and never mix agents.
Writes metrics.csv, learning_curve.png, TorchRL logs and checkpoint/ into the run folder.
"""

from __future__ import annotations

import hydra
from hydra.core.hydra_config import HydraConfig
from utils import train

from torchrl_spqr.training.cli import run_script


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

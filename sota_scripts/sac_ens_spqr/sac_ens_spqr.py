"""SPQR-SAC-Ens on Gymnasium MuJoCo: SAC with N critics (min over all N for target and actor) + SPQR.

    python sota_scripts/sac_ens_spqr/sac_ens_spqr.py                              # Hopper-v5, paper defaults
    python sota_scripts/sac_ens_spqr/sac_ens_spqr.py env=walker2d seed=1 spqr.beta=0   # baseline, same code
    python sota_scripts/sac_ens_spqr/sac_ens_spqr.py resume=true hydra.run.dir=RUN_DIR # continue a run
    python sota_scripts/sac_ens_spqr/sac_ens_spqr.py -m seed=0,1,2 spqr.beta=0,1       # sweep

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
        f"final eval return {result['final_eval_return']:.1f}, "
        f"best eval return {result['best_eval_return']:.1f}\nrun folder: {run_dir}"
    )


if __name__ == "__main__":
    main()

"""SPQR-EDAC (offline): SAC-N plus the ensemble gradient-diversity term (eta), + SPQR. spqr.beta=0: EDAC.

    python sota_scripts/edac_spqr/edac_spqr.py                                     # locally built Hopper-v5 medium-replay
    python sota_scripts/edac_spqr/edac_spqr.py dataset=hopper_medium_replay        # D4RL (needs network)
    python sota_scripts/edac_spqr/edac_spqr.py spqr.beta=0 seed=1                   # the baseline, same code
    python sota_scripts/edac_spqr/edac_spqr.py resume=true hydra.run.dir=RUN_DIR    # continue a run

Writes metrics.csv (returns and normalised scores, final and best), learning_curve.png,
TorchRL logs and checkpoint/ into the run folder.
"""

from __future__ import annotations

import hydra
from hydra.core.hydra_config import HydraConfig
from utils import train

from torchrl_spqr.training.cli import run_script


@hydra.main(version_base="1.3", config_path="", config_name="config")
def main(cfg) -> None:
    run_dir = HydraConfig.get().runtime.output_dir
    r = run_script(train, cfg, run_dir)  # a bad config: one line, exit 2
    print(
        f"updates {r['updates']}, final eval return {r['final_eval_return']:.1f} "
        f"(normalised {r['final_normalized_score']:.1f}), best eval return "
        f"{r['best_eval_return']:.1f} (normalised {r['best_normalized_score']:.1f})\nrun folder: {run_dir}"
    )


if __name__ == "__main__":
    main()

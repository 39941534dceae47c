#!/usr/bin/env bash
# Short offline comparison on this machine: SAC-N vs SPQR-SAC-N (equal N = 10, 3x256 networks,
# same seeds) on a locally built Hopper-v5 dataset (D4RL "random" recipe, 50k transitions).
# Usage: bash benchmarks/learning/run_offline_hopper.sh SEED [UPDATES] [OUT]
set -euo pipefail
seed=${1:-0}
updates=${2:-10000}
out=${3:-runs/learning_offline}
export MINARI_DATASETS_PATH=${MINARI_DATASETS_PATH:-$HOME/.minari/datasets}
python -m torchrl_spqr.data info local/hopper/random-v0 >/dev/null 2>&1 || \
  python -m torchrl_spqr.data build --env Hopper-v5 --kind random --steps 50000 --id local/hopper/random-v0
for beta in 0 1; do
  python sota_scripts/sac_n_spqr/sac_n_spqr.py dataset=local_hopper_random network.ensemble_size=10 \
    spqr.beta="$beta" seed="$seed" optim.num_updates="$updates" logger.log_interval=500 \
    logger.eval_interval=2500 logger.eval_episodes=5 logger.progress=false \
    hydra.run.dir="$out/sac_n_hopper_random_N10_beta${beta}_seed${seed}" &
done
wait

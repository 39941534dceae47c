#!/usr/bin/env bash
# Short offline comparison on this machine: SAC-N vs SPQR-SAC-N vs EDAC vs SPQR-EDAC
# (N = 10, 3x256 networks, EDAC eta = 1, SPQR beta = 1 on Q_k(s', a'~pi)), the same seed for
# every arm, on a locally built Minari dataset (no download: see torchrl_spqr.datasets).
# 3,000 gradient updates, evaluation of 5 deterministic episodes every 1,000 updates.
# Two 1-thread processes at a time.
# Usage: bash benchmarks/learning/run_offline_compare.sh DATASET SEED [UPDATES] [OUT]
#   DATASET: local_hopper_random | local_hopper_medium_replay (a dataset/*.yaml config name)
# Build the datasets first (MINARI_DATASETS_PATH says where they live):
#   python -m torchrl_spqr.data build --env Hopper-v5 --kind random --steps 50000 --id local/hopper/random-v0
#   python -m torchrl_spqr.data build --env Hopper-v5 --kind medium-replay \
#       --source-run RUN_DIR --id local/hopper/medium-replay-v0 --ref-max-score 3234.3
set -euo pipefail
dataset=${1:?dataset config name, e.g. local_hopper_random}
seed=${2:-0}
updates=${3:-3000}
out=${4:-runs/learning_offline}
name=${dataset#local_}
run() {
  local algo=$1 beta=$2
  python "sota_scripts/${algo}_spqr/${algo}_spqr.py" dataset="$dataset" network.ensemble_size=10 \
    spqr.beta="$beta" seed="$seed" optim.num_updates="$updates" logger.log_interval=250 \
    logger.eval_interval=1000 logger.eval_episodes=5 logger.progress=false \
    checkpoint.interval=100000 threads=1 \
    hydra.run.dir="$out/${algo}_${name}_N10_beta${beta}_seed${seed}"
}
for algo in sac_n edac; do
  run "$algo" 0 &
  run "$algo" 1 &
  wait
done

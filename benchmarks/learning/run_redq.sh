#!/usr/bin/env bash
# Short online learning comparison on this machine: REDQ (N = 10, M = 2) with and without SPQR
# (beta = 1, the N/10 rule for member-summed critic losses), UTD 5 (the policy updated once per
# 5 critic updates), 5,000 environment steps of which the first 1,000 uniform random
# (20,000 critic updates), evaluation every 1,000 steps over 5 deterministic episodes.
# Two 1-thread processes side by side (faster than one 2-thread process on 2 cores).
# Usage: [ENV=walker2d] bash benchmarks/learning/run_redq.sh SEED [OUT]
# (ENV is a config name of torchrl_spqr/configs/env: hopper (default), walker2d, ...)
set -euo pipefail
seed=${1:-0}
out=${2:-runs/learning_redq}
env=${ENV:-hopper}
for beta in 0 1; do
  python sota_scripts/redq_spqr/redq_spqr.py env="$env" seed="$seed" spqr.beta="$beta" \
    collector.total_frames=5000 collector.init_random_frames=1000 \
    optim.utd_ratio=5 optim.policy_update_delay=5 \
    logger.log_interval=250 logger.eval_interval=1000 logger.eval_episodes=5 \
    logger.progress=false checkpoint.interval=5000 threads=1 \
    hydra.run.dir="$out/redq_${env}_N10_beta${beta}_seed${seed}" &
done
wait

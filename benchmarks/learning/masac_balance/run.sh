#!/usr/bin/env bash
# Short learning comparison on this 2-core CPU machine: SPQR-MASAC (beta 1) vs ensemble MASAC
# (beta 0), VMAS balance (3 agents), default config of sota_scripts/masac_spqr (N=10 centralised
# critics with shared parameters, 64x64, batch 256, 20 vectorised envs, 2,000 frames and 31
# updates per iteration), 100k frames, evaluation every 10k frames over 32 episodes.
# The two arms of one seed run side by side, one thread each.
# Usage: bash benchmarks/learning/masac_balance/run.sh SEED [OUT]
set -euo pipefail
seed=${1:-0}
out=${2:-runs/learning/masac_balance}
for beta in 0 1; do
  nice -n 5 python sota_scripts/masac_spqr/masac_spqr.py seed="$seed" spqr.beta="$beta" \
    collector.total_frames=100000 logger.eval_interval=10000 threads=1 logger.progress=false \
    hydra.run.dir="$out/masac_balance_N10_beta${beta}_seed${seed}" &
done
wait

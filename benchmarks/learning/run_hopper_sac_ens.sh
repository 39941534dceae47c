#!/usr/bin/env bash
# Short online learning comparison on this machine: SAC-Ens (N=10, UTD 1) with and without SPQR,
# 20k environment steps (5k uniform-random warm-up), evaluation every 2.5k steps over
# 5 deterministic episodes. Two 1-thread processes at a time (faster than one 2-thread process).
# Usage: [ENV=Walker2d-v5] bash benchmarks/learning/run_hopper_sac_ens.sh SEED [OUT]
# (ENV defaults to Hopper-v5.)
set -euo pipefail
seed=${1:-0}
out=${2:-runs/learning}
env=${ENV:-Hopper-v5}
for beta in 0 1; do
  python examples/spqr_demo.py --env "$env" --frames 20000 --random-frames 5000 \
    --eval-every 2500 --eval-episodes 5 --beta "$beta" --seed "$seed" --threads 1 --out "$out" &
done
wait

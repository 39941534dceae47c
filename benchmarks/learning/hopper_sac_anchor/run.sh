#!/usr/bin/env bash
# Sanity anchor for the training code (issue 19 item 6): our SAC-Ens script with N = 2
# critics and beta = 0 (clipped double-Q SAC) against TorchRL's own, unmodified SAC SOTA
# script (sota-implementations/sac), Hopper-v5, same budget, same seeds, side by side.
#
# Usage (from anywhere; the training runs use this checkout's package and scripts):
#   bash benchmarks/learning/hopper_sac_anchor/run.sh TORCHRL_REPO [REF]
#   TORCHRL_REPO=/path/to/pytorch-rl bash benchmarks/learning/hopper_sac_anchor/run.sh
# TORCHRL_REPO: a local clone of https://github.com/pytorch/rl (REF: a tag or branch
# holding TorchRL 0.14's script; default: the first of v0.14.1, v0.14.0, prepare-0.14
# that exists), or any folder holding sota-implementations/sac/ (then REF is ignored).
# The three files must be byte-identical to the ones of the committed results
# (sha256 below); ALLOW_OTHER_SAC=1 runs other versions anyway.
# Environment: SEEDS (default "0 1 2 3 4"), FRAMES (20000), INIT_RANDOM (5000),
# EVAL_EVERY (2000), OUT (runs/hopper_sac_anchor under this checkout), NICE (19).
# Each seed runs both arms at once (two 1-thread processes), then the next seed; a run
# whose folder already holds a finished run is skipped. At the end summarize.py writes
# curves/, summary.csv, stats.csv, difference.csv and hopper_sac_anchor.png next to this script.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../../.." && pwd)
repo=${1:-${TORCHRL_REPO:-}}
ref=${2:-${TORCHRL_REF:-}}
seeds=${SEEDS:-"0 1 2 3 4"}
frames=${FRAMES:-20000}
init_random=${INIT_RANDOM:-5000}
eval_every=${EVAL_EVERY:-2000}
out=${OUT:-$root/runs/hopper_sac_anchor}
nice_level=${NICE:-19}

if [ -z "$repo" ]; then
  echo "usage: run.sh TORCHRL_REPO [REF]  (or TORCHRL_REPO=... run.sh): a local pytorch/rl checkout" >&2
  exit 2
fi

# ------------------------------------------------------------- TorchRL's script, as it is
sac_dir="$out/torchrl_sac_script"
mkdir -p "$sac_dir"
files="sac.py utils.py config.yaml"
if git -C "$repo" rev-parse --git-dir > /dev/null 2>&1; then
  if [ -z "$ref" ]; then
    for r in v0.14.1 v0.14.0 prepare-0.14 origin/prepare-0.14; do
      if git -C "$repo" rev-parse --verify --quiet "$r^{commit}" > /dev/null; then ref=$r; break; fi
    done
  fi
  [ -n "$ref" ] || { echo "no v0.14.1 / v0.14.0 / prepare-0.14 in $repo: pass REF" >&2; exit 2; }
  for f in $files; do git -C "$repo" show "$ref:sota-implementations/sac/$f" > "$sac_dir/$f"; done
  echo "TorchRL SAC script: $repo at $ref ($(git -C "$repo" rev-parse "$ref^{commit}"))"
else
  for f in $files; do cp "$repo/sota-implementations/sac/$f" "$sac_dir/$f"; done
  echo "TorchRL SAC script: copied from $repo/sota-implementations/sac"
fi
expected="7df71061e75e8fe124fd9bd0502d539c741127d93272341da2dbd300fa1bc4cd  sac.py
43888e189136c7d356b19b5f39f6c4fee6f3c8eb435b1433c8504758613e8bbc  utils.py
5bc9868e7c41c72310d75dd0270d19501ef95e7a5644f85ba8d423de0c5dea89  config.yaml"
if ! (cd "$sac_dir" && echo "$expected" | sha256sum --check --quiet); then
  if [ "${ALLOW_OTHER_SAC:-0}" != 1 ]; then
    echo "TorchRL's SAC script differs from the one of the committed results (sha256 above);" \
      "pass the REF of TorchRL 0.14 or set ALLOW_OTHER_SAC=1" >&2
    exit 2
  fi
  echo "warning: running a different TorchRL SAC script (ALLOW_OTHER_SAC=1)" >&2
fi

# ------------------------------------------------------------------------- the runs
# Both arms: 1 environment, UTD 1, batch 256, 256x256 MLPs, lr 3e-4, gamma 0.99,
# tau 0.005 (TorchRL: target_update_polyak 0.995), alpha_init 1, target entropy -dim(A),
# PyTorch's default init, one deterministic evaluation episode every EVAL_EVERY frames.
finished() {  # finished FILE FRAMES: FILE holds a row logged at frame FRAMES
  [ -f "$1" ] && grep -q "^$2," "$1"
}

run_torchrl() {
  local seed=$1 dir="$out/torchrl_sac/seed$1"
  if finished "$dir/eval_reward.csv" "$frames"; then echo "skip $dir (finished)"; return; fi
  rm -rf "$dir" && mkdir -p "$dir"
  OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 nice -n "$nice_level" \
    python "$here/torchrl_sac_csv.py" "$sac_dir" \
    env.name=Hopper-v5 env.seed="$seed" \
    collector.total_frames="$frames" collector.init_random_frames="$init_random" \
    collector.env_per_collector=1 collector.device=cpu network.device=cpu \
    logger.backend=csv logger.eval_iter="$eval_every" \
    hydra.run.dir="$dir" > "$dir/stdout.log" 2>&1
  cp "$dir"/sac_logging/*/scalars/eval/reward.csv "$dir/eval_reward.csv"
}

run_ours() {
  local seed=$1 dir="$out/spqr_sac_ens_N2_beta0/seed$1"
  if finished "$dir/eval_reward.csv" "$frames"; then echo "skip $dir (finished)"; return; fi
  rm -rf "$dir"
  mkdir -p "$(dirname "$dir")"
  OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" \
    nice -n "$nice_level" python "$root/sota_scripts/sac_ens_spqr/sac_ens_spqr.py" \
    network.ensemble_size=2 spqr.beta=0 seed="$seed" \
    collector.total_frames="$frames" collector.init_random_frames="$init_random" \
    network.init=default network.actor_init=default network.actor_log_std_clamp=null \
    env.target_entropy=auto logger.eval_interval="$eval_every" logger.eval_episodes=1 \
    logger.progress=false threads=1 hydra.run.dir="$dir" > "$dir.log" 2>&1
  mv "$dir.log" "$dir/stdout.log"
  python - "$dir" << 'EOF'
import csv, sys
from pathlib import Path
run = Path(sys.argv[1])
with (run / "metrics.csv").open() as f:
    rows = [(r["frames"], r["eval_return"]) for r in csv.DictReader(f) if r.get("eval_return")]
(run / "eval_reward.csv").write_text("".join(f"{a},{b}\n" for a, b in rows))
EOF
}

for seed in $seeds; do
  echo "seed $seed: both arms, $frames frames ($(date -u +%H:%M:%S) UTC)"
  run_torchrl "$seed" &
  p1=$!
  run_ours "$seed" &
  p2=$!
  status=0
  wait "$p1" || status=$?
  wait "$p2" || status=$?
  [ "$status" = 0 ] || { echo "seed $seed failed (logs: $out/*/seed$seed/stdout.log)" >&2; exit 1; }
done

python "$here/summarize.py" "$out" --frames "$frames" --out "$here"

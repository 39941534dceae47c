#!/usr/bin/env bash
# Speed-up of a 2-process local sweep over running the same 2 runs one after another.
#
#   bash benchmarks/bench_sweep.sh | tee benchmarks/results/sweep.txt
#
# The same 2 runs (SPQR-SAC-Ens, Hopper-v5, seeds 0 and 1, FRAMES frames of which
# RANDOM_FRAMES random, paper network sizes), wall-clock from the command line:
#   sequential   Hydra's basic launcher, one run after the other, threads=1
#   parallel     hydra/launcher=local (joblib, loky processes), n_jobs=2, threads=1 each
#   sequential2  (only with SEQ2=1) one run after the other with threads=2
# and prints sequential / parallel, the speed-up (and sequential2 / parallel).
#
# Processes whose command line matches PAUSE_PATTERN (default: examples/spqr_demo.py,
# background trainings on this machine) are paused with SIGSTOP for the measurement and
# resumed with SIGCONT on exit, on Ctrl-C, and by a watchdog after MAX_PAUSE_S seconds
# whatever happens to this script. PAUSE_PATTERN= pauses nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

FRAMES=${FRAMES:-1000}
RANDOM_FRAMES=${RANDOM_FRAMES:-200}
MAX_PAUSE_S=${MAX_PAUSE_S:-480}
PY=${PYTHON:-python}
SCRIPT=sota_scripts/sac_ens_spqr/sac_ens_spqr.py
OUT=$(mktemp -d "${TMPDIR:-/tmp}/bench_sweep.XXXXXX")
ARGS=(
  collector.total_frames="$FRAMES" collector.init_random_frames="$RANDOM_FRAMES"
  logger.progress=false logger.log_interval=200 logger.eval_interval="$FRAMES"
  logger.eval_episodes=1 checkpoint.interval="$FRAMES" seed=0,1
)

PAUSED=""
WATCHDOG=""
if [ -n "${PAUSE_PATTERN-examples/spqr_demo.py}" ]; then
  PAUSED=$(pgrep -f "${PAUSE_PATTERN-examples/spqr_demo.py}" | tr '\n' ' ' || true)
fi
resume() {
  if [ -n "$PAUSED" ]; then kill -CONT $PAUSED 2>/dev/null || true; fi
  if [ -n "$WATCHDOG" ]; then kill "$WATCHDOG" 2>/dev/null || true; fi
}
trap resume EXIT
trap 'resume; exit 130' INT TERM
if [ -n "$PAUSED" ]; then
  # resumes the paused processes even if this script is killed without running its traps
  (sleep "$MAX_PAUSE_S"; kill -CONT $PAUSED 2>/dev/null) >/dev/null 2>&1 &
  WATCHDOG=$!
  kill -STOP $PAUSED
fi

timed() {  # name, extra args...: runs the sweep, prints its wall-clock seconds
  local name=$1; shift
  local t0 t1
  t0=$(date +%s.%N)
  RL_WARNINGS=False "$PY" "$SCRIPT" -m "${ARGS[@]}" hydra.sweep.dir="$OUT/$name" "$@" \
    >"$OUT/$name.log" 2>&1 || { tail -20 "$OUT/$name.log" >&2; exit 1; }
  t1=$(date +%s.%N)
  # both runs finished all frames, each in its own folder
  [ "$(find "$OUT/$name" -name metrics.csv | wc -l)" -eq 2 ] || { echo "$name: missing runs" >&2; exit 1; }
  for f in "$OUT/$name"/*/metrics.csv; do
    [ "$(tail -1 "$f" | cut -d, -f1)" = "$FRAMES" ] || { echo "$f: incomplete" >&2; exit 1; }
  done
  echo "$t1 - $t0" | bc -l
}

rates() {  # name: each run's updates/s over its last logging window (contention shows here)
  "$PY" - "$OUT/$1" <<'PY'
import csv, pathlib, sys
rows = [list(csv.DictReader(open(f)))[-1] for f in sorted(pathlib.Path(sys.argv[1]).glob("*/metrics.csv"))]
print(" ".join(f"{float(r['updates_per_s']):.1f}" for r in rows))
PY
}

# other busy processes (not paused, > 10% CPU over their lifetime) competing for the cores
OTHERS=$(ps -eo pcpu=,stat=,ni= | awk '$1 > 10 && $2 !~ /^T/ {n++; s = s " nice" $3} END {print n + 0 s}')
T_SEQ=$(timed sequential threads=1)
T_PAR=$(timed parallel threads=1 hydra/launcher=local hydra.launcher.n_jobs=2)
T_SEQ2=""
if [ "${SEQ2:-0}" = 1 ]; then T_SEQ2=$(timed sequential2 threads=2); fi
LOAD=$(cut -d' ' -f1-3 /proc/loadavg)
resume
PAUSED=""
R_SEQ=$(rates sequential)
R_PAR=$(rates parallel)

printf '# bench_sweep.sh: 2 runs of SPQR-SAC-Ens (Hopper-v5, N=10, 256x256, batch 256, UTD 1),\n'
printf '# %s frames each (%s random), seeds 0,1; %s\n' "$FRAMES" "$RANDOM_FRAMES" "$(date -u +%F)"
printf '# machine: %s CPU cores; torch %s; load average after the runs: %s\n' \
  "$(nproc)" "$("$PY" -c 'import torch; print(torch.__version__)')" "$LOAD"
printf '# paused for the measurement: %s; other busy processes: %s\n' \
  "${PAUSE_PATTERN-examples/spqr_demo.py}" "$OTHERS"
printf 'sequential, 1 process,  threads=1 : %7.1f s\n' "$T_SEQ"
if [ -n "$T_SEQ2" ]; then printf 'sequential, 1 process,  threads=2 : %7.1f s\n' "$T_SEQ2"; fi
printf 'joblib n_jobs=2,        threads=1 : %7.1f s\n' "$T_PAR"
printf 'updates/s of each run (last window): sequential %s; parallel %s\n' "$R_SEQ" "$R_PAR"
printf 'speed-up of the 2-process sweep over the 2 runs one after another: %.2fx\n' \
  "$(echo "$T_SEQ / $T_PAR" | bc -l)"
if [ -n "$T_SEQ2" ]; then
  printf 'speed-up over one after another with threads=2: %.2fx\n' "$(echo "$T_SEQ2 / $T_PAR" | bc -l)"
fi
rm -rf "$OUT"

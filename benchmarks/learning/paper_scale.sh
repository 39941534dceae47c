#!/usr/bin/env bash
# Paper-scale online comparison on one GPU machine (issue 19, item 4): Hopper-v5 SAC-Ens
# (N = 10 critics, UTD 1), beta in {0, 1}, 4 seeds each, at the largest budget (capped at the
# paper's 300k environment steps) that lets the whole script end within BUDGET_S seconds, run
#   POPULATION=1 (default): as ONE population process (sota_scripts/sac_ens_spqr/
#     sac_ens_spqr_population.py: the 8 agents' updates in one batched call on the GPU, each
#     agent in its own environment, one run folder per agent); if its timing pass measures no
#     update rate (the population cannot run on this machine, or stops at its first updates),
#     the script falls back to
#   POPULATION=0: 8 single-agent processes sharing the GPU (THREADS torch threads each).
#   GRAPHS=auto (default on CUDA with POPULATION=1): the population's update compiled and
#     captured as a CUDA graph (compile.compile=true compile.cudagraphs=true); if that timing
#     pass measures no update rate, the eager population is timed next, then POPULATION=0.
#     An eager population update of 8 agents takes 12 ms on an H200 (benchmarks/README.md
#     section 9): launch-bound, hours for 300k steps.
#
#   1. a timing pass: the same process(es) for TIMING_S seconds (uniform-random warm-up of
#      TIMING_WARMUP frames, then updates), stopped by `timeout`; the rate of environment steps
#      with updates per agent (the slowest run's, from the frames / time_s columns of
#      metrics.csv), the rate of the random warm-up and the start-up time come from them;
#   2. the plan: the largest collector.total_frames F (<= MAX_FRAMES, a multiple of the
#      evaluation interval) whose estimated time (start-up + warm-up + F updates + EVAL_POINTS
#      evaluations of 5 episodes, all agents at once in a population with BATCHED_EVAL=1, else
#      one agent after the other) times 1/SAFETY
#      fits before the training deadline (start + BUDGET_S - PLOT_RESERVE_S);
#   3. the runs, under a hard `timeout` at the training deadline (metrics.csv is flushed row
#      by row, so a run stopped early keeps its rows up to its last log step);
#   4. the small files of each agent's run (metrics.csv, learning_curve.png, .hydra/*.yaml, the
#      tail of its output) copied into OUT_DIR/runs/, the checkpoints and replay buffers left in a
#      scratch folder that is deleted; then `python -m torchrl_spqr.analysis` (grouped curves,
#      diagnostics, summary) and its paired effects table and figure, under a `timeout` that
#      keeps 20 s for the summary and the packing; if time is left, the
#      eigenvalue spectra of the first seed's two agents at their last checkpoint (batch from
#      their replay buffer; OUT_DIR/spectra/); and OUT_DIR/summary.md (device, budget planned
#      and reached, seeds, every command).
#
# Usage (repo root or anywhere):
#   bash benchmarks/learning/paper_scale.sh                      # GPU machine, defaults below
#   OUT_DIR=/tmp/ps PACK_TO=$OUT bash benchmarks/learning/paper_scale.sh
#       # PACK_TO: also a tarball of OUT_DIR plus summary.md, effects.md/.png, the grouped
#       # curves and the two spectra in that folder (<= 7 files, for a tool that brings back
#       # a few files only)
#   CPU=1 BUDGET_S=150 bash benchmarks/learning/paper_scale.sh   # rehearsal on a CPU machine
#   POPULATION=0 bash benchmarks/learning/paper_scale.sh         # one process per agent
#   DRY_RUN=1 bash benchmarks/learning/paper_scale.sh            # print the plan, train nothing
# Settings (environment variables, defaults in brackets):
#   BUDGET_S [540] whole-script wall budget, s      PLOT_RESERVE_S [60] kept for copy/plots, s
#   TIMING_S [60] timing pass, s (0: skip it)      TIMING_WARMUP [1000] its random frames
#   TIMING_S_GRAPHS [150] the timing pass with GRAPHS on (compilation and capture included)
#   GRAPHS [auto if DEVICE=cuda and POPULATION=1, else 0]: 1 = compiled and captured population
#          update, no eager fallback; auto = that, else the eager population; 0 = eager
#   TIMING_LOG [250] its log interval (frames)
#   MAX_FRAMES [300000]  MIN_FRAMES [10000]         TOTAL_FRAMES: fixed budget, no timing pass
#   SEEDS ["0 1 2 3"]    DEVICE [cuda if available, else cpu]
#   POPULATION [1]: one population process (0: one process per agent)
#   PARALLEL_ENVS [1 if nproc >= 2 x agents, else 0]: the population's training envs in one
#          worker process each (population.parallel_envs; same transitions, env steps in parallel)
#   BATCHED_EVAL [1]: the population evaluates all its agents at once, one batched policy call
#          per step (population.batched_eval; same returns up to float round-off)
#   THREADS [2 per process; POPULATION=1: min(nproc, 8) for the one process]
#   INIT_RANDOM [5000, at most F/10]   EVAL_POINTS [15]   EVAL_EPISODES [5]   SAFETY [0.85]
#   ENV [hopper] (a config of torchrl_spqr/configs/env)   ENSEMBLE [10]   NICE [0]
#   OUT_DIR [benchmarks/learning/paper_scale/<date>_<time>]   SCRATCH_DIR [mktemp -d]
#   EXTRA_OVERRIDES: more Hydra overrides for every run (e.g. "compile.compile=true")
#   WHEELS: a folder of wheels installed first into /tmp/site (packages missing on the machine)
#   ASSUMED_RATE [250]: env steps/s per process that DRY_RUN plans with (no timing pass)
#   CPU=1: DEVICE=cpu, SEEDS="0 1", THREADS=1, NICE=10, MAX_FRAMES=2000, MIN_FRAMES=500,
#          TIMING_S=30, TIMING_WARMUP=100, TIMING_LOG=10 unless set.
set -euo pipefail
T0=$(date +%s)
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"

POPULATION=${POPULATION:-1}
if [[ "${CPU:-0}" == 1 ]]; then
  DEVICE=${DEVICE:-cpu} SEEDS=${SEEDS:-"0 1"} THREADS=${THREADS:-1} NICE=${NICE:-10}
  MAX_FRAMES=${MAX_FRAMES:-2000} MIN_FRAMES=${MIN_FRAMES:-500}
  TIMING_S=${TIMING_S:-30} TIMING_WARMUP=${TIMING_WARMUP:-100} TIMING_LOG=${TIMING_LOG:-10}
fi
BUDGET_S=${BUDGET_S:-540}
PLOT_RESERVE_S=${PLOT_RESERVE_S:-60}
TIMING_S=${TIMING_S:-60}
TIMING_S_GRAPHS=${TIMING_S_GRAPHS:-150}
TIMING_WARMUP=${TIMING_WARMUP:-1000}
TIMING_LOG=${TIMING_LOG:-250}
MAX_FRAMES=${MAX_FRAMES:-300000}
MIN_FRAMES=${MIN_FRAMES:-10000}
TOTAL_FRAMES=${TOTAL_FRAMES:-}
SEEDS=${SEEDS:-"0 1 2 3"}
if [[ "$POPULATION" == 1 ]]; then
  NCPU=$(nproc)
  THREADS=${THREADS:-$(( NCPU < 8 ? NCPU : 8 ))}
else
  THREADS=${THREADS:-2}
fi
NICE=${NICE:-0}
ENV=${ENV:-hopper}
ENSEMBLE=${ENSEMBLE:-10}
INIT_RANDOM=${INIT_RANDOM:-}
EVAL_POINTS=${EVAL_POINTS:-15}
EVAL_EPISODES=${EVAL_EPISODES:-5}
SAFETY=${SAFETY:-0.85}
ASSUMED_RATE=${ASSUMED_RATE:-250}
EXTRA_OVERRIDES=${EXTRA_OVERRIDES:-}
read -r -a _seeds_for_count <<< "$SEEDS"
PARALLEL_ENVS=${PARALLEL_ENVS:-$(( $(nproc) >= 4 * ${#_seeds_for_count[@]} ? 1 : 0 ))}
BATCHED_EVAL=${BATCHED_EVAL:-1}
DRY_RUN=${DRY_RUN:-0}
OUT_DIR=${OUT_DIR:-benchmarks/learning/paper_scale/$(date +%Y%m%d_%H%M%S)}
PACK_TO=${PACK_TO:-}
SCRIPT=sota_scripts/sac_ens_spqr/sac_ens_spqr.py
POP_SCRIPT=sota_scripts/sac_ens_spqr/sac_ens_spqr_population.py

PY=${PYTHON:-python}
command -v "$PY" >/dev/null 2>&1 || PY=python3
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

if [[ -n "${WHEELS:-}" && "$DRY_RUN" != 1 ]]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$WHEELS"/*.whl
  export PYTHONPATH="$ROOT:/tmp/site${PYTHONPATH#"$ROOT"}"
fi

if [[ -z "${DEVICE:-}" ]]; then
  if [[ "$("$PY" -c 'import torch; print(torch.cuda.is_available())' 2>/dev/null)" == True ]]; then
    DEVICE=cuda
  else
    DEVICE=cpu
  fi
fi
if [[ "$DEVICE" == cuda ]]; then
  DEVICE_NAME=$("$PY" -c 'import torch; print(torch.cuda.get_device_name(0))' 2>/dev/null || echo cuda)
else
  DEVICE_NAME="cpu ($(nproc) cores)"
fi
if [[ "$DEVICE" == cuda && "$POPULATION" == 1 ]]; then GRAPHS=${GRAPHS:-auto}; else GRAPHS=${GRAPHS:-0}; fi
GRAPHS_ON=0
if [[ "$GRAPHS" != 0 && "$POPULATION" == 1 ]]; then GRAPHS_ON=1; fi
read -r -a SEED_LIST <<< "$SEEDS"
NAGENTS=$(( 2 * ${#SEED_LIST[@]} ))
nproc_of() { if [[ "$POPULATION" == 1 ]]; then echo 1; else echo "$NAGENTS"; fi; }
NPROC=$(nproc_of)
DEADLINE=$(( T0 + BUDGET_S - PLOT_RESERVE_S ))   # every training process ends by then
NICE_CMD=()
if [[ "$NICE" != 0 ]]; then NICE_CMD=(nice -n "$NICE"); fi

run_name() { echo "sac_ens_${ENV}_N${ENSEMBLE}_beta$1_seed$2"; }
# the run folder of agent (beta $1, seed $2): its own, or its folder in the population's
agent_dir() {
  if [[ "$POPULATION" == 1 ]]; then echo "$RUNS/population/beta$1.0_N${ENSEMBLE}_seed$2"
  else echo "$RUNS/$(run_name "$1" "$2")"; fi
}

# the Hydra command of one run: run_cmd BETA SEED RUN_DIR TOTAL INIT_RANDOM LOG EVAL CKPT
run_cmd() {
  local cmd=("$SCRIPT" "env=$ENV" "seed=$2" "spqr.beta=$1" "device=$DEVICE" "threads=$THREADS"
    "network.ensemble_size=$ENSEMBLE" "optim.utd_ratio=1"
    "collector.total_frames=$4" "collector.init_random_frames=$5"
    "logger.log_interval=$6" "logger.eval_interval=$7" "logger.eval_episodes=$EVAL_EPISODES"
    "logger.progress=false" "checkpoint.interval=$8" "hydra.run.dir=$3")
  local extra
  read -r -a extra <<< "$EXTRA_OVERRIDES"
  printf '%s\n' "${cmd[@]}" "${extra[@]}"
}

# the Hydra command of the population (every (beta, seed) agent in one process):
# pop_cmd RUN_DIR TOTAL INIT_RANDOM LOG EVAL CKPT; agent folders RUN_DIR/beta<b>.0_N<n>_seed<s>
pop_cmd() {
  local seeds
  seeds=$(IFS=,; echo "${SEED_LIST[*]}")
  local cmd=("$POP_SCRIPT" "env=$ENV" "population.seeds=[$seeds]" "population.beta=[0,1]"
    "device=$DEVICE" "threads=$THREADS" "network.ensemble_size=$ENSEMBLE" "optim.utd_ratio=1"
    "collector.total_frames=$2" "collector.init_random_frames=$3"
    "logger.log_interval=$4" "logger.eval_interval=$5" "logger.eval_episodes=$EVAL_EPISODES"
    "logger.progress=false" "checkpoint.interval=$6" "hydra.run.dir=$1")
  if [[ "$PARALLEL_ENVS" == 1 ]]; then cmd+=("population.parallel_envs=true"); fi
  if [[ "$BATCHED_EVAL" == 1 ]]; then cmd+=("population.batched_eval=true"); fi
  if [[ "$GRAPHS_ON" == 1 ]]; then cmd+=("compile.compile=true" "compile.cudagraphs=true"); fi
  local extra
  read -r -a extra <<< "$EXTRA_OVERRIDES"
  printf '%s\n' "${cmd[@]}" "${extra[@]}"
}

# launch every (beta, seed) run of one phase in the background (POPULATION=1: the one
# population process, folder $1/population), each stopped at $2 seconds (SIGTERM, then
# SIGKILL 10 s later); waits for all; phase folder $1; the rest: run_cmd's 4..8
launch_phase() {
  local dir=$1 limit=$2; shift 2
  local pids=() s b args
  mkdir -p "$dir"
  if [[ "$POPULATION" == 1 ]]; then
    mapfile -t args < <(pop_cmd "$dir/population" "$@")
    rc=0
    timeout -s TERM -k 10 "$limit" "${NICE_CMD[@]}" "$PY" "${args[@]}" \
      > "$dir/population.log" 2>&1 || rc=$?
    echo "$rc" > "$dir/population.rc"
    return 0
  fi
  for s in "${SEED_LIST[@]}"; do
    for b in 0 1; do
      mapfile -t args < <(run_cmd "$b" "$s" "$dir/$(run_name "$b" "$s")" "$@")
      (
        rc=0
        timeout -s TERM -k 10 "$limit" "${NICE_CMD[@]}" "$PY" "${args[@]}" \
          > "$dir/$(run_name "$b" "$s").log" 2>&1 || rc=$?
        echo "$rc" > "$dir/$(run_name "$b" "$s").rc"
      ) &
      pids+=($!)
    done
  done
  for p in "${pids[@]}"; do wait "$p" || true; done
}

# ------------------------------------------------------------------ timing pass and plan
# the rates of a timing pass's folder $1 (JSON): per-agent env steps/s with updates (the
# slowest run's), of the random warm-up, the start-up time, the frames each run reached
timing_json() {
  "$PY" - "$1" "$TIMING_WARMUP" "${2:-$TIMING_S}" <<'EOF'
import csv, json, statistics, sys
from pathlib import Path
folder, warmup, limit = Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
rates, random_rates, startups, reached, setups = [], [], [], [], []
for m in sorted(folder.rglob("metrics.csv")):  # per run, or per agent of a population
    rows = []
    with open(m, newline="") as f:
        for r in csv.DictReader(f):
            try:
                rows.append((int(float(r["frames"])), float(r["time_s"])))
            except (TypeError, ValueError, KeyError):
                pass  # a row cut by the timeout
    if not rows:
        continue
    reached.append(rows[-1][0])
    pre = [r for r in rows if r[0] <= warmup]
    if pre and pre[-1][1] > 0:
        random_rates.append(pre[-1][0] / pre[-1][1])
    post = [r for r in rows if r[0] > warmup]
    if len(post) >= 3:  # the first row after the warm-up holds the first updates' set-up
        (f0, t0), (f1, t1) = post[1], post[-1]
        if t1 > t0:
            rate = (f1 - f0) / (t1 - t0)
            rates.append(rate)
            startups.append(max(0.0, limit - t1))
            if pre:  # the first updates' set-up (compilation, capture) beyond the steady rate
                (fp, tp), (fa, ta) = pre[-1], post[0]
                setups.append(max(0.0, (ta - tp) - (fa - fp) / rate))
out = {"processes_logged": len(reached), "frames_reached": reached}
if rates:
    out.update(rate=min(rates), rate_median=statistics.median(rates),
               startup_s=statistics.median(startups))
if setups:
    out["setup_s"] = max(setups)
if random_rates:
    out["random_rate"] = statistics.median(random_rates)
print(json.dumps(out))
EOF
}

SCRATCH=${SCRATCH_DIR:-}
if [[ "$DRY_RUN" != 1 ]]; then
  SCRATCH=${SCRATCH:-$(mktemp -d "${TMPDIR:-/tmp}/paper_scale.XXXXXX")}
  mkdir -p "$SCRATCH"
fi
SCRATCH=${SCRATCH:-/tmp/paper_scale.scratch}
TIMING_JSON="{}"
TIMING_LOGS=""
# one timing pass with the current settings (label, seconds): TIMING_JSON, TIMING_WALL
timing_pass() {
  echo "[paper_scale] timing pass ($1): $NPROC processes on $DEVICE for ${2}s"
  local t_timing
  t_timing=$(date +%s)
  rm -rf "$SCRATCH/timing"
  launch_phase "$SCRATCH/timing" "$2" "$MAX_FRAMES" "$TIMING_WARMUP" "$TIMING_LOG" "$MAX_FRAMES" "$MAX_FRAMES"
  TIMING_WALL=$(( $(date +%s) - t_timing ))
  TIMING_JSON=$(timing_json "$SCRATCH/timing" "$2")
  echo "[paper_scale] timing, $1 (${TIMING_WALL}s): $TIMING_JSON"
  TIMING_LOGS+="$1 (${TIMING_WALL}s): $TIMING_JSON; "
}
no_rate() { [[ "$TIMING_JSON" != *'"rate":'* ]]; }  # nothing logged, or no rows after updates
if [[ -z "$TOTAL_FRAMES" && "$TIMING_S" != 0 && "$DRY_RUN" != 1 ]]; then
  if [[ "$GRAPHS_ON" == 1 ]]; then
    timing_pass "population, compiled and captured update" "$TIMING_S_GRAPHS"
    if no_rate && [[ "$GRAPHS" == auto ]]; then
      echo "[paper_scale] the compiled and captured population measured no update rate (see below); timing the eager population"
      tail -n 20 "$SCRATCH/timing/population.log" || true
      GRAPHS_ON=0
      timing_pass "population, eager" "$TIMING_S"
    fi
  else
    timing_pass "$( [[ "$POPULATION" == 1 ]] && echo "population, eager" || echo "one process per agent")" "$TIMING_S"
  fi
  if [[ "$POPULATION" == 1 ]] && no_rate; then
    # the population stopped before or at its first updates
    echo "[paper_scale] the population measured no update rate in its timing pass (see below); falling back to POPULATION=0"
    tail -n 20 "$SCRATCH/timing/population.log" || true
    POPULATION=0 THREADS=${FALLBACK_THREADS:-2} NPROC=$(nproc_of) GRAPHS_ON=0
    timing_pass "one process per agent" "$TIMING_S"
  fi
fi
NOW=$(date +%s)
PLAN=$("$PY" - "$TIMING_JSON" <<EOF
import json, math, sys
t = json.loads(sys.argv[1])
fixed = "$TOTAL_FRAMES"
max_f, min_f = int($MAX_FRAMES), int($MIN_FRAMES)
avail = $DEADLINE - $NOW                        # seconds left for the training processes
if "$DRY_RUN" == "1" and not fixed and int($TIMING_S) > 0:
    # the timing pass a real run would do first
    avail -= (int($TIMING_S_GRAPHS) if "$GRAPHS_ON" == "1" else int($TIMING_S)) + 10
points, eps, safety = int($EVAL_POINTS), int($EVAL_EPISODES), float($SAFETY)
dry = "$DRY_RUN" == "1"
rate = t.get("rate") or (float($ASSUMED_RATE) if dry else None)
rnd = t.get("random_rate") or (rate * 4 if rate else None)
startup = t.get("startup_s", 20.0) + t.get("setup_s", 0.0)  # + compilation and capture
init_fixed = "$INIT_RANDOM"

def init_of(f):
    return int(init_fixed) if init_fixed else max(100, min(5000, f // 10 // 100 * 100))

def interval_of(f):
    unit = 1000 if f >= 20 * 1000 else 100
    return max(unit, f // points // unit * unit)

# a population evaluates its agents in turn, or all at once (BATCHED_EVAL=1)
in_series = $NAGENTS if "$POPULATION" == "1" and "$BATCHED_EVAL" != "1" else 1

def seconds(f):  # start-up + random warm-up + F updates + the evaluations (each step of an
    # evaluation: an env step and an actor forward pass; episodes assumed 60% of 1000 steps)
    i = init_of(f)
    ev = in_series * (f // interval_of(f) + 1) * eps * 600 * (1.0 / rnd + 0.15 / rate)
    return startup + i / rnd + (f - i) / rate + ev

if fixed:
    f, how = int(fixed), "TOTAL_FRAMES"
elif rate is None:
    f, how = min_f, "no rate measured: MIN_FRAMES"
else:
    lo, hi = 0, max_f
    while lo < hi:  # the largest F with seconds(F) / safety <= avail
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if seconds(mid) / safety <= avail else (lo, mid - 1)
    f, how = lo, ("assumed rate (DRY_RUN)" if dry and "rate" not in t else "timing pass")
    if f < min_f:
        f, how = min_f, how + ", raised to MIN_FRAMES (the timeout may cut it)"
ev = interval_of(f)
f = max(ev, f // ev * ev)
if f < min_f and not fixed:  # rounded below MIN_FRAMES: round up instead
    f = -(-min_f // ev) * ev
plan = dict(total_frames=f, init_random=init_of(f), eval_interval=ev,
            log_interval=min(1000, ev), how=how, seconds_left=avail,
            estimated_s=round(seconds(f), 1) if rate else None, rate=rate,
            random_rate=rnd, startup_s=startup)
print(json.dumps(plan))
EOF
)
field() { "$PY" -c 'import json,sys; print(json.loads(sys.argv[1])[sys.argv[2]])' "$PLAN" "$1"; }
F=$(field total_frames); IR=$(field init_random); EI=$(field eval_interval); LI=$(field log_interval)
LIMIT=$(( DEADLINE - $(date +%s) ))
if (( LIMIT < 10 )); then LIMIT=10; fi
RUNS="$SCRATCH/runs"

if [[ "$POPULATION" == 1 ]]; then
  MODE="POPULATION=1: one population process of $NAGENTS agents"
  if [[ "$GRAPHS_ON" == 1 ]]; then
    MODE+=", the update compiled and captured as a CUDA graph (GRAPHS=$GRAPHS)"
  else
    MODE+=", eager update"
  fi
else
  MODE="POPULATION=0: one process per agent"
fi
echo "[paper_scale] device: $DEVICE ($DEVICE_NAME); $MODE; processes: $NPROC (seeds: $SEEDS; beta 0, 1); threads: $THREADS"
echo "[paper_scale] plan: $PLAN"
echo "[paper_scale] total_frames=$F init_random_frames=$IR eval_interval=$EI log_interval=$LI; hard limit ${LIMIT}s per process"
echo "[paper_scale] out: $OUT_DIR"
CMDS=""
if [[ "$POPULATION" == 1 ]]; then
  mapfile -t args < <(pop_cmd "$RUNS/population" "$F" "$IR" "$LI" "$EI" "$F")
  CMDS+="CMD: $PY ${args[*]}"$'\n'
else
  for s in "${SEED_LIST[@]}"; do
    for b in 0 1; do
      mapfile -t args < <(run_cmd "$b" "$s" "$RUNS/$(run_name "$b" "$s")" "$F" "$IR" "$LI" "$EI" "$F")
      CMDS+="CMD: $PY ${args[*]}"$'\n'
    done
  done
fi
printf '%s' "$CMDS"
if [[ "$DRY_RUN" == 1 ]]; then
  echo "[paper_scale] DRY_RUN=1: nothing trained"
  exit 0
fi
mkdir -p "$OUT_DIR"
printf '%s' "$CMDS" > "$OUT_DIR/plan.txt"

# ------------------------------------------------------------------ the runs
t_train=$(date +%s)
launch_phase "$RUNS" "$LIMIT" "$F" "$IR" "$LI" "$EI" "$F"
TRAIN_WALL=$(( $(date +%s) - t_train ))
echo "[paper_scale] training done in ${TRAIN_WALL}s"

# ------------------------------------------------------------------ small files, plots, summary
mkdir -p "$OUT_DIR/runs"
for s in "${SEED_LIST[@]}"; do
  for b in 0 1; do
    name=$(run_name "$b" "$s"); src=$(agent_dir "$b" "$s"); dst="$OUT_DIR/runs/$name"
    hydra_dir="$src/.hydra"; log="$RUNS/$name.log"; rc_file="$RUNS/$name.rc"
    if [[ "$POPULATION" == 1 ]]; then  # one process: its config, output and exit code
      hydra_dir="$RUNS/population/.hydra"; log="$RUNS/population.log"; rc_file="$RUNS/population.rc"
    fi
    mkdir -p "$dst"
    if [[ -f "$src/metrics.csv" ]]; then  # complete lines only (a row cut by the timeout dropped)
      "$PY" -c 'import sys; t=open(sys.argv[1]).read(); open(sys.argv[2],"w").write(t[:t.rfind("\n")+1])' \
        "$src/metrics.csv" "$dst/metrics.csv"
    fi
    if [[ -f "$src/learning_curve.png" ]]; then cp "$src/learning_curve.png" "$dst/"; fi
    for y in config overrides; do
      if [[ -f "$hydra_dir/$y.yaml" ]]; then cp "$hydra_dir/$y.yaml" "$dst/hydra_$y.yaml"; fi
    done
    tail -n 40 "$log" > "$dst/output_tail.log" 2>/dev/null || true
    cp "$rc_file" "$dst/exit_code.txt" 2>/dev/null || true
  done
done
PLOT_CMD=("$PY" -m torchrl_spqr.analysis "$OUT_DIR/runs" --out "$OUT_DIR/plots" --effects "$OUT_DIR/effects")
# seconds left before the last PACK_RESERVE_S, which are kept for the summary and the packing
PACK_RESERVE_S=20
secs_before_packing() { echo $(( T0 + BUDGET_S - PACK_RESERVE_S - $(date +%s) )); }
# bounded so that the packing keeps its reserve, as for the spectra below (at least 10 s: a
# plot that needs more than the time left is cut, not the packing)
PLOT_LEFT=$(secs_before_packing); (( PLOT_LEFT >= 10 )) || PLOT_LEFT=10
timeout -k 2 "$PLOT_LEFT" "${PLOT_CMD[@]}" > "$OUT_DIR/plot_output.log" 2>&1 \
  || echo "[paper_scale] plotting failed or ran out of time: see $OUT_DIR/plot_output.log"

# the spectra of the first seed's two agents at their last checkpoint (the checkpoints and
# the replay buffers are in the scratch folder, deleted below), if time is left before the
# packing's reserve
SPEC_CMD=()
SPEC_LEFT=$(secs_before_packing)
if (( SPEC_LEFT >= 15 )); then
  spec_runs=()
  for b in 0 1; do
    src=$(agent_dir "$b" "${SEED_LIST[0]}")
    if [[ -d "$src/checkpoint" ]]; then spec_runs+=("$src"); fi
  done
  if (( ${#spec_runs[@]} > 0 )); then
    SPEC_CMD=("$PY" -m torchrl_spqr.analysis "${spec_runs[@]}" --checkpoint --out "$OUT_DIR/spectra")
    timeout -k 2 "$SPEC_LEFT" "${SPEC_CMD[@]}" > "$OUT_DIR/spectra_output.log" 2>&1 \
      || echo "[paper_scale] spectra failed or ran out of time: see $OUT_DIR/spectra_output.log"
  fi
else
  echo "[paper_scale] no time left for the spectra (${SPEC_LEFT}s)"
fi

"$PY" - "$OUT_DIR" "$PLAN" "$TIMING_JSON" "$TIMING_LOGS" <<EOF || echo "[paper_scale] writing summary.md failed (see above)"
import csv, json, sys
from pathlib import Path
out, plan, timing = Path(sys.argv[1]), json.loads(sys.argv[2]), json.loads(sys.argv[3])
timing_passes = sys.argv[4] or "none (TOTAL_FRAMES)"
lines = ["# Paper-scale online comparison: SAC-Ens (N = $ENSEMBLE, UTD 1), beta 0 vs 1, $ENV", "",
         "- device: $DEVICE ($DEVICE_NAME), $(nproc) CPU cores; $MODE; $NPROC process(es) "
         "at once, $THREADS torch threads each",
         "- seeds: $SEEDS (each with beta 0 and beta 1)",
         f"- budget: collector.total_frames = {plan['total_frames']:,} of the paper's 300,000 "
         f"({plan['how']}); init_random_frames {plan['init_random']:,}, evaluation every "
         f"{plan['eval_interval']:,} frames over $EVAL_EPISODES episodes",
         "- whole-script budget BUDGET_S = $BUDGET_S s; timing pass: TIMING_S = $TIMING_S s; "
         "training wall time: $TRAIN_WALL s; hard limit per process: $LIMIT s",
         f"- timing pass used for the plan: {json.dumps(timing)}",
         f"- timing passes, in order: {timing_passes}",
         f"- plan: {json.dumps(plan)}",
         "- script: \`" + " ".join(f"{k}={v}" for k, v in [
             ("BUDGET_S", "$BUDGET_S"), ("SEEDS", '"$SEEDS"'), ("DEVICE", "$DEVICE"),
             ("POPULATION", "$POPULATION"),
             ("THREADS", "$THREADS"), ("TOTAL_FRAMES", "$TOTAL_FRAMES")] if v not in ("", '""'))
         + " bash benchmarks/learning/paper_scale.sh\`", "",
         "| run | frames reached | last eval return | best eval return | exit code |",
         "|---|---|---|---|---|"]
for run in sorted((out / "runs").iterdir()):
    rows = list(csv.DictReader(open(run / "metrics.csv"))) if (run / "metrics.csv").exists() else []
    evals = [r for r in rows if r.get("eval_return")]
    rc = (run / "exit_code.txt").read_text().strip() if (run / "exit_code.txt").exists() else "?"
    rc = rc + (" (stopped by the time limit)" if rc in ("124", "137") else "")
    last = f"{float(evals[-1]['eval_return']):.1f}" if evals else "-"
    best = f"{max(float(r['eval_return']) for r in evals):.1f}" if evals else "-"
    frames = rows[-1]["frames"] if rows else "0"
    lines.append(f"| {run.name} | {frames} | {last} | {best} | {rc} |")
lines += ["", "Commands (all started together; a population is one command for every agent):",
          "", "\`\`\`"]
lines += [l[5:] for l in Path("$OUT_DIR/plan.txt").read_text().splitlines() if l.startswith("CMD: ")]
lines += [" ".join("${PLOT_CMD[*]}".split())]
if "${SPEC_CMD[*]}":
    lines += [" ".join("${SPEC_CMD[*]}".split())]
lines += ["\`\`\`", ""]
spectra = sorted((out / "spectra").glob("spectrum_*.png")) if (out / "spectra").is_dir() else []
if spectra:
    lines += ["Spectra of the saved ensembles at the last checkpoint (first seed, beta 0 and 1): "
              + ", ".join(f"spectra/{p.name}" for p in spectra), ""]
eff = out / "effects.md"
lines += ["## Paired effects (SPQR minus baseline, by seed)", "",
          eff.read_text() if eff.exists() else "(no effects table: see plot_output.log)"]
(out / "summary.md").write_text("\n".join(lines) + "\n")
EOF
echo "[paper_scale] wrote $OUT_DIR (summary.md, effects.md/.png, plots/, runs/)"

rm -rf "$SCRATCH"
if [[ -n "$PACK_TO" ]]; then
  mkdir -p "$PACK_TO"
  tar czf "$PACK_TO/paper_scale_results.tar.gz" -C "$(dirname "$OUT_DIR")" "$(basename "$OUT_DIR")"
  for f in summary.md effects.md effects.png plots/learning_curves.png; do
    if [[ -f "$OUT_DIR/$f" ]]; then cp "$OUT_DIR/$f" "$PACK_TO/"; fi
  done
  for f in "$OUT_DIR"/spectra/spectrum_*.png; do
    if [[ -f "$f" ]]; then cp "$f" "$PACK_TO/"; fi
  done
  echo "[paper_scale] packed into $PACK_TO"
fi
echo "[paper_scale] total wall time: $(( $(date +%s) - T0 ))s"

#!/usr/bin/env bash
# The paper-small comparison on the real SmolLM2-135M-Instruct: eight methods, 3 seeds each, interleaved by seed
# so that machine noise spreads over the methods and a stopped run leaves whole seeds. Finished runs are skipped,
# interrupted ones resume from their last checkpoint; then `analyse.sh` evaluates them and writes the report.
#   JOBS=2      runs two trainings at once, each on its share of the cores (more throughput on small machines)
#   ALONE=...   methods that always run by themselves on every core (upcycle: its fp32 FFN copies need ~16 GiB)
#   ANALYSE=1   evaluates each run right after it trains (analyse.sh RUN), on the same thread budget
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-runs/paper-small}
SEEDS=${SEEDS:-"0 1 2"}
METHODS=${METHODS:-"dense camel dense-matched pesc pesc-camelidae mixlora upit upcycle"}
ALONE=${ALONE:-upcycle}
JOBS=${JOBS:-1}
ANALYSE=${ANALYSE:-0}
CORES=$(nproc)

# The directory `sparsecraft compare` and `analyse.sh` read for a run: UpIT's trained MoE is its upcycle stage.
run_dir() { if [ "$1" = upit ]; then echo "$OUT/upit-s$2/upcycle"; else echo "$OUT/$1-s$2"; fi; }

train_one() {  # METHOD SEED THREADS
  local method=$1 seed=$2 threads=$3 run="$OUT/$1-s$2"
  if [ -f "$(run_dir "$method" "$seed")/summary.json" ]; then echo "done: $run"
  else
    echo "=== $run ($(date -u +%H:%M:%S), $threads threads)"
    if [ "$method" = upit ]; then
      # every stage's randomness follows the seed; --resume skips finished stages, continues an interrupted one
      OMP_NUM_THREADS=$threads sparsecraft upit configs/paper-small/upit.yaml "output_dir=$run" "seed=$seed" \
        "expand.seed=$seed" "route.seed=$seed" --resume
    else
      local resume=""
      if [ -d "$run/checkpoints" ]; then resume="--resume"; elif [ -d "$run" ]; then resume="--overwrite"; fi
      OMP_NUM_THREADS=$threads sparsecraft train "configs/paper-small/$method.yaml" "output_dir=$run" \
        "seed=$seed" $resume
    fi
  fi
  if [ "$ANALYSE" = 1 ]; then OMP_NUM_THREADS=$threads bash configs/paper-small/analyse.sh "$(run_dir "$method" "$seed")"; fi
}

lane() {  # LANE_NUMBER SEED METHOD...: takes the next unclaimed method (mkdir is atomic), until none is left
  local number=$1 seed=$2; shift 2
  for method in "$@"; do
    mkdir "$CLAIMS/$method" 2>/dev/null || continue
    train_one "$method" "$seed" $((CORES / JOBS > 0 ? CORES / JOBS : 1)) 2>&1 | sed -u "s/^/[lane $number] /"
  done
}

for seed in $SEEDS; do
  together=() alone=()
  for method in $METHODS; do
    if [[ " $ALONE " == *" $method "* ]]; then alone+=("$method"); else together+=("$method"); fi
  done
  if [ "$JOBS" -gt 1 ] && [ ${#together[@]} -gt 0 ]; then
    CLAIMS=$(mktemp -d)
    pids=()
    for number in $(seq 1 "$JOBS"); do lane "$number" "$seed" "${together[@]}" & pids+=($!); done
    failed=0
    for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
    rm -rf "$CLAIMS"
    [ "$failed" = 0 ] || { echo "a run of seed $seed failed (see above)" >&2; exit 1; }
  else
    for method in "${together[@]}"; do train_one "$method" "$seed" "$CORES"; done
  fi
  for method in "${alone[@]}"; do train_one "$method" "$seed" "$CORES"; done
done

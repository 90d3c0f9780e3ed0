#!/usr/bin/env bash
# After run.sh: benchmark scores (the bundled offline multiple-choice tasks through lm-eval) for every run, then
# the independent held-out set (data/independent/: response loss per domain, short-answer match and code pass@1;
# the code task runs the generated programs, each in a subprocess with a timeout), with HUMANEVAL=1 HumanEval
# through the chat template (HUMANEVAL_SAMPLED=1: its sampled pass@k), routing statistics and plots for the MoE
# runs, then one comparison report.
# Finished steps are skipped. `analyse.sh RUN...` evaluates only those runs and writes no report.
#   JOBS=2   evaluates two runs at once, each on its share of the cores
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-runs/paper-small}
TASKS=${TASKS:-sc_math_mc,sc_general_mc,sc_code_mc}
JOBS=${JOBS:-1}

analyse() {  # RUN: a finished training run directory
  local run=$1
  if [ ! -f "$run/eval/results.json" ]; then
    echo "=== eval $run ($(date -u +%H:%M:%S))"
    sparsecraft eval "$run/model" --tasks "$TASKS" --out "$run/eval" --batch-size 8
  fi
  if [ ! -f "$run/eval-independent/results.json" ]; then
    echo "=== independent held-out $run ($(date -u +%H:%M:%S))"
    sparsecraft eval "$run/model" --tasks independent --apply-chat-template --allow-code-execution --quick \
      --data indep-math=data/independent/math.jsonl indep-code=data/independent/code.jsonl indep-general=data/independent/general.jsonl \
      --out "$run/eval-independent" --batch-size 8
  fi
  if [ "${HUMANEVAL:-0}" = 1 ] && [ ! -f "$run/eval-humaneval-chat/results.json" ]; then
    # HumanEval's 164 problems through the chat template (~15-30 min per run on 2 CPU cores): opt-in
    echo "=== HumanEval (chat) $run ($(date -u +%H:%M:%S))"
    sparsecraft eval "$run/model" --tasks sc_humaneval_chat --apply-chat-template --allow-code-execution \
      --out "$run/eval-humaneval-chat" --batch-size 16
  fi
  if [ "${HUMANEVAL_SAMPLED:-0}" = 1 ] && [ ! -f "$run/eval-humaneval-chat-sampled/results.json" ]; then
    # pass@1/5/10 from 10 sampled answers per problem: ten times the greedy generation (0.5-1 h per run on 2 CPU
    # cores through the eval engine, docs/benchmarks.md; minutes on a GPU): opt-in
    echo "=== HumanEval (chat, sampled) $run ($(date -u +%H:%M:%S))"
    sparsecraft eval "$run/model" --tasks sc_humaneval_chat_sampled --apply-chat-template --allow-code-execution \
      --out "$run/eval-humaneval-chat-sampled" --batch-size 40
  fi
  if [ "$(python -c 'import json,sys; print(json.load(open(sys.argv[1]))["method"])' "$run/summary.json")" != dense ] \
     && [ ! -f "$run/routes/routes.json" ]; then
    echo "=== routes $run ($(date -u +%H:%M:%S))"
    sparsecraft routes "$run/model" --out "$run/routes" --no-progress
  fi
}

if [ $# -gt 0 ]; then
  for run in "$@"; do analyse "$run"; done
  exit 0
fi
runs=()
for dir in "$OUT"/*-s*; do
  run=$dir
  [ -f "$dir/upit.json" ] && run="$dir/upcycle"  # UpIT: the trained MoE is the pipeline's last stage
  [ -f "$run/summary.json" ] && runs+=("$run")
done
pids=()
for lane in $(seq 0 $((JOBS - 1))); do  # lane i takes runs i, i+JOBS, ...
  (
    export OMP_NUM_THREADS=$(( $(nproc) / JOBS > 0 ? $(nproc) / JOBS : 1 ))
    for i in "${!runs[@]}"; do
      if [ $((i % JOBS)) = "$lane" ]; then analyse "${runs[$i]}"; fi
    done
  ) &
  pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; done
sparsecraft compare "${runs[@]}" --out "$OUT/report" \
  --title "paper-small: eight methods on SmolLM2-135M-Instruct, 3 seeds"

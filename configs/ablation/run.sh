#!/usr/bin/env bash
# The routing ablation of docs/results.md on the real SmolLM2-135M-Instruct with the bundled data, one seed each:
# PESC (the quickstart recipe) with micro vs global load balancing, each with and without auxiliary-loss-free
# bias balancing; then `sparsecraft routes` over the held-out split for each. Resumable: a finished run is skipped.
#   bash configs/ablation/run.sh [OUT]          (default runs/ablation; about 25 minutes on 2 CPU cores)
set -euo pipefail
out=${1:-runs/ablation}
run() {
  local name=$1; shift
  if [ ! -f "$out/$name/summary.json" ]; then
    sparsecraft train configs/quickstart.yaml output_dir="$out/$name" logging.progress=false "$@" --overwrite
  fi
  if [ ! -f "$out/$name/routes/routes.json" ]; then
    sparsecraft routes "$out/$name/model" --out "$out/$name/routes" --no-progress
  fi
}
run micro craft.balance=micro
run global craft.balance=global
run micro-bias craft.balance=micro craft.bias_balance=true craft.bias_update_rate=0.01
run global-bias craft.balance=global craft.bias_balance=true craft.bias_update_rate=0.01
sparsecraft compare "$out"/micro "$out"/global "$out"/micro-bias "$out"/global-bias --out "$out/report"

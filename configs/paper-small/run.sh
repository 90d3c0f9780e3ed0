#!/usr/bin/env bash
# The paper-small comparison: dense, pesc and upcycle on the real SmolLM2-135M-Instruct, 3 seeds each,
# interleaved by seed so that machine noise spreads over the methods. Finished runs are skipped, interrupted
# ones resume from their last checkpoint; then the routing analysis and the comparison report.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-runs/paper-small}
SEEDS=${SEEDS:-"0 1 2"}
METHODS=${METHODS:-"dense camel camel-alpha64 dense-matched pesc pesc-camelidae mixlora upcycle"}
for seed in $SEEDS; do
  for method in $METHODS; do
    run="$OUT/$method-s$seed"
    if [ -f "$run/summary.json" ]; then echo "done: $run"; continue; fi
    resume=""
    if [ -d "$run/checkpoints" ]; then resume="--resume"; elif [ -d "$run" ]; then resume="--overwrite"; fi
    echo "=== $run ($(date -u +%H:%M:%S))"
    sparsecraft train "configs/paper-small/$method.yaml" "output_dir=$run" "seed=$seed" $resume
  done
done

#!/usr/bin/env bash
# The UpIT part of the routing ablation (docs/results.md): LoRA experts on the real SmolLM2-135M-Instruct at the
# paper-small budget (configs/paper-small/upit.yaml), one seed each:
#   balanced vs argmin seed buckets, each with genetic expansion (m=4 -> n=8) and without it (8 checkpoints).
# Runs that differ only in bucketing share their prepare/ and expand/ stages (copied, then resumed).
#   bash configs/ablation/upit.sh [OUT]        (default runs/ablation-upit; about 30 minutes on 2 CPU cores)
set -euo pipefail
out=${1:-runs/ablation-upit}
base=configs/paper-small/upit.yaml
upit() {  # name, overrides...
  local name=$1; shift
  if [ ! -f "$out/$name/upcycle/summary.json" ]; then
    sparsecraft upit "$base" output_dir="$out/$name" "$@" --resume
  fi
  if [ ! -f "$out/$name/upcycle/routes/routes.json" ]; then
    sparsecraft routes "$out/$name/upcycle/model" --out "$out/$name/upcycle/routes" --no-progress
  fi
}
share() {  # copy the finished prepare/ and expand/ of $1 into $2, so $2 differs only from the route stage on
  mkdir -p "$out/$2"
  for stage in prepare expand; do
    [ -d "$out/$2/$stage" ] || cp -r "$out/$1/$stage" "$out/$2/$stage"
  done
}
no_expansion=(expand.enabled=false prepare.num_experts=8 prepare.interval=0.0625)
upit balanced-expand route.bucketing=balanced
share balanced-expand argmin-expand
upit argmin-expand route.bucketing=argmin
upit balanced-noexpand route.bucketing=balanced "${no_expansion[@]}"
share balanced-noexpand argmin-noexpand
upit argmin-noexpand route.bucketing=argmin "${no_expansion[@]}"
sparsecraft compare "$out"/*/upcycle --out "$out/report"

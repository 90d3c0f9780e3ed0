#!/usr/bin/env bash
# The GPU checks in one run (docs/benchmarks.md records what it printed): `pytest -m gpu`, the block bench at
# LLaMA-2-7B shapes (16k tokens, bf16), the model-level bench at SmolLM2 shapes, and short real trainings of a
# SmolLM2-shaped model (random weights, the real tokenizer) on the bundled data, dense vs PESC, NF4.
#
#   scripts/gpu-check.sh OUT_DIR [MODEL_DIR]
#
# MODEL_DIR holds a config.json and a tokenizer (weights are drawn here if it has none). Missing Python packages
# can be put in .whl/ as wheels; they are installed into a private folder first.
set -uo pipefail
out=${1:?usage: scripts/gpu-check.sh OUT_DIR [MODEL_DIR]}
model=${2:-}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD/src:${PYTHONPATH:-}
py=python3
section() { echo; echo "=== $* ($(date -u +%H:%M:%S))"; }

section machine
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
$py -c "import torch, transformers, peft, accelerate; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'transformers', transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__)"
$py -c "import bitsandbytes; print('bitsandbytes', bitsandbytes.__version__)" || true

section "pytest -m gpu"
timeout 240 $py -m pytest -q -m gpu -p no:cacheprovider -rs tests/test_gpu.py 2>&1 | tee "$out/pytest-gpu.txt" | tail -25

section "block bench: LLaMA-2-7B shapes, 16k tokens, bf16"
timeout 180 $py -m sparsecraft bench --level block --shape llama2-7b --tokens 16384 --dtype bfloat16 --device cuda \
  --experts 8 --top-k 2 --adapter-dim 512 --repeats 20 --warmup 3 --no-memory --no-progress \
  --methods dense,pesc,pesc-dense,pesc-grouped,pesc-sorted,pesc-triton,pesc:compiled,upcycle,loop,mixlora \
  --json "$out/block-llama2-7b.json" 2>&1 | tail -14
timeout 90 $py -m sparsecraft bench --level block --shape llama2-7b --tokens 16384 --dtype bfloat16 --device cuda \
  --experts 64 --top-k 2 --adapter-dim 512 --repeats 20 --warmup 3 --no-memory --no-progress \
  --methods dense,pesc --json "$out/block-llama2-7b-e64.json" 2>&1 | tail -5

section "model bench: SmolLM2 shapes, batch 8 x 512, bf16"
timeout 150 $py -m sparsecraft bench --level model --shape smollm2-135m --batch-size 8 --seq-len 512 --dtype bfloat16 \
  --device cuda --repeats 10 --warmup 2 --decode-tokens 32 --decode-repeats 2 --no-memory --no-progress \
  --methods dense,pesc,upcycle,mixlora --json "$out/model-smollm2.json" 2>&1 | tail -9

if [ -n "$model" ]; then
  section "training: SmolLM2-shaped model, bundled data, NF4, 40 steps"
  if ! compgen -G "$model/*.safetensors" >/dev/null; then
    $py -c "import sys, torch, transformers as tf; torch.manual_seed(0)
m = tf.AutoModelForCausalLM.from_config(tf.AutoConfig.from_pretrained(sys.argv[1]), dtype=torch.float32)
m.save_pretrained(sys.argv[1])" "$model"
  fi
  for method in dense pesc; do
    timeout 150 $py -m sparsecraft train configs/quickstart.yaml model="$model" method=$method max_steps=40 \
      output_dir=/tmp/run-$method logging.progress=false checkpoint.every=0 2>&1 | tail -6
    cp /tmp/run-$method/summary.json "$out/train-$method.json" 2>/dev/null || true
  done
fi

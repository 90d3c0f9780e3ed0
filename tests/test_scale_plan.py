"""`sparsecraft train RECIPE --dry-run`: the paper's recipes as written (their base's config.json placed in a
temporary hub cache, read offline), parameters and per-GPU memory per engine, and the engine split by hand."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from sparsecraft.memory import MemoryEstimate
from sparsecraft.scale import per_gpu_bytes

REPO = Path(__file__).resolve().parents[1]
LLAMA2_7B = {"architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 11008,
             "num_attention_heads": 32, "num_key_value_heads": 32, "num_hidden_layers": 32, "vocab_size": 32000,
             "max_position_embeddings": 4096, "model_type": "llama", "rms_norm_eps": 1e-05,
             "tie_word_embeddings": False}


def test_engine_split_by_hand():
    gib = 2**30
    est = MemoryEstimate("nf4", 4, 2048, {"base weights": 8 * gib, "trainable state": 16 * gib,
                                          "checkpointed layer inputs": 2 * gib, "logits + loss": 1 * gib}, {})
    trainable = gib  # 1 Gi trainable parameters: 16 GiB of state
    layer = gib // 4
    assert per_gpu_bytes(est, trainable, layer, "ddp", 1) == 27 * gib
    assert per_gpu_bytes(est, trainable, layer, "ddp", 8) == 27 * gib + 4 * gib  # gradient buckets
    assert per_gpu_bytes(est, trainable, layer, "fsdp", 8) == gib + gib // 2 + 2 * gib + 3 * gib
    assert per_gpu_bytes(est, trainable, layer, "zero2", 8) == 8 * gib + 4 * gib + 12 * gib // 8 + 3 * gib
    assert per_gpu_bytes(est, trainable, layer, "zero3", 8) == per_gpu_bytes(est, trainable, layer, "fsdp", 8)
    for engine in ("fsdp", "zero2", "zero3"):  # one GPU: nothing to shard over
        assert per_gpu_bytes(est, trainable, layer, engine, 1) == 27 * gib


def test_the_papers_recipes_dry_run_as_written(tmp_path):
    snap = tmp_path / "cache" / "models--meta-llama--Llama-2-7b-hf" / "snapshots" / ("c" * 40)
    snap.mkdir(parents=True)
    (snap / "config.json").write_text(json.dumps(LLAMA2_7B))
    (snap.parent.parent / "refs").mkdir()
    (snap.parent.parent / "refs" / "main").write_text("c" * 40)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "cache"),
           "HF_HOME": str(tmp_path / "home")}
    outputs = {}
    for recipe in ("camelidae-7b", "camel-7b"):
        done = subprocess.run([sys.executable, "-m", "sparsecraft", "train", f"configs/{recipe}.yaml", "--dry-run"],
                              env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        outputs[recipe] = done.stdout
    pesc, camel = outputs["camelidae-7b"], outputs["camel-7b"]
    # 6,738,415,616 (LLaMA-2-7B) + 32 layers x (8 x 2 x 4096 x 512 + 8 x 4096), as the PESC spec says
    assert "7,813,206,016 total" in pesc and "added 1,074,790,400" in pesc
    # LoRA r=64 on the 7 linears of 32 layers: 32 x 64 x (4 x (4096 + 4096) + 3 x (4096 + 11008))
    lora = 32 * 64 * (4 * 8192 + 3 * 15104)
    assert f"LoRA {lora:,}" in pesc and f"{lora:,} trainable" in camel and "6,738,415,616 total" in camel
    for text in (pesc, camel):
        assert "8x80 GB" in text and "zero3" in text and "fsdp" in text


def test_the_dry_run_sizes_the_sequences_training_will_use(tmp_path):
    """`data.max_length` as training reads it: its default when the recipe leaves it out, capped to the model's
    context as training caps it."""
    from conftest import save_tiny_base

    from sparsecraft.data.config import DataConfig
    from sparsecraft.scale import plan_training
    from sparsecraft.train.recipe import load_recipe

    save_tiny_base(tmp_path / "base", hidden=32, max_positions=256)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {tmp_path / 'base'}\nquantization: none\ndata:\n  sources: [d.jsonl]\n")
    assert plan_training(load_recipe(recipe)).estimate.seq_len == min(DataConfig.max_length, 256)
    long = plan_training(load_recipe(recipe, ["data.max_length=4096"]))
    assert long.estimate.seq_len == 256
    short = plan_training(load_recipe(recipe, ["data.max_length=64"]))
    assert short.estimate.seq_len == 64

"""Parameter report and weight-free dry run: exact counts, active-per-token, memory-estimate behaviour."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import transformers as tf
from conftest import FAMILIES, tiny_config, tiny_model

from sparsecraft import CraftConfig, craft
from sparsecraft.errors import CheckpointError
from sparsecraft.memory import estimate_training_memory, logical_numel, nf4_bytes
from sparsecraft.report import DryRunReport, dry_run, parameter_report, short_count, trainable_by_part

LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False)
LLAMA2_70B = dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                  num_key_value_heads=8, vocab_size=32000, tie_word_embeddings=False)
CAMELIDAE = CraftConfig(num_experts=8, top_k=2, adapter_dim=512, scaling=0.25)


def _independent_counts(model: nn.Module) -> dict[str, int]:
    """Counts by parameter name, written without sparsecraft's helpers."""
    named = list(model.named_parameters())
    return {
        "total": sum(p.numel() for _, p in named),
        "added": sum(p.numel() for n, p in named if ".moe." in n),
        "routers": sum(p.numel() for n, p in named if n.endswith(".moe.router.weight")),
        "adapters": sum(p.numel() for n, p in named if n.endswith((".moe.experts.down", ".moe.experts.up"))),
        "lora": sum(p.numel() for n, p in named if "lora_" in n),
        "trainable": sum(p.numel() for _, p in named if p.requires_grad),
    }


def test_llama2_7b_camelidae_total_is_exact():
    report = dry_run(tf.LlamaConfig(**LLAMA2_7B), CAMELIDAE)
    p = report.params
    assert p.total == 7_813_206_016
    assert p.base == 6_738_415_616
    assert p.added == 32 * 33_587_200
    assert p.routers == 32 * 8 * 4096
    assert p.adapters == 32 * 8 * 2 * 4096 * 512
    # shared FFN: all base params + routers + 2 of 8 adapters per token
    assert p.active_per_token == 6_738_415_616 + 32 * 8 * 4096 + 32 * 2 * 2 * 4096 * 512
    assert (p.num_experts, p.top_k, p.crafted_layers) == (8, 2, 32)
    # LoRA r=64 on q,k,v,o of 32 layers: 4 targets x 64 x (4096 + 4096)
    assert report.lora_modules == 128
    assert report.lora_params == 32 * 4 * 64 * 8192
    assert report.trainable_params == p.added + report.lora_params


def test_llama2_70b_dry_run_finishes():
    report = dry_run(tf.LlamaConfig(**LLAMA2_70B), CAMELIDAE, batch_size=1, seq_len=2048)
    assert report.params.base == 68_976_648_192
    assert report.params.added == 80 * (8 * 2 * 8192 * 512 + 8 * 8192)
    assert report.memory_nf4.total < report.memory_bf16.total
    assert "74,350,600,192" in report.format()


@pytest.mark.parametrize("family", FAMILIES)
def test_counts_match_independent_sums(family):
    model = craft(tiny_model(family), CraftConfig(num_experts=4, top_k=2, adapter_dim=8))
    report = parameter_report(model)
    expected = _independent_counts(model)
    assert report.total == expected["total"]
    assert report.added == expected["added"]
    assert report.routers == expected["routers"]
    assert report.adapters == expected["adapters"]
    assert report.base == expected["total"] - expected["added"]
    assert report.trainable == expected["trainable"] == expected["total"]  # crafting freezes nothing
    assert report.trainable_if_frozen_base == expected["added"]
    assert report.lora == 0
    # tied embeddings (gemma3) counted once: unique storages of the state dict
    storages = {t.untyped_storage().data_ptr(): t.numel() for t in model.state_dict().values()
                if t.is_floating_point()}
    assert report.total == sum(storages.values())
    # the weight-free dry run of the same config gives the same counts
    assert dry_run(tiny_config(family), CraftConfig(num_experts=4, top_k=2, adapter_dim=8)).params == report


def test_dense_model_report():
    model = tiny_model("llama")
    report = parameter_report(model)
    assert report.added == report.routers == report.adapters == 0
    assert report.active_per_token == report.base == report.total == sum(p.numel() for p in model.parameters())
    assert report.crafted_layers == 0 and report.num_experts is None
    assert "not crafted" in report.format()


def test_active_per_token_by_hand():
    h, num_layers = 32, 3
    dense_total = sum(p.numel() for p in tiny_model("llama").parameters())
    # E=4, k=1, r=8 on layers 0 and 2 ("every:2")
    model = craft(tiny_model("llama"), CraftConfig(num_experts=4, top_k=1, adapter_dim=8, layers="every:2"))
    report = parameter_report(model)
    crafted = 2
    router = 4 * h  # W_r: [E, h]
    adapters = 4 * (8 * h + h * 8)  # E x (W_down [r, h] + W_up [h, r])
    assert report.crafted_layers == crafted < num_layers
    assert report.base == dense_total
    assert report.total == dense_total + crafted * (router + adapters)
    # one of the four adapters is active per token: 1 x (8*32 + 32*8) = 512 per crafted layer
    assert report.active_per_token == dense_total + crafted * (router + 512)


def test_lora_counts_with_peft():
    peft = pytest.importorskip("peft")
    cfg = CraftConfig(num_experts=4, top_k=2, adapter_dim=8)
    targets = ("q_proj", "k_proj", "v_proj", "o_proj")
    model = craft(tiny_model("llama"), cfg)
    added = parameter_report(model).added
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=list(targets)))
    report = parameter_report(wrapped)
    expected = _independent_counts(wrapped)
    assert report.lora == expected["lora"] > 0
    assert report.added == added
    assert report.trainable == expected["trainable"]
    assert report.trainable_if_frozen_base == added + expected["lora"]
    # the dry run's LoRA count from target shapes equals what PEFT actually creates
    dry = dry_run(tiny_config("llama"), cfg, lora_rank=4, lora_targets=targets)
    assert dry.lora_params == expected["lora"]
    assert dry.params.total == parameter_report(craft(tiny_model("llama"), cfg)).total


def test_trainable_by_part_with_lora_on_attention_and_ffn():
    """The Camelidae layout: LoRA on every linear layer of the base plus the PESC router and adapters."""
    peft = pytest.importorskip("peft")
    cfg = CraftConfig(num_experts=4, top_k=2, adapter_dim=8)
    attention, ffn = ("q_proj", "k_proj", "v_proj", "o_proj"), ("gate_proj", "up_proj", "down_proj")
    model = craft(tiny_model("llama"), cfg)
    plain = parameter_report(model)
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=list(attention + ffn)))
    for name, p in wrapped.named_parameters():  # PEFT froze the crafted weights; train them as a run does
        p.requires_grad_(p.requires_grad or ".moe." in name)
    parts = trainable_by_part(wrapped)
    h = tiny_config("llama")
    layers, inter = h.num_hidden_layers, h.intermediate_size
    kv = h.num_key_value_heads * (h.hidden_size // h.num_attention_heads)
    hidden = h.hidden_size
    per_layer_attention = 2 * 4 * (hidden + hidden) + 2 * 4 * (hidden + kv)  # q, o: h->h; k, v: h->kv
    assert parts["LoRA on attention"] == layers * per_layer_attention
    assert parts["LoRA on FFN"] == layers * 3 * 4 * (hidden + inter)
    assert parts["routers"] == plain.routers and parts["adapters"] == plain.adapters
    assert sum(parts.values()) == sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    # the dry run splits its LoRA the same way
    dry = dry_run(tiny_config("llama"), cfg, lora_rank=4, lora_targets=attention + ffn)
    assert dry.lora_by_place == {k: v for k, v in parts.items() if k.startswith("LoRA")}
    assert "LoRA on FFN" in str(dry)


def test_4bit_params_counted_by_logical_size():
    # a stand-in for a bitsandbytes Params4bit: packed uint8 data plus quant_state.shape
    packed = nn.Parameter(torch.zeros(512, 1, dtype=torch.uint8), requires_grad=False)
    packed.quant_state = SimpleNamespace(shape=torch.Size([32, 32]))
    assert logical_numel(packed) == 1024
    module = nn.Module()
    module.weight = packed
    module.norm = nn.Parameter(torch.ones(32))
    report = parameter_report(module)
    assert report.total == 1024 + 32 and report.trainable == 32


def test_real_bitsandbytes_params4bit():
    bnb = pytest.importorskip("bitsandbytes")  # a dev dependency; its NF4 runs on the CPU (environment.md)
    weight = bnb.nn.Params4bit(torch.randn(64, 32), requires_grad=False, quant_type="nf4",
                               compress_statistics=True)._quantize("cpu")
    assert weight.dtype == torch.uint8 and weight.data.numel() == 64 * 32 // 2  # really packed, two per byte
    module = nn.Module()
    module.weight = weight
    assert weight.numel() == 1024
    assert parameter_report(module).total == 64 * 32


def test_nf4_bytes_formula():
    n = 64 * 256 * 10
    assert nf4_bytes(n) == n // 2 + n // 64 + 4 * 10 + 4
    bits_per_param = 8 * nf4_bytes(4096 * 11008) / (4096 * 11008)
    assert math.isclose(bits_per_param, 4 + 8 / 64 + 32 / (64 * 256), rel_tol=1e-4)  # ≈ 4.127


def test_4bit_base_smaller_than_bf16():
    report = dry_run(tf.LlamaConfig(**LLAMA2_7B), CAMELIDAE, batch_size=2, seq_len=512)
    bf, nf = report.memory_bf16.components, report.memory_nf4.components
    assert nf["base weights"] < 0.35 * bf["base weights"]
    assert report.memory_nf4.total < report.memory_bf16.total
    # 16 B per trainable parameter, the same with either base
    assert bf["trainable state"] == nf["trainable state"] == 16 * report.trainable_params
    assert bf["base weights"] == 2 * report.params.base


def test_memory_grows_with_batch_and_seq_len():
    cfg = tf.LlamaConfig(**LLAMA2_7B)
    totals = {}
    for b, t in [(1, 512), (2, 512), (2, 1024), (4, 2048)]:
        report = dry_run(cfg, CAMELIDAE, batch_size=b, seq_len=t)
        totals[(b, t)] = report.memory_bf16
        assert report.memory_nf4.components["checkpointed layer inputs"] == 32 * b * t * 4096 * 2
        assert report.memory_nf4.components["logits + loss"] == b * t * 32000 * (2 + 4 + 2)
    seq = [totals[k].total for k in [(1, 512), (2, 512), (2, 1024), (4, 2048)]]
    assert seq == sorted(seq) and len(set(seq)) == len(seq)
    # weights and optimizer state do not depend on the batch
    assert totals[(1, 512)].components["base weights"] == totals[(4, 2048)].components["base weights"]


def test_estimate_same_for_real_and_meta_model():
    cfg = CraftConfig(num_experts=4, top_k=2, adapter_dim=8)
    real = craft(tiny_model("llama"), cfg)
    est = estimate_training_memory(real, batch_size=2, seq_len=16, lora_rank=4, quantization="nf4")
    dry = dry_run(tiny_config("llama"), cfg, batch_size=2, seq_len=16, lora_rank=4)
    assert est.components == dry.memory_nf4.components


def test_dry_run_from_directory_and_config_json(tmp_path):
    cfg = tiny_config("qwen2")
    cfg.save_pretrained(tmp_path)
    craft_cfg = {"num_experts": 4, "top_k": 2, "adapter_dim": 8}
    from_dir = dry_run(str(tmp_path), craft_cfg)
    from_file = dry_run(tmp_path / "config.json", craft_cfg)
    real = parameter_report(craft(tiny_model("qwen2"), CraftConfig(**craft_cfg)))
    assert isinstance(from_dir, DryRunReport)
    assert from_dir.params == from_file.params
    assert from_dir.params.total == real.total and from_dir.params.active_per_token == real.active_per_token


def test_dry_run_errors(tmp_path):
    with pytest.raises(CheckpointError):
        dry_run(tmp_path / "missing", None)
    with pytest.raises(CheckpointError):
        dry_run(12345, None)


def test_formatting():
    report = dry_run(tf.LlamaConfig(**LLAMA2_7B), CAMELIDAE, batch_size=4, seq_len=2048)
    text = str(report)
    assert "7,813,206,016" in text and "7.81B" in text
    assert "ESTIMATE" in text and "GiB" in text and "L·B·T·h·2" in text
    assert "active per token" in str(report.params)
    assert short_count(7_813_206_016) == "7.81B"
    assert short_count(33_587_200) == "33.59M"
    assert short_count(512) == "512"

"""The vLLM plugin for PESC models: its torch block computes what sparsecraft's PESC block computes (every routing
order, combine form, activation and router dtype), attached to a model's MLPs it reproduces the crafted model's
logits, `export --to vllm` writes the directory vLLM loads, and where vLLM is installed, vLLM with the plugin
generates the same greedy tokens as sparsecraft (skipped without vLLM)."""

from __future__ import annotations

import copy
import importlib.util
import json
import os

import pytest
import torch
import transformers as tf
from conftest import tiny_model, tiny_tokenizer
from safetensors import safe_open

import sparsecraft
import sparsecraft.cli
from sparsecraft.config import CraftConfig
from sparsecraft.errors import ConfigError
from sparsecraft.integrations.vllm import ARCHITECTURE
from sparsecraft.integrations.vllm.layout import write_vllm_dir
from sparsecraft.integrations.vllm.pesc_block import PescBlock, attach
from sparsecraft.surgery import find_decoder_layers


def pesc(model, **kw):
    cfg = CraftConfig(**{"num_experts": 4, "top_k": 2, "adapter_dim": 8, "dropout": 0.0, "scaling": 0.5, **kw})
    sparsecraft.craft(model, cfg, seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in sparsecraft.new_parameters(model).values():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


SETTINGS = [{}, {"routing": "softmax_topk"}, {"routing": "softmax_topk", "normalize_topk": False},
            {"combine": "per_slot"}, {"activation": "gelu_tanh"}, {"router_dtype": "model"},
            {"num_experts": 8, "top_k": 1, "activation": "silu"}, {"bias_balance": True},
            {"bias_balance": True, "routing": "softmax_topk"}]


@pytest.mark.parametrize("settings", SETTINGS, ids=[json.dumps(s) for s in SETTINGS])
def test_block_computes_the_pesc_block(settings):
    model = pesc(tiny_model("llama"), **settings)
    (_, mlp), *_ = sparsecraft.crafted_layers(model)
    if settings.get("bias_balance"):  # a trained selection bias, large enough to change choices
        with torch.no_grad():
            mlp.moe.router_bias.copy_(torch.randn(4, generator=torch.Generator().manual_seed(2)))
    block = PescBlock(32, model._sparsecraft_config.to_dict())
    block.load_state_dict(mlp.moe.state_dict(), strict=True)  # the same parameter names
    x, f = torch.randn(2, 9, 32), torch.randn(2, 9, 32)
    with torch.no_grad():
        torch.testing.assert_close(block(x, f), mlp.moe(x, f), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("combine", ["residual", "per_slot"])
def test_block_is_bit_equal_in_bf16(combine):
    """In bf16 the two combine forms round differently (the gates rarely sum to exactly 1): the block rounds each
    as sparsecraft's PESC block does, to the bit."""
    model = pesc(tiny_model("llama"), combine=combine).to(torch.bfloat16)
    (_, mlp), *_ = sparsecraft.crafted_layers(model)
    block = PescBlock(32, model._sparsecraft_config.to_dict(), dtype=torch.bfloat16)
    block.load_state_dict(mlp.moe.state_dict(), strict=True)
    g = torch.Generator().manual_seed(0)
    x, f = (torch.randn(4, 64, 32, generator=g).bfloat16() for _ in range(2))
    with torch.no_grad():
        assert torch.equal(block(x, f), mlp.moe(x, f))


def test_blocks_attached_to_a_dense_copy_reproduce_the_crafted_model():
    dense = tiny_model("qwen2")
    model = pesc(copy.deepcopy(dense))
    craft = model._sparsecraft_config.to_dict()
    _, layers = find_decoder_layers(dense)
    for i, mlp in sparsecraft.crafted_layers(model):
        block = PescBlock(32, craft)
        block.load_state_dict(mlp.moe.state_dict())
        names = {n for n, _ in layers[i].mlp.named_parameters()}
        attach(layers[i].mlp, block)
        assert names < {n for n, _ in layers[i].mlp.named_parameters()}  # the MLP's own names stay
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(dense(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


def test_export_to_vllm_writes_the_plugin_directory(tmp_path, capsys):
    model = pesc(tiny_model("llama"))
    tiny_model("llama").save_pretrained(tmp_path / "base")
    tiny_tokenizer().save_pretrained(tmp_path / "base")
    model._sparsecraft_base = sparsecraft.sources.resolve_base(tmp_path / "base")
    sparsecraft.save(model, tmp_path / "pesc")
    assert sparsecraft.cli.main(["export", str(tmp_path / "pesc"), str(tmp_path / "v"), "--to", "vllm"]) == 0
    config = json.loads((tmp_path / "v" / "config.json").read_text())
    assert config["architectures"] == [ARCHITECTURE] and config["model_type"] == "llama"
    assert config["sparsecraft"]["base_architecture"] == "LlamaForCausalLM"
    assert config["sparsecraft"]["crafted_layers"] == [0, 1, 2]
    with safe_open(str(tmp_path / "v" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.layers.0.mlp.gate_proj.weight" in keys and "model.layers.2.mlp.moe.experts.up" in keys
    assert (tmp_path / "v" / "tokenizer.json").is_file()


@pytest.mark.parametrize("method", ["upcycle", "mixlora"])
def test_export_to_vllm_refuses_other_methods(tmp_path, method):
    model = tiny_model("llama")
    sparsecraft.craft(model, CraftConfig(num_experts=4, top_k=2, adapter_dim=8), seed=0, method=method)
    with pytest.raises(ConfigError, match="PESC models"):
        write_vllm_dir(model, tmp_path / "v")


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vLLM (pip install 'sparsecraft[vllm]')")
def test_vllm_with_the_plugin_generates_what_sparsecraft_generates(tmp_path, monkeypatch):
    """vLLM (CPU or GPU) serving the plugin directory: greedy tokens equal sparsecraft's generate."""
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: register() reaches it
    from vllm import LLM, SamplingParams

    from sparsecraft.integrations.vllm import register

    register()
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256)
    model = pesc(tf.AutoModelForCausalLM.from_config(cfg), adapter_dim=16)
    write_vllm_dir(model, tmp_path / "v", tokenizer=tiny_tokenizer())
    prompts = ["hello there", "a mixture of experts"]
    tok = tiny_tokenizer()
    want = []
    for p in prompts:
        ids = tok(p, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)
        want.append(out[0, ids.shape[1]:].tolist())
    llm = LLM(model=str(tmp_path / "v"), dtype="float32", max_model_len=256, enforce_eager=True, max_num_seqs=4,
              seed=0)
    outs = llm.generate(prompts, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    release_vllm(llm)
    assert [list(o.outputs[0].token_ids) for o in outs] == want
    dense = sparsecraft.uncraft(model)  # the control: without the adapters the answers differ
    ids = tok(prompts[0], return_tensors="pt").input_ids
    with torch.no_grad():
        out = dense.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)
    assert out[0, ids.shape[1]:].tolist() != want[0]
    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"


def release_vllm(llm) -> None:
    """vLLM keeps process-wide parallel state per engine; drop it so the next test's engine starts clean."""
    import gc

    from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

    del llm
    gc.collect()
    destroy_model_parallel()
    destroy_distributed_environment()

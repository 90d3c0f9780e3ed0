"""`sparsecraft export --to mixtral|qwen2_moe|qwen3_moe`: a Sparse-Upcycling model written as a plain transformers
MoE computes the same logits and greedy tokens (loaded by transformers alone, in a process without sparsecraft);
PESC, MixLoRA, dense models and mismatched families are refused with one line."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
import torch
from conftest import tiny_model, tiny_tokenizer
from transformers import AutoModelForCausalLM

import sparsecraft
import sparsecraft.cli
from sparsecraft.checkpoint.native_moe import export_native
from sparsecraft.config import CraftConfig
from sparsecraft.errors import ConfigError

CASES = [  # family, target, layers, routing, normalize_topk
    ("llama", "mixtral", "all", "topk_softmax", True),
    ("mistral", "mixtral", "all", "softmax_topk", True),
    ("qwen2", "qwen2_moe", "0,2", "topk_softmax", True),
    ("qwen2", "qwen2_moe", "all", "softmax_topk", False),
    ("qwen3", "qwen3_moe", "1", "softmax_topk", True),
    ("qwen3", "qwen3_moe", "all", "softmax_topk", False),
]


def upcycled(family: str, layers="all", routing="topk_softmax", normalize_topk=True, top_k=2, bias_balance=False):
    model = tiny_model(family)
    cfg = CraftConfig(num_experts=4, top_k=top_k, layers=layers, routing=routing, normalize_topk=normalize_topk,
                      bias_balance=bias_balance)
    return sparsecraft.upcycle(model, cfg, seed=0, noise_std=0.05)  # noise: experts differ, routing matters


def biased(model):
    """A model whose balancing biases have moved away from zero, as training would move them."""
    with torch.no_grad():
        for _, mlp in sparsecraft.crafted_layers(model):
            mlp.moe.router_bias.fill_(0.5)
    return model


def test_an_untrained_balancing_bias_exports_exactly(tmp_path):
    model = upcycled("qwen3", bias_balance=True)  # bias all zero: the plain top-k choice
    export_native(model, tmp_path / "out", "qwen3_moe")
    native = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(native(ids).logits, model(ids).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family, target, layers, routing, norm", CASES, ids=[f"{c[1]}-{c[0]}-{c[2]}-{c[3]}-{c[4]}"
                                                                              for c in CASES])
def test_native_export_computes_the_same_logits(tmp_path, family, target, layers, routing, norm):
    model = upcycled(family, layers, routing, norm)
    export_native(model, tmp_path / "out", target, tokenizer=tiny_tokenizer())
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == target and "sparsecraft" not in json.dumps(config)
    native = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(native).__name__ == config["architectures"][0]
    ids = torch.randint(0, 128, (3, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(native(ids).logits, model(ids).logits, rtol=0, atol=1e-5)
        prompt = ids[:1, :5]
        kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
        assert torch.equal(native.generate(prompt, **kw), model.generate(prompt, **kw))


def test_head_dim_and_rope_of_the_base_go_along(tmp_path):
    import transformers as tf

    torch.manual_seed(0)
    config = tf.Qwen3Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=5000.0)
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    sparsecraft.upcycle(model, CraftConfig(num_experts=4, top_k=2), seed=0, noise_std=0.05)
    export_native(model, tmp_path / "out", "qwen3_moe")
    native = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert native.config.head_dim == 16
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(native(ids).logits, model(ids).logits, rtol=0, atol=1e-5)


def test_export_loads_without_sparsecraft_in_the_process(tmp_path):
    model = upcycled("llama")
    export_native(model, tmp_path / "out", "mixtral")
    script = ("import sys, json, torch\nfrom transformers import AutoModelForCausalLM\n"
              f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'out')!r}).eval()\n"
              "ids = torch.arange(12).view(1, 12) * 7 % 128\n"
              "with torch.no_grad(): logits = m(ids).logits\n"
              "assert not any(k.startswith('sparsecraft') for k in sys.modules)\n"
              "print(json.dumps(logits[0, -1].tolist()))\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-2000:]
    theirs = torch.tensor(json.loads(out.stdout.strip().splitlines()[-1]))
    with torch.no_grad():
        ours = model((torch.arange(12).view(1, 12) * 7 % 128)).logits[0, -1]
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)


def test_cli_export_to_mixtral_verifies(tmp_path, capsys):
    model = upcycled("llama")
    tiny_model("llama").save_pretrained(tmp_path / "base")
    tiny_tokenizer().save_pretrained(tmp_path / "base")
    model._sparsecraft_base = sparsecraft.sources.resolve_base(tmp_path / "base")
    sparsecraft.save(model, tmp_path / "up")
    assert sparsecraft.cli.main(["export", str(tmp_path / "up"), str(tmp_path / "mx"), "--to", "mixtral"]) == 0
    out = capsys.readouterr().out
    assert "mixtral checkpoint written" in out and "verified" in out
    assert (tmp_path / "mx" / "tokenizer.json").is_file()


def crafted(method: str, family: str = "llama"):
    model = tiny_model(family)
    if method != "dense":
        sparsecraft.craft(model, CraftConfig(num_experts=4, top_k=2, adapter_dim=8), seed=0, method=method)
    return model


@pytest.mark.parametrize("model, target, message", [
    (lambda: crafted("pesc"), "mixtral", "act on the FFN output F(x)"),
    (lambda: crafted("mixlora"), "mixtral", "MixLoRA experts are LoRA deltas"),
    (lambda: crafted("dense"), "mixtral", "this is a dense model"),
    (lambda: upcycled("llama"), "qwen2_moe", "use --to mixtral"),
    (lambda: upcycled("qwen2"), "mixtral", "use --to qwen2_moe"),
    (lambda: upcycled("gemma3"), "mixtral", "this base is gemma3_text"),
    (lambda: upcycled("llama", layers="0,1"), "mixtral", "Mixtral has no dense layers"),
    (lambda: upcycled("llama", routing="softmax_topk", normalize_topk=False), "mixtral", "renormalises"),
    (lambda: biased(upcycled("qwen3", bias_balance=True)), "qwen3_moe", "balancing bias"),
], ids=["pesc", "mixlora", "dense", "llama-to-qwen", "qwen-to-mixtral", "gemma3", "partial", "unnormalised",
        "selection-bias"])
def test_refused_where_not_exact(tmp_path, model, target, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        export_native(model(), tmp_path / "out", target)
    assert not (tmp_path / "out").exists()


def test_cli_refusal_is_one_error_line(tmp_path, capsys):
    model = crafted("pesc")
    tiny_model("llama").save_pretrained(tmp_path / "base")
    model._sparsecraft_base = sparsecraft.sources.resolve_base(tmp_path / "base")
    sparsecraft.save(model, tmp_path / "pesc")
    capsys.readouterr()  # progress bars of the writes above
    assert sparsecraft.cli.main(["export", str(tmp_path / "pesc"), str(tmp_path / "x"), "--to", "mixtral"]) == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if "Loading weights" not in line]
    assert len(err) == 1 and err[0].startswith("error: cannot export a pesc model to mixtral")


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vLLM")
@pytest.mark.parametrize("family, target", [("llama", "mixtral"), ("qwen2", "qwen2_moe"), ("qwen3", "qwen3_moe")])
def test_vllm_serves_the_export_with_the_same_tokens(tmp_path, monkeypatch, family, target):
    """vLLM (no plugin: these are its own architectures) generates sparsecraft's greedy tokens."""
    import transformers as tf

    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM, SamplingParams

    torch.manual_seed(0)
    shape = dict(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=2, max_position_embeddings=256, head_dim=64)  # vLLM's CPU attention: 64
    config = {"llama": tf.LlamaConfig, "qwen2": tf.Qwen2Config, "qwen3": tf.Qwen3Config}[family](**shape)
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    sparsecraft.upcycle(model, CraftConfig(num_experts=4, top_k=2), seed=0, noise_std=0.05)
    export_native(model, tmp_path / "out", target, tokenizer=tiny_tokenizer())
    ids = tiny_tokenizer()("hello there", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)
    llm = LLM(model=str(tmp_path / "out"), dtype="float32", max_model_len=256, enforce_eager=True, max_num_seqs=2)
    got = llm.generate(["hello there"], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    release_vllm(llm)
    assert list(got[0].outputs[0].token_ids) == out[0, ids.shape[1]:].tolist()


def release_vllm(llm) -> None:
    """vLLM keeps process-wide parallel state per engine; drop it so the next test's engine starts clean."""
    import gc

    from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

    del llm
    gc.collect()
    destroy_model_parallel()
    destroy_distributed_environment()

"""CUDA paths (`pytest -m gpu`; skipped without CUDA): every dispatch path against the per-expert reference in
bf16 on the GPU, the grouped kernels really in use on sm90+, crafting and save/load on the GPU, the CPU fp32
reference against the GPU model, and a whole training step (bf16, gradient checkpointing, NF4 where
bitsandbytes has CUDA) through `sparsecraft train`; CUDA dropout left to torch's fused kernel."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as tf
from conftest import tiny_tokenizer

import sparsecraft
from sparsecraft.methods import get_method
from sparsecraft.moe import experts as ex
from sparsecraft.surgery import crafted_layers, set_dispatch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

CUDA = torch.device("cuda")
BF16 = torch.bfloat16


def sm90() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def gpu_llama(hidden=256, inter=512, layers=2, vocab=128, seed=0, dtype=torch.float32):
    """A small LLaMA whose sizes are multiples of 16 (the grouped GEMM's stride rule in bf16)."""
    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return tf.AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()


def perturb_new_weights(model, seed=1, std=0.05):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sparsecraft.new_parameters(model).values():
            p.add_((torch.randn(p.shape, generator=gen) * std).to(p.device, p.dtype))


@pytest.mark.parametrize("path", ["dense", "grouped", "padded", "sorted", "gathered", "triton"])
def test_adapter_paths_match_the_loop_in_bf16(path):
    if path == "triton":
        pytest.importorskip("triton")
    n, e, k, r, h = 512, 8, 2, 64, 256
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, h, generator=gen).to(CUDA, BF16)
    gates = torch.softmax(torch.randn(n, k, generator=gen), -1).to(CUDA)
    idx = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(n)]).to(CUDA)
    down = (torch.randn(e, r, h, generator=gen) * 0.05).to(CUDA, BF16)
    up = (torch.randn(e, h, r, generator=gen) * 0.05).to(CUDA, BF16)
    outs = {}
    for p in ("loop", path):
        xs, ds, us = (t.clone().requires_grad_(True) for t in (x, down, up))
        y = ex.dispatch(xs, gates, idx, ds, us, "gelu", 0.5, p)
        y.float().square().sum().backward()
        outs[p] = (y, xs.grad, ds.grad, us.grad)
    for got, want in zip(outs[path], outs["loop"]):
        assert rel_err(got, want) < 2e-2


def test_triton_kernel_compiled_matches_the_reference_in_fp32():
    """The Triton kernel itself (not a fallback) on CUDA, fp32 (ieee dot), against the per-expert loop."""
    pytest.importorskip("triton")
    from sparsecraft.moe.triton_adapters import triton_adapters, triton_available

    n, e, k, r, h = 300, 8, 2, 64, 256
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, h, generator=gen).to(CUDA)
    assert triton_available(x, "gelu")
    gates = torch.softmax(torch.randn(n, k, generator=gen), -1).to(CUDA)
    idx = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(n)]).to(CUDA)
    down = (torch.randn(e, r, h, generator=gen) * 0.05).to(CUDA)
    up = (torch.randn(e, h, r, generator=gen) * 0.05).to(CUDA)
    outs = []
    for fn in (triton_adapters, lambda *a: ex.dispatch(*a, "gelu", 1.0, "loop")):
        xs, gs, ds, us = (t.clone().requires_grad_(True) for t in (x, gates, down, up))
        y = fn(xs, gs, idx, ds, us)
        y.square().sum().backward()
        outs.append((y, xs.grad, gs.grad, ds.grad, us.grad))
    for got, want in zip(*outs):
        assert rel_err(got, want) < 1e-4


def test_grouped_kernel_runs_on_sm90_in_bf16():
    if not sm90():
        pytest.skip("torch._grouped_mm on CUDA needs sm90+")
    probe = torch.empty(0, 256, device=CUDA, dtype=BF16)
    assert ex.grouped_mm_available(probe, 1024, 64)
    assert not ex.grouped_mm_available(torch.empty(0, 256, device=CUDA, dtype=torch.float32), 1024, 64)


def test_crafted_on_gpu_equals_dense_at_init_and_the_cpu_reference_after():
    dense = gpu_llama(dtype=BF16).to(CUDA)
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(3)).to(CUDA)
    with torch.no_grad():
        want = dense(ids).logits
    cfg = sparsecraft.CraftConfig(num_experts=8, top_k=2, adapter_dim=64, dropout=0.0)
    model = sparsecraft.craft(dense, cfg, seed=0)
    assert all(p.device.type == "cuda" for p in model.parameters())
    with torch.no_grad():
        assert torch.equal(model(ids).logits, want)  # W_up = 0: exactly the dense model
    perturb_new_weights(model)
    reference = sparsecraft.craft(gpu_llama(), cfg, seed=0)  # fp32 on the CPU, same weights below
    reference.load_state_dict({k: v.float().cpu() for k, v in model.state_dict().items()})
    for path in ("grouped", "dense", "loop"):
        set_dispatch(model, path)
        with torch.no_grad():
            got = model(ids).logits.float().cpu()
            ref = reference(ids.cpu()).logits
        assert rel_err(got, ref) < 3e-2, path


def test_lora_experts_and_upcycle_grouped_match_their_loops_on_gpu():
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(4)).to(CUDA)
    for name in ("mixlora", "upcycle"):
        model = get_method(name).craft(gpu_llama(dtype=BF16).to(CUDA), sparsecraft.CraftConfig(
            num_experts=8, top_k=2, adapter_dim=16, dropout=0.0), seed=0)
        perturb_new_weights(model, std=0.02)
        logits = {}
        for path in ("grouped", "loop"):
            set_dispatch(model, path)
            with torch.no_grad():
                logits[path] = model(ids).logits
        assert rel_err(logits["grouped"], logits["loop"]) < 3e-2, name


def test_save_and_load_on_gpu(tmp_path):
    model = sparsecraft.craft(gpu_llama(dtype=BF16).to(CUDA), sparsecraft.CraftConfig(
        num_experts=4, top_k=2, adapter_dim=32), seed=0)
    perturb_new_weights(model)
    sparsecraft.save(model, tmp_path / "crafted", standalone=True)
    loaded = sparsecraft.load(tmp_path / "crafted", dtype=BF16).to(CUDA).eval()
    ids = torch.randint(0, 128, (1, 16)).to(CUDA)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model.eval()(ids).logits)
    assert len(crafted_layers(loaded)) == 2


@pytest.mark.parametrize("quantization, optimizer", [("none", "adamw"), ("nf4", "adamw"),
                                                     ("nf4", "paged_adamw_8bit")])
def test_training_on_gpu_lowers_the_loss_and_saves(tmp_path, quantization, optimizer):
    if quantization == "nf4":
        pytest.importorskip("bitsandbytes")
    from sparsecraft.train.loop import run
    from sparsecraft.train.recipe import load_recipe

    gpu_llama().save_pretrained(tmp_path / "base")
    tiny_tokenizer().save_pretrained(tmp_path / "base")
    with open(tmp_path / "data.jsonl", "w") as f:
        for i in range(64):
            f.write(json.dumps({"query": f"{i % 7}+{i % 5}?", "response": f"{i % 7 + i % 5}"}) + "\n")
    recipe = load_recipe(None, [
        f"model={tmp_path / 'base'}", f"output_dir={tmp_path / 'run'}", f"data={tmp_path / 'data.jsonl'}",
        f"quantization={quantization}", "max_steps=12", "batch_size=8", "lora.r=8", "craft.num_experts=8",
        "craft.adapter_dim=64", "data.max_length=32", "lr=3e-3", "optim.warmup_ratio=0", "logging.progress=false",
        "checkpoint.every=0", "train.gradient_checkpointing=true", f"optim.name={optimizer}"])
    summary = run(recipe)
    print(json.dumps({k: summary[k] for k in ("first_loss", "final_loss", "tokens_per_s", "peak_mem_bytes")}))
    assert summary["final_loss"] < summary["first_loss"]
    assert summary["peak_mem_bytes"] > 0
    loaded = sparsecraft.load(tmp_path / "run" / "model", dtype=BF16).to(CUDA)
    assert sparsecraft.is_crafted(loaded)


@pytest.mark.parametrize("level", ["block", "model"])
def test_every_bench_variant_steps_on_gpu_in_bf16(level):
    """Each variant's training step under the bench's own bf16 autocast (a failure shows its traceback here)."""
    from sparsecraft.bench.block import build_block_variants
    from sparsecraft.bench.model import build_model_variants
    from sparsecraft.bench.settings import BenchSettings

    settings = BenchSettings(shape="tiny", tokens=256, seq_len=32, batch_size=2, dtype="bfloat16", device="cuda",
                             experts=8, top_k=2, adapter_dim=16)
    names = ["dense", "pesc", "pesc-dense", "pesc-grouped", "pesc-sorted", "upcycle", "loop", "mixlora"]
    build = build_block_variants if level == "block" else build_model_variants
    for variant in build(settings, names, CUDA):
        variant.reset()
        variant.step()
        torch.cuda.synchronize()


def test_lane_dropout_leaves_cuda_tensors_to_torch(monkeypatch):
    """CUDA's dropout is one fused kernel already: the CPU lane sampler must not run (its mask is a CPU tensor)."""
    from sparsecraft.moe import dropout as lane

    monkeypatch.setattr(lane, "keep_mask", lambda *a, **k: pytest.fail("CPU lane sampler ran on a CUDA tensor"))
    x = torch.ones(256, 256, device=CUDA, dtype=BF16, requires_grad=True)
    y = lane.LaneDropout(0.25).train()(x)
    assert y.device.type == "cuda" and 0.2 < (y == 0).float().mean().item() < 0.3
    y.float().sum().backward()
    assert torch.equal(x.grad != 0, y.detach() != 0)

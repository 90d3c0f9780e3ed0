"""`sparsecraft bench`: the CLI runs both levels on the tiny shape and writes complete records, the memory worker
reports a peak, the loop reference equals sparsecraft's PESC block, the FLOP floors match hand counts, and PESC
decodes exactly like dense at init. No timing is asserted anywhere (the machine is shared)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from sparsecraft.bench import run_bench
from sparsecraft.bench.flops import ModelDims, MoEDims, block_flops, model_flops
from sparsecraft.bench.model import build_model_variants
from sparsecraft.bench.reference import LoopAdapter, LoopPescBlock
from sparsecraft.bench.settings import METHODS, BenchSettings
from sparsecraft.bench.timing import Timed, quantile, round_robin, summary_ms
from sparsecraft.cli import main
from sparsecraft.config import CraftConfig
from sparsecraft.moe.dropout import LaneDropout
from sparsecraft.moe.layers import PescMoE, RouterSite

REQUIRED = ("level", "method", "path", "median_ms", "p10_ms", "p90_ms", "ratio_to_dense", "tokens_per_s",
            "flop_floor_ratio", "flop_executed_ratio", "peak_mem_bytes", "settings", "machine")
FAST = ["--shape", "tiny", "--repeats", "2", "--warmup", "1", "--threads", "1", "--no-progress"]


def _run_cli(tmp_path, *extra: str) -> dict:
    out = tmp_path / "out.json"
    assert main(["bench", *FAST, *extra, "--json", str(out)]) == 0
    return json.loads(out.read_text())


def _check_records(result: dict, level: str, methods=METHODS) -> dict:
    records = {r["method"]: r for r in result["records"] if r["level"] == level}
    assert set(records) == set(methods)
    for rec in records.values():
        missing = [k for k in REQUIRED if k not in rec]
        assert not missing, (rec["method"], missing)
        assert rec["median_ms"] > 0 and rec["p10_ms"] <= rec["median_ms"] <= rec["p90_ms"]
        assert len(rec["times_ms"]) == 2 and rec["flop_floor_ratio"] > 0 and rec["tokens_per_s"] > 0
    assert records["dense"]["ratio_to_dense"] == 1.0 and records["dense"]["flop_floor_ratio"] == 1.0
    for key in ("cpu", "torch", "threads", "date"):
        assert key in result["machine"]
    assert result["machine"]["threads"] == 1 and result["settings"]["repeats"] == 2
    return records


def test_block_level_cli_writes_every_record(tmp_path, capsys):
    result = _run_cli(tmp_path, "--level", "block", "--tokens", "32", "--no-memory")
    records = _check_records(result, "block")
    assert records["pesc-grouped"]["path"] == "grouped" and records["loop"]["path"] == "loop"
    assert records["pesc"]["path"].startswith("auto:")
    # the dense path runs all E adapters: more executed FLOPs than its floor
    assert records["pesc-dense"]["flop_executed_ratio"] > records["pesc-dense"]["flop_floor_ratio"]
    assert records["loop"]["flop_floor_ratio"] == records["pesc"]["flop_floor_ratio"]
    for rec in records.values():  # executed FLOPs follow the path each variant ran
        if rec["path"].split(":")[-1] == "dense":
            assert rec["flop_executed_ratio"] == records["pesc-dense"]["flop_executed_ratio"], rec["method"]
    table = capsys.readouterr().out
    assert "x dense" in table and "pesc-sorted" in table


def test_model_level_cli_decodes_like_dense_at_init(tmp_path):
    result = _run_cli(tmp_path, "--level", "model", "--seq-len", "16", "--batch-size", "2",
                      "--decode-tokens", "4", "--decode-repeats", "1", "--no-memory")
    records = _check_records(result, "model")
    for method in ("pesc", "pesc-dense", "pesc-grouped", "pesc-sorted", "loop"):
        assert records[method]["same_tokens_as_dense"] is True, method  # W_up = 0 and LoRA B = 0 at init
    for rec in records.values():
        assert set(rec["decode"]) == {"1", "8"}
        assert all(fig["tokens_per_s"] > 0 for fig in rec["decode"].values())
        assert rec["trainable_params"] > 0
    assert records["upcycle"]["trainable_params"] > records["pesc"]["trainable_params"]


def test_memory_worker_reports_a_positive_peak(tmp_path):
    """The only test that spawns `python -m sparsecraft.bench.worker` (one variant, tiny block)."""
    result = _run_cli(tmp_path, "--level", "block", "--tokens", "32", "--methods", "dense",
                      "--memory-allocator", "live")
    [rec] = result["records"]
    # the 'live' allocator reaches the worker: a fixed mmap threshold, so RSS follows live tensors
    assert rec["mem_allocator"] == "live" and rec["malloc_mmap_threshold"] == "131072"
    assert rec["mem_error"] is None
    assert rec["peak_mem_bytes"] > 0 and rec["peak_mem_bytes"] >= rec["mem_baseline_bytes"] > 0
    assert rec["peak_mem_ratio_to_dense"] == 1.0
    # ru_maxrss is the worker's own, not inherited from this (bigger) pytest process through exec
    assert abs(rec["peak_rss_bytes"] - rec["vmhwm_bytes"]) < 0.05 * rec["vmhwm_bytes"]


def test_real_model_directory_in_4bit(tmp_path):
    """`--model DIR --layers 1 --4bit`: NF4 base shared by the variants; NF4 upcycled copies are frozen."""
    from conftest import tiny_config
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config("llama")).save_pretrained(tmp_path / "base")
    result = _run_cli(tmp_path, "--model", str(tmp_path / "base"), "--layers", "1", "--4bit", "--level", "model",
                      "--methods", "dense,pesc,upcycle", "--seq-len", "8", "--decode-tokens", "2",
                      "--decode-repeats", "1", "--no-memory")
    records = _check_records(result, "model", ("dense", "pesc", "upcycle"))
    assert records["pesc"]["same_tokens_as_dense"] is True
    assert records["upcycle"]["path"] == "loop"  # NF4 FFNs are deep-copied, not stacked


def test_bad_method_is_a_one_line_error(capsys):
    assert main(["bench", "--shape", "tiny", "--methods", "pesc,nope", "--no-memory"]) == 2
    assert "nope" in capsys.readouterr().err


@pytest.mark.parametrize("train", [False, True])
def test_loop_reference_equals_pesc_block_forward_and_backward(train):
    torch.manual_seed(0)
    cfg = CraftConfig(num_experts=4, top_k=2, adapter_dim=4, scaling=0.5, dropout=0.0 if train else 0.1)
    moe = PescMoE(RouterSite(16, cfg)).train(train)
    with torch.no_grad():
        moe.experts.up.normal_(0, 0.3)  # W_up = 0 would hide the adapters
    loop = LoopPescBlock.from_pesc(moe)
    x = torch.randn(2, 9, 16)
    f = torch.randn(2, 9, 16)
    weight = torch.randn(2, 9, 16)
    outs, grads = [], []
    for block in (moe, loop):
        xi, fi = x.clone().requires_grad_(True), f.clone().requires_grad_(True)
        y = block(xi, fi)
        (y * weight).sum().backward()
        if block is moe:
            down, up = moe.experts.down.grad, moe.experts.up.grad
        else:
            down = torch.stack([e.down.weight.grad for e in loop.experts])
            up = torch.stack([e.up.weight.grad for e in loop.experts])
        outs.append(y.detach())
        grads.append([xi.grad, fi.grad, block.router.weight.grad, down, up])
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-6)
    for name, a, b in zip(("x", "ffn_out", "router", "down", "up"), grads[1], grads[0]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert grads[0][2].abs().sum() > 0  # the router really got a gradient through the gates


def test_block_flop_floors_by_hand():
    n, h, i, e, k, r = 3, 8, 16, 4, 2, 2
    dims = MoEDims(hidden=h, ffn_macs=3 * h * i, experts=e, top_k=k, adapter_dim=r)
    ffn = 3 * 8 * 16 * 3  # 3 matmuls of N*h*i = 1152 multiply-adds
    dense = 2 * ffn  # forward + input grad (frozen): 2304
    router = 3 * 8 * 4 * 3  # N*h*E, fwd + input grad + weight grad: 288
    adapters = 3 * 2 * (2 * 3 * 8 * 2)  # k adapters of 2*N*h*r, 3 passes: 576
    assert block_flops("dense", n, dims) == 2 * 2304
    assert block_flops("pesc", n, dims) == 2 * (dense + router + adapters) == 2 * 3168
    assert block_flops("loop", n, dims) == block_flops("pesc-sorted", n, dims) == block_flops("pesc", n, dims)
    runs_all = 2 * (dense + router + 2 * adapters)  # E = 2k adapters as the masked-dense path runs them
    assert block_flops("pesc-dense", n, dims, path="dense") == runs_all
    # the path that ran decides, whatever the variant's name: auto or the rule may pick dense, compile traces it
    for label in ("auto:dense", "rule:dense", "compiled:dense"):
        assert block_flops("pesc", n, dims, path=label) == runs_all, label
    for label in ("auto:grouped", "grouped->sorted", "sorted", "loop"):
        assert block_flops("pesc", n, dims, path=label) == block_flops("pesc", n, dims), label
    assert block_flops("upcycle", n, dims) == 2 * (3 * 2 * 1152 + router) == 2 * 7200
    assert block_flops("pesc", n, dims) / block_flops("dense", n, dims) == pytest.approx(1.375)


def test_model_flop_floors_by_hand():
    # 2 layers, h=8, 2 heads x 4 = q 8, 1 kv head x 4 = kv 4, vocab 10, FFN i=16; B=1, T=3 (N=3); LoRA r=2
    moe = MoEDims(hidden=8, ffn_macs=3 * 8 * 16, experts=4, top_k=2, adapter_dim=2)
    dims = ModelDims(layers=2, hidden=8, q_dim=8, kv_dim=4, vocab=10, moe=moe)
    proj = {"q": 3 * 8 * 8, "k": 3 * 8 * 4, "v": 3 * 8 * 4, "o": 3 * 8 * 8}  # 192, 96, 96, 192
    lora_a = {"q": 3 * 8 * 2, "k": 3 * 8 * 2, "v": 3 * 8 * 2, "o": 3 * 8 * 2}  # N*in*R = 48 each
    lora_b = {"q": 3 * 2 * 8, "k": 3 * 2 * 4, "v": 3 * 2 * 4, "o": 3 * 2 * 8}  # N*R*out
    attention = 3 * 3 * 3 * 8  # 3 * N*T*q
    ffn = 2 * 3 * 384
    # layer 0: q, k, v read the embeddings (no grad): no input-grad matmul for them nor their LoRA A
    layer0 = (sum(proj[t] for t in "qkv") + 2 * proj["o"] + sum(2 * lora_a[t] for t in "qkv") + 3 * lora_a["o"]
              + sum(3 * b for b in lora_b.values()) + attention + ffn)
    layer1 = 2 * sum(proj.values()) + 3 * sum(lora_a.values()) + 3 * sum(lora_b.values()) + attention + ffn
    lm_head = 2 * 3 * 8 * 10
    assert (layer0, layer1) == (4152, 4680)
    assert model_flops("dense", 1, 3, dims, lora_rank=2) == 2 * (layer0 + layer1 + lm_head) == 2 * 9312
    moe_extra = 2 * (3 * 3 * 8 * 4 + 3 * 2 * (2 * 3 * 8 * 2))  # router + adapters, both layers
    assert model_flops("pesc", 1, 3, dims, lora_rank=2) == 2 * (9312 + moe_extra)


def test_the_loop_reference_counts_its_trained_adapters_at_model_level():
    """The loop reference swaps PESC's blocks for its own: its floor is PESC's (same trainable adapters)."""
    settings = BenchSettings(shape="tiny", levels=["model"], methods=["dense", "pesc", "loop"], seq_len=8,
                             batch_size=1, repeats=1, warmup=0, memory=False, threads=1, decode_tokens=0)
    records = {r["method"]: r for r in run_bench(settings, progress=False, log=lambda m: None)["records"]}
    assert records["loop"]["flop_floor_ratio"] == records["pesc"]["flop_floor_ratio"]


def test_bench_variants_draw_dropout_as_training_does():
    """Every variant (the loop reference too) draws its LoRA and adapter dropout with `moe.dropout`, as
    `sparsecraft train` does: timings compare dispatch, not which dropout sampler ran."""
    settings = BenchSettings(shape="tiny", levels=["model"], methods=["dense", "pesc", "loop"], seq_len=8,
                             batch_size=1, repeats=1, warmup=0, memory=False, threads=1, decode_tokens=0)
    variants = build_model_variants(settings, ["dense", "pesc", "loop"], torch.device("cpu"))
    for variant in variants:
        dropouts = [m for m in variant.model.modules() if isinstance(m, torch.nn.Dropout) and m.p > 0]
        assert dropouts and all(isinstance(m, LaneDropout) for m in dropouts), variant.method
    loop = next(v for v in variants if v.method == "loop").model
    assert any(isinstance(m, LoopAdapter) and isinstance(m.dropout, LaneDropout) for m in loop.modules())


def test_bench_steps_with_the_optimizer_training_makes(monkeypatch):
    """The model-level step runs AdamW as `sparsecraft train` makes it (fused on the CPU): the foreach kernel's
    step-sized temporaries would move both the time and the peak memory the bench reports."""
    made = []

    class Recorded(torch.optim.AdamW):
        def __init__(self, params, **kwargs):
            super().__init__(params, **kwargs)
            made.append(self)

    monkeypatch.setattr(torch.optim, "AdamW", Recorded)
    settings = BenchSettings(shape="tiny", levels=["model"], methods=["dense", "pesc"], seq_len=8,
                             batch_size=1, repeats=1, warmup=0, memory=False, threads=1, decode_tokens=0)
    variants = build_model_variants(settings, ["dense", "pesc"], torch.device("cpu"))
    assert len(made) == 2 and all(opt.defaults["fused"] for opt in made)
    for variant, opt in zip(variants, made):
        variant.step()
        assert all(opt.state[p]["step"] == 1 for group in opt.param_groups for p in group["params"]), variant.method


def test_round_robin_interleaves_after_warmup():
    calls = []
    items = [Timed(name, (lambda n=name: calls.append(n)), (lambda n=name: calls.append("z" + n)))
             for name in ("a", "b")]
    round_robin(items, rounds=3, warmup=1, sync=lambda: None, progress=False)
    assert calls == ["za", "a", "zb", "b"] + ["za", "a", "zb", "b"] * 3
    assert all(len(t.times_s) == 3 for t in items)
    assert quantile([1.0, 2.0, 3.0, 4.0, 5.0], 0.5) == 3.0 and quantile([0.0, 10.0], 0.1) == pytest.approx(1.0)
    s = summary_ms([0.001, 0.003, 0.002])
    assert s["median_ms"] == pytest.approx(2.0) and s["p10_ms"] <= 2.0 <= s["p90_ms"]


def test_settings_validation():
    with pytest.raises(ValueError, match="shape"):
        BenchSettings(shape="gpt-9").validate()
    with pytest.raises(ValueError, match="top_k"):
        BenchSettings(experts=2, top_k=3).validate()
    with pytest.raises(ValueError, match="allocator"):
        BenchSettings(memory_allocator="jemalloc").validate()
    assert not math.isnan(BenchSettings().craft_config("grouped").scaling)


def test_labels_name_the_path_that_runs():
    """Upcycling runs its sorted slices for both `sorted` and `loop`; MixLoRA's experts fall back to them where
    `torch._grouped_mm` cannot take their LoRA pairs (an adapter width of 6 fp32 values is not 16-byte aligned)."""
    settings = BenchSettings(shape="tiny", levels=["block"], methods=["dense", "upcycle-sorted", "upcycle-loop",
                                                                      "mixlora"],
                             tokens=64, adapter_dim=6, repeats=1, warmup=0, memory=False, threads=1)
    records = {r["method"]: r for r in run_bench(settings, progress=False, log=lambda m: None)["records"]}
    assert records["upcycle-sorted"]["path"] == records["upcycle-loop"]["path"] == "sorted"
    assert records["mixlora"]["path"] == "grouped->sorted"

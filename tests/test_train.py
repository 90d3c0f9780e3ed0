"""Training from a recipe: methods, QLoRA, trainable sets, metrics, resume after a real kill, 2 processes, export."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_base
from safetensors.torch import load_file

import sparsecraft
from sparsecraft.cli import main
from sparsecraft.errors import ConfigError
from sparsecraft.moe.dropout import LaneDropout
from sparsecraft.train.batches import BatchPlan
from sparsecraft.train.loop import run
from sparsecraft.train.recipe import load_recipe
from sparsecraft.train.setup import build_model, trainable_parameters

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "configs" / "quickstart.yaml"  # the CLI runs below start from it; so do their references


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A tiny LLaMA (hidden 64: the smallest bitsandbytes' CPU NF4 kernel takes) with a tokenizer, and data."""
    root = tmp_path_factory.mktemp("train")
    save_tiny_base(root / "base")
    with open(root / "data.jsonl", "w") as f:
        for i in range(48):
            a, b = i % 7, i % 5
            f.write(json.dumps({"query": f"{a}+{b}?", "response": f"{a + b}"}) + "\n")
    with open(root / "chat.jsonl", "w") as f:
        for i in range(16):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"echo {i}"},
                                             {"role": "assistant", "content": f"{i}"}]}) + "\n")
    return root


def recipe_args(workdir, out, *extra):
    return [f"model={workdir / 'base'}", f"output_dir={out}", f"data={workdir / 'data.jsonl'}",
            "quantization=none", "max_steps=8", "batch_size=4", "lora.r=4", "lora.dropout=0.0",
            "craft.num_experts=4", "craft.adapter_dim=8", "craft.dropout=0.0", "data.max_length=32", "lr=5e-3",
            "optim.warmup_ratio=0", "logging.progress=false", "checkpoint.every=0", *extra]


def test_recipe_errors_are_one_line():
    with pytest.raises(ConfigError, match="unknown recipe field optim.learning_rate"):
        load_recipe(None, ["data=x.jsonl", "optim.learning_rate=1"])
    with pytest.raises(ConfigError, match="train.batch_size must be int"):
        load_recipe(None, ["data=x.jsonl", "batch_size=four"])
    with pytest.raises(ConfigError, match="method must be one of"):
        load_recipe(None, ["data=x.jsonl", "method=moe"])
    with pytest.raises(ConfigError, match="top_k"):
        load_recipe(None, ["data=x.jsonl", "craft.top_k=9"])
    with pytest.raises(ConfigError, match="key=value"):
        load_recipe(None, ["data=x.jsonl", "max_steps"])
    with pytest.raises(ConfigError, match="recipe not found"):
        load_recipe("/no/recipe.yaml")


def test_recipe_file_and_overrides(tmp_path):
    (tmp_path / "r.yaml").write_text("method: dense\ncraft: {num_experts: 4}\ndata:\n  sources: [{path: a.jsonl}]\n")
    r = load_recipe(tmp_path / "r.yaml", ["max_steps=10", "optim.lr=1e-3", "data=b.jsonl", "data.max_length=64",
                                          "method=pesc"])
    assert (r.method, r.train.max_steps, r.optim.lr) == ("pesc", 10, 1e-3)
    assert r.data["sources"] == [{"path": "b.jsonl"}] and r.data["max_length"] == 64
    assert r.craft["num_experts"] == 4
    # the paper's defaults
    d = load_recipe(None, ["data=a.jsonl"])
    assert (d.optim.lr, d.optim.weight_decay, d.optim.max_grad_norm, d.optim.warmup_ratio) == (2e-4, 0.0, 0.3, 0.03)
    assert (d.lora.r, d.lora.alpha, d.quantization, d.train.gradient_checkpointing) == (64, 16, "nf4", True)
    assert d.craft_config().aux_loss_coef == 0.01


@pytest.mark.parametrize("method", ["pesc", "dense", "upcycle"])
def test_each_method_reduces_loss_and_saves_loadable_model(workdir, tmp_path, method):
    summary = run(load_recipe(None, recipe_args(workdir, tmp_path / method, f"method={method}",
                                                 "data.eval_fraction=0.25")))
    assert summary["final_loss"] < summary["first_loss"] - 0.2
    assert summary["eval_loss"] < summary["initial_eval_loss"]  # held-out loss measured before and after
    assert summary["eval_loss/data"] == pytest.approx(summary["eval_loss"])  # one source: per-source = overall
    model = sparsecraft.load(summary["model_dir"])
    assert sparsecraft.is_crafted(model) == (method != "dense")
    config = json.loads((Path(summary["model_dir"]) / "config.json").read_text())
    assert config["method"] == method and config["lora"] == "lora"


def test_packed_training_reduces_loss(workdir, tmp_path):
    summary = run(load_recipe(None, recipe_args(workdir, tmp_path / "packed", "data.packing=true",
                                                 "data.eval_fraction=0.25")))
    assert summary["final_loss"] < summary["first_loss"] - 0.2 and summary["eval_loss"] < summary["initial_eval_loss"]


def test_pesc_trains_only_router_adapters_and_lora(workdir, tmp_path):
    recipe = load_recipe(None, recipe_args(workdir, tmp_path / "x"))
    built = build_model(recipe)
    params = trainable_parameters(built.model)
    assert params and all(".moe." in n or "lora_" in n for n in params)
    assert any(".moe.router" in n for n in params) and any(".moe.experts" in n for n in params)
    report = sparsecraft.parameter_report(built.inner)
    assert sum(p.numel() for p in params.values()) == report.trainable_if_frozen_base
    # a training step gives gradients to exactly the trainable parameters
    batch = {"input_ids": torch.randint(5, 100, (2, 12))}
    built.model.train()
    out = built.model(**batch, labels=batch["input_ids"])
    out.loss.backward()
    with_grad = {n for n, p in built.model.named_parameters() if p.grad is not None}
    assert with_grad == set(params)


def test_aux_loss_has_gradient_and_is_logged(workdir, tmp_path):
    recipe = load_recipe(None, recipe_args(workdir, tmp_path / "aux"))
    built = build_model(recipe)
    built.model.train()
    out = built.model(input_ids=torch.randint(5, 100, (2, 12)))
    out.aux_loss.backward()
    routers = [p for n, p in built.model.named_parameters() if ".moe.router" in n]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in routers)
    run(recipe)
    lines = [json.loads(l) for l in (tmp_path / "aux" / "metrics.jsonl").read_text().splitlines()]
    steps = [l for l in lines if "aux_loss" in l]
    assert len(steps) == 8 and all(l["aux_loss"] >= 1.0 - 1e-6 for l in steps)
    assert len(steps[0]["expert_load"]) == 2 and abs(sum(steps[0]["expert_load"][0]) - 1) < 1e-3
    assert "eval_loss" not in steps[0] and all("tokens_per_s" in l for l in steps)


def test_nf4_qlora_pesc_trains_on_cpu(workdir, tmp_path):
    import bitsandbytes as bnb

    recipe = load_recipe(None, recipe_args(workdir, tmp_path / "q", "quantization=nf4"))
    built = build_model(recipe)
    attn = built.inner.model.layers[0].self_attn.q_proj
    assert isinstance(attn.base_layer, bnb.nn.Linear4bit)
    moe = built.inner.model.layers[0].mlp.moe
    assert moe.router.weight.dtype == torch.float32 and moe.experts.down.dtype == torch.float32
    summary = run(recipe)
    assert summary["final_loss"] < summary["first_loss"] - 0.2


@pytest.mark.parametrize("precision, expected", [("bf16", torch.bfloat16), ("fp32", None)])
def test_adapters_compute_in_the_base_precision(workdir, tmp_path, precision, expected):
    """An NF4 base hands its output back in fp32 on the CPU; the adapters follow `train.precision` instead."""
    recipe = load_recipe(None, recipe_args(workdir, tmp_path / "p", "quantization=nf4", f"train.precision={precision}"))
    built = build_model(recipe)
    blocks = [layer.mlp.moe for layer in built.inner.model.layers]
    assert blocks and all(b.compute_dtype == expected for b in blocks)
    assert all(b.experts.up.dtype == torch.float32 for b in blocks)  # the weights themselves stay fp32


def test_lora_dropout_uses_the_cheap_cpu_mask(workdir, tmp_path):
    """peft's LoRA dropout modules are swapped for `LaneDropout` (same rate): torch's CPU mask draws one random
    number per element, 11 % of the quickstart's step."""
    recipe = load_recipe(None, recipe_args(workdir, tmp_path / "d", "lora.dropout=0.05"))
    built = build_model(recipe)
    lora_dropouts = [m.lora_dropout["default"] for m in built.model.modules() if hasattr(m, "lora_dropout")]
    assert lora_dropouts and all(isinstance(d, LaneDropout) and d.p == 0.05 for d in lora_dropouts)


def test_nf4_gradients_unchanged_by_an_eval_forward(workdir, tmp_path):
    """bitsandbytes repacks NF4 weights for its CPU inference kernel on the first eval forward (on AVX512-BF16
    machines), after which training gradients go through a kernel without autograd; held-out evaluation during
    training must not change the gradients."""
    from accelerate.utils import set_seed

    recipe = load_recipe(None, recipe_args(workdir, tmp_path / "q", "quantization=nf4"))
    ids = torch.randint(5, 100, (2, 12))
    grads = []
    for evaluate_first in (False, True):
        set_seed(0)
        built = build_model(recipe)
        if evaluate_first:
            built.model.eval()
            with torch.no_grad():
                built.model(input_ids=ids)
        built.model.train()
        built.model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in built.model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=0, atol=1e-6, msg=name)


def test_bad_data_fails_before_the_model_loads(capsys, workdir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": 1, "response": "x"}\nnot json\n{"query": "q", "response": ""}\n')
    code = main(["train", str(QUICKSTART), f"data={bad}", "model=/no/such/model",
                 f"output_dir={tmp_path / 'o'}"])
    err = capsys.readouterr().err
    assert code == 2 and "no usable metamath record out of 3" in err and "malformed_json 1" in err, err
    assert "/no/such/model" not in err  # the data was checked first


def test_batch_plan_shards_ranks_and_resumes():
    plans = [BatchPlan(40, 3, world_size=2, rank=r, grad_accum=2, seed=1) for r in range(2)]
    for step in range(4):
        rank0, rank1 = (p.rank_indices(step) for p in plans)
        for a, b, whole in zip(rank0, rank1, plans[0].global_indices(step)):
            assert not set(a) & set(b) and a + b == whole
    single = BatchPlan(40, 6, grad_accum=2, seed=1)
    assert single.global_indices(5) == plans[0].global_indices(5)
    assert plans[0].steps_per_epoch == 3 and plans[0].global_indices(3) != plans[0].global_indices(0)


def _final_weights(out: Path) -> dict:
    tensors = load_file(str(out / "model" / "sparsecraft.safetensors"))
    tensors.update(load_file(str(out / "model" / "lora" / "adapter_model.safetensors")))
    return tensors


def _cli(*args, env=None, **kw):
    return subprocess.Popen([sys.executable, "-m", "sparsecraft", *map(str, args)], cwd=REPO,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}, **kw)


def test_resume_after_real_kill_during_save_matches_uninterrupted(workdir, tmp_path):
    # separate processes probe dispatch paths separately; under load they may pick other winners (other rounding)
    common = recipe_args(workdir, tmp_path / "full", "craft.dropout=0.1", "lora.dropout=0.1", "checkpoint.every=2",
                         "checkpoint.keep=5", "craft.dispatch=rule")
    run(load_recipe(QUICKSTART, common))
    expected = _final_weights(tmp_path / "full")

    killed = tmp_path / "killed"
    args = [a if not a.startswith("output_dir=") else f"output_dir={killed}" for a in common]
    proc = _cli("train", QUICKSTART, *args, env={"SPARSECRAFT_TEST_SAVE_DELAY": "6"},
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    def saving(step: int) -> bool:  # the save's temp folder carries the run's own token: `.step-N.tmp-<token>`
        return any((p / "state.json").exists() for p in (killed / "checkpoints").glob(f".step-{step:06d}.tmp-*"))

    deadline = time.time() + 120
    while not saving(2) and time.time() < deadline:
        time.sleep(0.1)
    assert saving(2), "the run never reached its first save"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "checkpoints" / "step-000002").exists()  # the interrupted save never became visible

    # run again until the second save is under way, then kill: step 2 must survive intact
    proc = _cli("train", QUICKSTART, *args, "--resume",
                env={"SPARSECRAFT_TEST_SAVE_DELAY": "6"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # step 2's save is delayed too; wait for it to land and for step 4's to start
    deadline = time.time() + 180
    while not saving(4) and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = json.loads((killed / "checkpoints" / "step-000002" / "state.json").read_text())
    assert state["step"] == 2
    load_file(str(killed / "checkpoints" / "step-000002" / "trainable.safetensors"))  # readable, not truncated

    summary = run(load_recipe(QUICKSTART, args), resume=True)
    assert summary["steps"] == 8
    got = _final_weights(killed)
    assert set(got) == set(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-6, msg=name)


def test_two_processes_match_one_with_the_same_global_batch(workdir, tmp_path):
    # fp32: equal sums in another order differ by more than the tolerance in bf16 (auto's choice on AMX CPUs)
    common = recipe_args(workdir, tmp_path / "one", "max_steps=4", "batch_size=4", "train.precision=fp32",
                         "craft.dispatch=rule")  # path choices by rule, not by each process's own timing
    run(load_recipe(QUICKSTART, common))
    two = [a for a in common if not a.startswith(("output_dir=", "batch_size="))]
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517", "-m",
         "sparsecraft", "train", QUICKSTART, *two, f"output_dir={tmp_path / 'two'}",
         "batch_size=2"],
        cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}, capture_output=True,
        text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["world_size"] == 2
    one, two_w = _final_weights(tmp_path / "one"), _final_weights(tmp_path / "two")
    for name in one:
        # LM loss normalised by the global target count, router statistics all-reduced: the same gradients
        torch.testing.assert_close(two_w[name], one[name], rtol=0, atol=1e-5, msg=name)


def test_export_merges_lora_and_loads_with_same_logits(workdir, tmp_path):
    summary = run(load_recipe(None, recipe_args(workdir, tmp_path / "e")))
    trained = sparsecraft.load(summary["model_dir"])
    code = main(["export", summary["model_dir"], str(tmp_path / "exported")])
    assert code == 0
    assert (tmp_path / "exported" / "base").is_dir()
    exported = sparsecraft.load(tmp_path / "exported")
    ids = torch.randint(5, 100, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, trained(ids).logits, rtol=0, atol=1e-5)
        # LoRA was trained: the merged attention differs from the base
        base = sparsecraft.load(workdir / "base")
        assert not torch.allclose(base.model.layers[0].self_attn.q_proj.weight,
                                  exported.model.layers[0].self_attn.q_proj.weight)


def test_upcycle_with_nf4_base_trains_full_precision_experts(workdir, tmp_path):
    import bitsandbytes as bnb

    recipe = load_recipe(None, recipe_args(workdir, tmp_path / "uq", "method=upcycle", "quantization=nf4",
                                           "lora.ffn=true"))
    built = build_model(recipe)
    assert isinstance(built.inner.model.layers[0].self_attn.q_proj.base_layer, bnb.nn.Linear4bit)
    experts = [p for n, p in built.model.named_parameters() if ".moe.experts" in n]
    assert experts and all(p.requires_grad and p.dtype == torch.float32 for p in experts)
    assert not any("lora_" in n for n in sparsecraft.new_parameters(built.inner))  # no LoRA inside experts
    summary = run(recipe)
    assert summary["final_loss"] < summary["first_loss"] - 0.2
    assert sparsecraft.is_crafted(sparsecraft.load(summary["model_dir"]))

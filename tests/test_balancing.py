"""Balancing options (issue 17.1), each against a hand-computed value: `aux_reduce` (mean or sum over layers),
`balance: global` (expert counts over the optimizer step's micro-batches), and auxiliary-loss-free bias balancing
(selection by biased scores, gates from the unbiased ones, the sign update, saved and loaded)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_model

import sparsecraft
from sparsecraft.moe.balance import update_router_biases
from sparsecraft.moe.layers import RoutingRecord
from sparsecraft.moe.model import router_losses
from sparsecraft.moe.router import gates_from_logits

E = 4


def record(layer, logits, k=1):
    logits = torch.tensor(logits, dtype=torch.float32)
    indices = torch.topk(logits, k, dim=-1).indices
    return RoutingRecord(layer, logits, indices, logits.shape[0])


def switch_loss(logits, counts, tokens, k=1):
    """E * sum_i f_i P_i by hand: f from the given counts, P from these logits."""
    probs = torch.softmax(torch.tensor(logits, dtype=torch.float64), -1)
    f = torch.tensor(counts, dtype=torch.float64) / (tokens * k)
    return float(E * (f * probs.mean(0)).sum())


A = [[2.0, 0.0, 0.0, 0.0], [0.0, 3.0, 0.0, 0.0]]  # two tokens: experts 0 and 1
B = [[1.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.5], [0.0, 0.0, 2.0, 0.0]]  # experts 0, 0, 2


def test_aux_reduce_mean_and_sum_over_layers():
    recs = [record(0, A), record(1, B)]
    by_hand = [switch_loss(A, [1, 1, 0, 0], 2), switch_loss(B, [2, 0, 1, 0], 3)]
    mean, _, _ = router_losses(recs, E, None, reduce="mean")
    total, _, _ = router_losses(recs, E, None, reduce="sum")
    assert float(mean) == pytest.approx(sum(by_hand) / 2)
    assert float(total) == pytest.approx(sum(by_hand))


def test_global_balance_counts_the_steps_micro_batches():
    step: dict = {}
    first, _, _ = router_losses([record(0, A)], E, None, step_counts=step)
    second, _, _ = router_losses([record(0, B)], E, None, step_counts=step)
    # micro-step 1: f from A alone; micro-step 2: f from A and B together (5 tokens), P from B only
    assert float(first) == pytest.approx(switch_loss(A, [1, 1, 0, 0], 2))
    assert float(second) == pytest.approx(switch_loss(B, [3, 1, 1, 0], 5))
    assert step[0].tolist() == [3, 1, 1, 0, 5]
    micro, _, _ = router_losses([record(0, B)], E, None)  # micro balance: B on its own
    assert float(micro) == pytest.approx(switch_loss(B, [2, 0, 1, 0], 3))


def test_global_balance_in_a_model_resets_each_optimizer_step():
    model = sparsecraft.craft(tiny_model("llama"), sparsecraft.CraftConfig(num_experts=E, top_k=2, adapter_dim=8,
                                                                           balance="global"), seed=0).train()
    recorder = model._sparsecraft_recorder
    ids = torch.randint(5, 120, (2, 6), generator=torch.Generator().manual_seed(0))
    recorder.new_step()
    model(input_ids=ids, labels=ids)
    once = {k: v.clone() for k, v in recorder.step_counts.items()}
    model(input_ids=ids, labels=ids)
    assert all(torch.equal(recorder.step_counts[k], 2 * once[k]) for k in once)  # accumulated over micro-steps
    assert all(float(v[-1]) == 12 for v in once.values())  # 12 tokens per forward
    recorder.new_step()
    assert recorder.step_counts == {}


def test_bias_chooses_but_does_not_gate():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    bias = torch.tensor([0.0, 0.0, 5.0, 0.0])
    gates, idx = gates_from_logits(logits, 2, "topk_softmax", True, bias)
    assert idx.tolist() == [[2, 0]]  # chosen with the bias: 5.0 and 2.0
    want = torch.softmax(torch.tensor([0.0, 2.0]), -1)  # gated by the unbiased logits of experts 2 and 0
    torch.testing.assert_close(gates[0], want)
    gates, idx = gates_from_logits(logits, 2, "softmax_topk", True, bias)
    probs = torch.softmax(logits[0], -1)
    assert idx.tolist() == [[2, 0]]
    torch.testing.assert_close(gates[0], probs[[2, 0]] / probs[[2, 0]].sum())


def test_bias_update_rule_and_round_trip(tmp_path):
    cfg = sparsecraft.CraftConfig(num_experts=E, top_k=1, adapter_dim=8, bias_balance=True, bias_update_rate=0.1)
    model = sparsecraft.craft(tiny_model("llama"), cfg, seed=0)
    counts = torch.tensor([[6, 2, 0, 0], [2, 2, 2, 2], [0, 0, 0, 8]])  # mean load 2 in every layer
    assert update_router_biases(model, counts, 0.1) == 3
    biases = [mlp.moe.router_bias for _, mlp in sparsecraft.crafted_layers(model)]
    torch.testing.assert_close(biases[0], torch.tensor([-0.1, 0.0, 0.1, 0.1]))  # sign(mean - load) * u
    torch.testing.assert_close(biases[1], torch.zeros(E))
    torch.testing.assert_close(biases[2], torch.tensor([0.1, 0.1, 0.1, -0.1]))
    assert not any(b.requires_grad for b in biases)
    sparsecraft.save(model, tmp_path / "m", standalone=True)
    loaded = sparsecraft.load(tmp_path / "m")
    for (_, mlp), want in zip(sparsecraft.crafted_layers(loaded), biases):
        torch.testing.assert_close(mlp.moe.router_bias, want)
    assert json.loads((tmp_path / "m" / "config.json").read_text())["craft"]["bias_balance"] is True


def test_bias_balancing_in_training_moves_the_bias_and_not_by_gradient(tmp_path):
    from conftest import tiny_run_files

    from sparsecraft.train.loop import run
    from sparsecraft.train.recipe import load_recipe

    tiny_run_files(tmp_path, records=32)
    summary = run(load_recipe(None, [
        f"model={tmp_path / 'base'}", f"output_dir={tmp_path / 'run'}", f"data={tmp_path / 'data.jsonl'}",
        "quantization=none", "max_steps=3", "batch_size=4", "grad_accum=2", "lora.r=4", "craft.num_experts=4",
        "craft.adapter_dim=8", "craft.bias_balance=true", "craft.bias_update_rate=0.05", "craft.balance=global",
        "craft.aux_reduce=sum", "data.max_length=32", "logging.progress=false", "checkpoint.every=0"]))
    trained = sparsecraft.load(summary["model_dir"])
    biases = torch.stack([mlp.moe.router_bias for _, mlp in sparsecraft.crafted_layers(trained)])
    assert biases.abs().max() > 0  # moved by the rule: multiples of 0.05 in [-0.15, 0.15]
    assert torch.allclose(biases / 0.05, (biases / 0.05).round(), atol=1e-5) and biases.abs().max() <= 0.15 + 1e-6

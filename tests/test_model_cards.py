"""Model cards on every model directory written (train, export, craft, convert), built with huggingface_hub's
ModelCard, and `sparsecraft push` / `push_to_hub:` against a local stand-in of the upload (what would be sent,
file by file)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import tiny_model, tiny_run_files, tiny_tokenizer
from huggingface_hub import ModelCard

import sparsecraft
from sparsecraft.checkpoint.card import model_card
from sparsecraft.cli import main
from sparsecraft.errors import CheckpointError


@pytest.fixture
def stand_in(monkeypatch):
    """Record what `HfApi.create_repo` / `upload_folder` would do instead of doing it."""
    from huggingface_hub import HfApi

    sent = {}

    def create_repo(self, repo_id, **kwargs):
        sent["created"] = (repo_id, kwargs.get("private"))

    def upload_folder(self, *, folder_path, repo_id, **kwargs):
        root = Path(folder_path)
        sent["uploaded"] = (repo_id, sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()))
        sent["card"] = (root / "README.md").read_text()
        return type("Info", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/abc"})()

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return sent


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tiny_run_files(tmp_path_factory.mktemp("cards"), records=24)


def train_args(workdir, out, *extra):
    return ["train", str(Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"),
            f"model={workdir / 'base'}", f"output_dir={out}", f"data={workdir / 'data.jsonl'}", "quantization=none",
            "max_steps=2", "batch_size=4", "lora.r=4", "craft.num_experts=4", "craft.adapter_dim=8",
            "data.max_length=32", "logging.progress=false", "checkpoint.every=0", *extra]


def test_card_metadata_for_hub_bases_datasets_and_results():
    config = {"method": "pesc", "base": {"spec": "Qwen/Qwen2.5-0.5B-Instruct", "revision": "a" * 40},
              "craft": {"num_experts": 8, "top_k": 2, "adapter_dim": 64},
              "recipe": {"data": {"sources": [{"path": "Open-Orca/SlimOrca"}, {"path": "local.jsonl"}]},
                         "lora": {"enabled": True, "r": 64, "alpha": 16, "targets": ["q_proj"]}, "optim": {},
                         "train": {}}}
    summary = {"eval_loss/math": 0.61, "initial_eval_loss/math": 1.7, "steps": 3, "tokens": 10,
               "trainable_params": 5, "total_params": 9}
    card = model_card(config, standalone=False, name="me/pesc", summary=summary)
    data = card.data.to_dict()
    assert data["base_model"] == "Qwen/Qwen2.5-0.5B-Instruct" and data["base_model_relation"] == "adapter"
    assert data["library_name"] == "sparsecraft" and data["pipeline_tag"] == "text-generation"
    assert {"moe", "pesc"} <= set(data["tags"]) and data["datasets"] == ["Open-Orca/SlimOrca"]
    metric = data["model-index"][0]["results"][0]["metrics"][0]
    assert metric == {"type": "loss", "value": 0.61}
    assert "| math | 1.7000 | 0.6100 |" in card.text and 'sparsecraft.load("me/pesc")' in card.text
    assert model_card({**config}, standalone=True, name="x").data.to_dict()["base_model_relation"] == "finetune"
    local = model_card({"method": "dense", "base": {"spec": "/some/dir"}}, standalone=False, name="x").data.to_dict()
    assert "base_model" not in local and "lora" in local["tags"]


def test_every_written_directory_carries_a_card(workdir, tmp_path):
    run = tmp_path / "run"
    assert main(train_args(workdir, run, "data.eval_fraction=0.25")) == 0
    card = ModelCard.load(run / "model" / "README.md")
    assert "pesc" in card.data.tags and "base_model_relation" not in card.data.to_dict()  # local base: no hub ID
    assert "## Held-out results" in card.text and "data.jsonl" in card.text
    assert main(["export", str(run / "model"), str(tmp_path / "merged")]) == 0
    assert ModelCard.load(tmp_path / "merged" / "README.md").data.library_name == "sparsecraft"
    assert main(["craft", str(workdir / "base"), str(tmp_path / "crafted"), "--experts", "4",
                 "--adapter-dim", "8"]) == 0
    assert (tmp_path / "crafted" / "README.md").is_file()
    assert main(["convert", str(tmp_path / "crafted"), str(tmp_path / "camelidae"), "--to", "camelidae"]) == 0
    assert "adapter_dim" in (tmp_path / "camelidae" / "README.md").read_text()


def test_push_sends_the_directory_file_by_file(stand_in, tmp_path):
    model = sparsecraft.craft(tiny_model(), sparsecraft.CraftConfig(num_experts=4, adapter_dim=8), seed=0)
    sparsecraft.save(model, tmp_path / "pesc", standalone=True, tokenizer=tiny_tokenizer())
    assert main(["push", str(tmp_path / "pesc"), "me/pesc", "--private"]) == 0
    assert stand_in["created"] == ("me/pesc", True)
    repo, files = stand_in["uploaded"]
    assert repo == "me/pesc" and {"config.json", "sparsecraft.safetensors", "README.md", "tokenizer.json",
                                  "base/config.json", "base/model.safetensors"} <= set(files)
    assert stand_in["card"].startswith("---\n")


def test_push_refuses_what_others_could_not_load(stand_in, tmp_path, workdir):
    model = sparsecraft.craft_from(workdir / "base", sparsecraft.CraftConfig(num_experts=4, adapter_dim=8))
    sparsecraft.save(model, tmp_path / "referenced")  # refers to a local base directory
    with pytest.raises(CheckpointError, match="local path"):
        from sparsecraft.checkpoint.push import push_to_hub

        push_to_hub(tmp_path / "referenced", "me/x")
    assert main(["push", str(tmp_path / "referenced"), "not a repo id"]) == 2
    assert "uploaded" not in stand_in


def test_recipe_push_to_hub_uploads_the_trained_model(stand_in, workdir, tmp_path, monkeypatch):
    # a local base cannot be pushed by reference: the run's model dir refers to it, so the push is refused and
    # says why; a recipe with a bad repo ID is refused before any work
    assert main(train_args(workdir, tmp_path / "bad", "push_to_hub=not/a/repo")) == 2
    from sparsecraft.checkpoint import push

    monkeypatch.setattr(push, "check_pushable", lambda directory: json.loads((directory / "config.json").read_text()))
    assert main(train_args(workdir, tmp_path / "run", "push_to_hub=me/trained", "push_private=true")) == 0
    assert stand_in["created"] == ("me/trained", True) and "README.md" in stand_in["uploaded"][1]

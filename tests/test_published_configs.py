"""The published PESC configs as they are (tests/fixtures/published/): Sparsetral's `model_type: sparsetral`,
Camelidae's and Qwen2idae's `auto_map` on a plain model type, each recognised, mapped to the crafting settings of
its reference code and built without remote code, with the published parameter counts; a tiny checkpoint with
Sparsetral's config keys imports through `sparsecraft.load` and `sparsecraft convert`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from safetensors.torch import save_file

import sparsecraft
from sparsecraft.checkpoint.published import detect_published_layout, published_craft_config, published_skeleton
from sparsecraft.cli import main

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "published"


def published(name: str) -> dict:
    return json.loads((FIXTURES / f"{name}.config.json").read_text())


@pytest.mark.parametrize("name, layout, settings, total", [
    # totals: the base + layers * (E * 2 * h * r + E * h); Camelidae's is the PESC spec's 7,813,206,016
    ("camelidae-8x7B", "camelidae", dict(num_experts=8, top_k=2, adapter_dim=512, scaling=0.25,
                                         routing="topk_softmax", router_dtype="model"), 7_813_206_016),
    ("sparsetral-16x7B-v2", "sparsetral", dict(num_experts=16, top_k=4, adapter_dim=512, scaling=1.0,
                                               routing="softmax_topk", router_dtype="float32", dropout=0.0,
                                               aux_loss_coef=0.01), 7_241_732_096 + 32 * (16 * 2 * 4096 * 512
                                                                                          + 16 * 4096)),
    ("qwen2idae-16x14B", "qwen2idae", dict(num_experts=16, top_k=4, adapter_dim=512, scaling=0.25,
                                           aux_loss_coef=0.02), None),
])
def test_published_configs_as_they_are(name, layout, settings, total):
    config = published(name)
    assert detect_published_layout(config) == layout
    cfg = published_craft_config(config)
    for key, value in settings.items():
        assert getattr(cfg, key) == value, key
    model = published_skeleton(config)  # meta device: no weights, no remote code
    assert sparsecraft.is_crafted(model) and len(sparsecraft.crafted_layers(model)) == config["num_hidden_layers"]
    if total is not None:
        assert sum(p.numel() for p in model.parameters()) == total
    if layout == "sparsetral":
        assert type(model).__mro__[1].__name__ == "MistralForCausalLM"


def test_a_sparsetral_model_type_checkpoint_imports_and_converts(tmp_path):
    """Sparsetral's keys (`model_type: sparsetral`, `experts.{e}.`) at tiny sizes: load, then convert."""
    dense = tiny_model("mistral")
    E, K, R = 4, 2, 8
    g = torch.Generator().manual_seed(0)
    tensors = {k: v.clone() for k, v in dense.state_dict().items()}
    h = dense.config.hidden_size
    for i in range(dense.config.num_hidden_layers):
        tensors[f"model.layers.{i}.mlp.moe_adapter.router.weight"] = torch.randn(E, h, generator=g)
        for e in range(E):
            for proj, shape in (("down", (R, h)), ("up", (h, R))):
                tensors[f"model.layers.{i}.mlp.moe_adapter.experts.{e}.adapter_{proj}.weight"] = \
                    torch.randn(*shape, generator=g) * 0.3
    config = {k: v for k, v in published("sparsetral-16x7B-v2").items()}
    small = {k: v for k, v in dense.config.to_dict().items() if k in config}
    config.update(small, num_experts=E, topk=K, adapter_dim=R, torch_dtype="float32")
    path = tmp_path / "sparsetral"
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(path / "model.safetensors"))
    model = sparsecraft.load(path)
    assert sparsecraft.is_crafted(model) and model._sparsecraft_config.num_experts == E
    ids = torch.tensor([[3, 9, 27, 81, 100]])
    with torch.no_grad():
        want = model(ids).logits
    assert main(["convert", str(path), str(tmp_path / "ours")]) == 0
    with torch.no_grad():
        torch.testing.assert_close(sparsecraft.load(tmp_path / "ours")(ids).logits, want)

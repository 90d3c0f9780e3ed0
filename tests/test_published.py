"""Import/export of the published PESC layouts against a reference computed here from the published formula."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model
from safetensors.torch import load_file, save_file

from sparsecraft import craft, is_crafted
from sparsecraft.checkpoint.published import detect_published_layout, load_published, published_craft_config
from sparsecraft.checkpoint.published_export import export_published
from sparsecraft.errors import CheckpointError

E, K, R = 4, 2, 8
AUTO_MAP = {
    "camelidae": {"AutoConfig": "configuration_camelidae.CamelidaeConfig",
                  "AutoModelForCausalLM": "modeling_camelidae.LlamaForCausalLM"},
    "qwen2idae": {"AutoConfig": "configuration_qwen2idae.Qwen2idaeConfig",
                  "AutoModelForCausalLM": "modeling_qwen2idae.Qwen2ForCausalLM"},
    "sparsetral": {"AutoConfig": "configuration_sparsetral.SparsetralConfig",
                   "AutoModelForCausalLM": "modeling_sparsetral.MistralForCausalLM"},
}
FAMILY = {"camelidae": "llama", "qwen2idae": "qwen2", "sparsetral": "mistral"}
SCALING = {"camelidae": 0.25, "qwen2idae": 0.25, "sparsetral": 1.0}
INPUT = torch.tensor([[1, 5, 9, 33, 70, 101, 4, 17], [3, 3, 60, 2, 127, 45, 8, 90]])


def _expert_key(layout: str, i: int, e: int, proj: str) -> str:
    expert = f"expert_{e}" if layout != "sparsetral" else str(e)
    return f"model.layers.{i}.mlp.moe_adapter.experts.{expert}.adapter_{proj}.weight"


def make_published(tmp_path, layout: str, *, tied: bool = False, seed: int = 0):
    """A fake published directory: returns (dir, dense base model, moe weights {layer: (router, downs, ups)})."""
    dense = tiny_model(FAMILY[layout], seed=seed)
    if tied:  # tie lm_head to the embedding, as Qwen-style configs may
        dense.config.tie_word_embeddings = True
        dense.lm_head.weight = dense.model.embed_tokens.weight
    g = torch.Generator().manual_seed(seed + 1)
    h = dense.config.hidden_size
    tensors = {k: v.clone() for k, v in dense.state_dict().items()}
    if tied:
        del tensors["lm_head.weight"]  # tied checkpoints omit it
    moe = {}
    for i in range(dense.config.num_hidden_layers):
        router = torch.randn(E, h, generator=g)
        downs = [torch.randn(R, h, generator=g) * 0.3 for _ in range(E)]
        ups = [torch.randn(h, R, generator=g) * 0.3 for _ in range(E)]
        moe[i] = (router, downs, ups)
        tensors[f"model.layers.{i}.mlp.moe_adapter.router.weight"] = router
        for e in range(E):
            tensors[_expert_key(layout, i, e, "down")] = downs[e]
            tensors[_expert_key(layout, i, e, "up")] = ups[e]
    config = dense.config.to_dict()
    config.update(num_experts=E, topk=K, adapter_dim=R, moe_scaling=SCALING[layout], moe_dtype="bfloat16",
                  output_router_logits=False, auto_map=AUTO_MAP[layout])
    if layout == "sparsetral":
        config.update(adapter_dropout=0.0, router_aux_loss_coef=0.01)
    path = tmp_path / layout
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(path / "model.safetensors"))
    return path, dense, moe


def reference_logits(dense, moe, layout: str, input_ids=INPUT) -> torch.Tensor:
    """The published layer maths, token by token, hooked onto each dense MLP's output.

    F = mlp(x); l = W_r x; Camelidae: top-k of l, softmax over the k; Sparsetral: softmax over all E in fp32,
    top-k, renormalise; y = sum_j g_j (F + s * W_up_e GELU(W_down_e F)).
    """
    s = SCALING[layout]

    def make_hook(i):
        router, downs, ups = moe[i]

        def hook(module, args, out):
            x = args[0]
            flat_x, flat_f = x.reshape(-1, x.shape[-1]), out.reshape(-1, out.shape[-1])
            rows = []
            for xt, ft in zip(flat_x, flat_f):
                logits = router @ xt
                if layout == "sparsetral":
                    probs = torch.softmax(logits.float(), dim=-1)
                    gates, idx = torch.topk(probs, K)
                    gates = gates / gates.sum()
                else:
                    top, idx = torch.topk(logits, K)
                    gates = torch.softmax(top, dim=-1)
                y = torch.zeros_like(ft)
                for g, e in zip(gates, idx.tolist()):
                    y = y + g * (ft + s * (ups[e] @ F.gelu(downs[e] @ ft)))
                rows.append(y)
            return torch.stack(rows).view_as(out)

        return hook

    handles = [layer.mlp.register_forward_hook(make_hook(i)) for i, layer in enumerate(dense.model.layers)]
    try:
        with torch.no_grad():
            return dense(input_ids).logits
    finally:
        for handle in handles:
            handle.remove()


def logits_of(model, input_ids=INPUT) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids).logits


# ------------------------------------------------------------------------------------------------- detection

def test_detection_by_fields_not_model_type():
    assert detect_published_layout(tiny_model("llama").config.to_dict()) is None
    assert detect_published_layout(tiny_model("mistral").config.to_dict()) is None
    mixtral_like = {"model_type": "mixtral", "num_local_experts": 8, "num_experts_per_tok": 2,
                    "router_aux_loss_coef": 0.02}
    assert detect_published_layout(mixtral_like) is None
    fields = {"num_experts": 8, "adapter_dim": 512, "moe_scaling": 0.25, "topk": 2}
    assert detect_published_layout({"model_type": "llama", **fields}) == "camelidae"
    assert detect_published_layout({"model_type": "qwen2", **fields}) == "qwen2idae"
    assert detect_published_layout({"model_type": "mistral", **fields, "adapter_dropout": 0.1}) == "sparsetral"
    for layout, auto_map in AUTO_MAP.items():
        assert detect_published_layout({"model_type": "llama", "auto_map": auto_map}) == layout


def test_missing_fields_take_reference_defaults():
    cfg = published_craft_config({"model_type": "llama", "auto_map": AUTO_MAP["camelidae"]})
    assert (cfg.num_experts, cfg.top_k, cfg.adapter_dim, cfg.scaling) == (8, 1, 64, 0.25)
    assert (cfg.routing, cfg.router_dtype, cfg.combine) == ("topk_softmax", "model", "per_slot")
    cfg = published_craft_config({"model_type": "mistral", "auto_map": AUTO_MAP["sparsetral"]})
    assert (cfg.routing, cfg.normalize_topk, cfg.router_dtype) == ("softmax_topk", True, "float32")


# ------------------------------------------------------------------------------------------ import fidelity

@pytest.mark.parametrize("layout", ["camelidae", "sparsetral"])
def test_load_matches_reference_formula(tmp_path, layout):
    path, dense, moe = make_published(tmp_path, layout)
    model = load_published(path)
    assert is_crafted(model) and not model.training
    expected = reference_logits(dense, moe, layout)
    got = logits_of(model)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    # the adapters matter: the dense model alone is far off
    assert (logits_of(dense) - expected).abs().max() > 100 * 1e-5
    # several experts are actually chosen
    chosen = set()
    router = moe[0][0]
    x = dense.model.layers[0].post_attention_layernorm(dense.model.embed_tokens(INPUT))
    chosen.update(torch.topk(x @ router.T, K).indices.flatten().tolist())
    assert len(chosen) > 2


def test_qwen2idae_with_tied_embeddings(tmp_path):
    path, dense, moe = make_published(tmp_path, "qwen2idae", tied=True)
    model = load_published(path)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    expected = reference_logits(dense, moe, "qwen2idae")
    torch.testing.assert_close(logits_of(model), expected, atol=1e-5, rtol=0)


def test_load_dtype_and_stacked_layout(tmp_path):
    path, dense, moe = make_published(tmp_path, "camelidae")
    model = load_published(path, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    state = model.state_dict()
    down = state["model.layers.1.mlp.moe.experts.down"]
    assert down.shape == (E, R, dense.config.hidden_size)
    torch.testing.assert_close(down[2].float(), moe[1][1][2].bfloat16().float())
    torch.testing.assert_close(state["model.layers.1.mlp.moe.experts.up"][3].float(),
                               moe[1][2][3].bfloat16().float())


# ------------------------------------------------------------------------------------------------ round trip

@pytest.mark.parametrize("layout", ["camelidae", "sparsetral"])
def test_round_trip_identical_logits(tmp_path, layout):
    path, _, _ = make_published(tmp_path, layout)
    first = load_published(path)
    out = export_published(first, tmp_path / "exported", layout=layout)
    config = json.loads((out / "config.json").read_text())
    assert detect_published_layout(config) == layout
    assert config["model_type"] == FAMILY[layout] and "auto_map" not in config
    keys = set(load_file(str(out / "model.safetensors")))
    assert keys == set(load_file(str(path / "model.safetensors")))
    second = load_published(out)
    assert torch.equal(logits_of(first), logits_of(second))


def test_round_trip_sharded_and_tied(tmp_path):
    path, _, _ = make_published(tmp_path, "qwen2idae", tied=True)
    first = load_published(path)
    out = export_published(first, tmp_path / "sharded", layout="camelidae", shard_size=20_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert "lm_head.weight" not in index["weight_map"]
    assert torch.equal(logits_of(first), logits_of(load_published(out)))


def test_export_refuses_existing_dir_and_uncrafted(tmp_path):
    path, _, _ = make_published(tmp_path, "camelidae")
    model = load_published(path)
    with pytest.raises(CheckpointError, match="not empty"):
        export_published(model, path)
    export_published(model, path, overwrite=True)
    assert torch.equal(logits_of(model), logits_of(load_published(path)))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp dirs left
    with pytest.raises(CheckpointError, match="crafted"):
        export_published(tiny_model("llama"), tmp_path / "plain")
    partial = craft(tiny_model("llama"), layers=[0])
    with pytest.raises(CheckpointError, match="every decoder layer"):
        export_published(partial, tmp_path / "partial")


# --------------------------------------------------------------------------------------------------- pickle

def test_pickle_only_dir_needs_allow_pickle(tmp_path):
    path, dense, moe = make_published(tmp_path, "camelidae")
    tensors = load_file(str(path / "model.safetensors"))
    (path / "model.safetensors").unlink()
    torch.save(tensors, path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="allow.pickle") as info:
        load_published(path)
    assert "\n" not in str(info.value)
    model = load_published(path, allow_pickle=True)
    torch.testing.assert_close(logits_of(model), reference_logits(dense, moe, "camelidae"), atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------ refusals

def _rewrite(path, change):
    tensors = load_file(str(path / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(path / "model.safetensors"))


def test_unknown_adapter_key_refused(tmp_path):
    path, _, _ = make_published(tmp_path, "camelidae")
    extra = _expert_key("camelidae", 1, E, "down")  # one expert more than num_experts
    _rewrite(path, lambda t: t.__setitem__(extra, torch.zeros(R, 32)))
    with pytest.raises(CheckpointError, match=extra.replace(".", r"\.")):
        load_published(path)


def test_wrong_key_style_refused(tmp_path):
    path, _, _ = make_published(tmp_path, "sparsetral")
    config = json.loads((path / "config.json").read_text())
    config["auto_map"] = AUTO_MAP["camelidae"]  # sparsetral names under a camelidae config
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"moe_adapter\.experts\.0\.adapter"):
        load_published(path)


def test_shape_mismatch_refused(tmp_path):
    path, _, _ = make_published(tmp_path, "camelidae")
    key = _expert_key("camelidae", 2, 1, "up")
    _rewrite(path, lambda t: t.__setitem__(key, torch.zeros(32, R + 1)))
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.") + ".*shape"):
        load_published(path)


def test_missing_tensor_refused(tmp_path):
    path, _, _ = make_published(tmp_path, "sparsetral")
    key = _expert_key("sparsetral", 0, 3, "up")
    _rewrite(path, lambda t: t.pop(key))
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.") + " is missing"):
        load_published(path)


def test_untied_lm_head_missing_refused(tmp_path):
    path, _, _ = make_published(tmp_path, "camelidae")
    _rewrite(path, lambda t: t.pop("lm_head.weight"))
    with pytest.raises(CheckpointError, match=r"lm_head\.weight is missing"):
        load_published(path)


def test_plain_checkpoint_refused(tmp_path):
    dense = tiny_model("llama")
    dense.save_pretrained(tmp_path / "plain")
    with pytest.raises(CheckpointError, match="no PESC fields"):
        load_published(tmp_path / "plain")


def test_camelidae_rope_theta_warning(tmp_path):
    path, _, _ = make_published(tmp_path, "camelidae")
    config = json.loads((path / "config.json").read_text())
    config["rope_parameters"]["rope_theta"] = 5_000_000.0  # a Yi-based config; the reference used 10000
    (path / "config.json").write_text(json.dumps(config))
    with pytest.warns(UserWarning, match="rope_theta"):
        model = load_published(path)
    assert model.config.rope_parameters["rope_theta"] == 5_000_000.0


@pytest.mark.parametrize("method", ["upcycle", "mixlora"])
def test_export_refuses_methods_the_layout_cannot_hold(tmp_path, method):
    model = craft(tiny_model("llama"), method=method)
    with pytest.raises(CheckpointError, match=f"PESC.*{method}"):
        export_published(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_export_of_balancing_biases(tmp_path):
    """Zero selection biases change nothing and are left out; moved ones the layout cannot express are refused."""
    from sparsecraft import CraftConfig, crafted_layers

    model = craft(tiny_model("llama"), CraftConfig(bias_balance=True)).eval()
    out = export_published(model, tmp_path / "zero", layout="camelidae")
    assert not [k for k in load_file(str(out / "model.safetensors")) if "router_bias" in k]
    assert torch.equal(logits_of(model), logits_of(load_published(out)))
    with torch.no_grad():
        crafted_layers(model)[0][1].moe.router_bias[0] = 0.5
    with pytest.raises(CheckpointError, match="selection bias"):
        export_published(model, tmp_path / "moved", layout="camelidae")

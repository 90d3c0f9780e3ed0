"""UpIT expert sets (methods/expert_set.py, methods/upit.py): files, reading states from dense-stage models, and
building the MoE of each kind with function preservation (equal experts = the dense-stage model), router rows,
shared weights, freezing experts, and the crafted-directory round trip. Tiny fp32 models; the file runs in well
under a minute."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_model
from peft import LoraConfig, get_peft_model

import sparsecraft
from sparsecraft import CraftConfig, craft, crafted_layers
from sparsecraft.errors import CheckpointError, ConfigError
from sparsecraft.methods import expert_kinds, get_method
from sparsecraft.methods.expert_set import ExpertSet, expert_state, load_expert_set, save_expert_set
from sparsecraft.methods.upit import build_moe
from sparsecraft.moe.lora_experts import LoraExpertsMoE
from sparsecraft.moe.parts import expert_modules, set_trainable
from sparsecraft.moe.upcycle import CopiedExperts, GatedExperts
from sparsecraft.surgery import set_dispatch

EXPERT_KINDS = expert_kinds()


def lora_meta(model):
    return get_method("lora_experts").expert_meta(model)

E = 4
MOE = CraftConfig(num_experts=2, top_k=2, dropout=0.0)  # num_experts is replaced by the expert count


def ids_for(batch=2, seq=9, seed=0):
    return torch.randint(1, 128, (batch, seq), generator=torch.Generator().manual_seed(seed))


def logits(model, ids=None):
    with torch.no_grad():
        return model(ids if ids is not None else ids_for()).logits


def noisy(state, seed, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    return {k: v + torch.randn(v.shape, generator=g) * scale for k, v in state.items()}


# --------------------------------------------------------------------------------------------- dense stage


def peft_dense(seed=0, trained=True):
    """A dense tiny LLaMA with peft LoRA on its MLP projections (B non-zero when `trained`)."""
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["gate_proj", "up_proj", "down_proj"])
    model = get_peft_model(tiny_model("llama"), config)
    if trained:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def lora_set(states, base=None, **meta):
    return ExpertSet("lora", states, base if base is not None else states[0], {}, {"r": 4, "alpha": 8.0, **meta},
                     [f"ckpt-{j}" for j in range(len(states))])


def pesc_dense(seed=0):
    """A PESC model crafted with one adapter per layer (the adapter setting's dense stage), `up` non-zero."""
    model = tiny_model("llama")
    craft(model, CraftConfig(num_experts=1, top_k=1, adapter_dim=8, scaling=0.5, dropout=0.0), seed=seed)
    with torch.no_grad():
        for _, mlp in crafted_layers(model):
            mlp.moe.experts.up.normal_(0, 0.1, generator=torch.Generator().manual_seed(seed))
    return model.eval()


# ------------------------------------------------------------------------------------------------- files


def test_expert_set_round_trip(tmp_path):
    state = expert_state(peft_dense(), "lora")
    es = lora_set([noisy(state, j) for j in range(3)], base=state, sources=["a", "b", "c"])
    es.shared = {"model.norm.weight": torch.rand(32)}
    out = save_expert_set(es, tmp_path / "experts")
    assert sorted(p.name for p in out.iterdir()) == [
        "base.safetensors", "expert_0.safetensors", "expert_1.safetensors", "expert_2.safetensors",
        "experts.json", "shared.safetensors"]
    back = load_expert_set(out)
    assert (back.kind, back.names, back.meta) == ("lora", es.names, es.meta)
    for got, want in zip(back.states + [back.base, back.shared], es.states + [es.base, es.shared]):
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    save_expert_set(lora_set(es.states[:2], base=state), out)  # overwrite in place, atomically
    assert load_expert_set(out).num_experts == 2 and not list(tmp_path.glob(".experts.*"))


def test_expert_set_file_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not an expert set"):
        load_expert_set(tmp_path / "nowhere")
    state = expert_state(peft_dense(), "lora")
    out = save_expert_set(lora_set([state, state]), tmp_path / "experts")
    (out / "expert_1.safetensors").write_bytes((out / "expert_1.safetensors").read_bytes()[:40])
    with pytest.raises(CheckpointError, match="corrupted or truncated"):
        load_expert_set(out)
    (out / "expert_1.safetensors").unlink()
    with pytest.raises(CheckpointError, match="expert_1.safetensors is missing"):
        load_expert_set(out)
    (out / "experts.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not a valid expert set index"):
        load_expert_set(out)


def test_expert_set_validation():
    state = expert_state(peft_dense(), "lora")
    with pytest.raises(ConfigError, match="expert kind"):
        ExpertSet("mlp", [state], state, names=["a"]).validate()
    with pytest.raises(ConfigError, match="other keys"):
        lora_set([state, {k: v for k, v in state.items() if "layers.0." not in k}]).validate()
    bad = dict(state, **{"layers.0.up_proj.lora_A": torch.zeros(2, 32)})
    with pytest.raises(ConfigError, match="has shape"):
        lora_set([state, bad], base=state).validate()
    with pytest.raises(ConfigError, match="names"):
        ExpertSet("lora", [state], state, names=[]).validate()
    assert set(EXPERT_KINDS) == {"lora", "ffn", "adapter"}


def test_reading_states_from_dense_stage_models():
    model = peft_dense()
    state = expert_state(model, "lora")
    assert state["layers.2.down_proj.lora_A"].shape == (4, 64)
    assert state["layers.2.down_proj.lora_B"].shape == (32, 4)
    assert len(state) == 3 * 3 * 2
    assert lora_meta(model) == {"r": 4, "alpha": 8.0, "scaling": 2.0,
                                "targets": ["down_proj", "gate_proj", "up_proj"]}
    ffn = expert_state(tiny_model("llama"), "ffn")
    assert ffn["layers.1.gate_proj.weight"].shape == (64, 32) and len(ffn) == 9
    adapter = expert_state(pesc_dense(), "adapter")
    assert adapter["layers.0.down"].shape == (8, 32) and adapter["layers.0.up"].shape == (32, 8)
    with pytest.raises(ConfigError, match="no lora expert weights"):
        expert_state(tiny_model("llama"), "lora")


# --------------------------------------------------------------------------------------------- lora kind


@pytest.mark.parametrize("routing", ["topk_softmax", "softmax_topk"])
def test_lora_equal_experts_equal_merged_dense(routing):
    """Function preservation: E copies of one LoRA state = the dense model with that LoRA merged."""
    trained = peft_dense()
    state = expert_state(trained, "lora")
    want = logits(trained.merge_and_unload())
    model = build_moe(tiny_model("llama"), lora_set([state] * E), CraftConfig(**{**MOE.to_dict(), "routing": routing}),
                      seed=0)
    assert len(crafted_layers(model)) == 3 and model._sparsecraft_config.num_experts == E
    torch.testing.assert_close(logits(model), want, atol=1e-5, rtol=1e-5)


def test_lora_initial_state_equals_dense():
    initial = expert_state(peft_dense(trained=False), "lora")  # B = 0: what the dense stage starts from
    model = build_moe(tiny_model("llama"), lora_set([initial] * E), MOE, seed=0)
    torch.testing.assert_close(logits(model), logits(tiny_model("llama")), atol=1e-6, rtol=1e-6)


def test_lora_states_land_in_their_slots():
    base = expert_state(peft_dense(), "lora")
    states = [noisy(base, j) for j in range(E)]
    model = build_moe(tiny_model("llama"), lora_set(states, base=base), MOE, seed=0)
    moe = crafted_layers(model)[1][1].moe
    assert isinstance(moe, LoraExpertsMoE) and moe.scaling == 2.0
    for e in range(E):
        assert torch.equal(moe.experts.A["up_proj"][e], states[e]["layers.1.up_proj.lora_A"])
        assert torch.equal(moe.experts.B["down_proj"][e], states[e]["layers.1.down_proj.lora_B"])
    # distinct experts: grouped dispatch still equals the per-expert reference on the whole model
    want = logits(model)
    set_dispatch(model, "loop")
    torch.testing.assert_close(logits(model), want, atol=1e-5, rtol=1e-5)


def test_lora_scaling_must_be_known():
    state = expert_state(peft_dense(), "lora")
    es = ExpertSet("lora", [state, state], state, {}, {}, ["a", "b"])
    with pytest.raises(ConfigError, match="scaling"):
        build_moe(tiny_model("llama"), es, MOE)


# ---------------------------------------------------------------------------------------------- ffn kind


@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_ffn_equal_experts_equal_dense(family):
    dense = tiny_model(family)
    state = expert_state(dense, "ffn")
    es = ExpertSet("ffn", [state] * E, state, {}, {}, [f"c{j}" for j in range(E)])
    model = build_moe(tiny_model(family, seed=1), es, MOE, seed=0)  # other weights: the states must win
    for _, mlp in crafted_layers(model):
        assert isinstance(mlp.moe.experts, GatedExperts)
    shared = {k: v for k, v in dense.state_dict().items() if ".mlp." not in k}
    model.load_state_dict(shared, strict=False)  # non-FFN weights of the dense model too
    torch.testing.assert_close(logits(model), logits(dense), atol=1e-5, rtol=1e-5)


def test_ffn_states_land_in_their_copies():
    base = expert_state(tiny_model("llama"), "ffn")
    states = [noisy(base, j) for j in range(E)]
    model = build_moe(tiny_model("llama"), ExpertSet("ffn", states, base, {}, {}, list("abcd")), MOE)
    experts = crafted_layers(model)[2][1].moe.experts
    for e in range(E):
        want = torch.cat([states[e]["layers.2.gate_proj.weight"], states[e]["layers.2.up_proj.weight"]])
        assert torch.equal(experts.gate_up_proj[e], want)
        assert torch.equal(experts.down_proj[e], states[e]["layers.2.down_proj.weight"])


def test_ffn_of_unknown_structure_uses_copies():
    from conftest import tiny_config
    from transformers import AutoModelForCausalLM

    config = tiny_config("llama")
    config.mlp_bias = True  # biases: not the stacked form, the copy-and-loop fallback
    torch.manual_seed(0)
    dense = AutoModelForCausalLM.from_config(config).eval()
    base = expert_state(dense, "ffn")
    states = [noisy(base, j) for j in range(E)]
    model = AutoModelForCausalLM.from_config(config).eval()
    model.load_state_dict(dense.state_dict())
    build_moe(model, ExpertSet("ffn", states, base, {}, {}, list("abcd")), MOE)
    experts = crafted_layers(model)[0][1].moe.experts
    assert isinstance(experts, CopiedExperts)
    assert torch.equal(experts[3].up_proj.bias, states[3]["layers.0.up_proj.bias"])


def test_ffn_states_must_match_the_ffn():
    base = expert_state(tiny_model("llama"), "ffn")
    base = {k.replace("gate_proj", "w1"): v for k, v in base.items()}
    with pytest.raises(ConfigError, match="do not match its FFN"):
        build_moe(tiny_model("llama"), ExpertSet("ffn", [base, base], base, {}, {}, ["a", "b"]), MOE)


# ------------------------------------------------------------------------------------------ adapter kind


def test_adapter_zero_up_equals_dense():
    state = expert_state(pesc_dense(), "adapter")
    initial = {k: (torch.zeros_like(v) if k.endswith(".up") else v) for k, v in state.items()}
    model = build_moe(tiny_model("llama"), ExpertSet("adapter", [initial] * E, initial, {}, {}, list("abcd")), MOE)
    torch.testing.assert_close(logits(model), logits(tiny_model("llama")), atol=1e-6, rtol=1e-6)


def test_adapter_equal_experts_equal_dense_stage_model():
    stage = pesc_dense()
    state = expert_state(stage, "adapter")
    es = ExpertSet("adapter", [state] * E, state, {}, {"scaling": 0.5}, list("abcd"))
    model = build_moe(tiny_model("llama"), es, MOE, seed=3)
    moe = crafted_layers(model)[0][1].moe
    assert moe.config.scaling == 0.5 and moe.config.adapter_dim == 8 and moe.experts.down.shape == (E, 8, 32)
    torch.testing.assert_close(logits(model), logits(stage), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------ router, shared, freezing


def test_router_rows_are_installed():
    state = expert_state(peft_dense(), "lora")
    rows = {1: torch.randn(E, 32), 2: torch.randn(E, 32)}
    default = crafted_layers(build_moe(tiny_model("llama"), lora_set([state] * E), MOE, seed=0))[0][1]
    model = build_moe(tiny_model("llama"), lora_set([state] * E), MOE, router=rows, seed=0)
    layers = dict(crafted_layers(model))
    assert torch.equal(layers[1].moe.router.weight, rows[1]) and torch.equal(layers[2].moe.router.weight, rows[2])
    assert torch.equal(layers[0].moe.router.weight, default.moe.router.weight)  # seeded default init
    with pytest.raises(ConfigError, match="layer 7"):
        build_moe(tiny_model("llama"), lora_set([state] * E), MOE, router={7: torch.randn(E, 32)})
    with pytest.raises(ConfigError, match="expected"):
        build_moe(tiny_model("llama"), lora_set([state] * E), MOE, router={0: torch.randn(E + 1, 32)})


def test_top_k_above_expert_count_is_refused():
    state = expert_state(peft_dense(), "lora")
    with pytest.raises(ConfigError, match="top_k"):
        build_moe(tiny_model("llama"), lora_set([state]), MOE)


def test_shared_weights_are_loaded_and_checked():
    state = expert_state(peft_dense(), "lora")
    q = torch.randn(32, 32)
    es = lora_set([state] * E)
    es.shared = {"model.layers.0.self_attn.q_proj.weight": q}
    model = build_moe(tiny_model("llama"), es, MOE)
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, q)
    es.shared = {"model.layers.0.self_attn.query.weight": q}
    with pytest.raises(ConfigError, match="not in"):
        build_moe(tiny_model("llama"), es, MOE)


def test_freeze_experts_train_routers():
    state = expert_state(peft_dense(), "lora")
    model = build_moe(tiny_model("llama"), lora_set([noisy(state, j) for j in range(E)], base=state), MOE)
    for p in model.parameters():
        p.requires_grad_(False)
    parts = expert_modules(model)
    assert sorted(parts.routers) == [0, 1, 2] and len(parts.expert_parameters()) == 3 * 6
    assert set_trainable(model, routers=True, experts=False) == 3 * E * 32
    model.train()
    ids = ids_for()
    model(ids, labels=ids).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in parts.router_parameters())
    assert all(p.grad is None for p in parts.expert_parameters())
    assert set_trainable(model, routers=True, experts=True) > 3 * E * 32


# ------------------------------------------------------------------------------------- crafted directory


@pytest.mark.parametrize("kind", ["lora", "ffn", "adapter"])
def test_saved_moe_loads_back(tmp_path, kind):
    base_dir = tmp_path / "base"
    tiny_model("llama").save_pretrained(base_dir)
    if kind == "lora":
        base = expert_state(peft_dense(), "lora")
    elif kind == "ffn":
        base = expert_state(tiny_model("llama"), "ffn")
    else:
        base = expert_state(pesc_dense(), "adapter")
    es = ExpertSet(kind, [noisy(base, j) for j in range(E)], base, {}, {"alpha": 8.0}, list("abcd"))
    q = torch.randn(32, 32)
    es.shared = {"model.layers.1.self_attn.q_proj.weight": q}  # a replaced base weight must survive the save
    model = build_moe(sparsecraft.load(base_dir), es, MOE, router={0: torch.randn(E, 32)}).eval()
    want = logits(model)
    out = sparsecraft.save(model, tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    assert config["method"] == {"lora": "lora_experts", "ffn": "upcycle", "adapter": "pesc"}[kind]
    assert config["shared"] == "shared.safetensors"
    loaded = sparsecraft.load(out)
    assert torch.equal(loaded.model.layers[1].self_attn.q_proj.weight, q)
    torch.testing.assert_close(logits(loaded), want, atol=0, rtol=0)
    resaved = sparsecraft.load(sparsecraft.save(loaded, tmp_path / "again"))  # the shared tensors stay with it
    torch.testing.assert_close(logits(resaved), want, atol=0, rtol=0)


def test_missing_shared_file_is_a_clear_error(tmp_path):
    base_dir = tmp_path / "base"
    tiny_model("llama").save_pretrained(base_dir)
    state = expert_state(peft_dense(), "lora")
    es = lora_set([state] * E)
    es.shared = {"model.norm.weight": torch.rand(32)}
    out = sparsecraft.save(build_moe(sparsecraft.load(base_dir), es, MOE), tmp_path / "out")
    (out / "shared.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing shared weights file"):
        sparsecraft.load(out)
    standalone = sparsecraft.save(build_moe(sparsecraft.load(base_dir), es, MOE), tmp_path / "alone",
                                  standalone=True)
    assert not (standalone / "shared.safetensors").exists()  # base/ already holds the replaced weights
    torch.testing.assert_close(sparsecraft.load(standalone).model.norm.weight, es.shared["model.norm.weight"])


@pytest.mark.parametrize("kind", ["lora", "adapter"])
def test_states_read_back_from_a_built_moe(kind):
    """route's `states_from_moe` (used when experts train with the router) inverts `build_moe` for every kind."""
    from sparsecraft.upit.route import states_from_moe

    if kind == "lora":
        base = expert_state(peft_dense(), "lora")
        es = lora_set([noisy(base, j) for j in range(E)], base=base)
    else:
        base = expert_state(pesc_dense(), "adapter")
        es = ExpertSet("adapter", [noisy(base, j) for j in range(E)], base, {}, {}, [f"a{j}" for j in range(E)])
    model = build_moe(tiny_model("llama"), es, MOE, seed=0)
    got = states_from_moe(model, es)
    assert len(got) == E
    for a, b in zip(got, es.states):
        assert sorted(a) == sorted(b)
        for key in b:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


def test_settings_the_set_fixes_are_derived_and_never_silently_replace_the_users():
    """The set fixes E, the layers and what its experts were trained with: a default is replaced and reported, a
    value the user wrote that differs is a one-line error naming both values."""
    from sparsecraft.methods.upit import settings_from_set

    es = lora_set([expert_state(peft_dense(), "lora")] * E)
    settings, derived = settings_from_set(es, MOE)  # nothing written by the user
    assert settings["num_experts"] == E and settings["adapter_dim"] == 4 and settings["scaling"] == 2.0
    assert derived == {"num_experts": E, "adapter_dim": 4, "scaling": 2.0, "layers": [0, 1, 2]}
    same, _ = settings_from_set(es, CraftConfig(num_experts=E, top_k=2, adapter_dim=4), ["num_experts", "adapter_dim"])
    assert same["num_experts"] == E  # written and equal: fine
    with pytest.raises(ConfigError, match=r"craft.num_experts=2 conflicts with the lora expert set, which fixes "
                                          r"num_experts=4"):
        settings_from_set(es, MOE, ["num_experts"])
    with pytest.raises(ConfigError, match=r"craft.adapter_dim=64 conflicts"):
        settings_from_set(es, CraftConfig(num_experts=E, top_k=2), ["adapter_dim"])
    with pytest.raises(ConfigError, match="conflicts"):  # through training's build path too
        build_moe(tiny_model("llama"), es, CraftConfig(num_experts=E, top_k=2, scaling=0.5), explicit=["scaling"])

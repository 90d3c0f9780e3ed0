"""Crafting tiny decoders of every family into PESC MoE models: equivalence at init, layer selection, router losses
in the forward, padding, gradient checkpointing, generation, errors, dtypes."""

from __future__ import annotations

import math
import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import FAMILIES, tiny_model

from sparsecraft import CraftConfig, craft, crafted_layers, is_crafted, new_parameters, uncraft
from sparsecraft.errors import ConfigError, CraftError
from sparsecraft.moe.layers import PescMoE, is_pesc_mlp
from sparsecraft.surgery import set_dispatch

SMALL = dict(num_experts=4, top_k=2, adapter_dim=4, dropout=0.0)


def ids_for(batch=2, seq=9, seed=0):
    return torch.randint(1, 128, (batch, seq), generator=torch.Generator().manual_seed(seed))


def make(family="llama", seed=0, **kw):
    model = tiny_model(family)
    return craft(model, seed=seed, **{**SMALL, **kw})


def perturb_up(model, std=0.5, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("moe.experts.up"):
                p.copy_(torch.randn(p.shape, generator=g) * std)


def moe_blocks(model):
    return [m for m in model.modules() if isinstance(m, PescMoE)]


def lm_loss(logits, labels):
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1))


def layer_list(model):
    return model.model.layers


# --------------------------------------------------------------------------------------------- equivalence


@pytest.mark.parametrize("family", FAMILIES)
def test_crafted_equals_dense_at_init_and_differs_after_w_up(family):
    model = tiny_model(family)
    ids = ids_for()
    with torch.no_grad():
        dense = model(ids).logits
    craft(model, seed=0, **SMALL)
    assert is_crafted(model) and type(model).__name__.startswith("Pesc")
    assert [i for i, _ in crafted_layers(model)] == [0, 1, 2]
    with torch.no_grad():
        crafted = model(ids).logits
    torch.testing.assert_close(crafted, dense, atol=1e-6, rtol=0)
    perturb_up(model)
    with torch.no_grad():
        changed = model(ids).logits
    assert (changed - dense).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["llama", "gemma3", "phi3"])
def test_pesc_block_matches_formula_on_the_real_mlp(family):
    """mlp(x) == F + s * sum_j g_j W_up[e] gelu(W_down[e] F), router on the MLP input x, experts on F."""
    model = make(family, scaling=0.5)
    perturb_up(model)
    mlp = crafted_layers(model)[1][1]
    moe = mlp.moe
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = mlp(x)
        f = type(mlp)._sparsecraft_base_class.forward(mlp, x)
        logits = x @ moe.router.weight.T
        top, idx = logits.topk(2, -1)
        gates = top.softmax(-1)
        want = f.clone()
        for b in range(2):
            for t in range(5):
                for j in range(2):
                    e = idx[b, t, j]
                    a = moe.experts.up[e] @ F.gelu(moe.experts.down[e] @ f[b, t])
                    want[b, t] += 0.5 * gates[b, t, j] * a
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    # the per-slot combine is the same function in fp32
    moe.config.combine = "per_slot"
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("path", ["dense", "grouped", "sorted", "loop"])
def test_every_dispatch_path_gives_the_same_model(path):
    model = make("qwen3", num_experts=8, top_k=2, adapter_dim=4)
    perturb_up(model)
    ids = ids_for()
    with torch.no_grad():
        want = model(ids).logits
        set_dispatch(model, path)
        got = model(ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    with pytest.raises(ConfigError):
        set_dispatch(model, "warp")


# --------------------------------------------------------------------------------------------- layer choice


@pytest.mark.parametrize(
    "spec, chosen", [("all", [0, 1, 2]), ("every:2", [0, 2]), ([0, 2], [0, 2]), ([-1], [2]), ("1", [1])]
)
def test_layer_selection(spec, chosen):
    model = make(layers=spec)
    assert [i for i, _ in crafted_layers(model)] == chosen
    for i, layer in enumerate(layer_list(model)):
        assert hasattr(layer.mlp, "moe") == (i in chosen)
        assert is_pesc_mlp(layer.mlp) == (i in chosen)
    assert model._sparsecraft_layers == chosen
    assert sorted(m.layer_index for m in moe_blocks(model)) == chosen
    # router [E, h], down [E, r, h], up [E, h, r] per crafted layer, nothing else added
    params = new_parameters(model)
    assert len(params) == 3 * len(chosen)
    assert sum(p.numel() for p in params.values()) == len(chosen) * (4 * 32 + 2 * 4 * 4 * 32)
    assert all(".mlp.moe." in name for name in params)


def test_base_state_dict_keys_unchanged():
    model = tiny_model("llama")
    before = set(model.state_dict())
    craft(model, **SMALL)
    after = set(model.state_dict())
    assert before <= after
    assert all(".mlp.moe." in k for k in after - before)


@pytest.mark.parametrize("spec", [[3], [-4], "every:0", "odd"])
def test_bad_layer_spec_raises_config_error_and_leaves_model_alone(spec):
    model = tiny_model("llama")
    with pytest.raises(ConfigError) as info:
        craft(model, layers=spec, **SMALL)
    assert "\n" not in str(info.value)
    assert not is_crafted(model) and not moe_blocks(model)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_experts": 2, "top_k": 3}, "top_k"),
        ({"num_experts": 0}, "num_experts"),
        ({"adapter_dim": -1}, "adapter_dim"),
        ({"routing": "hash"}, "routing"),
    ],
)
def test_bad_settings_raise_config_error(kwargs, message):
    model = tiny_model("llama")
    with pytest.raises(ConfigError, match=message) as info:
        craft(model, **{**SMALL, **kwargs})
    assert "\n" not in str(info.value)
    assert not is_crafted(model)


def test_config_object_and_overrides():
    cfg = CraftConfig(**SMALL)
    a = craft(tiny_model("llama"), cfg, layers=[1])
    assert [i for i, _ in crafted_layers(a)] == [1]
    assert cfg.layers == "all"  # overrides never touch the caller's object
    b = craft(tiny_model("llama"), cfg)
    set_dispatch(b, "loop")
    assert cfg.dispatch == "auto" and a._sparsecraft_config.dispatch == "auto"


# --------------------------------------------------------------------------------------------- router losses


def test_aux_loss_in_output_with_gradient_and_added_to_loss():
    model = make("llama", aux_loss_coef=0.5, z_loss_coef=0.1)
    perturb_up(model)
    ids = ids_for()
    out = model(ids, labels=ids)
    assert out.aux_loss is not None and out.router_z_loss is not None
    assert out.aux_loss.dtype == torch.float32 and out.aux_loss.dim() == 0
    assert 1.0 - 1e-4 <= out.aux_loss.item() <= 4.0
    routers = [m.router.weight for m in moe_blocks(model)]
    grads = torch.autograd.grad(out.aux_loss, routers, retain_graph=True)
    assert all(g.abs().sum() > 0 for g in grads)
    want = lm_loss(out.logits, ids) + 0.5 * out.aux_loss + 0.1 * out.router_z_loss
    torch.testing.assert_close(out.loss, want, atol=1e-6, rtol=0)
    # the coefficients really matter: the loss is not just the LM loss
    assert (out.loss - lm_loss(out.logits, ids)).abs() > 1e-3
    # aux loss averaged over layers, each recomputed from the recorded router logits
    out2 = model(ids, labels=ids, output_router_logits=True)
    assert len(out2.router_logits) == 3 and out2.router_logits[0].shape == (18, 4)
    torch.testing.assert_close(out2.aux_loss, out.aux_loss)


def test_return_dict_false_gives_tuple_with_loss_first():
    model = make("llama")
    ids = ids_for()
    out = model(ids, labels=ids, return_dict=False)
    assert isinstance(out, tuple)
    torch.testing.assert_close(out[0], model(ids, labels=ids).loss)


def test_padding_does_not_change_router_losses():
    """One sequence right-padded (mask 0) against the same sequence alone: exactly the same routing stats."""
    model = make("llama", z_loss_coef=0.1)
    perturb_up(model)
    real = ids_for(1, 6, seed=4)
    padded = torch.cat([real, torch.tensor([[7, 99, 3]])], 1)
    mask = torch.tensor([[1] * 6 + [0] * 3])
    with torch.no_grad():
        alone = model(real, attention_mask=torch.ones(1, 6, dtype=torch.long), output_router_logits=True)
        pad = model(padded, attention_mask=mask, output_router_logits=True)
        no_mask = model(padded, output_router_logits=True)
    torch.testing.assert_close(pad.aux_loss, alone.aux_loss, atol=1e-6, rtol=0)
    torch.testing.assert_close(pad.router_z_loss, alone.router_z_loss, atol=1e-6, rtol=0)
    assert torch.equal(pad.expert_counts, alone.expert_counts)
    assert pad.expert_counts.tolist() and all(s == 6 * 2 for s in pad.expert_counts.sum(-1).tolist())
    # the check is sensitive: counting the padding changes the numbers
    assert not torch.equal(no_mask.expert_counts, alone.expert_counts)
    assert (no_mask.router_z_loss - alone.router_z_loss).abs() > 1e-6


def test_expert_counts_sum_to_real_tokens_times_k():
    model = make("qwen2", num_experts=4, top_k=3, layers=[0, 2])
    ids = ids_for(3, 7)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 5:] = 0
    mask[2, 2:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    out = model(ids, attention_mask=mask, labels=labels)
    assert out.expert_counts.shape == (2, 4) and out.expert_counts.dtype == torch.int64
    assert out.expert_counts.sum(-1).tolist() == [int(mask.sum()) * 3] * 2


def test_eval_without_labels_skips_router_losses():
    model = make("llama")
    with torch.no_grad():
        out = model(ids_for())
    assert out.aux_loss is None and out.loss is None and out.router_logits is None
    model.train()
    out = model(ids_for())
    assert out.aux_loss is not None and out.loss is None


@pytest.mark.parametrize("checkpoint_kwargs", [None, {"use_reentrant": True}])
def test_gradient_checkpointing_keeps_aux_loss_gradient(checkpoint_kwargs):
    def run(checkpointing):
        model = make("llama", dropout=0.1, aux_loss_coef=0.1, z_loss_coef=0.01)
        perturb_up(model)
        model.train()
        if checkpointing:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpoint_kwargs)
            assert all(layer.gradient_checkpointing for layer in layer_list(model))
        torch.manual_seed(123)  # same dropout masks in both runs
        out = model(ids_for(), labels=ids_for(), use_cache=False)
        routers = [m.router.weight for m in moe_blocks(model)]
        aux_grads = torch.autograd.grad(out.aux_loss, routers, retain_graph=True)
        out.loss.backward()
        return out, aux_grads, [r.grad.clone() for r in routers]

    plain, plain_aux, plain_grads = run(False)
    ckpt, ckpt_aux, ckpt_grads = run(True)
    torch.testing.assert_close(ckpt.loss, plain.loss, atol=1e-6, rtol=0)
    torch.testing.assert_close(ckpt.aux_loss, plain.aux_loss, atol=1e-6, rtol=0)
    assert all(g.abs().sum() > 0 for g in plain_aux + ckpt_aux)
    if checkpoint_kwargs is None:  # non-reentrant (the default): exactly the same gradients
        for got, want in zip(ckpt_aux + tuple(ckpt_grads), plain_aux + tuple(plain_grads)):
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    else:
        # reentrant: the forward ran under no_grad, so the balance loss reaches each router weight directly
        # but not through the activations of the layers below; the last router has no such indirect part
        torch.testing.assert_close(ckpt_aux[-1], plain_aux[-1], atol=1e-6, rtol=1e-5)


def test_gradient_checkpointing_defaults_to_non_reentrant():
    """peft's k-bit preparation passes `{}`; the crafted model must still use non-reentrant checkpoints."""
    model = make("llama")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={})
    func = layer_list(model)[0]._gradient_checkpointing_func
    assert func.keywords.get("use_reentrant") is False


# --------------------------------------------------------------------------------------------- uncraft, errors


def test_uncraft_restores_the_dense_model():
    model = tiny_model("gemma3")
    base_cls = type(model)
    ids = ids_for()
    with torch.no_grad():
        dense = model(ids).logits
    keys = list(model.state_dict())
    craft(model, **SMALL)
    perturb_up(model)
    uncraft(model)
    assert type(model) is base_cls and not is_crafted(model)
    assert not moe_blocks(model)
    assert all(type(layer.mlp).__name__ == "Gemma3MLP" for layer in layer_list(model))
    assert list(model.state_dict()) == keys
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, dense, atol=0, rtol=0)
    with pytest.raises(CraftError, match="not crafted"):
        uncraft(model)
    craft(model, **SMALL)  # and it can be crafted again
    assert is_crafted(model)


def test_crafting_twice_raises():
    model = make("llama")
    with pytest.raises(CraftError, match="already crafted"):
        craft(model, **SMALL)
    assert len(moe_blocks(model)) == 3


def _tiny_moe_configs():
    import transformers as tf

    common = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1)
    return {
        "mixtral": tf.MixtralConfig(**common, num_local_experts=4),
        "qwen2_moe": tf.Qwen2MoeConfig(**common, moe_intermediate_size=8, shared_expert_intermediate_size=32,
                                       num_experts=4),
    }


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe"])
def test_moe_architectures_are_refused(name):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(_tiny_moe_configs()[name])
    with pytest.raises(CraftError) as info:
        craft(model, **SMALL)
    text = str(info.value)
    assert "already a mixture of experts" in text and "dense" in text and "\n" not in text
    assert not is_crafted(model) and not moe_blocks(model)


class _Dense(nn.Module):
    def __init__(self, h=8):
        super().__init__()
        self.up_proj = nn.Linear(h, 4 * h, bias=False)
        self.down_proj = nn.Linear(4 * h, h, bias=False)

    def forward(self, x):
        return self.down_proj(F.relu(self.up_proj(x)))


class _Layer(nn.Module):
    def __init__(self, h=8, kind="dense"):
        super().__init__()
        self.self_attn = nn.Linear(h, h)
        if kind == "dense":
            self.mlp = _Dense(h)
        elif kind == "experts":
            self.mlp = nn.Module()
            self.mlp.experts = nn.ModuleList([_Dense(h), _Dense(h)])
            self.mlp.gate = nn.Linear(h, 2)
        # kind == "none": attention only

    def forward(self, x):
        x = x + self.self_attn(x)
        return x + self.mlp(x) if hasattr(self, "mlp") else x


class _Toy(nn.Module):
    def __init__(self, kinds):
        super().__init__()
        self.config = SimpleNamespace(hidden_size=8, num_hidden_layers=len(kinds))
        self.layers = nn.ModuleList([_Layer(kind=k) for k in kinds])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def test_custom_module_without_ffn_names_what_was_expected():
    with pytest.raises(CraftError) as info:
        craft(_Toy(["none", "none"]), **SMALL)
    text = str(info.value)
    assert "expected one feed-forward child" in text and "hidden_size=8" in text and "self_attn" in text


def test_custom_module_without_layer_list():
    model = nn.Sequential(nn.Linear(8, 8))
    model.config = SimpleNamespace(hidden_size=8, num_hidden_layers=4)
    with pytest.raises(CraftError, match="expected an nn.ModuleList of 4 decoder layers"):
        craft(model, **SMALL)


def test_failure_in_a_later_layer_leaves_earlier_layers_untouched():
    model = _Toy(["dense", "experts"])
    with pytest.raises(CraftError, match="already a mixture of experts"):
        craft(model, **SMALL)
    assert type(model.layers[0].mlp) is _Dense and not hasattr(model.layers[0].mlp, "moe")


def test_dense_layers_of_a_partly_moe_model_can_be_crafted_and_uncrafted():
    model = _Toy(["dense", "experts", "dense"])
    x = torch.randn(2, 3, 8)
    with torch.no_grad():
        dense = model.layers[0](x)
    craft(model, layers=[0, 2], **SMALL)
    assert [i for i, _ in crafted_layers(model)] == [0, 2]
    perturb_up(model)
    uncraft(model)
    assert not moe_blocks(model) and type(model.layers[2].mlp) is _Dense
    with torch.no_grad():
        torch.testing.assert_close(model.layers[0](x), dense, atol=0, rtol=0)


def test_custom_dense_module_can_be_crafted():
    model = _Toy(["dense", "dense", "dense"])
    x = torch.randn(2, 3, 8)
    with torch.no_grad():
        dense = model(x)
    craft(model, layers="every:2", **SMALL)
    assert [i for i, _ in crafted_layers(model)] == [0, 2]
    with torch.no_grad():
        torch.testing.assert_close(model(x), dense, atol=1e-6, rtol=0)


# --------------------------------------------------------------------------------------------- generation, seeds


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_generation_with_and_without_cache_agree(family):
    model = make(family)
    perturb_up(model, std=30.0)
    prompt = ids_for(1, 5, seed=9)
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(prompt, use_cache=True, **kw)
        uncached = model.generate(prompt, use_cache=False, **kw)
    assert cached.shape == (1, 13)
    assert torch.equal(cached, uncached)
    # the experts matter for what is generated (otherwise this test would prove little)
    uncraft(model)
    with torch.no_grad():
        dense = model.generate(prompt, use_cache=True, **kw)
    assert not torch.equal(dense, cached)


def test_seeded_crafting_is_deterministic_and_does_not_touch_global_rng():
    a = make("llama", seed=5)
    b = make("llama", seed=5)
    c = make("llama", seed=6)
    pa, pb, pc = new_parameters(a), new_parameters(b), new_parameters(c)
    assert list(pa) == list(pb)
    assert all(torch.equal(pa[n], pb[n]) for n in pa)
    assert not torch.equal(pa[next(iter(pa))], pc[next(iter(pc))])
    # W_down differs between experts and layers; W_up is zero
    downs = [p for n, p in pa.items() if n.endswith("experts.down")]
    assert not torch.equal(downs[0], downs[1])
    assert all(torch.count_nonzero(p) == 0 for n, p in pa.items() if n.endswith("experts.up"))
    # the caller's random stream is left where it was
    torch.manual_seed(42)
    model = tiny_model("llama")
    torch.manual_seed(42)
    want = torch.rand(3)
    torch.manual_seed(42)
    craft(model, seed=7, **SMALL)
    assert torch.equal(torch.rand(3), want)


# --------------------------------------------------------------------------------------------- dtypes


def test_bf16_model_with_fp32_router():
    model = tiny_model("llama", dtype=torch.bfloat16)
    ids = ids_for()
    with torch.no_grad():
        dense = model(ids).logits
    craft(model, seed=0, num_experts=4, top_k=2, adapter_dim=8, dropout=0.0)
    for moe in moe_blocks(model):
        assert moe.router.weight.dtype == torch.float32
        assert moe.experts.down.dtype == torch.bfloat16 and moe.experts.up.dtype == torch.bfloat16
    with torch.no_grad():
        out = model(ids, output_router_logits=True)
    assert out.logits.dtype == torch.bfloat16
    assert torch.equal(out.logits, dense)  # W_up = 0: exactly the dense bf16 model
    assert all(r.dtype == torch.float32 for r in out.router_logits)
    perturb_up(model)
    model.train()
    out = model(ids, labels=ids)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    for moe in moe_blocks(model):
        assert moe.router.weight.grad is not None and moe.router.weight.grad.dtype == torch.float32
        assert moe.experts.up.grad is not None and torch.isfinite(moe.experts.up.grad).all()


def _router_inputs(model, ids):
    """The MLP input (= router input) of every crafted layer, captured by forward pre-hooks."""
    seen = []
    hooks = [mlp.register_forward_pre_hook(lambda m, a: seen.append(a[0])) for _, mlp in crafted_layers(model)]
    try:
        with torch.no_grad():
            out = model(ids, output_router_logits=True)
    finally:
        for h in hooks:
            h.remove()
    return seen, out


@pytest.mark.parametrize("router_dtype", ["float32", "model"])
def test_router_logits_are_computed_in_the_router_dtype(router_dtype):
    model = tiny_model("llama", dtype=torch.bfloat16)
    craft(model, seed=0, num_experts=4, top_k=2, adapter_dim=8, router_dtype=router_dtype)
    inputs, out = _router_inputs(model, ids_for())
    for x, logits, moe in zip(inputs, out.router_logits, moe_blocks(model)):
        x = x.reshape(-1, x.shape[-1])
        assert x.dtype == torch.bfloat16 and logits.dtype == torch.float32
        in_fp32 = x.float() @ moe.router.weight.float().T
        in_bf16 = (x @ moe.router.weight.to(torch.bfloat16).T).float()
        assert not torch.equal(in_fp32, in_bf16)
        want = in_fp32 if router_dtype == "float32" else in_bf16
        torch.testing.assert_close(logits, want, atol=1e-5, rtol=1e-5)


def test_bf16_model_with_model_dtype_router():
    model = tiny_model("qwen2", dtype=torch.bfloat16)
    craft(model, seed=0, num_experts=4, top_k=2, adapter_dim=8, dropout=0.0, router_dtype="model")
    assert all(m.router.weight.dtype == torch.bfloat16 for m in moe_blocks(model))
    perturb_up(model)
    ids = ids_for()
    out = model(ids, labels=ids)
    assert torch.isfinite(out.loss) and out.aux_loss.dtype == torch.float32
    out.loss.backward()
    assert all(m.router.weight.grad is not None for m in moe_blocks(model))


def test_fp32_adapters_in_a_bf16_model():
    model = tiny_model("llama", dtype=torch.bfloat16)
    craft(model, seed=0, adapter_dtype=torch.float32, **SMALL)
    assert all(m.experts.up.dtype == torch.float32 for m in moe_blocks(model))
    with torch.no_grad():
        assert model(ids_for()).logits.dtype == torch.bfloat16


def test_aux_loss_value_is_switch_formula_on_recorded_logits():
    model = make("mistral", num_experts=4, top_k=1)
    perturb_up(model)
    ids = ids_for()
    with torch.no_grad():
        out = model(ids, labels=ids, output_router_logits=True)
    per_layer = []
    for logits in out.router_logits:
        idx = logits.argmax(-1)
        f = torch.bincount(idx, minlength=4).float() / idx.numel()
        per_layer.append(4 * (f * logits.softmax(-1).mean(0)).sum())
    assert math.isclose(out.aux_loss.item(), torch.stack(per_layer).mean().item(), rel_tol=1e-6)


@pytest.mark.parametrize("path", ["loop", "dense", "grouped"])
def test_per_slot_combine_rounds_as_the_published_code_in_bf16(path):
    # the reference: per expert, index_add of g * (F + s A_e(F)) into zeros, all in bf16
    from sparsecraft.moe.layers import RouterSite

    h, E, k, r, N = 64, 8, 2, 16, 512
    cfg = CraftConfig(num_experts=E, top_k=k, adapter_dim=r, scaling=0.25, dropout=0.0, router_dtype="model",
                      combine="per_slot", dispatch=path)
    torch.manual_seed(0)
    moe = PescMoE(RouterSite(h, cfg, router_dtype=torch.bfloat16), torch.bfloat16).eval()
    with torch.no_grad():
        moe.experts.up.normal_(0, 0.3)
    x, f = torch.randn(N, h).bfloat16(), (torch.randn(N, h) * 2).bfloat16()
    down, up = moe.experts.down, moe.experts.up
    with torch.no_grad():
        got = moe(x, f)
        top, idx = F.linear(x, moe.router.weight).topk(k, -1)
        g = top.softmax(-1)
        want = torch.zeros_like(f)
        for e in range(E):
            token, slot = torch.where(idx == e)
            y = f[token] + 0.25 * F.linear(F.gelu(F.linear(f[token], down[e])), up[e])
            want.index_add_(0, token, y * g[token, slot, None])
        moe.config.combine = "residual"
        residual = moe(x, f)
    assert torch.equal(got, want)
    assert not torch.equal(residual, want)  # the two forms differ in bf16: the gates do not sum to exactly 1


def test_top1_gate_is_constant_unless_switch_style():
    # top-1 renormalised over the one kept expert: gate 1, no router gradient from the task loss
    assert CraftConfig(top_k=1).constant_gate and CraftConfig(top_k=1, routing="softmax_topk").constant_gate
    switch = CraftConfig(top_k=1, routing="softmax_topk", normalize_topk=False)
    assert not switch.constant_gate and not CraftConfig(top_k=2).constant_gate
    model = tiny_model("llama")
    craft(model, switch)
    perturb_up(model)  # W_up starts at zero: no adapter output, no gate gradient at all
    ids = torch.randint(0, 100, (2, 6))
    model(ids).logits.float().pow(2).mean().backward()
    router = next(m for m in model.modules() if isinstance(m, PescMoE)).router.weight
    assert float(router.grad.abs().sum()) > 0  # the kept probability carries the task loss's gradient



@pytest.mark.parametrize("adapter_dtype, ffn_dtype", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)])
def test_block_output_keeps_the_ffn_dtype_whatever_the_adapters_compute_in(adapter_dtype, ffn_dtype):
    """bf16 adapters on an fp32 F are added by type promotion (no cast pass); fp32 adapters on a bf16 F are cast
    down first. Either way the block returns F's dtype and F's gradient comes back in it."""
    from sparsecraft.moe.layers import RouterSite

    torch.manual_seed(0)
    block = PescMoE(RouterSite(16, CraftConfig(num_experts=4, top_k=2, adapter_dim=8, dropout=0.0)),
                    adapter_dtype).train()
    with torch.no_grad():
        block.experts.up.normal_()
    x, f = torch.randn(5, 16, dtype=ffn_dtype), torch.randn(5, 16, dtype=ffn_dtype, requires_grad=True)
    out = block(x, f)
    out.float().sum().backward()
    assert out.dtype == ffn_dtype and f.grad.dtype == ffn_dtype
    assert (out.float() - f.detach().float()).abs().max() > 0  # the adapters contributed

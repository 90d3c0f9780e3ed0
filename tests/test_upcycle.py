"""Sparse Upcycling baseline: function preservation at init, the grouped expert path against a per-token
reference, router losses through the PESC forward wrapper, training, parameter counts, layer selection and the
copy-and-loop fallback for FFNs of unknown structure. Tiny fp32 models; the file runs in a few seconds."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import tiny_config, tiny_model

from sparsecraft import craft, is_crafted, new_parameters, upcycle
from sparsecraft.errors import ConfigError, CraftError
from sparsecraft.methods import method_of
from sparsecraft.methods.upcycle import dense_ffn_state, upcycled_layers
from sparsecraft.moe.upcycle import CopiedExperts, GatedExperts, UpcycledMLP, UpcycledMoE, is_upcycled_mlp
from sparsecraft.surgery import set_dispatch


def is_upcycled(model):
    return method_of(model).name == "upcycle"

E, K, H, I = 4, 2, 32, 64  # tiny models: hidden 32, intermediate 64, 3 layers
SMALL = dict(num_experts=E, top_k=K)


def ids_for(batch=2, seq=9, seed=0):
    return torch.randint(1, 128, (batch, seq), generator=torch.Generator().manual_seed(seed))


def lm_loss(logits, labels):
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1))


def blocks(model):
    return [m for m in model.modules() if isinstance(m, UpcycledMoE)]


def perturb_experts(model, std=0.02, seed=1):
    """Make the copies differ (as training would) so that routing matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for moe in blocks(model):
            for p in moe.experts.parameters():
                p.add_(torch.randn(p.shape, generator=g) * std)


@pytest.fixture
def grouped_calls(monkeypatch):
    """Counts `torch._grouped_mm` calls, to prove the grouped path really ran."""
    calls = []
    real = torch._grouped_mm

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "_grouped_mm", spy)
    return calls


# --------------------------------------------------------------------------------------------- equivalence


@pytest.mark.parametrize(
    "family, routing", [("llama", "topk_softmax"), ("qwen3", "softmax_topk"), ("gemma3", "topk_softmax"),
                        ("phi3", "softmax_topk")]
)
def test_upcycled_equals_dense_at_init(family, routing, grouped_calls):
    model = tiny_model(family)
    base_cls = type(model)
    ids = ids_for()
    with torch.no_grad():
        dense = model(ids).logits
    assert upcycle(model, seed=0, routing=routing, **SMALL) is model
    assert isinstance(model, base_cls) and type(model).__name__.startswith("Pesc")
    assert is_crafted(model) and is_upcycled(model) and model._sparsecraft_method == "upcycle"
    assert model._sparsecraft_layers == [0, 1, 2] and model._sparsecraft_config.routing == routing
    assert [i for i, _ in upcycled_layers(model)] == [0, 1, 2]
    for layer in model.model.layers:
        assert is_upcycled_mlp(layer.mlp) and isinstance(layer.mlp.moe.experts, GatedExperts)
    names = dict(model.named_parameters())
    assert names["model.layers.1.mlp.moe.router.weight"].shape == (E, H)
    assert names["model.layers.1.mlp.moe.experts.gate_up_proj"].shape == (E, 2 * I, H)
    assert names["model.layers.1.mlp.moe.experts.down_proj"].shape == (E, H, I)
    assert not any("mlp.gate_proj" in n or "mlp.up_proj" in n or "mlp.gate_up_proj" in n for n in names)
    grouped_calls.clear()
    with torch.no_grad():
        out = model(ids)
    assert len(grouped_calls) == 2 * 3  # two projections per layer, no fallback
    torch.testing.assert_close(out.logits, dense, atol=1e-5, rtol=0)
    # noise makes the copies (and so the model) differ
    noisy = upcycle(tiny_model(family), seed=0, noise_std=0.05, routing=routing, **SMALL)
    with torch.no_grad():
        assert (noisy(ids).logits - dense).abs().max() > 1e-3


def test_sorted_dispatch_gives_the_same_model():
    model = upcycle(tiny_model("qwen3"), seed=0, num_experts=6, top_k=2)
    perturb_experts(model)
    ids = ids_for()
    with torch.no_grad():
        grouped = model(ids).logits
        set_dispatch(model, "sorted")
        sliced = model(ids).logits
    torch.testing.assert_close(sliced, grouped, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------- grouped path


def reference(x, gates, idx, gate_up, down):
    """sum_j g_j down[e] (silu(gate[e] x) * up[e] x), one token and one slot at a time."""
    inter = down.shape[-1]
    rows = []
    for n in range(x.shape[0]):
        acc = torch.zeros(x.shape[1])
        for j in range(idx.shape[1]):
            e = int(idx[n, j])
            gu = gate_up[e] @ x[n]
            acc = acc + gates[n, j] * (down[e] @ (F.silu(gu[:inter]) * gu[inter:]))
        rows.append(acc)
    return torch.stack(rows)


CASES = {
    "random": (11, 5, 2, None),
    "k1": (7, 5, 1, None),
    # experts 1, 3, 4 get no token; the last groups are empty
    "empty_experts": (9, 5, 2, lambda n: torch.tensor([[0, 2], [2, 0]] * 4 + [[2, 0]])),
    # every token on the last expert: the leading groups are empty
    "all_on_last": (6, 5, 1, lambda n: torch.full((n, 1), 4)),
}


@pytest.mark.parametrize("path", ["grouped", "sorted"])
@pytest.mark.parametrize("case", list(CASES))
def test_gated_experts_match_reference_forward_and_backward(path, case, grouped_calls):
    n, e, k, build = CASES[case]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, H, generator=g)
    gate_up = torch.randn(e, 2 * I, H, generator=g) / math.sqrt(H)
    down = torch.randn(e, H, I, generator=g) / math.sqrt(I)
    idx = build(n) if build else torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(n)])
    gates = torch.softmax(torch.randn(n, k, generator=g), -1)
    weight = torch.randn(n, H, generator=g)

    experts = GatedExperts(gate_up[0], down[0], nn.SiLU(), num_experts=e)
    with torch.no_grad():  # distinct experts
        experts.gate_up_proj.copy_(gate_up)
        experts.down_proj.copy_(down)
    xg, gg = x.clone().requires_grad_(True), gates.clone().requires_grad_(True)
    got = experts(xg, gg, idx, path)
    (got * weight).sum().backward()
    assert (len(grouped_calls) > 0) == (path == "grouped")

    leaves = [t.clone().requires_grad_(True) for t in (x, gates, gate_up, down)]
    want = reference(leaves[0], leaves[1], idx, leaves[2], leaves[3])
    (want * weight).sum().backward()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for mine, ref in zip((xg.grad, gg.grad, experts.gate_up_proj.grad, experts.down_proj.grad),
                         [t.grad for t in leaves]):
        torch.testing.assert_close(mine, ref, atol=1e-5, rtol=1e-5)
    unused = sorted(set(range(e)) - set(idx.flatten().tolist()))
    for u in unused:  # experts with no token get exactly zero gradient
        assert experts.gate_up_proj.grad[u].abs().max() == 0 and experts.down_proj.grad[u].abs().max() == 0
    # an expanded incoming gradient (what .sum() gives) must work too: _grouped_mm's backward needs contiguity
    experts(x.clone().requires_grad_(True), gates, idx, path).sum().backward()


# --------------------------------------------------------------------------------------------- losses, training


def test_aux_loss_in_output_with_gradient_and_added_to_loss():
    model = upcycle(tiny_model("llama"), seed=0, aux_loss_coef=0.5, z_loss_coef=0.1, **SMALL)
    ids = ids_for()
    out = model(ids, labels=ids)
    assert out.aux_loss is not None and out.aux_loss.dim() == 0 and 1.0 - 1e-4 <= out.aux_loss.item() <= E
    routers = [m.router.weight for m in blocks(model)]
    grads = torch.autograd.grad(out.aux_loss, routers, retain_graph=True)
    assert all(g.abs().sum() > 0 for g in grads)
    want = lm_loss(out.logits, ids) + 0.5 * out.aux_loss + 0.1 * out.router_z_loss
    torch.testing.assert_close(out.loss, want, atol=1e-6, rtol=0)
    assert out.expert_counts.shape == (3, E) and out.expert_counts.sum(-1).tolist() == [ids.numel() * K] * 3


def test_experts_train_and_loss_goes_down():
    model = upcycle(tiny_model("llama"), seed=0, **SMALL).train()
    experts = blocks(model)[0].experts
    assert experts.gate_up_proj.requires_grad and experts.down_proj.requires_grad
    ids = ids_for(4, 16, seed=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    losses = []
    for _ in range(6):
        opt.zero_grad()
        out = model(ids, labels=ids)
        out.loss.backward()
        assert experts.gate_up_proj.grad.abs().sum() > 0 and blocks(model)[0].router.weight.grad.abs().sum() > 0
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    # different tokens reach different copies, so the experts have moved apart
    assert not torch.equal(experts.gate_up_proj[0], experts.gate_up_proj[1])


# --------------------------------------------------------------------------------------------- structure


def ffn_params(family="llama"):
    return sum(p.numel() for p in tiny_model(family).model.layers[0].mlp.parameters())


@pytest.mark.parametrize(
    "spec, chosen", [("all", [0, 1, 2]), ("every:2", [0, 2]), ([-1], [2]), ("1", [1])]
)
def test_layer_selection_and_parameter_count(spec, chosen):
    base = sum(p.numel() for p in tiny_model("llama").parameters())
    per_ffn = ffn_params()
    model = upcycle(tiny_model("llama"), layers=spec, **SMALL)
    assert model._sparsecraft_layers == chosen and [i for i, _ in upcycled_layers(model)] == chosen
    assert sorted(m.layer_index for m in blocks(model)) == chosen
    for i, layer in enumerate(model.model.layers):
        assert is_upcycled_mlp(layer.mlp) == (i in chosen)
        assert type(layer.mlp).__name__ == ("UpcycledMLP" if i in chosen else "LlamaMLP")
    total = sum(p.numel() for p in model.parameters())
    # the dense FFN is gone, E copies are present, plus an [E, h] router per upcycled layer
    assert total == base + len(chosen) * ((E - 1) * per_ffn + E * H)
    added = new_parameters(model)
    assert sum(p.numel() for p in added.values()) == len(chosen) * (E * per_ffn + E * H)
    assert all(".mlp.moe." in n for n in added) and len(added) == 3 * len(chosen)


def test_refusals_and_settings():
    model = upcycle(tiny_model("llama"), **SMALL)
    with pytest.raises(CraftError, match="already"):
        upcycle(model, **SMALL)
    with pytest.raises(CraftError, match="already"):
        craft(model, num_experts=4, top_k=2, adapter_dim=4)
    with pytest.raises(ConfigError, match="noise_std"):
        upcycle(tiny_model("llama"), noise_std=-1.0, **SMALL)
    with pytest.raises(ConfigError, match="top_k"):
        upcycle(tiny_model("llama"), num_experts=2, top_k=3)
    with pytest.raises(ConfigError, match="out of range"):
        upcycle(fresh := tiny_model("llama"), layers=[5], **SMALL)
    assert not is_crafted(fresh) and not blocks(fresh)


def test_seeded_upcycling_is_deterministic_and_leaves_global_rng_alone():
    a = upcycle(tiny_model("llama"), seed=5, noise_std=0.01, **SMALL)
    b = upcycle(tiny_model("llama"), seed=5, noise_std=0.01, **SMALL)
    pa, pb = new_parameters(a), new_parameters(b)
    assert all(torch.equal(pa[n], pb[n]) for n in pa)
    torch.manual_seed(42)
    want = torch.rand(3)
    model = tiny_model("llama")
    torch.manual_seed(42)
    upcycle(model, seed=7, noise_std=0.01, **SMALL)
    assert torch.equal(torch.rand(3), want)


def test_generation_with_and_without_cache_agree():
    model = upcycle(tiny_model("llama"), seed=0, **SMALL)
    perturb_experts(model, std=0.2)
    prompt = ids_for(1, 5, seed=9)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(model.generate(prompt, use_cache=True, **kw), model.generate(prompt, use_cache=False, **kw))


def test_bf16_model_keeps_fp32_router_and_bf16_experts():
    model = tiny_model("llama", dtype=torch.bfloat16)
    ids = ids_for()
    with torch.no_grad():
        dense = model(ids).logits
    upcycle(model, seed=0, **SMALL)
    moe = blocks(model)[0]
    assert moe.router.weight.dtype == torch.float32 and moe.experts.gate_up_proj.dtype == torch.bfloat16
    with torch.no_grad():
        out = model(ids).logits
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), dense.float(), atol=5e-2, rtol=0)


# --------------------------------------------------------------------------------------------- fallback


class _Plain(nn.Module):
    """Not gated: up -> relu -> down, with biases."""

    def __init__(self, h=8):
        super().__init__()
        self.up_proj = nn.Linear(h, 4 * h)
        self.down_proj = nn.Linear(4 * h, h)

    def forward(self, x):
        return self.down_proj(F.relu(self.up_proj(x)))


class _Lookalike(nn.Module):
    """A gated MLP's attribute names with another forward (activation on `up`): only the probe can tell."""

    def __init__(self, h=8):
        super().__init__()
        self.gate_proj = nn.Linear(h, 4 * h, bias=False)
        self.up_proj = nn.Linear(h, 4 * h, bias=False)
        self.down_proj = nn.Linear(4 * h, h, bias=False)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.gate_proj(x) * self.act_fn(self.up_proj(x)))


class _Layer(nn.Module):
    def __init__(self, mlp, h=8):
        super().__init__()
        self.self_attn = nn.Linear(h, h)
        self.mlp = mlp

    def forward(self, x):
        x = x + self.self_attn(x)
        return x + self.mlp(x)


class _Toy(nn.Module):
    def __init__(self, mlp_cls, n=2):
        super().__init__()
        self.config = SimpleNamespace(hidden_size=8, num_hidden_layers=n)
        self.layers = nn.ModuleList([_Layer(mlp_cls()) for _ in range(n)])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


@pytest.mark.parametrize("mlp_cls", [_Plain, _Lookalike])
def test_unknown_ffn_uses_copies_and_preserves_function(mlp_cls):
    torch.manual_seed(0)
    model = _Toy(mlp_cls)
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        dense = model(x)
    upcycle(model, seed=0, num_experts=3, top_k=2)
    experts = model.layers[0].mlp.moe.experts
    assert isinstance(experts, CopiedExperts) and len(experts) == 3
    assert all(type(m) is mlp_cls for m in experts)
    assert "layers.0.mlp.moe.experts.2.down_proj.weight" in dict(model.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(model(x), dense, atol=1e-5, rtol=0)
    out = model(x)
    out.square().sum().backward()
    assert all(p.requires_grad for p in experts.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in experts[1].parameters())


def test_biased_llama_mlp_falls_back_and_preserves_function():
    from transformers import AutoModelForCausalLM

    cfg = tiny_config("llama")
    cfg.mlp_bias = True
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    ids = ids_for()
    with torch.no_grad():
        dense = model(ids).logits
    upcycle(model, seed=0, layers=[1], **SMALL)
    assert isinstance(model.model.layers[1].mlp.moe.experts, CopiedExperts)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, dense, atol=1e-5, rtol=0)
    assert isinstance(model.model.layers[1].mlp, UpcycledMLP)


@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_dense_ffn_state_rebuilds_the_base_checkpoint_at_init(family):
    want = tiny_model(family).state_dict()
    model = upcycle(tiny_model(family), layers=[0, 2], **SMALL)
    base_state = {k: v for k, v in model.state_dict().items() if ".moe." not in k}
    assert not any(k.startswith("model.layers.0.mlp.") for k in base_state)
    base_state.update(dense_ffn_state(model))
    assert base_state.keys() == want.keys()
    assert all(torch.equal(base_state[k], want[k]) for k in want)

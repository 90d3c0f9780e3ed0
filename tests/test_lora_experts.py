"""LoRA experts on a shared MLP (moe/lora_experts.py, the MixLoRA form): grouped dispatch against the per-expert
loop reference (forward and gradients), function preservation, fused and biased MLPs, router losses, NF4 and
peft on top, and the crafted-directory round trip. Tiny fp32 models; the file runs in well under a minute."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config, tiny_model
from transformers import AutoModelForCausalLM

import sparsecraft
from sparsecraft import (
    CraftConfig,
    crafted_layers,
    is_crafted,
    new_parameters,
    parameter_report,
    uncraft,
)
from sparsecraft.errors import ConfigError, CraftError
from sparsecraft.methods import get_method
from sparsecraft.moe.dropout import LaneDropout
from sparsecraft.moe.gated import gated_layout
from sparsecraft.moe.layers import RoutedBlock
from sparsecraft.moe.lora_experts import LoraExpertsMoE, is_lora_experts_mlp
from sparsecraft.surgery import set_dispatch

METHOD = "lora_experts"


def attach_lora_experts(model, cfg, seed=None):
    return get_method(METHOD).craft(model, cfg, seed=seed)

E, K, R = 4, 2, 4
TARGETS = ["gate_proj", "up_proj", "down_proj"]


def lora_cfg(targets=TARGETS, **kw):
    base = {"num_experts": E, "top_k": K, "adapter_dim": R, "scaling": 2.0, "dropout": 0.0,
            "extra": {"lora_targets": targets}}
    return CraftConfig(**{**base, **kw})


def ids_for(batch=2, seq=9, seed=0):
    return torch.randint(1, 128, (batch, seq), generator=torch.Generator().manual_seed(seed))


def blocks(model):
    return [m for m in model.modules() if isinstance(m, LoraExpertsMoE)]


def randomize_lora(model, seed=1, scale=0.1):
    """Distinct non-zero A and B per expert, as trained experts would have."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for moe in blocks(model):
            for p in moe.experts.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * scale)
            moe.router.weight.copy_(torch.randn(moe.router.weight.shape, generator=g))


def lora_model(family="llama", targets=TARGETS, seed=0, config=None, **kw):
    model = tiny_model(family) if config is None else AutoModelForCausalLM.from_config(config).eval()
    attach_lora_experts(model, lora_cfg(targets, **kw), seed=seed)
    randomize_lora(model)
    return model


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


def block_run(model, path, x, layer=1):
    """One MLP's output and gradients (input, router, LoRA factors, base projections) under a dispatch path."""
    set_dispatch(model, path)
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    mlp = crafted_layers(model)[layer][1]
    y = mlp(x)
    weight = torch.randn(y.shape, generator=torch.Generator().manual_seed(5))
    (y * weight).sum().backward()
    grads = {n: p.grad.clone() for n, p in mlp.named_parameters() if p.grad is not None}
    return y.detach(), x.grad.clone(), grads


def assert_paths_agree(model, path, hidden=32, tol=1e-5, base_grads=True):
    x = torch.randn(3, 7, hidden, generator=torch.Generator().manual_seed(3))
    ref_y, ref_gx, ref_g = block_run(model, "loop", x)
    y, gx, g = block_run(model, path, x)
    torch.testing.assert_close(y, ref_y, atol=tol, rtol=tol)
    torch.testing.assert_close(gx, ref_gx, atol=tol, rtol=tol)
    assert set(g) == set(ref_g)
    assert any("experts.A." in n for n in g) and any("router" in n for n in g)
    assert any("down_proj.weight" in n for n in g) == base_grads
    for name in ref_g:
        torch.testing.assert_close(g[name], ref_g[name], atol=tol, rtol=tol, msg=name)


# --------------------------------------------------------------------------------------------- equivalence


@pytest.mark.parametrize("family, targets", [
    ("llama", TARGETS), ("qwen3", ["up_proj", "down_proj"]), ("llama", ["gate_proj"]),
    ("phi3", ["gate_up_proj", "down_proj"]),  # fused gate_up (gate rows first)
])
def test_grouped_equals_loop_forward_and_grads(family, targets, grouped_calls):
    model = lora_model(family, targets)
    assert_paths_agree(model, "grouped")
    assert grouped_calls, "the grouped path did not call torch._grouped_mm"


def test_sorted_fallback_equals_loop(grouped_calls):
    model = lora_model()
    assert_paths_agree(model, "sorted")
    assert not grouped_calls


def test_rank_not_aligned_for_grouped_mm_falls_back(grouped_calls):
    # r = 2 fp32 rows are 8 bytes: _grouped_mm refuses them, the sliced loop runs instead
    model = lora_model(adapter_dim=2)
    assert_paths_agree(model, "grouped")
    assert not grouped_calls


def test_biased_mlp_with_unnormalised_gates():
    # the down base matmul runs once on gate-mixed rows; with a bias and gates not summing to 1 the correction
    # (sum_j g_j - 1) * b must make it equal to the per-expert reference
    config = tiny_config("llama")
    config.mlp_bias = True
    torch.manual_seed(0)
    model = lora_model(config=config, routing="softmax_topk", normalize_topk=False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.down_proj.bias"):
                p.normal_()
    assert_paths_agree(model, "grouped")


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3", "phi3"])
def test_zero_b_equals_dense(family):
    dense = tiny_model(family)
    targets = ["gate_up_proj", "down_proj"] if family == "phi3" else TARGETS
    model = tiny_model(family)
    attach_lora_experts(model, lora_cfg(targets), seed=0)  # fresh: A random, B = 0
    assert all(not b.detach().any() for moe in blocks(model) for b in moe.experts.B.values())
    ids = ids_for()
    with torch.no_grad():
        want = dense(ids).logits
        for path in ("grouped", "loop"):
            set_dispatch(model, path)
            torch.testing.assert_close(model(ids).logits, want, atol=1e-6, rtol=1e-6)


def test_nonzero_experts_change_the_output():
    dense, model = tiny_model(), lora_model()
    with torch.no_grad():
        assert (model(ids_for()).logits - dense(ids_for()).logits).abs().max() > 1e-3


# ------------------------------------------------------------------------------------ model integration


def test_model_is_a_sparsecraft_moe():
    model = lora_model()
    assert is_crafted(model) and model._sparsecraft_method == METHOD
    layers = crafted_layers(model)
    assert [i for i, _ in layers] == [0, 1, 2]
    assert all(is_lora_experts_mlp(m) and isinstance(m.moe, RoutedBlock) for _, m in layers)
    assert all(isinstance(m.moe.dropout, LaneDropout) for _, m in layers)  # the CPU mask training draws cheaply
    assert tuple(layers[0][1].moe.router.weight.shape) == (E, 32)
    names = set(new_parameters(model))
    assert "model.layers.0.mlp.moe.router.weight" in names
    assert "model.layers.0.mlp.moe.experts.A.gate_proj" in names
    # base projections keep their keys, outside `.moe.`
    assert "model.layers.0.mlp.gate_proj.weight" in model.state_dict()
    assert not any(".moe." in n and n.endswith("proj.weight") for n in model.state_dict())
    report = parameter_report(model)  # expert factors count as added (adapter) weights, not as peft LoRA
    assert report.lora == 0 and report.routers == 3 * E * 32
    assert report.adapters == 3 * E * R * (3 * 32 + 3 * 64)
    assert report.active_per_token == report.total - report.adapters // 2  # k/E = 1/2 of the experts per token


def test_aux_loss_trains_router_and_experts():
    model = lora_model().train()
    ids = ids_for()
    out = model(ids, labels=ids)
    assert out.aux_loss is not None and out.aux_loss.item() > 0
    assert tuple(out.expert_counts.shape) == (3, E)
    assert int(out.expert_counts.sum()) == 3 * ids.numel() * K
    lm = F.cross_entropy(out.logits[:, :-1].reshape(-1, 128), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, lm + 0.01 * out.aux_loss, atol=1e-5, rtol=1e-5)
    out.loss.backward()
    moe = blocks(model)[0]
    assert moe.router.weight.grad.abs().sum() > 0
    assert all(b.grad.abs().sum() > 0 for b in moe.experts.B.values())


def test_bad_inputs_are_one_line_errors():
    with pytest.raises(ConfigError, match="lora_targets"):
        attach_lora_experts(tiny_model(), CraftConfig(num_experts=E, top_k=K))
    with pytest.raises(ConfigError, match="q_proj"):
        attach_lora_experts(tiny_model(), lora_cfg(["q_proj"]))
    model = tiny_model()
    model.model.layers[1].mlp.add_module("drop", torch.nn.Dropout(0.1))
    with pytest.raises(CraftError, match="gated MLP"):
        attach_lora_experts(model, lora_cfg())
    assert not is_crafted(model) and not blocks(model)  # refused before any layer changed


def test_gated_layout_probe_rejects_another_forward():
    mlp = tiny_model().model.layers[0].mlp
    layout = gated_layout(mlp, 32)
    assert layout is not None and layout.projections == ("gate_proj", "up_proj", "down_proj")
    # the same children computing something else (no gate) must not pass as a gated MLP
    mlp.__class__ = type("UngatedMLP", (type(mlp),), {"forward": lambda self, x: self.down_proj(self.up_proj(x))})
    assert gated_layout(mlp, 32) is None


def test_uncraft_restores_dense():
    dense, model = tiny_model(), lora_model()
    uncraft(model)
    assert type(model) is type(dense) and not blocks(model)
    with torch.no_grad():
        torch.testing.assert_close(model(ids_for()).logits, dense(ids_for()).logits)


def test_greedy_generation_same_on_grouped_and_loop():
    model = lora_model()
    ids = ids_for(batch=1, seq=5)
    outs = []
    for path in ("grouped", "loop"):
        set_dispatch(model, path)
        outs.append(model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0))
    assert outs[0].shape == (1, 9)
    assert torch.equal(outs[0], outs[1])


# ------------------------------------------------------------------------------------ NF4 and peft on top


def test_nf4_and_peft_after_building():
    """As train/setup.py does: quantise the base in place, k-bit prep, peft LoRA on attention and the shared MLP
    (never inside `.moe.`), unfreeze `.moe.`. Experts stay fp32 and trainable, base projections go 4-bit."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from sparsecraft.train.quantize import keep_trainable_layout, quantize_linears_nf4

    model = lora_model()
    quantize_linears_nf4(model, compute_dtype=torch.float32)
    mlp = crafted_layers(model)[1][1]
    assert isinstance(mlp.down_proj, bnb.nn.Linear4bit) and isinstance(mlp.gate_proj, bnb.nn.Linear4bit)
    assert type(mlp.moe.router) is torch.nn.Linear
    assert_paths_agree(model, "grouped", base_grads=False)  # through the 4-bit modules, never their `.weight`

    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    keep_trainable_layout(model)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], task_type="CAUSAL_LM",
                        exclude_modules=r".*\.moe\..*")
    peft_model = get_peft_model(model, config)
    for name, p in model.named_parameters():
        if ".moe." in f".{name}":
            p.requires_grad_(True)
    names = [n for n, _ in peft_model.named_parameters()]
    assert any("mlp.up_proj.lora_A" in n for n in names)  # the shared MLP projection may carry peft LoRA
    assert not any(".moe." in n and ".lora_A.default" in n for n in names)
    set_dispatch(model, "grouped")
    peft_model.train()
    ids = ids_for()
    out = peft_model(input_ids=ids, labels=ids)
    assert out.aux_loss is not None
    out.loss.backward()
    moe = blocks(model)[1]
    for p in list(moe.experts.parameters()) + [moe.router.weight]:
        assert p.dtype == torch.float32 and p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0
    q_lora = next(p for n, p in peft_model.named_parameters() if "q_proj.lora_B" in n)
    assert q_lora.grad is not None
    from peft import get_peft_model_state_dict

    saved = get_peft_model_state_dict(peft_model)  # what lora/ gets: peft's own LoRA only, never the experts
    assert saved and not any(".moe." in k for k in saved)


# ------------------------------------------------------------------------------------------------ files


@pytest.fixture
def based(tmp_path):
    """A LoRA-expert model whose base lives at tmp_path/base (so a referenced save can point at it)."""
    base_dir = tmp_path / "base"
    tiny_model("llama").save_pretrained(base_dir)
    model = sparsecraft.load(base_dir)
    attach_lora_experts(model, lora_cfg(), seed=0)
    randomize_lora(model)
    return model.eval()


@pytest.mark.parametrize("standalone", [False, True])
def test_save_load_round_trip(based, tmp_path, standalone):
    ids = ids_for()
    with torch.no_grad():
        want = based(ids).logits
    out = sparsecraft.save(based, tmp_path / "out", standalone=standalone)
    config = sparsecraft.checkpoint.crafted.read_config(out)
    assert config["method"] == METHOD and config["craft"]["extra"]["lora_targets"] == TARGETS
    loaded = sparsecraft.load(out)
    assert loaded._sparsecraft_method == METHOD and len(blocks(loaded)) == 3
    auto = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, want, atol=0, rtol=0)
        torch.testing.assert_close(auto(ids).logits, want, atol=0, rtol=0)


def test_load_in_bf16_keeps_experts_fp32(based, tmp_path):
    out = sparsecraft.save(based, tmp_path / "out")
    loaded = sparsecraft.load(out, dtype=torch.bfloat16)
    mlp = crafted_layers(loaded)[0][1]
    assert mlp.gate_proj.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in mlp.moe.parameters())
    with torch.no_grad():
        logits = loaded(ids_for()).logits
        want = based(ids_for()).logits
    assert logits.dtype == torch.bfloat16
    assert (logits.float() - want).abs().max() < 0.1


def test_bf16_grouped_takes_whole_tiles_and_equals_loop(monkeypatch):
    """In bf16 on the CPU each expert's rows are padded to whole tiles (zero rows, zero gates): oneDNN then sees
    repeating shapes, and the outputs and gradients are the loop's."""
    model = lora_model(adapter_dim=8).to(torch.bfloat16)
    seen = []
    real = torch._grouped_mm
    monkeypatch.setattr(torch, "_grouped_mm",
                        lambda a, b, offs: seen.append(offs.tolist()) or real(a, b, offs=offs))
    x = torch.randn(3, 7, 32, generator=torch.Generator().manual_seed(3)).bfloat16()
    ref_y, ref_gx, ref_g = block_run(model, "loop", x)
    y, gx, g = block_run(model, "grouped", x)
    assert seen and all(end % 16 == 0 for offs in seen for end in offs)
    for got, want in [(y, ref_y), (gx, ref_gx)] + [(g[n], ref_g[n]) for n in ref_g]:
        assert (got.float() - want.float()).norm() <= 2e-2 * want.float().norm() + 1e-6

"""What inference calls of few tokens do differently: exact GELU without oneDNN's per-call cost and the experts'
up-projections kept in the stacked layout while the weights do not change; and the adapters computing in bf16
beside a bf16 base."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sparsecraft.moe.activations import NATIVE_GELU_MAX, gelu_exact
from sparsecraft.moe.experts import dispatch
from sparsecraft.moe.stacked import MAX_CACHED_BYTES, cached_stacked_up, stack_up


@pytest.mark.parametrize("shape", [(1, 64), (8, 512), (4096, 64)])
def test_gelu_exact_is_the_erf_gelu_and_leaves_onednn_on(shape):
    t = torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * 3
    erf_gelu = 0.5 * t * (1.0 + torch.erf(t / math.sqrt(2.0)))
    torch.testing.assert_close(gelu_exact(t), erf_gelu, rtol=1e-5, atol=1e-5)  # oneDNN's: 1e-6 off
    assert torch.backends.mkldnn.enabled
    assert (t.numel() <= NATIVE_GELU_MAX) == (shape != (4096, 64))  # both kernels are covered


def test_gelu_exact_keeps_its_gradient():
    t = torch.randn(3, 5, requires_grad=True)
    gelu_exact(t).sum().backward()
    ref = t.detach().clone().requires_grad_(True)
    F.gelu(ref).sum().backward()
    torch.testing.assert_close(t.grad, ref.grad)


def up_parameter(e=4, h=8, r=2, seed=0) -> nn.Parameter:
    return nn.Parameter(torch.randn(e, h, r, generator=torch.Generator().manual_seed(seed)))


def test_stacked_up_layout():
    up = up_parameter()
    stacked = stack_up(up)
    for e in range(4):
        for j in range(2):
            assert torch.equal(stacked[e * 2 + j], up[e, :, j])


def test_stacked_up_is_cached_in_inference_mode_and_follows_every_change():
    up = up_parameter()
    with torch.inference_mode():
        first = cached_stacked_up(up)
        assert first is not None and cached_stacked_up(up) is first  # made once
        up.add_(1.0)  # an optimizer step's in-place update
        second = cached_stacked_up(up)
    assert second is not first and torch.equal(second, stack_up(up.detach()))
    up.data = up.data * 2  # swapped storage (a move, a reload)
    with torch.inference_mode():
        assert torch.equal(cached_stacked_up(up), stack_up(up.detach()))


def test_stacked_up_is_not_cached_where_it_must_not_be():
    up = up_parameter()
    assert cached_stacked_up(up) is None  # a gradient is being taken
    with torch.no_grad():
        assert cached_stacked_up(up) is None  # e.g. evaluation inside training, where shards move between steps
    with torch.inference_mode():
        assert cached_stacked_up(up.detach().clone()) is None  # a temporary, e.g. a dtype cast
        e = MAX_CACHED_BYTES // (4 * 64 * 64) + 1
        assert cached_stacked_up(nn.Parameter(torch.zeros(e, 64, 64))) is None  # too large to hold twice


def test_dense_decoding_after_an_update_uses_the_new_weights():
    """A stale cached layout would decode with the old experts after training or loading weights."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 8, generator=g)
    idx = torch.tensor([[0, 2], [1, 3], [2, 0]])
    gates = torch.softmax(torch.randn(3, 2, generator=g), -1)
    down = nn.Parameter(torch.randn(4, 2, 8, generator=g))
    up = up_parameter(seed=2)
    with torch.inference_mode():
        before = dispatch(x, gates, idx, down, up, path="dense")
        torch.testing.assert_close(before, dispatch(x, gates, idx, down, up, path="loop"))
        up.mul_(-0.5)
        after = dispatch(x, gates, idx, down, up, path="dense")
    torch.testing.assert_close(after, -0.5 * before)
    with torch.no_grad():
        torch.testing.assert_close(after, dispatch(x, gates, idx, down, up.detach(), path="loop"))


def test_switching_to_training_drops_the_kept_layout():
    """A sharded engine may swap a parameter's storage in place (same address, same version) between steps:
    training mode forgets the layout so that the next inference lays it out again."""
    from sparsecraft.moe.adapter_weights import AdapterExperts

    experts = AdapterExperts(4, 8, 2).eval()
    with torch.inference_mode():
        first = cached_stacked_up(experts.up)
        assert first is not None and cached_stacked_up(experts.up) is first
    experts.train().eval()
    with torch.inference_mode():
        assert cached_stacked_up(experts.up) is not first


def test_bf16_adapter_compute_on_fp32_activations():
    """`compute_dtype=bf16`: the adapters run in bf16 on an fp32 FFN output, the block returns fp32, and the fp32
    weights get fp32 gradients through the cast."""
    from sparsecraft.config import CraftConfig
    from sparsecraft.moe.layers import PescMoE, RouterSite, set_adapter_compute_dtype
    from sparsecraft.moe.router import route

    torch.manual_seed(0)
    block = PescMoE(RouterSite(16, CraftConfig(num_experts=4, top_k=2, adapter_dim=8, dropout=0.0)))
    nn.init.normal_(block.experts.up, std=0.5)
    assert set_adapter_compute_dtype(nn.Sequential(block), torch.bfloat16) == 1
    x, f = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    out = block(x, f)
    assert out.dtype == torch.float32
    gates, idx, _ = route(x.view(-1, 16), block.router.weight, 2)
    bf16 = torch.bfloat16
    delta = dispatch(f.view(-1, 16).to(bf16), gates, idx, block.experts.down.to(bf16), block.experts.up.to(bf16),
                     path="loop")
    torch.testing.assert_close(out.view(-1, 16), f.view(-1, 16) + delta.float(), rtol=2e-2, atol=2e-2)
    fp32_delta = dispatch(f.view(-1, 16), gates, idx, block.experts.down, block.experts.up, path="loop")
    assert float((out.view(-1, 16) - f.view(-1, 16) - fp32_delta).abs().max()) > 1e-4  # bf16 rounding is there
    out.sum().backward()
    assert block.experts.up.grad.dtype == torch.float32 and block.experts.up.grad.abs().sum() > 0

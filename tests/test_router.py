"""Top-k routing: both orders, renormalisation, gate order, and the fp32 router for low-precision inputs."""

from __future__ import annotations

import pytest
import torch

from sparsecraft.moe.router import route


def inputs(n=13, h=8, e=6, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, h, generator=g).to(dtype), torch.randn(e, h, generator=g).to(dtype)


@pytest.mark.parametrize("k", [1, 2, 3, 6])
def test_topk_softmax_matches_formula(k):
    x, w = inputs()
    gates, idx, logits = route(x, w, k, "topk_softmax")
    want_logits = x @ w.T
    torch.testing.assert_close(logits, want_logits, atol=1e-6, rtol=0)
    assert gates.shape == idx.shape == (13, k) and idx.dtype == torch.int64
    # chosen experts are the k largest logits, largest first
    chosen = want_logits.gather(1, idx)
    kth = want_logits.sort(-1, descending=True).values[:, k - 1 : k]
    assert torch.all(chosen >= kth)
    assert torch.all(chosen[:, :-1] >= chosen[:, 1:])
    # softmax over the kept logits only: sums to 1, and ratio g_a / g_b = exp(l_a - l_b)
    torch.testing.assert_close(gates.sum(-1), torch.ones(13), atol=1e-6, rtol=0)
    torch.testing.assert_close(gates, torch.softmax(chosen, -1), atol=1e-6, rtol=0)
    assert torch.all(gates[:, :-1] >= gates[:, 1:])
    if k == 2:
        assert torch.all(gates[:, 0] >= 0.5)


def test_topk_softmax_hand_example():
    x = torch.eye(3)
    w = torch.tensor([[0.0, 0.0, 3.0], [1.0, 0.0, 0.0], [0.0, 2.0, 1.0], [0.5, 1.0, 0.0]])  # [E=4, h=3]
    gates, idx, logits = route(x, w, 2, "topk_softmax")
    # token 2 (x = e_2): logits (3, 0, 1, 0) -> experts 0 then 2, gates softmax(3, 1)
    assert idx[2].tolist() == [0, 2]
    e2 = torch.exp(torch.tensor(2.0))
    torch.testing.assert_close(gates[2], torch.stack([e2 / (1 + e2), 1 / (1 + e2)]))


def test_softmax_topk_renormalised_equals_topk_softmax():
    x, w = inputs(seed=1)
    g1, i1, l1 = route(x, w, 2, "topk_softmax")
    g2, i2, l2 = route(x, w, 2, "softmax_topk", normalize_topk=True)
    assert torch.equal(i1, i2)
    torch.testing.assert_close(g1, g2, atol=1e-6, rtol=0)
    torch.testing.assert_close(g2.sum(-1), torch.ones(13), atol=1e-6, rtol=0)


def test_softmax_topk_unnormalised_keeps_full_softmax_probabilities():
    x, w = inputs(seed=2)
    gates, idx, logits = route(x, w, 2, "softmax_topk", normalize_topk=False)
    probs = torch.softmax(x @ w.T, -1)
    torch.testing.assert_close(gates, probs.gather(1, idx), atol=1e-6, rtol=0)
    assert torch.all(gates.sum(-1) < 1 - 1e-3)  # 6 experts: the two kept never hold all the mass here
    assert torch.all(gates[:, 0] >= gates[:, 1])
    # and it differs from the renormalised form
    renorm, _, _ = route(x, w, 2, "softmax_topk", normalize_topk=True)
    assert not torch.allclose(gates, renorm)


def test_bf16_input_routes_in_fp32():
    x, w = inputs(seed=3, dtype=torch.bfloat16)
    gates, idx, logits = route(x, w.float(), 2, "topk_softmax", compute_dtype=torch.float32)
    assert logits.dtype == torch.float32 and gates.dtype == torch.float32
    want = x.float() @ w.float().T
    torch.testing.assert_close(logits, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(gates, torch.softmax(want.gather(1, idx), -1), atol=1e-6, rtol=0)


def test_model_dtype_router_computes_in_bf16_but_returns_fp32_logits():
    x, w = inputs(seed=4, dtype=torch.bfloat16)
    gates, idx, logits = route(x, w, 2, "topk_softmax", compute_dtype=None)
    assert gates.dtype == torch.bfloat16
    assert logits.dtype == torch.float32
    assert torch.equal(logits, (x @ w.T).float())


def test_gradient_reaches_router_weight_through_gates():
    x, w = inputs(seed=5)
    w.requires_grad_(True)
    gates, _, _ = route(x, w, 2, "topk_softmax")
    (gates[:, 0] * torch.arange(13.0)).sum().backward()
    assert w.grad is not None and w.grad.abs().sum() > 0


def test_unknown_order_raises():
    x, w = inputs()
    with pytest.raises(ValueError, match="routing order"):
        route(x, w, 2, "random")

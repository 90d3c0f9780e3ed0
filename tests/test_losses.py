"""Router auxiliary losses: Switch load balancing (with a gradient), z-loss, expert counts, padding masks."""

from __future__ import annotations

import math

import pytest
import torch

from sparsecraft.moe.losses import expert_counts, load_balancing_loss, router_z_loss
from sparsecraft.moe.router import route


def test_balance_loss_has_gradient_wrt_router_weight_and_logits():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 8, generator=g)
    w = torch.randn(4, 8, generator=g, requires_grad=True)
    gates, idx, logits = route(x, w, 2)
    loss = load_balancing_loss(logits, idx, 4)
    assert loss.dtype == torch.float32 and loss.requires_grad
    (gw,) = torch.autograd.grad(loss, w)
    assert gw.abs().sum() > 1e-6
    # unlike the published code's loss (mean of top-k gates: the constant E), this one is not constant
    assert not math.isclose(loss.item(), 4.0, abs_tol=1e-3)


def test_balance_loss_formula():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(10, 5, generator=g)
    idx = torch.topk(logits, 2).indices
    probs = torch.softmax(logits, -1)
    f = torch.stack([(idx == i).sum() for i in range(5)]).float() / idx.numel()
    want = 5 * (f * probs.mean(0)).sum()
    torch.testing.assert_close(load_balancing_loss(logits, idx, 5), want)


@pytest.mark.parametrize("k", [1, 2])
def test_balance_loss_is_one_for_uniform_routing(k):
    e = 4
    logits = torch.zeros(8, e)  # uniform probabilities
    idx = torch.stack([(torch.arange(k) + k * n) % e for n in range(8)])  # every expert chosen equally often
    assert torch.equal(torch.bincount(idx.flatten(), minlength=e), torch.full((e,), 8 * k // e))
    assert load_balancing_loss(logits, idx, e).item() == pytest.approx(1.0, abs=1e-6)


def test_balance_loss_is_num_experts_when_everything_goes_to_one_expert():
    e = 4
    logits = torch.full((6, e), -30.0)
    logits[:, 2] = 30.0
    idx = torch.full((6, 1), 2)
    assert load_balancing_loss(logits, idx, e).item() == pytest.approx(float(e), abs=1e-5)
    # and its gradient pushes the favoured expert's logit down
    near = torch.zeros(6, e)
    near[:, 2] = 1.0
    near.requires_grad_(True)
    (grad,) = torch.autograd.grad(load_balancing_loss(near, idx, e), near)
    assert torch.all(grad[:, 2] > 0)


def test_padding_tokens_do_not_change_losses():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(12, 6, generator=g)
    idx = torch.topk(logits, 2).indices
    mask = torch.tensor([True] * 7 + [False] * 5)
    want_lb = load_balancing_loss(logits[:7], idx[:7], 6)
    want_z = router_z_loss(logits[:7])
    torch.testing.assert_close(load_balancing_loss(logits, idx, 6, mask), want_lb)
    torch.testing.assert_close(router_z_loss(logits, mask), want_z)
    # changing what the padding rows hold changes nothing
    other = logits.clone()
    other[7:] = 50.0 * torch.randn(5, 6, generator=g)
    other_idx = idx.clone()
    other_idx[7:] = 0
    torch.testing.assert_close(load_balancing_loss(other, other_idx, 6, mask), want_lb)
    torch.testing.assert_close(router_z_loss(other, mask), want_z)
    # while without the mask they do count
    assert not torch.allclose(load_balancing_loss(other, other_idx, 6), want_lb)
    # an integer 0/1 mask means the same as the boolean one
    torch.testing.assert_close(load_balancing_loss(logits, idx, 6, mask.long()), want_lb)


def test_all_padding_gives_zero_not_nan():
    logits = torch.randn(3, 4, requires_grad=True)
    idx = torch.topk(logits, 2).indices
    mask = torch.zeros(3, dtype=torch.bool)
    lb = load_balancing_loss(logits, idx, 4, mask)
    z = router_z_loss(logits, mask)
    assert lb.item() == 0.0 and z.item() == 0.0
    (lb + z).backward()
    assert torch.all(torch.isfinite(logits.grad))


def test_z_loss_hand_example():
    # logsumexp(0, 0) = ln 2; logsumexp(ln 3, 0) = ln 4 = 2 ln 2  ->  mean of squares = 2.5 (ln 2)^2
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    assert router_z_loss(logits).item() == pytest.approx(2.5 * math.log(2.0) ** 2, rel=1e-6)
    # masked: only the second token
    assert router_z_loss(logits, torch.tensor([False, True])).item() == pytest.approx(
        4 * math.log(2.0) ** 2, rel=1e-6
    )


def test_losses_are_fp32_for_bf16_logits():
    logits = torch.randn(5, 4).to(torch.bfloat16)
    idx = torch.topk(logits.float(), 2).indices
    assert load_balancing_loss(logits, idx, 4).dtype == torch.float32
    assert router_z_loss(logits).dtype == torch.float32


def test_expert_counts():
    idx = torch.tensor([[0, 2], [2, 1], [2, 0], [3, 2]])
    assert expert_counts(idx, 5).tolist() == [2, 1, 4, 1, 0]
    mask = torch.tensor([True, True, False, False])
    counts = expert_counts(idx, 5, mask)
    assert counts.tolist() == [1, 1, 2, 0, 0]
    assert counts.dtype == torch.int64 and counts.sum().item() == 2 * 2

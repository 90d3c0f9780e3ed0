"""The CPU dropout that draws four mask elements per random number (`moe/dropout.py`)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from sparsecraft.moe.dropout import LaneDropout, dropout, keep_mask, use_lane_dropout


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_rate_and_scale_match_the_requested_dropout(p):
    torch.manual_seed(0)
    y = dropout(torch.ones(1000, 1000), p)
    dropped = (y == 0).float().mean().item()
    assert abs(dropped - p) < 3e-3  # 1e6 draws: the standard error is <= 5e-4
    assert abs(y.mean().item() - 1.0) < 5e-3  # unbiased
    assert torch.all((y == 0) | (y == 1 / (1 - round(p * 65536) / 65536)))


def test_every_lane_of_a_draw_is_used_evenly():
    """Each 64-bit draw feeds four neighbouring elements: no position within a group of four is favoured."""
    torch.manual_seed(1)
    keep, _ = keep_mask((250_000, 4), 0.5)
    per_lane = keep.float().mean(dim=0)
    assert torch.all((per_lane - 0.5).abs() < 5e-3), per_lane
    # neighbours within a draw are independent: P(both kept) = 1/4
    assert abs((keep[:, 0] & keep[:, 1]).float().mean().item() - 0.25) < 5e-3


def test_gradient_is_the_same_mask_and_scale():
    torch.manual_seed(2)
    x = torch.randn(64, 96, requires_grad=True)
    y = dropout(x, 0.25)
    grad = torch.randn_like(y)
    y.backward(grad)
    kept = y.detach() != 0
    scale = 1 / 0.75
    torch.testing.assert_close(y.detach(), torch.where(kept, x.detach() * scale, 0.0))
    torch.testing.assert_close(x.grad, torch.where(kept, grad * scale, 0.0))


def test_backward_keeps_a_bool_mask_not_a_float_one():
    saved = []
    x = torch.randn(32, 32, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.dtype) or t, lambda t: t):
        dropout(x, 0.1).sum().backward()
    assert saved == [torch.bool]


def test_seeded_draws_repeat_and_differ_between_seeds():
    torch.manual_seed(3)
    a = dropout(torch.ones(40, 50), 0.3)
    torch.manual_seed(3)
    b = dropout(torch.ones(40, 50), 0.3)
    torch.manual_seed(4)
    c = dropout(torch.ones(40, 50), 0.3)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_dtype_and_shape_kept():
    x = torch.randn(2, 3, 5, dtype=torch.bfloat16)
    y = dropout(x, 0.2)
    assert y.dtype == torch.bfloat16 and y.shape == x.shape


def test_identity_when_not_training_or_rate_zero():
    x = torch.randn(4, 4)
    assert dropout(x, 0.5, training=False) is x
    assert dropout(x, 0.0) is x


def test_rates_that_round_to_the_ends_use_torch(monkeypatch):
    """p below 1/131072 would round to no dropout at all, and p = 1 to a zero division: torch handles those."""
    calls = []
    monkeypatch.setattr(F, "dropout", lambda x, p, training: calls.append(p) or x)
    x = torch.randn(3, 3)
    dropout(x, 1e-6)
    dropout(x, 1.0)
    dropout(x, 0.1)
    assert calls == [1e-6, 1.0]


@pytest.mark.parametrize("p", [0.0, 1e-6, 1.0, 1.5, -0.1])
def test_mask_of_a_rate_that_rounds_to_the_ends_is_refused(p):
    with pytest.raises(ValueError, match="needs 0 < p' < 1"):
        keep_mask((4,), p)


def test_restored_rng_state_redraws_the_same_mask():
    """What a resumed run does: the checkpointed CPU RNG state gives the next step the same masks."""
    state = torch.get_rng_state()
    a = dropout(torch.ones(33, 7), 0.2)
    torch.set_rng_state(state)
    b = dropout(torch.ones(33, 7), 0.2)
    assert torch.equal(a, b)


def test_traced_by_torch_compile_it_is_torchs_dropout(monkeypatch):
    """Inside torch.compile the lane sampler (Python-side RNG buffers) is not traced; `F.dropout` is."""
    import sparsecraft.moe.dropout as lane

    monkeypatch.setattr(lane, "keep_mask", lambda *a, **k: pytest.fail("lane sampler traced by torch.compile"))
    torch._dynamo.reset()
    y = torch.compile(lambda t: lane.dropout(t, 0.5), backend="eager")(torch.ones(64, 64))
    assert 0.3 < (y == 0).float().mean().item() < 0.7
    torch._dynamo.reset()


def test_activation_checkpointing_replays_the_same_mask():
    """Non-reentrant checkpointing recomputes the forward with the CPU RNG state restored: same mask, same
    gradients as without recomputation."""
    lin = nn.Linear(16, 16)
    x = torch.randn(8, 16)

    def block(t):
        return lin(dropout(t, 0.5)).tanh()

    grads = []
    for use_checkpoint in (False, True):
        lin.zero_grad()
        torch.manual_seed(5)
        out = checkpoint(block, x, use_reentrant=False) if use_checkpoint else block(x)
        out.sum().backward()
        grads.append(lin.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_swap_replaces_plain_dropout_modules_only():
    class Custom(nn.Dropout):
        pass

    model = nn.ModuleDict({"a": nn.Dropout(0.1), "off": nn.Dropout(0.0), "custom": Custom(0.3),
                           "deep": nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.2))})
    assert use_lane_dropout(model) == 2
    assert isinstance(model["a"], LaneDropout) and model["a"].p == 0.1
    assert isinstance(model["deep"][1], LaneDropout) and model["deep"][1].p == 0.2
    assert type(model["off"]) is nn.Dropout and type(model["custom"]) is Custom
    model.eval()
    x = torch.randn(3, 2)
    assert torch.equal(model["a"](x), x)

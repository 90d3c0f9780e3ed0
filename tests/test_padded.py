"""The padded dispatch path's layout and its way out for uneven routing (its values and gradients against the
formula are in test_dispatch.py, with every other path)."""

from __future__ import annotations

import torch

from sparsecraft.moe import experts as ex
from sparsecraft.moe import padded
from sparsecraft.moe.padded import ROW_MULTIPLE, padded_rows, padding_pays


def test_rows_put_each_pair_in_its_experts_block_in_token_order():
    idx = torch.tensor([[2, 0], [0, 1], [2, 1], [0, 2]])
    layout = padded_rows(idx, num_experts=3)
    capacity = layout.capacity
    assert capacity == ROW_MULTIPLE  # 3 pairs at most per expert, rounded up to a tile
    # expert 0: tokens 0, 1, 3; expert 1: tokens 1, 2; expert 2: tokens 0, 2, 3
    expected = torch.tensor([[2 * capacity, 0], [1, capacity], [2 * capacity + 1, capacity + 1],
                             [2, 2 * capacity + 2]])
    assert torch.equal(layout.rows, expected)
    assert layout.source.shape == (3 * capacity,)
    for n in range(4):
        for j in range(2):
            assert layout.source[layout.rows[n, j]] == n
    used = torch.zeros(3 * capacity, dtype=torch.bool)
    used[layout.rows.reshape(-1)] = True
    assert torch.equal(layout.spare, (~used).nonzero().squeeze(1))
    assert layout.spare.numel() == 3 * capacity - 8


def test_int32_indices_give_the_same_layout():
    idx = torch.tensor([[2, 0], [0, 1], [2, 1], [0, 2]])
    a, b = padded_rows(idx, 3), padded_rows(idx.int(), 3)
    assert torch.equal(a.rows, b.rows) and torch.equal(a.source, b.source) and a.capacity == b.capacity


def test_no_pairs_give_an_empty_layout():
    layout = padded_rows(torch.zeros(0, 2, dtype=torch.long), num_experts=4)
    assert layout.rows.shape == (0, 2) and layout.source.numel() == 0 and layout.capacity == 0


def test_a_non_finite_token_stays_in_its_own_experts():
    """Spare rows read token 0 but are zeroed: an inf in token 0's gradient reaches only the experts token 0
    chose, as in the per-expert reference (a zero gate alone would give 0 * inf = NaN in every expert)."""
    g = torch.Generator().manual_seed(0)
    n, e, h, r = 40, 8, 16, 16
    x = torch.randn(n, h, generator=g)
    idx = torch.stack([torch.randperm(e, generator=g)[:2] for _ in range(n)])
    idx[0] = torch.tensor([0, 1])
    idx[1:][(idx[1:] == 0) | (idx[1:] == 1)] = 5  # only token 0 uses experts 0 and 1 ...
    idx[1:, 1] = torch.where(idx[1:, 0] == idx[1:, 1], 6, idx[1:, 1])  # ... and choices stay distinct
    gates = torch.full((n, 2), 0.5)
    grads = {}
    for path in ("loop", "padded"):
        down = (torch.randn(e, r, h, generator=torch.Generator().manual_seed(1)) / 4).requires_grad_(True)
        up = (torch.randn(e, h, r, generator=torch.Generator().manual_seed(2)) / 4).requires_grad_(True)
        out = ex.dispatch(x, gates, idx, down, up, "gelu", 1.0, path)
        weight = torch.ones_like(out)
        weight[0, 0] = float("inf")
        (out * weight).sum().backward()
        grads[path] = (down.grad.isfinite().flatten(1).all(1), up.grad.isfinite().flatten(1).all(1))
    assert torch.equal(grads["padded"][0], grads["loop"][0]) and torch.equal(grads["padded"][1], grads["loop"][1])
    assert grads["padded"][0][2:].all() and not grads["padded"][0][:2].all()


def test_padding_pays_bounds_the_rows():
    assert padding_pays(capacity=160, num_experts=8, num_pairs=1024)  # 1,280 rows for 1,024 pairs
    assert not padding_pays(capacity=1024, num_experts=8, num_pairs=1024)  # one expert takes every token


def test_uneven_routing_goes_to_the_grouped_kernel(monkeypatch):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 16, generator=g)
    idx = torch.stack([torch.zeros(256, dtype=torch.long), torch.randint(1, 8, (256,), generator=g)], 1)
    gates = torch.full((256, 2), 0.5)
    down, up = torch.randn(8, 16, 16, generator=g), torch.randn(8, 16, 16, generator=g)
    calls = []
    real = ex.grouped_adapters
    monkeypatch.setattr(ex, "grouped_adapters", lambda *a: calls.append(1) or real(*a))
    applied = []
    real_apply = padded.PaddedAdapters.apply
    monkeypatch.setattr(padded.PaddedAdapters, "apply", lambda *a: applied.append(1) or real_apply(*a))
    out = ex.dispatch(x, gates, idx, down, up, "gelu", 1.0, "padded")  # expert 0 holds all 256 tokens
    assert calls and not applied
    torch.testing.assert_close(out, ex.dispatch(x, gates, idx, down, up, "gelu", 1.0, "loop"))
    ex.dispatch(x, gates, torch.randint(0, 8, (256, 1), generator=g).repeat(1, 2).clamp(max=6) +
                torch.tensor([0, 1]), down, up, "gelu", 1.0, "padded")
    assert applied  # balanced enough: the padded kernel itself


def test_bf16_close_to_fp32():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(96, 32, generator=g)
    idx = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(96)])
    gates = torch.softmax(torch.randn(96, 2, generator=g), -1)
    down, up = torch.randn(8, 16, 32, generator=g) / 6, torch.randn(8, 32, 16, generator=g) / 4
    want = ex.dispatch(x, gates, idx, down, up, "gelu", 1.0, "loop")
    got = ex.dispatch(x.bfloat16(), gates.bfloat16(), idx, down.bfloat16(), up.bfloat16(), "gelu", 1.0, "padded")
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=3e-2, atol=3e-2)

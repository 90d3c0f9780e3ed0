"""The grouped kernel's row layout: exact groups in fp32, groups of whole tiles in bf16 on the CPU (oneDNN builds
a kernel per matmul shape, so per-expert counts that change every batch would each cost a new one)."""

from __future__ import annotations

import pytest
import torch

from sparsecraft.moe import experts as ex
from sparsecraft.moe import grouped
from sparsecraft.moe.grouped import ROW_MULTIPLE, group_rows, place_pairs, row_multiple, sort_pairs


def _routing(n: int, e: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(n)])


def test_exact_layout_is_the_sorted_order():
    idx = _routing(37, 6, 2, 0)
    order, inverse, offs = sort_pairs(idx, 6)
    layout = place_pairs(idx, 6)
    assert torch.equal(layout.rows.reshape(-1), inverse) and torch.equal(layout.offs, offs)
    assert torch.equal(layout.source, order // 2) and layout.spare.numel() == 0


def test_tiled_layout_starts_every_group_at_a_whole_tile():
    idx = torch.tensor([[2, 0], [0, 1], [2, 1], [0, 2], [1, 0]])  # counts: 4, 3, 3
    layout = place_pairs(idx, 3, multiple=4)
    assert layout.offs.tolist() == [4, 8, 12]
    # expert 0 holds tokens 0, 1, 3, 4 in rows 0-3; expert 1 tokens 1, 2, 4 in rows 4-6; expert 2 tokens 0, 2, 3
    assert layout.rows.tolist() == [[8, 0], [1, 4], [9, 5], [2, 10], [6, 3]]
    assert layout.source.tolist() == [0, 1, 3, 4, 1, 2, 4, 0, 0, 2, 3, 0]
    assert layout.spare.tolist() == [7, 11]


def test_an_empty_expert_gets_no_rows():
    idx = torch.tensor([[0, 2], [2, 0]])
    layout = place_pairs(idx, 3, multiple=16)
    assert layout.offs.tolist() == [16, 16, 32]


def test_bf16_on_the_cpu_takes_whole_tiles_fp32_exact_counts():
    cpu = torch.device("cpu")
    assert row_multiple(torch.bfloat16, cpu) == ROW_MULTIPLE and row_multiple(torch.float16, cpu) == ROW_MULTIPLE
    assert row_multiple(torch.float32, cpu) == 1 and row_multiple(torch.bfloat16, torch.device("cuda")) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_kernel_sees_tiles_in_bf16_and_matches_the_reference(monkeypatch, dtype):
    n, e, h, r = 53, 8, 32, 16
    g = torch.Generator().manual_seed(3)
    idx = _routing(n, e, 2, 1)
    gates = torch.softmax(torch.randn(n, 2, generator=g), -1)
    x = torch.randn(n, h, generator=g)
    down, up = torch.randn(e, r, h, generator=g) / 6, torch.randn(e, h, r, generator=g) / 4
    seen = []
    real = torch._grouped_mm
    monkeypatch.setattr(torch, "_grouped_mm", lambda a, b, offs: seen.append(offs.tolist()) or real(a, b, offs=offs))
    leaves = [t.to(dtype).requires_grad_(True) for t in (x, gates, down, up)]
    got = ex.dispatch(leaves[0], leaves[1], idx, leaves[2], leaves[3], "gelu", 1.0, "grouped")
    weight = torch.randn(n, h, generator=g)
    (got.float() * weight).sum().backward()
    refs = [t.detach().clone().requires_grad_(True) for t in (x, gates, down, up)]
    want = ex.dispatch(refs[0], refs[1], idx, refs[2], refs[3], "gelu", 1.0, "loop")
    (want * weight).sum().backward()
    bound = 2e-2 if dtype == torch.bfloat16 else 1e-5  # relative to the norm: bf16 keeps 8 bits
    for a, b in zip([got] + [t.grad for t in leaves], [want] + [t.grad for t in refs]):
        assert (a.float() - b).norm() <= bound * b.norm()
    assert seen
    if dtype == torch.bfloat16:
        assert all(end % ROW_MULTIPLE == 0 for offs in seen for end in offs)
    else:
        assert seen[0][-1] == n * 2  # exact: no spare rows


def test_bf16_grouped_keeps_a_non_finite_gradient_in_its_own_experts():
    """Spare rows read token 0 and are zeroed, as in the padded kernel: an inf in token 0's gradient reaches
    only the experts token 0 chose."""
    n, e, h, r = 40, 8, 16, 16
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, h, generator=g).bfloat16()
    idx = torch.tensor([[0, 1]] + [[2 + i % 3, 5 + i % 3] for i in range(n - 1)])
    gates = torch.full((n, 2), 0.5, dtype=torch.bfloat16)
    down = (torch.randn(e, r, h, generator=g) / 4).bfloat16().requires_grad_(True)
    up = (torch.randn(e, h, r, generator=g) / 4).bfloat16().requires_grad_(True)
    out = grouped.grouped_adapters(x, gates, idx, down, up, torch.nn.functional.gelu)
    weight = torch.ones_like(out)
    weight[0, 0] = float("inf")
    (out * weight).float().sum().backward()
    finite = down.grad.isfinite().flatten(1).all(1)
    assert not finite[:2].any() and finite[2:].all()


def test_group_rows_are_whole_tiles_then_a_32nd_of_the_octave():
    counts = torch.tensor([0, 1, 16, 17, 511, 513, 1000, 1100, 5000])
    assert group_rows(counts, 16).tolist() == [0, 16, 16, 32, 512, 528, 1008, 1120, 5120]
    many = torch.arange(1, 70_000)
    rows = group_rows(many, 16)
    assert (rows >= many).all() and (rows % 16 == 0).all()
    assert ((rows - many).double() <= many.double() / 32 + 16).all()  # at most 1/32 more rows, plus a tile
    assert rows.unique().numel() <= 32 + 32 * 8  # up to 512, then 32 sizes per octave (8 octaves to 65,536)

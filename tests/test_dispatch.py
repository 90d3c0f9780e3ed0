"""Every dispatch path of `moe/experts.py` against a per-token, per-slot reference written from the formula.

    out[n] = sum_j s * g[n, j] * up[e] @ gelu(down[e] @ x[n]),  e = idx[n, j]

Forward and backward (x, gates, down, up), fp32; shapes are tiny so the whole file runs in a few seconds.
"""

from __future__ import annotations

import math

import pytest
import torch

from sparsecraft.moe import experts as ex
from sparsecraft.moe.adapter_weights import AdapterExperts
from sparsecraft.moe.experts import choose_path, dispatch

PATHS = ("dense", "grouped", "padded", "sorted", "gathered", "loop", "auto")
ATOL = 1e-5


def gelu_exact(t: torch.Tensor) -> torch.Tensor:
    return 0.5 * t * (1.0 + torch.erf(t / math.sqrt(2.0)))


def reference(x, gates, idx, down, up, scaling):
    """The formula, one token and one slot at a time (no batching tricks)."""
    rows = []
    for n in range(x.shape[0]):
        acc = torch.zeros(x.shape[1], dtype=x.dtype)
        for j in range(idx.shape[1]):
            e = int(idx[n, j])
            acc = acc + scaling * gates[n, j] * (up[e] @ gelu_exact(down[e] @ x[n]))
        rows.append(acc)
    return torch.stack(rows) if rows else x.new_zeros(0, x.shape[1])


def make_case(n, e, k, h=8, r=4, seed=0, idx=None, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, h, generator=g, dtype=dtype)
    down = torch.randn(e, r, h, generator=g, dtype=dtype) / math.sqrt(h)
    up = torch.randn(e, h, r, generator=g, dtype=dtype) / math.sqrt(r)
    if idx is None:
        idx = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(n)]) if n else torch.zeros(0, k)
    idx = idx.long()
    gates = torch.softmax(torch.randn(n, idx.shape[1], generator=g), -1).to(dtype)
    return x, gates, idx, down, up


def run_with_grads(fn, x, gates, idx, down, up, weight=None):
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, gates, down, up)]
    out = fn(leaves[0], leaves[1], idx, leaves[2], leaves[3])
    if weight is None:
        out.sum().backward()  # expanded incoming gradient: the torch._grouped_mm CPU trap
    else:
        (out * weight).sum().backward()
    return out.detach(), [t.grad for t in leaves]


CASES = {
    # name: (n, E, k, idx-builder or None)
    "random_n7": (7, 4, 2, None),
    "single_token": (1, 4, 2, None),
    "n33_e8_k2": (33, 8, 2, None),
    "k1": (7, 4, 1, None),
    "k_equals_e": (5, 4, 4, None),
    # experts 2 and 3 receive no tokens
    "empty_experts": (7, 4, 2, lambda n: torch.tensor([[0, 1], [1, 0]] * 3 + [[1, 0]])),
    # every token on expert 2 only (k=1), so experts 0, 1, 3 are empty
    "all_on_one": (7, 4, 1, lambda n: torch.full((n, 1), 2)),
    # the last expert only, leading groups empty
    "all_on_last": (33, 4, 1, lambda n: torch.full((n, 1), 3)),
    # enough tokens for the training kernels (the masked-dense Function from 64 tokens)
    "n96_e8_k2": (96, 8, 2, None),
    "n70_k_equals_e": (70, 4, 4, None),
}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", list(CASES))
def test_path_matches_reference_forward_and_backward(path, case):
    n, e, k, build = CASES[case]
    x, gates, idx, down, up = make_case(n, e, k, idx=build(n) if build else None)
    scaling = 0.25
    ref_out, ref_grads = run_with_grads(lambda *a: reference(*a, scaling), x, gates, idx, down, up)
    out, grads = run_with_grads(
        lambda x_, g_, i_, d_, u_: dispatch(x_, g_, i_, d_, u_, "gelu", scaling, path), x, gates, idx, down, up
    )
    assert out.shape == (n, x.shape[1]) and out.dtype == torch.float32
    torch.testing.assert_close(out, ref_out, atol=ATOL, rtol=0)
    for name, got, want in zip(("x", "gates", "down", "up"), grads, ref_grads):
        assert got is not None, f"no gradient for {name}"
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0, msg=f"grad {name} ({path}, {case})")
    # the output really depends on the experts (guards against a path that returns zeros)
    assert ref_out.abs().max() > 1e-3


@pytest.mark.parametrize("path", PATHS)
def test_path_backward_with_non_uniform_gradient(path):
    x, gates, idx, down, up = make_case(9, 4, 2, seed=3)
    w = torch.randn(9, 8, generator=torch.Generator().manual_seed(5))
    ref_out, ref_grads = run_with_grads(lambda *a: reference(*a, 1.0), x, gates, idx, down, up, weight=w)
    out, grads = run_with_grads(
        lambda x_, g_, i_, d_, u_: dispatch(x_, g_, i_, d_, u_, "gelu", 1.0, path), x, gates, idx, down, up, weight=w
    )
    torch.testing.assert_close(out, ref_out, atol=ATOL, rtol=0)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("path", PATHS)
def test_unaligned_shapes(path):
    """h=6, r=3 in fp32 are not 16-byte row strides: grouped must fall back instead of raising."""
    x, gates, idx, down, up = make_case(7, 4, 2, h=6, r=3)
    ref_out, ref_grads = run_with_grads(lambda *a: reference(*a, 0.5), x, gates, idx, down, up)
    out, grads = run_with_grads(
        lambda x_, g_, i_, d_, u_: dispatch(x_, g_, i_, d_, u_, "gelu", 0.5, path), x, gates, idx, down, up
    )
    torch.testing.assert_close(out, ref_out, atol=ATOL, rtol=0)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("path", PATHS)
def test_zero_tokens(path):
    x, gates, idx, down, up = make_case(0, 4, 2)
    out = dispatch(x, gates, idx, down, up, "gelu", 1.0, path)
    assert out.shape == (0, 8)


@pytest.mark.parametrize("activation", ["gelu_tanh", "silu", "relu"])
@pytest.mark.parametrize("path", ["dense", "grouped", "sorted"])
def test_other_activations_match_loop(activation, path):
    x, gates, idx, down, up = make_case(11, 4, 2, seed=7)
    want = dispatch(x, gates, idx, down, up, activation, 1.0, "loop")
    got = dispatch(x, gates, idx, down, up, activation, 1.0, path)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    assert not torch.allclose(want, dispatch(x, gates, idx, down, up, "gelu", 1.0, "loop"))


def test_grouped_uses_grouped_mm_on_cpu(monkeypatch):
    assert hasattr(torch, "_grouped_mm")
    calls = []
    real = torch._grouped_mm

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "_grouped_mm", spy)
    x, gates, idx, down, up = make_case(33, 8, 2)
    ref_out, ref_grads = run_with_grads(lambda *a: reference(*a, 1.0), x, gates, idx, down, up)
    out, grads = run_with_grads(
        lambda x_, g_, i_, d_, u_: dispatch(x_, g_, i_, d_, u_, "gelu", 1.0, "grouped"), x, gates, idx, down, up
    )
    # one call per projection, whatever the number of experts (no loop over experts): forward 2 (down, up),
    # backward 2 (input gradients; on the CPU the weight gradients are one mm per expert, see grouped.py)
    assert len(calls) == 4
    assert calls[0] == (33 * 2, 8)
    torch.testing.assert_close(out, ref_out, atol=ATOL, rtol=0)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_contiguous_grad_guard_makes_grouped_mm_backward_work_with_expanded_gradient():
    """`y.sum().backward()` straight on a `_grouped_mm` output fails on the CPU; the guard used by the grouped
    path makes the incoming gradient contiguous."""
    g = torch.Generator().manual_seed(8)
    x = torch.randn(7, 8, generator=g, requires_grad=True)
    w = torch.randn(2, 8, 4, generator=g, requires_grad=True)
    offs = torch.tensor([3, 7], dtype=torch.int32)
    ex.ContiguousGrad.apply(torch._grouped_mm(x, w, offs=offs)).sum().backward()
    want_x = torch.cat([torch.ones(3, 4) @ w[0].T, torch.ones(4, 4) @ w[1].T]).detach()
    torch.testing.assert_close(x.grad, want_x)
    torch.testing.assert_close(w.grad[0], x[:3].sum(0).detach()[:, None].expand(8, 4))


def test_grouped_falls_back_to_sorted_without_grouped_mm(monkeypatch):
    x, gates, idx, down, up = make_case(33, 8, 2, seed=2)
    with_gmm, with_gmm_grads = run_with_grads(
        lambda x_, g_, i_, d_, u_: dispatch(x_, g_, i_, d_, u_, "gelu", 1.0, "grouped"), x, gates, idx, down, up
    )
    sorted_calls = []
    real_sorted = ex._sorted

    def spy_sorted(*args):
        sorted_calls.append(1)
        return real_sorted(*args)

    monkeypatch.delattr(torch, "_grouped_mm")
    monkeypatch.setattr(ex, "_sorted", spy_sorted)
    monkeypatch.setitem(ex._PATHS, "sorted", spy_sorted)
    without, without_grads = run_with_grads(
        lambda x_, g_, i_, d_, u_: dispatch(x_, g_, i_, d_, u_, "gelu", 1.0, "grouped"), x, gates, idx, down, up
    )
    assert sorted_calls == [1]
    torch.testing.assert_close(without, with_gmm, atol=ATOL, rtol=0)
    for got, want in zip(without_grads, with_gmm_grads):
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_grouped_falls_back_for_unsupported_dtype(monkeypatch):
    """float64 is not a _grouped_mm dtype: the grouped path must still give the reference (via sorted)."""
    x, gates, idx, down, up = make_case(7, 4, 2, dtype=torch.float64)
    out = dispatch(x, gates, idx, down, up, "gelu", 1.0, "grouped")
    torch.testing.assert_close(out, reference(x, gates, idx, down, up, 1.0), atol=1e-10, rtol=0)


def test_grouped_bf16_close_to_fp32_reference():
    x, gates, idx, down, up = make_case(17, 4, 2, h=16, r=8, seed=4)
    want = reference(x, gates, idx, down, up, 1.0)
    b = [t.to(torch.bfloat16) for t in (x, gates, down, up)]
    got = dispatch(b[0], b[1], idx, b[2], b[3], "gelu", 1.0, "grouped")
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, atol=3e-2, rtol=3e-2)


def test_gates_in_other_dtype_are_cast():
    x, gates, idx, down, up = make_case(5, 4, 2)
    out = dispatch(x, gates.double(), idx, down, up, "gelu", 1.0, "dense")
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, reference(x, gates, idx, down, up, 1.0), atol=ATOL, rtol=0)


def test_unknown_path_raises():
    x, gates, idx, down, up = make_case(3, 4, 2)
    with pytest.raises(ValueError, match="unknown dispatch path"):
        dispatch(x, gates, idx, down, up, path="magic")


def test_choose_path():
    # Sparsetral-like layer during prefill/training: many tokens, 16 experts x r=512, top-4
    assert choose_path(num_tokens=2048, num_experts=16, top_k=4, adapter_dim=512) == "grouped"
    assert choose_path(num_tokens=512, num_experts=8, top_k=1, adapter_dim=128) == "grouped"
    # decoding: fewer (token, slot) pairs than experts -> only the chosen experts' weights are read
    assert choose_path(num_tokens=1, num_experts=16, top_k=4, adapter_dim=512) == "gathered"
    assert choose_path(num_tokens=4, num_experts=16, top_k=2, adapter_dim=512) == "gathered"
    # a decoding batch: too few pairs per expert for grouping
    assert choose_path(num_tokens=8, num_experts=16, top_k=4, adapter_dim=512) == "dense"
    # few experts per slot or a narrow stack: dense regardless of tokens
    assert choose_path(num_tokens=4096, num_experts=4, top_k=2, adapter_dim=512) == "dense"
    assert choose_path(num_tokens=4096, num_experts=8, top_k=2, adapter_dim=16) == "dense"


@pytest.mark.parametrize("n, expected", [(64, "grouped"), (12, "dense"), (1, "gathered")])
def test_rule_picks_by_shape_and_matches_reference(monkeypatch, n, expected):
    picked = []
    for name in ("dense", "grouped", "gathered"):
        real = ex._PATHS[name]

        def spy(*args, _real=real, _name=name):
            picked.append(_name)
            return _real(*args)

        monkeypatch.setitem(ex._PATHS, name, spy)
    x, gates, idx, down, up = make_case(n, 8, 1, h=8, r=128, seed=6)
    assert choose_path(n, 8, 1, 128) == expected
    out, grads = run_with_grads(
        lambda x_, g_, i_, d_, u_: dispatch(x_, g_, i_, d_, u_, "gelu", 1.0, "rule"), x, gates, idx, down, up
    )
    assert picked == [expected]
    ref_out, ref_grads = run_with_grads(lambda *a: reference(*a, 1.0), x, gates, idx, down, up)
    torch.testing.assert_close(out, ref_out, atol=ATOL, rtol=0)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_adapter_experts_init():
    torch.manual_seed(0)
    experts = AdapterExperts(num_experts=3, hidden_size=16, adapter_dim=4)
    assert experts.down.shape == (3, 4, 16) and experts.up.shape == (3, 16, 4)
    assert experts.num_experts == 3 and experts.adapter_dim == 4
    assert torch.count_nonzero(experts.up) == 0
    # Kaiming-uniform(a=sqrt 5) on [r, h]: U(-1/sqrt(h), 1/sqrt(h)), each expert drawn separately
    bound = 1 / math.sqrt(16)
    assert experts.down.abs().max() <= bound
    assert experts.down.abs().max() > 0.5 * bound
    assert not torch.equal(experts.down[0], experts.down[1])
    meta = AdapterExperts(2, 8, 4, device="meta")
    assert meta.down.is_meta


def test_masked_dense_training_saves_one_activation_sized_tensor(monkeypatch):
    """With a gradient the masked-dense path is one Function that keeps the pre-activation `[N, E*r]` (not also
    the activation, the gated activation and the stacked `up`) and recomputes the rest in backward."""
    from sparsecraft.moe import masked_dense

    x, gates, idx, down, up = make_case(128, 8, 2, h=16, r=8)
    leaves = [t.clone().requires_grad_(True) for t in (x, gates, down, up)]
    applied = []
    real = masked_dense.MaskedDenseAdapters.apply
    monkeypatch.setattr(masked_dense.MaskedDenseAdapters, "apply", lambda *a: applied.append(1) or real(*a))
    saved = {}

    def pack(t):
        saved[t.data_ptr()] = t
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = dispatch(leaves[0], leaves[1], idx, leaves[2], leaves[3], "gelu", 1.0, "dense")
    assert applied
    inputs = {t.data_ptr() for t in leaves} | {idx.data_ptr()}
    activations = [t for p, t in saved.items() if p not in inputs and t.numel() >= 128 * 8 * 8]
    assert len(activations) == 1 and activations[0].shape == (128, 64)
    out.sum().backward()
    with torch.no_grad():  # inference keeps the composite path (and its cached `up` layout)
        dispatch(x, gates, idx, down, up, "gelu", 1.0, "dense")
    assert len(applied) == 1


@pytest.mark.parametrize("path", ["dense", "grouped", "padded"])
def test_second_derivatives_raise_rather_than_go_wrong(path):
    """The training kernels' backwards are written for first derivatives only (`once_differentiable`)."""
    x, gates, idx, down, up = make_case(96, 8, 2, h=16, r=8)
    leaves = [t.clone().requires_grad_(True) for t in (x, gates, down, up)]
    out = dispatch(leaves[0], leaves[1], idx, leaves[2], leaves[3], "gelu", 1.0, path)
    (grad_x,) = torch.autograd.grad(out.square().sum(), leaves[0], create_graph=True)
    with pytest.raises(RuntimeError):
        grad_x.sum().backward()

"""UpIT merging: DARE, linear, TIES, similarity of experts, LoRA product refactoring (hand-made tensors)."""

from __future__ import annotations

import math

import pytest
import torch

from sparsecraft.errors import ConfigError
from sparsecraft.upit.merge import (
    cross_similarity,
    dare,
    dare_merge,
    dare_merge_lora_product,
    layer_groups,
    linear_merge,
    lora_pairs,
    refactor_low_rank,
    similarity_matrix,
    ties_merge,
)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- dare ----------------------------------------------------------------------------------------------------

def test_dare_p0_is_a_copy_and_draws_nothing():
    delta = torch.randn(5, 7)
    g = gen(1)
    state = g.get_state()
    out = dare(delta, 0.0, g)
    assert torch.equal(out, delta) and out.data_ptr() != delta.data_ptr()
    assert torch.equal(g.get_state(), state)


def test_dare_drops_and_rescales():
    delta = torch.randn(100, 100, dtype=torch.float64) + 3.0  # no zeros, so a zero means dropped
    out = dare(delta, 0.3, gen(2))
    kept = out != 0
    assert torch.allclose(out[kept], delta[kept] / 0.7, rtol=0, atol=1e-12)
    assert abs(kept.double().mean().item() - 0.7) < 0.03  # binomial std is 0.0046
    assert torch.equal(out, dare(delta, 0.3, gen(2)))
    assert not torch.equal(out, dare(delta, 0.3, gen(3)))


def test_dare_is_unbiased():
    # 20000 independent masks over the same 4 values (rows broadcast): the mean is the delta
    delta = torch.tensor([1.0, -2.0, 0.5, 4.0], dtype=torch.float64)
    out = dare(delta.expand(20000, 4).contiguous(), 0.5, gen(4))
    # std of one draw is |d|, so of the mean |d| / sqrt(20000) ~ 0.007 |d|; allow 5 sigma
    assert torch.allclose(out.mean(0), delta, atol=0, rtol=0.036)


def test_dare_keeps_dtype_and_rejects_bad_p():
    delta = torch.randn(4, 4).to(torch.bfloat16)
    assert dare(delta, 0.5, gen()).dtype == torch.bfloat16
    for p in (1.0, -0.1, 1.5):
        with pytest.raises(ConfigError, match="drop rate"):
            dare(delta, p, gen())


# ---- linear / dare_merge -------------------------------------------------------------------------------------

def test_linear_merge_exact_and_checks():
    a = {"x": torch.tensor([1.0, 2.0]), "y": torch.tensor([[4.0]])}
    b = {"x": torch.tensor([-1.0, 0.5]), "y": torch.tensor([[2.0]])}
    out = linear_merge([a, b], [0.25, 0.5])
    assert torch.equal(out["x"], torch.tensor([-0.25, 0.75]))
    assert torch.equal(out["y"], torch.tensor([[2.0]]))
    with pytest.raises(ConfigError, match="weights"):
        linear_merge([a, b], [1.0])
    with pytest.raises(ConfigError, match="different keys"):
        linear_merge([a, {"x": b["x"]}], [1.0, 1.0])
    with pytest.raises(ConfigError, match="shape"):
        linear_merge([a, {"x": torch.zeros(3), "y": b["y"]}], [1.0, 1.0])


def _parents(seed: int = 0, shape=(40, 30)):
    g = torch.Generator().manual_seed(seed)
    mk = lambda: torch.randn(shape, generator=g, dtype=torch.float64)
    base = {"w": mk(), "v": mk()[:3]}
    a = {k: t + mk()[: t.shape[0]] for k, t in base.items()}
    b = {k: t + mk()[: t.shape[0]] for k, t in base.items()}
    return a, b, base


def test_dare_merge_p0_is_linear_interpolation():
    a, b, base = _parents()
    for alpha in (0.0, 0.3, 0.77, 1.0):
        child = dare_merge(a, b, base, alpha, 0.0, gen())
        assert sorted(child) == sorted(a)
        for k in a:
            assert torch.allclose(child[k], alpha * a[k] + (1 - alpha) * b[k], rtol=0, atol=1e-12)
    # dyadic numbers: no rounding at all, so bit-exact
    a = {"w": torch.tensor([1.0, 3.0, -2.0])}
    b = {"w": torch.tensor([5.0, -1.0, 0.5])}
    base = {"w": torch.tensor([0.5, 0.25, 1.0])}
    assert torch.equal(dare_merge(a, b, base, 0.25, 0.0, gen())["w"], 0.25 * a["w"] + 0.75 * b["w"])


def test_dare_merge_elements_are_masked_combinations():
    a, b, base = _parents(1)
    alpha, p = 0.35, 0.4
    child = dare_merge(a, b, base, alpha, p, gen(7))
    for k in a:
        da, db = a[k] - base[k], b[k] - base[k]
        cands = torch.stack([base[k] + alpha * da / (1 - p) * m1 + (1 - alpha) * db / (1 - p) * m2
                             for m1 in (0, 1) for m2 in (0, 1)])  # [4, ...]
        err = (cands - child[k]).abs()
        assert err.min(0).values.max() < 1e-12  # every element is one of the four
        which = err.argmin(0)
        if k == "w":  # 1200 elements: each mask pattern occurs, so the masks of a and b are independent
            assert set(which.unique().tolist()) == {0, 1, 2, 3}
            assert abs((which >= 2).double().mean().item() - (1 - p)) < 0.06  # a kept with prob 1-p
        # the child is neither parent
        assert not torch.allclose(child[k], a[k]) and not torch.allclose(child[k], b[k])
    assert all(torch.equal(child[k], dare_merge(a, b, base, alpha, p, gen(7))[k]) for k in a)


def test_dare_merge_expectation_is_linear_merge():
    base = {"w": torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)}
    a = {"w": torch.tensor([1.5, 1.0, 2.5], dtype=torch.float64)}
    b = {"w": torch.tensor([-0.5, -2.0, 1.0], dtype=torch.float64)}
    rows = 20000  # each row an independent pair of masks
    rep = {k: {"w": t["w"].expand(rows, 3).contiguous()} for k, t in (("a", a), ("b", b), ("base", base))}
    alpha, p = 0.6, 0.5
    child = dare_merge(rep["a"], rep["b"], rep["base"], alpha, p, gen(5))["w"]
    expected = alpha * a["w"] + (1 - alpha) * b["w"]
    # per-row std <= |alpha da| + |(1-alpha) db| <= 1.6, so the mean's std <= 0.012; allow ~4 sigma
    assert torch.allclose(child.mean(0), expected, rtol=0, atol=0.05)
    assert (child.std(0) > 0.3).all()  # and the draws really vary


# ---- ties ----------------------------------------------------------------------------------------------------

def test_ties_merge_hand_values():
    d1 = {"x": torch.tensor([3.0, -1.0, 0.5, 2.0])}
    d2 = {"x": torch.tensor([1.0, 2.0, -0.5, -4.0])}
    # density 1: elected signs [+, +, 0, -]; disjoint means over the agreeing entries
    assert torch.equal(ties_merge([d1, d2], [1.0, 1.0], 1.0)["x"], torch.tensor([2.0, 2.0, 0.0, -4.0]))
    # density 0.5 trims to [3, 0, 0, 2] and [0, 2, 0, -4]
    assert torch.equal(ties_merge([d1, d2], [1.0, 1.0], 0.5)["x"], torch.tensor([3.0, 2.0, 0.0, -4.0]))
    # weights scale the deltas and the divisor: t1 = [6, -2, 1, 4], t2 = [1, 2, -.5, -4]
    out = ties_merge([d1, d2], [2.0, 1.0], 1.0)["x"]
    assert torch.allclose(out, torch.tensor([7 / 3, 0.0, 0.5, 0.0]))
    with pytest.raises(ConfigError, match="density"):
        ties_merge([d1, d2], [1.0, 1.0], 0.0)


# ---- similarity ----------------------------------------------------------------------------------------------

def test_layer_groups_numeric_order_and_other():
    keys = ["layers.10.a", "layers.2.b", "layers.2.a", "router", "layers.0.z"]
    assert layer_groups(keys) == {"layers.0": ["layers.0.z"], "layers.2": ["layers.2.a", "layers.2.b"],
                                  "layers.10": ["layers.10.a"], "other": ["router"]}


def test_similarity_matrix_exact_on_hand_made_vectors():
    deltas = [
        {"layers.0.w": [1.0, 0.0], "layers.1.w": [1.0, 0.0], "layers.1.v": [0.0]},
        {"layers.0.w": [0.0, 1.0], "layers.1.w": [1.0, 0.0], "layers.1.v": [1.0]},
        {"layers.0.w": [1.0, 1.0], "layers.1.w": [-1.0, 0.0], "layers.1.v": [0.0]},
    ]
    g = gen(3)
    base = {k: torch.randn(len(v), generator=g, dtype=torch.float64) for k, v in deltas[0].items()}
    states = [{k: base[k] + torch.tensor(v, dtype=torch.float64) for k, v in d.items()} for d in deltas]
    s = 1 / math.sqrt(2)
    # layer 0 cosines: (0,1)=0, (0,2)=s, (1,2)=s; layer 1 (w and v together): (0,1)=s, (0,2)=-1, (1,2)=-s
    expected = torch.tensor([[2.0, s, s - 1], [s, 2.0, 0.0], [s - 1, 0.0, 2.0]], dtype=torch.float64)
    sim = similarity_matrix(states, base)
    assert sim.dtype == torch.float64 and sim.shape == (3, 3)
    assert torch.allclose(sim, expected, rtol=0, atol=1e-12)
    assert torch.equal(sim, sim.T)
    assert torch.allclose(cross_similarity(states[2:], states, base), expected[2:], rtol=0, atol=1e-12)


def test_similarity_zero_delta_and_other_group():
    base = {"layers.0.w": torch.zeros(2), "router": torch.zeros(2)}
    states = [{"layers.0.w": torch.tensor([1.0, 0.0]), "router": torch.tensor([0.0, 2.0])},
              {"layers.0.w": torch.tensor([3.0, 0.0]), "router": torch.tensor([0.0, 0.0])}]
    sim = similarity_matrix(states, base)
    # "other" is a group of its own; the zero delta has cosine 0 with everything, itself included
    assert torch.allclose(sim, torch.tensor([[2.0, 1.0], [1.0, 1.0]], dtype=torch.float64), atol=1e-12)


# ---- LoRA product --------------------------------------------------------------------------------------------

def test_refactor_reproduces_rank_r_exactly():
    g = gen(6)
    for out_f, in_f, r in ((12, 10, 3), (5, 9, 4), (8, 8, 1)):
        b = torch.randn(out_f, r, generator=g, dtype=torch.float64)
        a = torch.randn(r, in_f, generator=g, dtype=torch.float64)
        new_b, new_a = refactor_low_rank(b @ a, r)
        assert new_b.shape == (out_f, r) and new_a.shape == (r, in_f)
        assert torch.allclose(new_b @ new_a, b @ a, rtol=0, atol=1e-10)
        # the factors are balanced: B'^T B' = A' A'^T = diag(S_r)
        assert torch.allclose(new_b.T @ new_b, new_a @ new_a.T, atol=1e-10)


def test_refactor_truncates_to_best_rank_r_and_pads():
    full = torch.randn(9, 7, generator=gen(8), dtype=torch.float64)
    s = torch.linalg.svdvals(full)
    new_b, new_a = refactor_low_rank(full, 2)
    err = torch.linalg.matrix_norm(full - new_b @ new_a)
    assert torch.allclose(err, s[2:].square().sum().sqrt())  # Eckart-Young
    new_b, new_a = refactor_low_rank(full[:3, :4], 5)  # r above min(out, in): zero-padded factors
    assert new_b.shape == (3, 5) and new_a.shape == (5, 4)
    assert torch.allclose(new_b @ new_a, full[:3, :4], atol=1e-10)


def _lora(seed: int, a_shared: torch.Tensor | None = None, r: int = 3):
    g = gen(seed)
    a = a_shared if a_shared is not None else torch.randn(r, 10, generator=g, dtype=torch.float64)
    return {"layers.0.up_proj.lora_A": a.clone(),
            "layers.0.up_proj.lora_B": torch.randn(12, r, generator=g, dtype=torch.float64),
            "layers.0.extra": torch.randn(4, generator=g, dtype=torch.float64)}


def test_product_merge_p0_with_shared_a_is_exact():
    a_init = torch.randn(3, 10, generator=gen(9), dtype=torch.float64)
    base = {"layers.0.up_proj.lora_A": a_init, "layers.0.up_proj.lora_B": torch.zeros(12, 3, dtype=torch.float64),
            "layers.0.extra": torch.zeros(4, dtype=torch.float64)}
    a_trained = a_init + 0.1 * torch.randn(3, 10, generator=gen(10), dtype=torch.float64)
    pa, pb = _lora(1, a_trained), _lora(2, a_trained)
    alpha = 0.3
    child = dare_merge_lora_product(pa, pb, base, alpha, 0.0, gen())
    ka, kb = "layers.0.up_proj.lora_A", "layers.0.up_proj.lora_B"
    assert child[ka].shape == (3, 10) and child[kb].shape == (12, 3)
    # same A in both parents: alpha B_a A + (1-alpha) B_b A has rank 3, so the refactor loses nothing
    expected = alpha * pa[kb] @ pa[ka] + (1 - alpha) * pb[kb] @ pb[ka]
    assert torch.allclose(child[kb] @ child[ka], expected, rtol=0, atol=1e-10)
    assert torch.allclose(child["layers.0.extra"], alpha * pa["layers.0.extra"] + (1 - alpha) * pb["layers.0.extra"])
    # the separate merge interpolates the factors instead, which here gives the same product only because A is shared
    sep = dare_merge(pa, pb, base, alpha, 0.0, gen())
    assert torch.allclose(sep[kb] @ sep[ka], expected, atol=1e-10)


def test_product_merge_with_dare_is_rank_r_and_seeded():
    base = {k: torch.zeros_like(v) for k, v in _lora(0).items()}
    pa, pb = _lora(1), _lora(2)
    c1 = dare_merge_lora_product(pa, pb, base, 0.6, 0.5, gen(11))
    c2 = dare_merge_lora_product(pa, pb, base, 0.6, 0.5, gen(11))
    assert all(torch.equal(c1[k], c2[k]) for k in c1)
    prod = c1["layers.0.up_proj.lora_B"] @ c1["layers.0.up_proj.lora_A"]
    assert torch.linalg.matrix_rank(prod) <= 3


def test_lora_pairs_checks_partners():
    assert lora_pairs(["l.lora_A", "l.lora_B", "x"]) == [("l.lora_A", "l.lora_B")]
    with pytest.raises(ConfigError, match="no l.lora_B"):
        lora_pairs(["l.lora_A"])
    with pytest.raises(ConfigError, match="without a matching"):
        lora_pairs(["l.lora_B"])

"""UpIT expansion switches (issue 17): the merge of two parents (dare, ties, linear; separate or LoRA product),
random parents, what the expanded set records, and peft's merge utilities where they agree with ours."""

from __future__ import annotations

import pytest
import torch
from test_upit_expand import ffn_set, lora_set

from sparsecraft.errors import ConfigError
from sparsecraft.upit.crossover import child_state, combiner
from sparsecraft.upit.expand import choose_parents, expand, genetic_expansion
from sparsecraft.upit.merge import dare_merge, linear_merge, similarity_matrix, ties_merge


def _delta(state, base):
    return {k: state[k] - base[k] for k in base}


def test_default_is_dare_of_dissimilar_parents_as_before():
    es = ffn_set(3)
    default = expand(es, 6, seed=3, progress=False)
    explicit = expand(es, 6, seed=3, merge="dare", parents="dissimilar", progress=False)
    assert default.meta["lineage"] == explicit.meta["lineage"]
    assert all(torch.equal(a[k], b[k]) for a, b in zip(default.states, explicit.states) for k in a)
    assert {c["merge"] for c in default.meta["lineage"]} == {"dare"}
    assert {c["parent_rule"] for c in default.meta["lineage"]} == {"dissimilar"}
    meta = default.meta["expansion"]
    assert (meta["enabled"], meta["merge"], meta["parents"], meta["p"]) == (True, "dare", "dissimilar", 0.5)
    # the first child is exactly dare_merge of the least similar pair with the generator's first alpha
    gen = torch.Generator().manual_seed(3)
    alpha = float(torch.rand((), generator=gen, dtype=torch.float64))
    i, j = choose_parents(similarity_matrix(es.states, es.base), set())
    want = dare_merge(es.states[i], es.states[j], es.base, alpha, 0.5, gen)
    assert all(torch.equal(default.states[3][k], want[k]) for k in want)


def test_linear_children_interpolate_their_parents_exactly():
    es = ffn_set(4)
    out = expand(es, 7, seed=1, merge="linear", progress=False)
    pool = list(out.states)
    for record in out.meta["lineage"]:
        a, b = (pool[p["index"]] for p in record["parents"])
        alpha = record["alpha"]
        assert record["merge"] == "linear" and record["p"] is None
        for k, v in pool[record["index"]].items():
            torch.testing.assert_close(v, alpha * a[k] + (1 - alpha) * b[k], rtol=0, atol=1e-12)
    # no mutation: the same alphas give the same children whatever p is
    other = expand(es, 7, seed=1, merge="linear", p=0.9, progress=False)
    assert all(torch.equal(x[k], y[k]) for x, y in zip(out.states, other.states) for k in x)


def test_ties_children_are_ties_merges_of_the_parent_deltas():
    es = ffn_set(3)
    out = expand(es, 5, seed=2, merge="ties", p=0.7, progress=False)
    pool = list(out.states)
    for record in out.meta["lineage"]:
        a, b = (pool[p["index"]] for p in record["parents"])
        alpha = record["alpha"]
        merged = ties_merge([_delta(a, es.base), _delta(b, es.base)], [alpha, 1 - alpha], density=0.3)
        assert record["merge"] == "ties" and record["p"] == 0.7
        for k, v in pool[record["index"]].items():
            torch.testing.assert_close(v, es.base[k] + merged[k], rtol=0, atol=1e-12)
            # 30 % of each delta kept: at most 60 % of the entries moved
            assert int((v != es.base[k]).sum()) <= 2 * -(-3 * v.numel() // 10)


def test_lora_product_merges_with_ties_and_linear():
    es = lora_set(3)
    shared_a = {k: v for k, v in es.base.items() if k.endswith("lora_A")}
    for state in es.states:  # a common A: B @ A of a linear child is then exactly rank r
        state.update({k: v.clone() for k, v in shared_a.items()})
    out = expand(es, 4, seed=0, merge="linear", lora_merge="product", progress=False)
    record = out.meta["lineage"][0]
    assert record["merge"] == "linear-lora-product"
    a, b = (out.states[p["index"]] for p in record["parents"])
    child, alpha = out.states[3], record["alpha"]
    for key in (k for k in child if k.endswith("lora_A")):
        kb = key[:-1] + "B"
        want = alpha * a[kb] @ a[key] + (1 - alpha) * b[kb] @ b[key]
        torch.testing.assert_close(child[kb] @ child[key], want, rtol=0, atol=1e-10)
    ties = expand(es, 4, seed=0, merge="ties", lora_merge="product", progress=False)
    assert ties.meta["lineage"][0]["merge"] == "ties-lora-product"
    assert all(ties.states[3][k].shape == es.base[k].shape for k in es.base)


def test_random_parents_are_seeded_unused_pairs():
    es = ffn_set(3)
    one = expand(es, 8, seed=4, parents="random", progress=False)
    two = expand(es, 8, seed=4, parents="random", progress=False)
    pairs = [tuple(p["index"] for p in c["parents"]) for c in one.meta["lineage"]]
    assert pairs == [tuple(p["index"] for p in c["parents"]) for c in two.meta["lineage"]]
    assert len(set(pairs)) == len(pairs) and all(i < j < c["index"] for (i, j), c in zip(pairs, one.meta["lineage"]))
    assert {c["parent_rule"] for c in one.meta["lineage"]} == {"random"}
    assert one.meta["expansion"]["parents"] == "random"
    dissimilar = expand(es, 8, seed=4, progress=False)
    assert pairs != [tuple(p["index"] for p in c["parents"]) for c in dissimilar.meta["lineage"]]
    draws = {tuple(tuple(p["index"] for p in c["parents"]) for c in
                   expand(es, 6, seed=s, parents="random", progress=False).meta["lineage"]) for s in range(6)}
    assert len(draws) > 1  # the seed decides


def test_bad_merge_or_parents_are_refused():
    es = ffn_set(3)
    with pytest.raises(ConfigError, match="merge must be one of"):
        genetic_expansion(es.states, es.names, es.base, 4, method="slerp")
    with pytest.raises(ConfigError, match="parents must be one of"):
        genetic_expansion(es.states, es.names, es.base, 4, parents="closest")


def test_peft_merge_utilities_agree_where_they_fit():
    """Linear children use peft's task_arithmetic; our TIES equals peft's with unit weights (peft divides the
    agreeing deltas by their count, ours by their weights, which is what an alpha-weighted child needs)."""
    from peft.utils.merge_utils import ties as peft_ties

    g = torch.Generator().manual_seed(0)
    da, db = torch.randn(4, 5, generator=g, dtype=torch.float64), torch.randn(4, 5, generator=g, dtype=torch.float64)
    ours = linear_merge([{"t": da}, {"t": db}], [0.3, 0.7])["t"]
    torch.testing.assert_close(combiner("linear", 0.3, 0.5)(da, db), ours, rtol=0, atol=1e-12)
    for density in (1.0, 0.6, 0.2):  # density * 20 entries is a whole number: both keep the same top entries
        want = peft_ties([da, db], torch.tensor([1.0, 1.0], dtype=torch.float64), density)
        torch.testing.assert_close(ties_merge([{"t": da}, {"t": db}], [1.0, 1.0], density)["t"], want)
    # with alpha weights peft's TIES would pull an agreed entry half way back to the base
    both = torch.tensor([1.0]), torch.tensor([1.0])
    assert float(combiner("ties", 0.25, 0.0)(*both)) == 1.0
    assert float(peft_ties(list(both), torch.tensor([0.25, 0.75]), 1.0)) == 0.5


def test_child_state_dispatch():
    es = ffn_set(2)
    a, b = es.states
    gen = torch.Generator().manual_seed(0)
    lin = child_state(a, b, es.base, alpha=0.25, p=0.5, method="linear", lora_merge="separate", generator=gen)
    assert all(torch.allclose(lin[k], 0.25 * a[k] + 0.75 * b[k]) for k in a)
    assert torch.equal(gen.get_state(), torch.Generator().manual_seed(0).get_state())  # linear draws nothing
    with pytest.raises(ValueError, match="no deterministic combiner"):
        combiner("dare", 0.5, 0.5)

"""UpIT genetic expansion m -> n: count, seeding, parent rule, children as DARE combinations, report files."""

from __future__ import annotations

import json

import pytest
import torch

from sparsecraft.errors import ConfigError
from sparsecraft.methods.expert_set import ExpertSet, load_expert_set, save_expert_set
from sparsecraft.upit.expand import (
    choose_parents,
    expand,
    genetic_expansion,
    write_expansion_report,
)
from sparsecraft.upit.merge import refactor_low_rank, similarity_matrix


def ffn_set(m: int = 3, seed: int = 0, layers: int = 3) -> ExpertSet:
    """m FFN experts (float64, so the DARE identities hold to 1e-12) around a random base."""
    g = torch.Generator().manual_seed(seed)
    base = {}
    for i in range(layers):
        base[f"layers.{i}.gate_proj.weight"] = torch.randn(6, 4, generator=g, dtype=torch.float64)
        base[f"layers.{i}.down_proj.weight"] = torch.randn(4, 6, generator=g, dtype=torch.float64)
    states = [{k: v + torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in base.items()}
              for _ in range(m)]
    return ExpertSet(kind="ffn", states=states, base=base, shared={"model.norm.weight": torch.ones(4)},
                     meta={"sources": [f"step{10 * (j + 1)}" for j in range(m)]},
                     names=[f"ckpt-step{10 * (j + 1)}" for j in range(m)])


def lora_set(m: int = 3, r: int = 2, seed: int = 0) -> ExpertSet:
    g = torch.Generator().manual_seed(seed)
    base = {}
    for i in range(2):
        for proj, (out_f, in_f) in (("up_proj", (8, 5)), ("down_proj", (5, 8))):
            base[f"layers.{i}.{proj}.lora_A"] = torch.randn(r, in_f, generator=g, dtype=torch.float64)
            base[f"layers.{i}.{proj}.lora_B"] = torch.zeros(out_f, r, dtype=torch.float64)
    states = [{k: v + torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in base.items()}
              for _ in range(m)]
    return ExpertSet(kind="lora", states=states, base=base, shared={}, meta={"lora": {"r": r, "alpha": 2 * r}},
                     names=[f"ckpt-{j}" for j in range(m)])


def test_expands_to_exactly_n():
    es = ffn_set(3)
    out = expand(es, 7, seed=0, progress=False)
    assert len(out.states) == 7 and len(out.names) == 7 and len(out.meta["lineage"]) == 4
    assert all(out.states[j] is es.states[j] for j in range(3)) and out.names[:3] == es.names
    assert out.base is es.base and out.shared is es.shared and out.kind == "ffn"
    assert [c["index"] for c in out.meta["lineage"]] == [3, 4, 5, 6]
    assert [c["name"] for c in out.meta["lineage"]] == out.names[3:]
    for child in out.states[3:]:
        assert sorted(child) == sorted(es.base)
        assert all(child[k].shape == es.base[k].shape and child[k].dtype == es.base[k].dtype for k in child)
    assert len(out.meta["similarity_before"]) == 3 and len(out.meta["similarity_after"]) == 7
    assert out.meta["expansion"]["from"] == 3 and out.meta["expansion"]["to"] == 7
    assert out.meta["sources"] == es.meta["sources"] and "lineage" not in es.meta  # input untouched
    json.dumps(out.meta)  # json-able for experts.json


def test_deterministic_for_a_seed():
    es = ffn_set(3)
    one, two = expand(es, 6, seed=5, progress=False), expand(es, 6, seed=5, progress=False)
    assert one.meta["lineage"] == two.meta["lineage"] and one.names == two.names
    assert all(torch.equal(x[k], y[k]) for x, y in zip(one.states, two.states) for k in x)
    other = expand(es, 6, seed=6, progress=False)
    assert [c["alpha"] for c in other.meta["lineage"]] != [c["alpha"] for c in one.meta["lineage"]]
    assert not torch.equal(other.states[3]["layers.0.gate_proj.weight"], one.states[3]["layers.0.gate_proj.weight"])


def test_children_are_dare_combinations_of_their_parents():
    es = ffn_set(3)
    p = 0.5
    out = expand(es, 6, p=p, seed=1, progress=False)
    for rec in out.meta["lineage"]:
        (i, j), alpha = [q["index"] for q in rec["parents"]], rec["alpha"]
        assert 0.0 <= alpha < 1.0 and rec["p"] == p and i < j < rec["index"]
        assert [q["name"] for q in rec["parents"]] == [out.names[i], out.names[j]]
        child, a, b = out.states[rec["index"]], out.states[i], out.states[j]
        for k in child:
            da, db = a[k] - es.base[k], b[k] - es.base[k]
            cands = torch.stack([es.base[k] + alpha * da / (1 - p) * m1 + (1 - alpha) * db / (1 - p) * m2
                                 for m1 in (0, 1) for m2 in (0, 1)])
            assert (cands - child[k]).abs().min(0).values.max() < 1e-12
            assert not torch.allclose(child[k], a[k]) and not torch.allclose(child[k], b[k])


def test_p0_children_interpolate_exactly():
    es = ffn_set(4)
    out = expand(es, 6, p=0.0, seed=2, progress=False)
    for rec in out.meta["lineage"]:
        (i, j), alpha = [q["index"] for q in rec["parents"]], rec["alpha"]
        child = out.states[rec["index"]]
        for k in child:
            expected = alpha * out.states[i][k] + (1 - alpha) * out.states[j][k]
            assert torch.allclose(child[k], expected, rtol=0, atol=1e-12)
            lo = torch.minimum(out.states[i][k], out.states[j][k])
            hi = torch.maximum(out.states[i][k], out.states[j][k])
            assert ((child[k] >= lo - 1e-12) & (child[k] <= hi + 1e-12)).all()  # elementwise between the parents


def test_parents_are_lowest_similarity_unused_pairs():
    es = ffn_set(4, seed=3)
    out = expand(es, 9, seed=0, progress=False)
    after = torch.tensor(out.meta["similarity_after"], dtype=torch.float64)
    before = torch.tensor(out.meta["similarity_before"], dtype=torch.float64)
    assert torch.allclose(after[:4, :4], before, atol=1e-12)
    assert torch.allclose(before, similarity_matrix(es.states, es.base), atol=1e-12)
    used: set[tuple[int, int]] = set()
    for rec in out.meta["lineage"]:
        k = rec["index"]  # the pool held experts 0..k-1 when this child was made
        pair = tuple(q["index"] for q in rec["parents"])
        sub = after[:k, :k]
        free = [(i, j) for i in range(k) for j in range(i + 1, k) if (i, j) not in used]
        assert pair in free and pair not in used
        assert sub[pair] == pytest.approx(min(float(sub[q]) for q in free), abs=1e-9)
        assert rec["similarity"] == pytest.approx(float(sub[pair]), abs=1e-9)
        used.add(pair)
    # the first choice is the global minimum of the original pool
    off = before + torch.eye(4) * 1e9
    first = tuple(q["index"] for q in out.meta["lineage"][0]["parents"])
    assert before[first] == off.min()


def test_choose_parents_ties_and_used_pairs():
    sim = torch.tensor([[2.0, -1.0, -1.0], [-1.0, 2.0, 0.0], [-1.0, 0.0, 2.0]])
    assert choose_parents(sim, set()) == (0, 1)  # tie with (0, 2) goes to the smaller pair
    assert choose_parents(sim, {(0, 1)}) == (0, 2)
    assert choose_parents(sim, {(0, 1), (0, 2)}) == (1, 2)
    with pytest.raises(ConfigError):
        choose_parents(sim, {(0, 1), (0, 2), (1, 2)})


def test_two_experts_grow_without_repeating_a_pair():
    es = ffn_set(2)
    out = expand(es, 6, seed=0, progress=False)
    pairs = [tuple(q["index"] for q in rec["parents"]) for rec in out.meta["lineage"]]
    assert pairs[0] == (0, 1) and len(set(pairs)) == len(pairs) == 4


def test_n_equal_m_is_a_no_op_and_bad_input_raises():
    es = ffn_set(3)
    same = expand(es, 3, progress=False)
    assert same.states == es.states and same.meta["lineage"] == [] and len(same.meta["similarity_after"]) == 3
    with pytest.raises(ConfigError, match="below"):
        expand(es, 2)
    with pytest.raises(ConfigError, match="drop rate"):
        expand(es, 5, p=1.0)
    with pytest.raises(ConfigError, match="at least 2"):
        expand(ffn_set(1), 3)
    with pytest.raises(ConfigError, match="needs LoRA"):
        expand(es, 5, lora_merge="product")
    with pytest.raises(ConfigError, match="lora_merge"):
        expand(lora_set(), 5, lora_merge="svd")
    with pytest.raises(ConfigError, match="names"):
        genetic_expansion(es.states, es.names[:2], es.base, 5)


def test_lora_separate_and_product():
    es = lora_set(3, r=2)
    sep = expand(es, 5, seed=0, progress=False)
    prod = expand(es, 5, seed=0, lora_merge="product", p=0.0, progress=False)
    assert len(sep.states) == len(prod.states) == 5
    assert prod.meta["expansion"]["lora_merge"] == "product"
    assert prod.meta["lineage"][0]["merge"] == "dare-lora-product" and sep.meta["lineage"][0]["merge"] == "dare"
    for rec in prod.meta["lineage"]:
        (i, j), alpha = [q["index"] for q in rec["parents"]], rec["alpha"]
        child, a, b = prod.states[rec["index"]], prod.states[i], prod.states[j]
        for proj in ("layers.0.up_proj", "layers.1.down_proj"):
            ka, kb = f"{proj}.lora_A", f"{proj}.lora_B"
            assert child[ka].shape == es.base[ka].shape and child[kb].shape == es.base[kb].shape
            # p = 0: the child's product is the best rank-r approximation of the interpolated products
            target = alpha * a[kb] @ a[ka] + (1 - alpha) * b[kb] @ b[ka]
            rb, ra = refactor_low_rank(target, 2)
            assert torch.allclose(child[kb] @ child[ka], rb @ ra, atol=1e-10)


def test_write_expansion_report(tmp_path):
    es = ffn_set(3)
    out = expand(es, 5, seed=0, progress=False)
    target = tmp_path / "run" / "expand"
    before = torch.tensor(out.meta["similarity_before"], dtype=torch.float64)  # a tensor or lists both work
    write_expansion_report(target, before, out.meta["similarity_after"], out.meta["lineage"], names=out.names)
    sim = json.loads((target / "similarity.json").read_text())
    lineage = json.loads((target / "lineage.json").read_text())
    assert sim["before"] == out.meta["similarity_before"] and sim["after"] == out.meta["similarity_after"]
    assert sim["names_before"] == es.names and sim["names_after"] == out.names
    assert lineage == out.meta["lineage"]
    assert sorted(p.name for p in target.iterdir()) == ["lineage.json", "similarity.json"]  # no temp files left
    with pytest.raises(ConfigError, match="names"):
        write_expansion_report(target, sim["before"], sim["after"], lineage, names=es.names)


def test_expanded_set_round_trips_through_save_and_load(tmp_path):
    es = ffn_set(3)
    out = expand(es, 5, seed=0, progress=False)
    back = load_expert_set(save_expert_set(out, tmp_path / "expand"))
    assert back.names == out.names and back.kind == "ffn"
    assert back.meta["lineage"] == out.meta["lineage"]
    assert back.meta["similarity_after"] == out.meta["similarity_after"]
    assert all(torch.equal(x[k], y[k]) for x, y in zip(back.states, out.states) for k in x)


def test_invalid_expert_set_is_refused():
    es = ffn_set(3)
    es.states[1] = {k: v for k, v in es.states[1].items() if "down" not in k}
    with pytest.raises(ConfigError, match="other keys"):
        expand(es, 5)

"""UpIT seed buckets (issue 17): per-expert normalisation, the balanced assignment (exact, deterministic, never
an empty bucket), the argmin and random rules, buckets.json's counts, and the route switches of the config."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch

from sparsecraft.errors import ConfigError
from sparsecraft.upit.assign import assign, balanced_assignment, normalise, quotas, random_assignment
from sparsecraft.upit.buckets import bucket_report
from sparsecraft.upit.config import RouteSettings, load_upit_config
from sparsecraft.upit.route import stored_nll

REPO = Path(__file__).resolve().parents[1]
QUICK = REPO / "configs" / "upit-quick.yaml"


@pytest.fixture(autouse=True)
def _cwd(monkeypatch):
    monkeypatch.chdir(REPO)  # the configs name the bundled data relative to the repository root


def known_strengths(slices: tuple[int, ...], offsets: tuple[float, ...], margin: float = 0.3,
                    seed: int = 0) -> tuple[torch.Tensor, list[int]]:
    """`(nll [E, S], owner of each record)`: record s belongs to slice k (its records are consecutive) and its NLL
    under expert e is `difficulty(s) + offsets[e] - margin * [e == k]` (+ tiny noise): expert k is relatively best
    on slice k, but an expert with a low enough offset has the lowest NLL on every record."""
    g = torch.Generator().manual_seed(seed)
    owner = [k for k, size in enumerate(slices) for _ in range(size)]
    total, num = len(owner), len(offsets)
    difficulty = 2.0 + 2.0 * torch.rand(total, generator=g, dtype=torch.float64)
    nll = difficulty[None, :] + torch.tensor(offsets, dtype=torch.float64)[:, None]
    nll = nll + 1e-3 * torch.rand(num, total, generator=g, dtype=torch.float64)
    for s, k in enumerate(owner):
        nll[k, s] -= margin
    return nll, owner


# ------------------------------------------------------------------------------------------------ normalisation


def test_normalise_formulas_on_hand_values():
    nll = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 5.0, 5.0, 5.0], [2.0, 1.0, 2.0, 4.0]])
    z = normalise(nll, "zscore")
    mean, std = 2.5, math.sqrt(1.25)  # row 0: population std
    torch.testing.assert_close(z[0], torch.tensor([(v - mean) / std for v in (1.0, 2.0, 3.0, 4.0)],
                                                  dtype=torch.float64))
    assert torch.equal(z[1], torch.zeros(4, dtype=torch.float64))  # no spread: all zeros, no division by 0
    r = normalise(nll, "rank")
    assert r[0].tolist() == [0.0, 1 / 3, 2 / 3, 1.0]
    assert r[1].tolist() == [0.5] * 4  # all tied: the average rank 1.5 of 0..3, over 3
    assert r[2].tolist() == [0.5, 0.0, 0.5, 1.0]  # the two 2.0s share ranks 1 and 2
    assert torch.equal(normalise(nll, "none"), nll.double())
    # a per-expert shift and scale changes nothing after zscore or rank
    moved = nll * torch.tensor([[3.0], [1.0], [0.5]]) + torch.tensor([[7.0], [-2.0], [1.0]])
    torch.testing.assert_close(normalise(moved, "zscore"), z)
    assert torch.equal(normalise(moved, "rank"), r)
    # margin: minus the record's mean over experts, then minus the expert's mean margin
    m = normalise(nll, "margin")
    col = nll.double().mean(0)  # [S]: 8/3, 8/3, 10/3, 13/3
    want = nll.double() - col
    want = want - want.mean(1, keepdim=True)
    torch.testing.assert_close(m, want)
    # row 1 (5 everywhere): 5 - [8/3, 8/3, 10/3, 13/3] = [7/3, 7/3, 5/3, 2/3], whose mean is 7/4
    assert m[1].tolist() == pytest.approx([7 / 12, 7 / 12, -1 / 12, -13 / 12])
    torch.testing.assert_close(m.sum(0), torch.zeros(4, dtype=torch.float64))  # rows and columns sum to 0
    torch.testing.assert_close(m.sum(1), torch.zeros(3, dtype=torch.float64))
    # a per-record shift (difficulty) and a per-expert shift (offset) change nothing after margin
    shifted = nll + torch.tensor([[0.5], [-1.0], [2.0]]) + torch.tensor([[1.0, -3.0, 0.25, 4.0]])
    torch.testing.assert_close(normalise(shifted, "margin"), m)


# ------------------------------------------------------------------------------------------- known strengths


@pytest.mark.parametrize("how", ["margin", "zscore", "rank", "none"])
def test_each_expert_gets_its_own_records_where_argmin_gives_one_expert_all(how):
    # expert 2 is "the latest checkpoint": 0.8-1.0 nats better everywhere, while each expert is 0.3 better than
    # the others on its own slice
    nll, owner = known_strengths((4, 4, 4), offsets=(1.0, 0.8, 0.0))
    argmin, _ = assign(nll, "argmin")
    assert argmin.tolist() == [2] * 12  # the collapse of issue 17
    buckets, scores = assign(nll, "balanced", how)
    assert buckets.tolist() == owner
    assert scores.shape == (3, 12) and scores.dtype == torch.float64


def test_min_share_keeps_unequal_slices_whole_and_exact_balance_trims_them():
    nll, owner = known_strengths((6, 4, 2), offsets=(0.0, 0.5, 0.2))
    exact, _ = assign(nll, "balanced")
    assert torch.bincount(exact, minlength=3).tolist() == [4, 4, 4]
    # every expert's own records first, as far as its quota allows
    for e in range(3):
        own = sum(b == e and o == e for b, o in zip(exact.tolist(), owner))
        assert own == min(owner.count(e), 4)
    assert quotas(12, 3, 0.5) == (2, 8)
    loose, _ = assign(nll, "balanced", "margin", min_share=0.5)
    assert loose.tolist() == owner  # 6/4/2: each at least 2, so the slices stay whole
    assert assign(nll, "argmin")[0].tolist() != owner  # expert 0's offset wins some of the others' records


# ------------------------------------------------------------------------------------------------- guarantees


def _brute_force(cost: torch.Tensor, low: int, high: int) -> float:
    num, total = cost.shape
    best = math.inf
    for choice in itertools.product(range(num), repeat=total):
        counts = [choice.count(e) for e in range(num)]
        if min(counts) >= low and max(counts) <= high:
            best = min(best, sum(float(cost[e, s]) for s, e in enumerate(choice)))
    return best


def test_balanced_assignment_is_optimal_within_its_bounds():
    g = torch.Generator().manual_seed(3)
    for trial in range(120):
        num = 2 + trial % 3
        total = int(torch.randint(1, 7, (), generator=g))
        share = (1.0, 0.5, 0.75)[trial % 3]
        low, high = quotas(total, num, share)
        cost = torch.randn(num, total, generator=g, dtype=torch.float64)
        if trial % 4 == 0:  # many exact ties
            cost = torch.randint(0, 3, (num, total), generator=g).double()
        got = balanced_assignment(cost, low, high)
        counts = torch.bincount(got, minlength=num)
        assert int(counts.min()) >= low and int(counts.max()) <= high
        assert float(cost[got, torch.arange(total)].sum()) == pytest.approx(_brute_force(cost, low, high), abs=1e-9)


def test_every_expert_gets_records_even_when_one_dominates():
    g = torch.Generator().manual_seed(4)
    for num in (2, 3, 8):
        for total in (num, num + 1, 3 * num - 1, 5 * num):
            cost = torch.randn(num, total, generator=g, dtype=torch.float64)
            cost[0] -= 100.0  # expert 0 is far better on everything
            counts = torch.bincount(balanced_assignment(cost), minlength=num).tolist()
            assert min(counts) == total // num and max(counts) == math.ceil(total / num), (num, total, counts)
    assert balanced_assignment(torch.zeros(3, 0)).tolist() == []
    with pytest.raises(ValueError, match="cannot give each of 3 experts 2 to 2 of 5 records"):
        balanced_assignment(torch.zeros(3, 5), 2, 2)


def test_ties_are_broken_by_a_fixed_rule():
    cost = torch.zeros(3, 7)
    # equal costs: expert 0 fills first, then 1, then 2; the one extra place goes to the lowest index
    assert balanced_assignment(cost).tolist() == [0, 0, 1, 1, 2, 2, 0]
    nll, _ = known_strengths((5, 5, 5), offsets=(0.0, 0.1, 0.2), margin=0.0, seed=9)  # no strengths at all
    first = assign(nll, "balanced", "rank")[0]
    assert torch.equal(first, assign(nll.clone(), "balanced", "rank")[0])  # same input, same buckets
    assert assign(torch.tensor([[1.0, 2.0], [1.0, 0.0]]), "argmin")[0].tolist() == [0, 1]  # argmin: first lowest


def test_random_buckets_are_seeded_balanced_and_ignore_the_perplexities():
    a = random_assignment(10, 4, seed=1)
    assert torch.equal(a, random_assignment(10, 4, seed=1)) and not torch.equal(a, random_assignment(10, 4, seed=2))
    assert sorted(torch.bincount(a, minlength=4).tolist()) == [2, 2, 3, 3]
    nll, _ = known_strengths((4, 4), offsets=(0.0, 0.0))
    one, scores = assign(nll, "random", seed=5, parts=(6, 2))
    two, _ = assign(-nll, "random", seed=5, parts=(6, 2))
    assert scores is None and torch.equal(one, two)
    assert torch.bincount(one[:6], minlength=2).tolist() == [3, 3] and torch.bincount(one[6:]).tolist() == [1, 1]


def test_parts_are_balanced_apart_and_normalised_together():
    nll, owner = known_strengths((6, 6), offsets=(0.0, 1.0))
    # the training part holds 5 records of slice 0 and 3 of slice 1; the held-out part the rest
    order = [0, 1, 2, 3, 4, 6, 7, 8, 5, 9, 10, 11]
    nll, owner = nll[:, order], [owner[i] for i in order]
    buckets, scores = assign(nll, "balanced", parts=(8, 4))
    assert torch.bincount(buckets[:8]).tolist() == [4, 4] and torch.bincount(buckets[8:]).tolist() == [2, 2]
    torch.testing.assert_close(scores, normalise(nll, "margin"))  # statistics over all 12 records
    with pytest.raises(ValueError, match="do not add up"):
        assign(nll, "balanced", parts=(8, 3))


# ------------------------------------------------------------------------------------------------ buckets.json


def test_bucket_report_counts():
    nll, owner = known_strengths((3, 3), offsets=(0.0, 1.0))
    train_idx, held_idx = [10, 11, 12, 13], [20, 21]
    settings = RouteSettings()
    buckets, scores = assign(nll, "balanced", parts=(4, 2))
    report = bucket_report(nll, buckets, scores, ["a"] * 3 + ["b"] * 3, train_idx, held_idx, ["e0", "e1"],
                           settings)
    assert (report["bucketing"], report["normalise"], report["min_share"]) == ("balanced", "margin", 1.0)
    assert report["sizes"] == [3, 3] and report["train_sizes"] == [2, 2] and report["heldout_sizes"] == [1, 1]
    assert report["argmin_sizes"] == [6, 0] and report["empty"] == []
    assert report["quota"] == {"train": [2, 2], "heldout": [1, 1]}
    # the training part holds 3 records of source a and 1 of b: a quota of 2 sends one a-record to e1
    assert report["by_source"] == {"a": [2, 1], "b": [1, 2]}
    assert [r["index"] for r in report["records"]] == train_idx + held_idx
    assert [r["split"] for r in report["records"]] == ["train"] * 4 + ["heldout"] * 2
    first = report["records"][0]
    assert first["nll"] == nll[:, 0].tolist() and first["perplexity"][0] == round(math.exp(float(nll[0, 0])), 4)
    assert len(first["score"]) == 2
    argmin = RouteSettings(bucketing="argmin")
    report = bucket_report(nll, nll.argmin(0), None, ["a"] * 6, train_idx, held_idx, ["e0", "e1"], argmin)
    assert report["normalise"] is None and report["quota"] is None and report["empty"] == ["e1"]
    assert "score" not in report["records"][0]


def test_a_resumed_route_stage_reuses_the_stored_nlls_of_the_same_records_and_experts(tmp_path):
    nll, _ = known_strengths((3, 3), offsets=(0.0, 1.0))
    nll = nll.float()  # what record_nll returns; stored exactly as Python floats
    buckets, scores = assign(nll, "argmin")
    report = bucket_report(nll, buckets, scores, ["a"] * 6, [1, 2, 3, 4], [7, 8], ["e0", "e1"],
                           RouteSettings(bucketing="argmin"))
    path = tmp_path / "buckets.json"
    path.write_text(json.dumps(report))
    again = stored_nll(path, [1, 2, 3, 4, 7, 8], ["e0", "e1"])
    assert again.shape == (2, 6) and torch.equal(again, nll.double())
    # so a resumed stage with other bucketing settings re-assigns from them exactly as from a fresh computation
    assert torch.equal(assign(again, "balanced", parts=(4, 2))[0], assign(nll, "balanced", parts=(4, 2))[0])
    assert stored_nll(path, [1, 2, 3, 4, 7, 9], ["e0", "e1"]) is None  # another seed split
    assert stored_nll(path, [1, 2, 3, 4, 7, 8], ["e1", "e0"]) is None  # another expert set
    for record in report["records"]:
        del record["nll"]  # a file written before the NLLs were stored
    path.write_text(json.dumps(report))
    assert stored_nll(path, [1, 2, 3, 4, 7, 8], ["e0", "e1"]) is None
    assert stored_nll(tmp_path / "none.json", [1], ["e0"]) is None


# ------------------------------------------------------------------------------------------------- the config


def test_route_defaults_and_switches():
    cfg = load_upit_config(QUICK)
    r = cfg.route
    assert (r.bucketing, r.normalise, r.min_share, r.init, r.enabled) == ("balanced", "margin", 1.0, "default", True)
    assert cfg.route_stage
    off = load_upit_config(QUICK, ["route.enabled=false"])
    assert not off.route_stage  # no router pre-training: the crafted default init, no route stage
    rand = load_upit_config(QUICK, ["route.enabled=false", "route.init=random", "route.init_std=0.1"])
    assert rand.route_stage and rand.route.init_std == 0.1  # the random rows are the route stage's file
    assert load_upit_config(QUICK, ["route.bucketing=argmin"]).route.bucketing == "argmin"


@pytest.mark.parametrize("overrides, message", [
    (["route.bucketing=best"], "route.bucketing must be one of balanced, argmin, random; got 'best'"),
    (["route.normalise=minmax"], "route.normalise must be one of margin, zscore, rank, none; got 'minmax'"),
    (["route.min_share=0"], r"route.min_share must be in \(0, 1\], got 0"),
    (["route.min_share=1.5"], r"route.min_share must be in \(0, 1\], got 1.5"),
    (["route.init=zeros"], "route.init must be one of default, random; got 'zeros'"),
    (["route.init=random"], "route.init=random is the random-router ablation, which replaces router pre-training"),
    (["route.enabled=false", "route.init=random", "route.init_std=0"], "route.init_std must be positive"),
])
def test_route_switches_are_validated_in_one_line(overrides, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_upit_config(QUICK, overrides)
    assert "\n" not in str(info.value)

"""UpIT as the paper describes it and its ablations (issue 17): the paper recipes, one file per ablation that
changes only its switch (`extends:`), the switches validated in one line, and the ablations run end to end on a
tiny model: no genetic expansion, random router, no router pre-training, another merge and random parents."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_base
from test_upit_pipeline import tiny_args

import sparsecraft
from sparsecraft.errors import ConfigError
from sparsecraft.methods.expert_set import load_expert_set, load_router
from sparsecraft.train.setup import build_model
from sparsecraft.upit.config import load_upit_config, read_upit_yaml, stage_recipe
from sparsecraft.upit.dense_run import checkpoint_interval
from sparsecraft.upit.pipeline import run_pipeline
from sparsecraft.upit.route import random_router

REPO = Path(__file__).resolve().parents[1]
QUICK = REPO / "configs" / "upit-quick.yaml"
PAPER = REPO / "configs" / "upit-paper.yaml"
ABLATIONS = REPO / "configs" / "upit-ablation"


@pytest.fixture(autouse=True)
def _cwd(monkeypatch):
    monkeypatch.chdir(REPO)  # the configs name the bundled data relative to the repository root


# ------------------------------------------------------------------------------------------------ the recipes


def test_paper_recipes_follow_the_paper():
    for path, kind, n, lr in ((PAPER, "lora", 8, 2e-4), (REPO / "configs" / "upit-paper-ffn.yaml", "ffn", 4, 2e-5)):
        cfg = load_upit_config(path)
        dense, post = stage_recipe(cfg, "prepare"), stage_recipe(cfg, "upcycle")
        assert (cfg.kind, cfg.num_experts, post.craft_config().top_k) == (kind, n, 2)
        assert (dense.optim.lr, post.optim.lr) == (lr, lr)  # LoRA experts 2e-4, FFN experts 2e-5: both stages
        assert (dense.train.epochs, post.train.epochs) == (2.0, 2.0)  # 2 epochs of preparation, 2 of post-training
        assert cfg.prepare.interval == 0.25 and cfg.prepare.num_experts < n  # expanded by the genetic loop
        assert (cfg.route.seed_fraction, cfg.route.epochs, cfg.route.enabled) == (0.01, 4.0, True)
        assert (cfg.expand.enabled, cfg.expand.merge, cfg.route.bucketing) == (True, "dare", "balanced")
        every, total = checkpoint_interval(dense, cfg.prepare.interval)
        # a checkpoint every quarter epoch (6 steps of an epoch's 24.5) over the 2 epochs' 49 steps, and the model
        assert (every, total, len(range(every, total, every)) + 1) == (6, 49, 9)


def _flat(data: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


ABLATION_SWITCHES = {
    "no-expansion": {"expand.enabled": False, "prepare.num_experts": 8},
    "no-router-pretraining": {"route.enabled": False, "route.init": "default"},
    "random-router": {"route.enabled": False, "route.init": "random", "route.init_std": 0.02},
    "random-buckets": {"route.bucketing": "random"},
    "argmin-buckets": {"route.bucketing": "argmin"},
    "random-parents": {"expand.parents": "random"},
    "merge-ties": {"expand.merge": "ties"},
    "merge-linear": {"expand.merge": "linear"},
}


@pytest.mark.parametrize("name", sorted(ABLATION_SWITCHES))
def test_each_ablation_changes_only_its_switch(name):
    paper = _flat(load_upit_config(PAPER).to_dict())
    cfg = load_upit_config(ABLATIONS / f"{name}.yaml")
    ablation = _flat(cfg.to_dict())
    changed = {k: v for k, v in ablation.items() if paper.get(k) != v}
    switches = {k: v for k, v in ABLATION_SWITCHES[name].items() if paper.get(k) != v}
    assert changed == {**switches, "output_dir": f"runs/upit-paper/ablation-{name}"}
    assert set(paper) == set(ablation)


def test_every_ablation_file_is_listed():
    assert sorted(p.stem for p in ABLATIONS.glob("*.yaml")) == sorted(ABLATION_SWITCHES)


def test_extends(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "base.yaml").write_text(f"extends: {QUICK}\nprepare: {{num_experts: 3}}\nexperts: 6\n")
    (tmp_path / "child.yaml").write_text("extends: sub/base.yaml\noutput_dir: runs/x\nexpand: {merge: ties}\n")
    cfg = load_upit_config(tmp_path / "child.yaml", ["expand.p=0.25"])
    assert (cfg.prepare.num_experts, cfg.num_experts, cfg.output_dir) == (3, 6, "runs/x")
    assert (cfg.expand.merge, cfg.expand.p, cfg.expand.seed) == ("ties", 0.25, 0)  # the rest from upit-quick
    assert cfg.prepare.interval == 0.1 and "extends" not in read_upit_yaml(tmp_path / "child.yaml")

    def fails(match, text):
        (tmp_path / "bad.yaml").write_text(text)
        with pytest.raises(ConfigError, match=match) as info:
            load_upit_config(tmp_path / "bad.yaml")
        assert "\n" not in str(info.value)

    fails("extends bad.yaml leads back to itself", "extends: bad.yaml\n")
    (tmp_path / "loop.yaml").write_text("extends: bad.yaml\n")
    fails("leads back to itself", "extends: loop.yaml\n")
    fails("extends must name another UpIT config file, got 3", "extends: 3\n")
    fails("UpIT config not found", "extends: none.yaml\n")
    with pytest.raises(ConfigError, match="unknown UpIT config field extends"):
        load_upit_config(QUICK, ["extends=x.yaml"])  # a file's field, not an override


@pytest.mark.parametrize("overrides, message", [
    (["expand.merge=slerp"], "expand.merge must be one of dare, ties, linear; got 'slerp'"),
    (["expand.parents=closest"], "expand.parents must be one of dissimilar, random; got 'closest'"),
    (["expand.enabled=false"], r"expand.enabled=false takes the n=4 experts as they are, but prepare.num_experts is "
                               r"2: make them equal \(the ablation's prepare.num_experts=4\)"),
    (["expand.enabled=false", "prepare.experts_from=[a, b, c]"], "but prepare.experts_from lists 3"),
    (["expand.enabled=maybe"], "expand.enabled"),
])
def test_expand_switches_are_validated_in_one_line(overrides, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_upit_config(QUICK, overrides)
    assert "\n" not in str(info.value)
    assert load_upit_config(QUICK, ["expand.enabled=false", "prepare.num_experts=4"]).expand.enabled is False


# ---------------------------------------------------------------------------------------------- on a tiny model


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("upit-ablations")
    save_tiny_base(root / "base", hidden=32, max_positions=256)
    return root / "base"


def ablation_args(base: Path, out: Path, *extra: str) -> list[str]:
    """configs/upit-quick.yaml on the tiny model, a checkpoint every 3 of 12 dense steps (4 candidates)."""
    return tiny_args(base, out, *extra, interval=0.03, upcycle_steps=4)


def _router_at_start(cfg, out: Path, router: str) -> dict[int, torch.Tensor]:
    """The router rows post-training starts from, for `upit.router = router` ("" = the default init)."""
    built = build_model(stage_recipe(cfg, "upcycle", upit={"experts": str(out / "expand"), "router": router}))
    return {i: mlp.moe.router.weight.detach().clone() for i, mlp in sparsecraft.crafted_layers(built.inner)}


def test_no_expansion_and_random_router_run_end_to_end(base, tmp_path):
    out = tmp_path / "run"
    cfg = load_upit_config(QUICK, ablation_args(base, out, "prepare.num_experts=4", "expand.enabled=false",
                                            "route.enabled=false", "route.init=random", "route.init_std=0.5"))
    results = run_pipeline(cfg)
    # no genetic expansion: the 4 experts are 4 dense-stage checkpoints, passed on unchanged
    prepared, expanded = load_expert_set(out / "prepare" / "experts"), load_expert_set(out / "expand")
    assert prepared.names == expanded.names == ["step3", "step6", "step9", "step12"]
    assert all(torch.equal(a[k], b[k]) for a, b in zip(prepared.states, expanded.states) for k in a)
    assert expanded.meta["expansion"]["enabled"] is False
    similarity = json.loads((out / "expand" / "similarity.json").read_text())
    assert similarity["expansion"]["enabled"] is False and similarity["before"] == similarity["after"]
    assert json.loads((out / "expand" / "lineage.json").read_text()) == []
    assert results["expand"]["children"] == 0 and results["expand"]["enabled"] is False
    # random router: seeded N(0, 0.5^2) rows in the route stage's file, no buckets, no pre-training
    rows = load_router(out / "route" / "router.safetensors")
    want = random_router([0, 1], 4, 32, 0.5, seed=0)
    assert sorted(rows) == [0, 1] and all(torch.equal(rows[i], want[i]) for i in rows)
    assert 0.35 < float(torch.cat([r.flatten() for r in rows.values()]).std()) < 0.65
    accuracy = json.loads((out / "route" / "accuracy.json").read_text())
    assert (accuracy["pretrained"], accuracy["init"], accuracy["init_std"]) == (False, "random", 0.5)
    assert not (out / "route" / "buckets.json").exists()
    # post-training started from them (its recipe names the file), and they are not the crafted default init
    recipe = json.loads((out / "upcycle" / "recipe.json").read_text())
    assert recipe["upit"]["router"] == str((out / "route" / "router.safetensors").resolve())
    start = _router_at_start(cfg, out, recipe["upit"]["router"])
    default = _router_at_start(cfg, out, "")
    assert all(torch.equal(start[i], rows[i]) and not torch.allclose(default[i], rows[i]) for i in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["route"]["pretrained"] is False and summary["upcycle"]["steps"] == 4

    # no router pre-training: no route stage, post-training from the crafted default init (recorded as such)
    plain = tmp_path / "plain"
    for stage in ("prepare", "expand"):
        shutil.copytree(out / stage, plain / stage)
    cfg = load_upit_config(QUICK, ablation_args(base, plain, "prepare.num_experts=4", "expand.enabled=false",
                                            "route.enabled=false"))
    with pytest.raises(ConfigError, match="route.enabled is false: there is no route stage"):
        run_pipeline(cfg, "route")
    results = run_pipeline(cfg, resume=True)
    assert results["route"] == {"skipped": True, "router": "default init (route.enabled=false, route.init=default)"}
    assert json.loads((plain / "summary.json").read_text())["route"]["skipped"] is True
    assert json.loads((plain / "upcycle" / "recipe.json").read_text())["upit"]["router"] == ""
    assert not (plain / "route").exists()

    # another merge and random parents: the expand stage says what it did
    grown = tmp_path / "grown"
    shutil.copytree(out / "prepare", grown / "prepare")
    cfg = load_upit_config(QUICK, ablation_args(base, grown, "prepare.num_experts=4", "experts=6", "expand.merge=ties",
                                            "expand.parents=random", "expand.seed=3"))
    result = run_pipeline(cfg, "expand")["expand"]
    assert (result["from"], result["to"], result["merge"], result["parents"]) == (4, 6, "ties", "random")
    lineage = json.loads((grown / "expand" / "lineage.json").read_text())
    assert [(c["merge"], c["parent_rule"], c["seed"]) for c in lineage] == [("ties", "random", 3)] * 2
    similarity = json.loads((grown / "expand" / "similarity.json").read_text())
    assert similarity["expansion"] == {"enabled": True, "merge": "ties", "parents": "random", "p": 0.5, "seed": 3,
                                       "lora_merge": "separate"}
    assert load_expert_set(grown / "expand").meta["expansion"]["merge"] == "ties"

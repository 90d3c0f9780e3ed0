"""UpIT pipeline: config, the four stages on the bundled data for each expert kind, resume, existing experts as
experts, and seed bucketing + router pre-training on experts built to be best on different slices."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import transformers as tf
from conftest import save_tiny_base, tiny_tokenizer

import sparsecraft
from sparsecraft.cli import COMMANDS, main
from sparsecraft.cli import upit as upit_cmd
from sparsecraft.config import CraftConfig
from sparsecraft.errors import ConfigError
from sparsecraft.methods.expert_set import ExpertSet, load_expert_set, load_router
from sparsecraft.methods.upit import build_moe
from sparsecraft.train.loop import run
from sparsecraft.train.recipe import load_recipe
from sparsecraft.train.setup import build_model
from sparsecraft.upit.assign import assign
from sparsecraft.upit.config import load_upit_config, stage_recipe
from sparsecraft.upit.pipeline import run_pipeline
from sparsecraft.upit.prepare import Candidate, experts_from_paths, select

REPO = Path(__file__).resolve().parents[1]
QUICK = REPO / "configs" / "upit-quick.yaml"


@pytest.fixture(autouse=True)
def _cli_and_cwd(monkeypatch):
    monkeypatch.setitem(COMMANDS, "upit", upit_cmd)  # until cli/__init__.py registers it
    monkeypatch.chdir(REPO)  # the configs name the bundled data relative to the repository root


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A tiny random LLaMA with a character tokenizer, saved as a model folder recipes can name."""
    root = tmp_path_factory.mktemp("upit")
    save_tiny_base(root / "base", hidden=32, max_positions=256)
    return root / "base"


def tiny_args(base: Path, out: Path, *extra: str, interval: float = 0.06, upcycle_steps: int = 8) -> list[str]:
    """Overrides that shrink configs/upit-quick.yaml to the tiny model: seconds per stage (12 dense steps, a
    checkpoint every `interval` of the epoch)."""
    return [f"model={base}", f"output_dir={out}", "data.max_length=48", "data.truncation=left",
            "data.template=chatml", "logging.progress=false", "lr=5e-3", "train.eval_batches=2", "lora.r=4",
            "route.seed_min=16", "prepare.recipe.train.max_steps=12", f"prepare.interval={interval}",
            f"upcycle.recipe.train.max_steps={upcycle_steps}", *extra]


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


# ------------------------------------------------------------------------------------------------------ config


def test_config_errors_are_one_line(tmp_path):
    def fails(match, *overrides, path=QUICK):
        with pytest.raises(ConfigError, match=match) as info:
            load_upit_config(path, list(overrides))
        assert "\n" not in str(info.value)

    fails("unknown UpIT config field stages", "stages=2")
    fails(r"kind must be one of (\w+, ){2}\w+; got .moe.", "kind=moe")
    fails(r"craft.num_experts \(n=2\) must be at least prepare.num_experts \(m=3\)", "experts=2",
          "prepare.num_experts=3")
    fails("prepare.recipe.method is set by the pipeline", "prepare.recipe.method=pesc")
    fails("prepare.select lists 1 steps", "prepare.select=[10]")
    fails("route: need 0 < seed_min <= seed_max", "route.seed_max=3")
    fails("upcycle stage: unknown recipe field optim.learning_rate", "upcycle.recipe.optim.learning_rate=1")
    fails("top_k", "top_k=9")
    fails("UpIT config not found", path=tmp_path / "none.yaml")
    (tmp_path / "bad.yaml").write_text("kind: [\n")
    fails("is not valid YAML", path=tmp_path / "bad.yaml")


def test_stage_recipes_derive_from_shared_fields_and_kind():
    cfg = load_upit_config(QUICK, ["max_steps=7", "lr=1e-3", "upcycle.recipe.optim.lr=3e-4", "output_dir=/x/run"])
    dense, post = stage_recipe(cfg, "prepare"), stage_recipe(cfg, "upcycle")
    # max_steps= reaches both training stages unless a stage's own recipe says otherwise (prepare does)
    assert (dense.train.max_steps, post.train.max_steps) == (20, 12)
    assert (dense.optim.lr, post.optim.lr) == (1e-3, 3e-4)
    assert (dense.output_dir, post.output_dir) == ("/x/run/prepare", "/x/run/upcycle")
    assert dense.method == "dense" and dense.lora.enabled and dense.lora.ffn and dense.lora.targets == []
    assert post.method == "upit" and not post.lora.enabled and post.upit.experts == "/x/run/expand"
    assert post.craft_config().num_experts == 4 and post.craft_config().top_k == 2
    assert dense.checkpoint.keep >= 1000  # every checkpoint is a candidate expert
    for kind, method in (("ffn", "upcycle"), ("adapter", "pesc")):
        d = stage_recipe(load_upit_config(QUICK, [f"kind={kind}"]), "prepare")
        assert d.method == method and d.craft_config().num_experts == 1 and d.craft_config().top_k == 1
    # the paper's FFN-setting learning rate is the ffn kind's default
    assert stage_recipe(load_upit_config(None, ["kind=ffn", "data=x.jsonl"]), "upcycle").optim.lr == 2e-5


def test_select_even_last_and_explicit():
    found = [Candidate(s, Path(f"s{s}")) for s in (5, 10, 15, 20, 25, 30, 35, 40)]
    assert [c.step for c in select(found, 4, "even")] == [10, 20, 30, 40]
    assert [c.step for c in select(found, 3, "even")] == [15, 30, 40]
    assert [c.step for c in select(found, 2, "last")] == [35, 40]
    assert [c.step for c in select(found, 2, [5, 25])] == [5, 25]
    with pytest.raises(ConfigError, match="no saved state at step 7"):
        select(found, 1, [7])


# ------------------------------------------------------------------------------------------ the whole pipeline


@pytest.fixture(scope="module")
def lora_run(base, tmp_path_factory):
    """All four stages, kind lora, through the command line."""
    out = tmp_path_factory.mktemp("lora") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(COMMANDS, "upit", upit_cmd)
        mp.chdir(REPO)
        assert main(["upit", str(QUICK), *tiny_args(base, out)]) == 0
    return out


def _held_out_record_accuracy(base: Path, out: Path, held: list[dict], router_file: Path | None) -> float:
    """Share of held-out seed records whose mean router probabilities (over MoE layers and scored tokens) peak at
    their bucket in buckets.json, for the MoE of `out/expand` with `router_file`'s rows (None: seeded init)."""
    from sparsecraft.sources import load_base_model, resolve_base
    from sparsecraft.upit.buckets import iter_batches, scored_mask, seed_data

    cfg = load_upit_config(QUICK, tiny_args(base, out))
    collator, _, held_ds, _, held_idx, _ = seed_data(cfg)
    assert held_idx == [r["index"] for r in held]
    craft = CraftConfig.from_dict(stage_recipe(cfg, "upcycle").craft)
    model = build_moe(load_base_model(resolve_base(cfg.model), dtype=torch.float32), load_expert_set(out / "expand"),
                      craft, load_router(router_file) if router_file else None, seed=cfg.route.seed).eval()
    right = 0
    for idx, batch in iter_batches(held_ds, collator, cfg.route.batch_size):  # batched as the stage did
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False,
                           output_router_logits=True).router_logits
        mask = scored_mask(batch, cfg.route.tokens)
        for row, i in enumerate(idx):
            probs = torch.cat([torch.softmax(z.float(), -1).reshape(*mask.shape, -1)[row][mask[row]] for z in logits])
            right += int(probs.mean(0).argmax()) == held[i]["bucket"]
    return right / len(held)


def test_lora_pipeline_writes_every_stage(lora_run, base):
    out = lora_run
    prepared = load_expert_set(out / "prepare" / "experts")
    assert prepared.kind == "lora" and prepared.names == ["step6", "step12"]  # 2 of the 12-step run's states
    assert prepared.meta["targets"] == ["down_proj", "gate_proj", "up_proj"] and prepared.meta["r"] == 4
    # base = the run's initial LoRA: B zero, A what training started from (it moved by at most ~lr per step)
    for key, value in prepared.base.items():
        if key.endswith("lora_B"):
            assert not value.any() and prepared.states[0][key].any()
        else:
            assert (prepared.states[0][key] - value).abs().max() < 12 * 5e-3 * 1.5
    expanded = load_expert_set(out / "expand")
    assert len(expanded.states) == 4 and expanded.names[:2] == prepared.names
    similarity = json.loads((out / "expand" / "similarity.json").read_text())
    assert len(similarity["before"]) == 2 and len(similarity["after"]) == 4
    assert len(json.loads((out / "expand" / "lineage.json").read_text())) == 2

    buckets = json.loads((out / "route" / "buckets.json").read_text())
    assert sum(buckets["sizes"]) == len(buckets["records"]) == 16 and len(buckets["sizes"]) == 4
    # the default bucketing is balanced: 12 training records give 3 to each expert, 4 held-out ones 1 each ...
    assert (buckets["bucketing"], buckets["normalise"]) == ("balanced", "margin")
    assert buckets["train_sizes"] == [3, 3, 3, 3] and buckets["heldout_sizes"] == [1, 1, 1, 1]
    assert buckets["quota"] == {"train": [3, 3], "heldout": [1, 1]} and buckets["empty"] == []
    # ... where the lowest raw perplexity leaves experts without a record on these checkpoints
    assert sum(buckets["argmin_sizes"]) == 16 and min(buckets["argmin_sizes"]) == 0
    # the stored buckets are the balanced assignment of the stored NLLs (perplexity = exp(NLL))
    nll = torch.tensor([r["nll"] for r in buckets["records"]], dtype=torch.float64).T
    want, _ = assign(nll, "balanced", "margin", parts=(12, 4))
    assert [r["bucket"] for r in buckets["records"]] == want.tolist()
    assert [r["split"] for r in buckets["records"]] == ["train"] * 12 + ["heldout"] * 4
    for record in buckets["records"]:
        assert record["perplexity"] == pytest.approx([math.exp(v) for v in record["nll"]], rel=1e-4)
    accuracy = json.loads((out / "route" / "accuracy.json").read_text())
    held = [r for r in buckets["records"] if r["split"] == "heldout"]
    assert accuracy["heldout_records"] == len(held) == 4
    # recomputed from the stage's files: the held-out records' buckets and the router rows it saved (after) or
    # its seeded initial router (before), each record's router probabilities averaged over layers and tokens
    for key, router_file in (("record_accuracy", out / "route" / "router.safetensors"),
                             ("record_accuracy_before", None)):
        assert accuracy[key] == _held_out_record_accuracy(base, out, held, router_file), key
    router = load_router(out / "route" / "router.safetensors")
    assert sorted(router) == [0, 1] and router[0].shape == (4, 32)

    summary = json.loads((out / "upcycle" / "summary.json").read_text())
    assert summary["method"] == "upit" and summary["steps"] == 8
    assert summary["eval_loss"] < summary["initial_eval_loss"]  # post-training trains
    # the post-training stage starts from the pre-trained router rows
    built = build_model(
        stage_recipe(load_upit_config(QUICK, tiny_args(base, out)), "upcycle",
                     upit={"experts": str(out / "expand"), "router": str(out / "route" / "router.safetensors")}))
    blocks = dict(sparsecraft.crafted_layers(built.inner))
    torch.testing.assert_close(blocks[1].moe.router.weight.detach(), router[1])
    # the result is a normal sparsecraft model: loads, generates
    model = sparsecraft.load(summary["model_dir"])
    assert sparsecraft.is_crafted(model) and len(sparsecraft.crafted_layers(model)) == 2
    ids = torch.tensor([[5, 6, 7, 8]])
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape == (1, 7)
    overall = json.loads((out / "summary.json").read_text())
    assert set(overall) == {"prepare", "expand", "route", "upcycle"}


def test_resume_skips_finished_stages_and_refuses_without_it(lora_run, base, capsys):
    out = lora_run
    args = ["upit", str(QUICK), *tiny_args(base, out)]
    assert main(args) == 2
    assert "holds a finished prepare stage: pass --resume" in capsys.readouterr().err
    stamp = (out / "prepare" / "experts" / "experts.json").stat().st_mtime_ns
    assert main([*args, "--resume"]) == 0
    assert capsys.readouterr().out.count("skipped") == 4
    assert (out / "prepare" / "experts" / "experts.json").stat().st_mtime_ns == stamp
    # one stage alone, with its input missing
    assert main(["upit", str(QUICK), *tiny_args(base, out.parent / "other"), "--stage", "route"]) == 2
    assert "run --stage expand first" in capsys.readouterr().err


def test_interrupted_dense_stage_resumes_to_the_same_experts(lora_run, base, tmp_path):
    """A dense stage killed after its first checkpoint continues from it and yields the same experts."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(lora_run / "prepare" / "checkpoints", out / "prepare" / "checkpoints")
    shutil.rmtree(out / "prepare" / "checkpoints" / "step-000012", ignore_errors=True)  # never written
    cfg = load_upit_config(QUICK, tiny_args(base, out))
    run_pipeline(cfg, "prepare", resume=True)
    got, want = load_expert_set(out / "prepare" / "experts"), load_expert_set(lora_run / "prepare" / "experts")
    for a, b in zip(got.states, want.states):
        for key in b:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["ffn", "adapter"])
def test_other_kinds_run_every_stage(kind, base, tmp_path):
    out = tmp_path / kind
    extra = ["experts=3", "lr=2e-3", "train.precision=fp32"]  # fp32 base: compared with the fp32 checkpoint below
    if kind == "ffn":  # the experts train with the router in stage 3; post-training starts from them
        extra += ["route.freeze_experts=false", "route.lr=1e-2"]
    if kind == "adapter":  # as in PESC, attention LoRA trained in the dense stage: averaged into shared weights
        extra += ["craft.adapter_dim=4", "craft.dropout=0.0", "prepare.recipe.lora.enabled=true",
                  "prepare.recipe.lora.targets=[q_proj]"]
    results = run_pipeline(load_upit_config(QUICK, tiny_args(base, out, f"kind={kind}", *extra)))
    es = load_expert_set(out / "expand")
    keys = sorted(es.base)
    if kind == "ffn":
        assert keys[:3] == ["layers.0.down_proj.weight", "layers.0.gate_proj.weight", "layers.0.up_proj.weight"]
        dense = tf.AutoModelForCausalLM.from_pretrained(base)
        torch.testing.assert_close(es.base["layers.0.gate_proj.weight"], dense.model.layers[0].mlp.gate_proj.weight)
    else:
        assert keys == ["layers.0.down", "layers.0.up", "layers.1.down", "layers.1.up"]
        assert not es.base["layers.0.up"].any() and es.states[0]["layers.0.up"].any()
    assert len(es.states) == 3 and es.states[0][keys[0]].ne(es.states[1][keys[0]]).any()
    summary = results["upcycle"]
    assert summary["final_loss"] < summary["first_loss"]
    model = sparsecraft.load(summary["model_dir"])
    assert len(sparsecraft.crafted_layers(model)) == 2
    q = "model.layers.1.self_attn.q_proj.weight"
    if kind == "adapter":
        assert sorted(es.shared) == ["model.layers.0.self_attn.q_proj.weight", q]
        dense_q = tf.AutoModelForCausalLM.from_pretrained(base).state_dict()[q]
        assert not torch.allclose(es.shared[q], dense_q)  # the averaged attention LoRA, merged
        torch.testing.assert_close(model.state_dict()[q], es.shared[q])  # and part of the saved model
    else:
        assert es.shared == {}
        trained = load_expert_set(out / "route" / "experts")
        key = "layers.1.down_proj.weight"
        assert all(not torch.equal(a[key], b[key]) for a, b in zip(trained.states, es.states))
        recipe = json.loads((out / "upcycle" / "recipe.json").read_text())
        assert recipe["upit"]["experts"] == str((out / "route" / "experts").resolve())


@pytest.mark.parametrize("name", ["upit-quick", "upit-lora", "upit-ffn", "upit-adapter"])
def test_example_configs_are_valid(name):
    cfg = load_upit_config(REPO / "configs" / f"{name}.yaml")
    assert cfg.kind == {"upit-ffn": "ffn", "upit-adapter": "adapter"}.get(name, "lora")
    assert stage_recipe(cfg, "upcycle").craft_config().num_experts >= cfg.prepare.num_experts


def test_moe_of_identical_experts_is_that_expert(lora_run, base):
    """Function preservation: gates sum to 1, so n copies of one expert compute the dense model + that expert,
    and LoRA experts at their initial state (B = 0) compute the dense model itself."""
    es = load_expert_set(lora_run / "prepare" / "experts")
    ids = torch.randint(5, 120, (2, 9))
    dense = tf.AutoModelForCausalLM.from_pretrained(base).eval()
    want = _logits(dense, ids)

    def moe(states, n):
        model = tf.AutoModelForCausalLM.from_pretrained(base)
        one = ExpertSet("lora", states, es.base, es.shared, es.meta, [f"e{j}" for j in range(n)])
        return build_moe(model, one, CraftConfig(num_experts=n, top_k=min(2, n), dropout=0.0), seed=1).eval()

    torch.testing.assert_close(_logits(moe([es.base] * 3, 3), ids), want, rtol=0, atol=1e-5)
    single = _logits(moe([es.states[1]], 1), ids)
    assert not torch.allclose(single, want, atol=1e-3)
    torch.testing.assert_close(_logits(moe([es.states[1]] * 3, 3), ids), single, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------ existing experts


def _slices(root: Path) -> dict[str, Path]:
    """Two slices with nothing in common: sums of digits (math) and print statements of words (code)."""
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta", "lambda", "zeta", "iota"]
    files = {"math": root / "math.jsonl", "code": root / "code.jsonl"}
    with open(files["math"], "w") as f:
        for i in range(60):
            a, b = (7 * i) % 50, (3 * i) % 40
            f.write(json.dumps({"query": f"{a}+{b}=", "response": f"{a + b} {a + b} {a + b}"}) + "\n")
    with open(files["code"], "w") as f:
        for i in range(60):
            w = words[i % len(words)]
            f.write(json.dumps({"query": f"show {w}", "response": f"print('{w}'); print('{w}')"}) + "\n")
    return files


def _train_lora_expert(base: Path, data: Path, out: Path) -> Path:
    """A dense LoRA-on-FFN run on one slice (what a user's own LoRA would be)."""
    recipe = load_recipe(None, [f"model={base}", f"output_dir={out}", f"data={data}", "method=dense",
                                "quantization=none", "lora.ffn=true", "lora.targets=[]", "lora.r=4",
                                "lora.alpha=8", "lora.dropout=0.0", "max_steps=30", "batch_size=6", "lr=1e-2",
                                "optim.warmup_ratio=0", "data.template=chatml", "data.max_length=48",
                                "logging.progress=false", "logging.tensorboard=false", "checkpoint.every=0"])
    return Path(run(recipe)["model_dir"])


def test_seed_buckets_and_router_follow_expert_specialisation(base, tmp_path):
    files = _slices(tmp_path)
    experts = [_train_lora_expert(base, files[s], tmp_path / s) for s in ("math", "code")]
    # a sparsecraft dense model folder (its lora/) and a bare PEFT adapter folder are both accepted
    out = tmp_path / "run"
    sources = f"[{{path: {files['math']}, name: math}}, {{path: {files['code']}, name: code}}]"
    args = tiny_args(base, out, "experts=2", "top_k=1", f"prepare.experts_from=[{experts[0]}, {experts[1] / 'lora'}]",
                     f"data.sources={sources}",
                     "data.eval_sources=[]", "route.seed_fraction=0.5", "route.heldout_fraction=0.3",
                     "route.epochs=6", "route.lr=5e-2", "route.min_share=0.5")
    cfg = load_upit_config(QUICK, args)
    for stage in ("prepare", "expand", "route"):
        results = run_pipeline(cfg, stage)
    es = load_expert_set(out / "expand")
    assert es.names == ["math", "code"] and es.meta["source"] == "peft-adapters"
    assert not any(v.any() for v in es.base.values())  # no common initial state: deltas from zero

    buckets = json.loads((out / "route" / "buckets.json").read_text())
    by_source = buckets["by_source"]
    # the slices are of unequal size (31 and 29 records): min_share 0.5 lets each keep its expert whole
    assert (buckets["bucketing"], buckets["normalise"], buckets["min_share"]) == ("balanced", "margin", 0.5)
    # each slice's records go to the expert trained on it
    assert by_source["math"][0] >= 0.9 * sum(by_source["math"]) and sum(by_source["math"]) >= 15
    assert by_source["code"][1] >= 0.9 * sum(by_source["code"]) and sum(by_source["code"]) >= 15
    assert buckets["argmin_sizes"] == buckets["sizes"]  # truly specialised experts: the lowest perplexity agrees
    # exactly balanced (min_share 1) on the same perplexities, each part apart: an expert takes its own slice's
    # records first, as many as its quota allows
    records = buckets["records"]
    n_train = sum(r["split"] == "train" for r in records)
    nll = torch.tensor([r["nll"] for r in records], dtype=torch.float64).T
    exact, _ = assign(nll, "balanced", "margin", parts=(n_train, len(records) - n_train))
    for part in (slice(0, n_train), slice(n_train, None)):
        got, slices = exact[part].tolist(), [r["source"] for r in records[part]]
        assert max(got.count(0), got.count(1)) - min(got.count(0), got.count(1)) <= 1
        for expert, name in enumerate(("math", "code")):
            own = sum(b == expert and s == name for b, s in zip(got, slices))
            assert own == min(slices.count(name), got.count(expert))
    accuracy = results["route"]
    assert accuracy["heldout_records"] >= 15
    # after pre-training the router sends the held-out records' tokens to their bucket's expert (chance: 0.5)
    assert accuracy["record_accuracy"] >= 0.9 and accuracy["token_accuracy"] >= 0.8
    assert accuracy["token_accuracy"] > accuracy["token_accuracy_before"] + 0.2
    # the stored rows route a new math / code answer's tokens to the math / code expert in every layer
    from sparsecraft.data import CHATML_TEMPLATE, encode_conversation

    router = load_router(out / "route" / "router.safetensors")
    model = build_moe(tf.AutoModelForCausalLM.from_pretrained(base), es, CraftConfig(num_experts=2, top_k=1),
                      router=router).eval()
    hits = []
    for expert, (query, answer) in enumerate((("13+29=", "42 42 42"), ("show sigma", "print('sigma')"))):
        messages = [{"role": "user", "content": query}, {"role": "assistant", "content": answer}]
        ids, labels = encode_conversation(tiny_tokenizer(), messages, CHATML_TEMPLATE)
        with torch.no_grad():
            out_ = model(torch.tensor([ids]), output_router_logits=True)
        answer = torch.tensor(labels) != -100
        logits = torch.stack(out_.router_logits)[:, answer]  # [layers, answer tokens, 2]
        assert logits.softmax(-1).mean((0, 1)).argmax() == expert  # the record-level choice
        hits.append(float((logits.argmax(-1) == expert).float().mean()))
    assert sum(hits) / 2 >= 0.75  # (layer, token) choices: chance is 0.5 (spaces are shared by both slices)


def test_full_checkpoints_as_ffn_experts(base, tmp_path):
    """Full checkpoints of the same base: their FFNs become experts, the rest is averaged into `shared`."""
    paths = []
    for j in range(2):
        model = tf.AutoModelForCausalLM.from_pretrained(base)
        with torch.no_grad():
            model.model.layers[1].mlp.up_proj.weight.add_(0.1 * (j + 1))
            model.model.layers[0].self_attn.q_proj.weight.add_(1.0 * j)
        model.save_pretrained(tmp_path / f"ckpt{j}")
        paths.append(tmp_path / f"ckpt{j}")
    es = experts_from_paths(paths, str(base), "ffn")
    dense = tf.AutoModelForCausalLM.from_pretrained(base)
    up = dense.model.layers[1].mlp.up_proj.weight.detach()
    torch.testing.assert_close(es.states[1]["layers.1.up_proj.weight"], up + 0.2)
    torch.testing.assert_close(es.base["layers.1.up_proj.weight"], up)
    q = "model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(es.shared[q], dense.model.layers[0].self_attn.q_proj.weight.detach() + 0.5)
    assert list(es.shared) == [q]  # the only non-FFN weight that differs from the base
    assert experts_from_paths(paths, str(base), "ffn", shared="base").shared == {}
    with pytest.raises(ConfigError, match="not a PEFT LoRA adapter folder"):
        experts_from_paths(paths, str(base), "lora")
    # an MoE of the two: both experts chosen with equal gates would average them; top-1 routes to one
    model = build_moe(tf.AutoModelForCausalLM.from_pretrained(base), es, CraftConfig(num_experts=2, top_k=1))
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, es.shared[q])


@pytest.mark.parametrize("pattern", [None, {"up_proj": 32}, {"model.layers.0.mlp.up_proj": 32},
                                     {r"^model.layers.1.mlp.down_proj": 32}])
def test_peft_adapters_as_experts_keep_each_modules_scaling(base, tmp_path, pattern):
    """One PEFT adapter as the only expert gives the adapter merged by PEFT itself, with `alpha_pattern` keys
    matched as PEFT matches them (a module's last name, its full name, or a regular expression)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    tuned = get_peft_model(tf.AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["gate_proj", "up_proj", "down_proj",
                                                                         "q_proj"], alpha_pattern=pattern or {}))
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    tuned.save_pretrained(tmp_path / "adapter")
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    want = _logits(tuned.merge_and_unload(), ids)
    es = experts_from_paths([tmp_path / "adapter"], str(base), "lora", "average")
    moe = build_moe(tf.AutoModelForCausalLM.from_pretrained(base), es, CraftConfig(num_experts=1, top_k=1))
    torch.testing.assert_close(_logits(moe.eval(), ids), want, rtol=1e-4, atol=1e-4)

"""A resumed run is the uninterrupted run: state moved by rule (the selection biases of auxiliary-loss-free
balancing) is checkpointed too; a length change that re-lays the learning-rate schedule is refused unless applied;
`train.epochs` trains at least that many epochs whatever `grad_accum` is; the logged lr is the step's own."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import tiny_run_files
from test_run_guards import QUICKSTART, weights
from test_run_guards import args_for as guard_args

from sparsecraft.errors import ConfigError
from sparsecraft.train.batches import BatchPlan
from sparsecraft.train.loop import run
from sparsecraft.train.recipe import load_recipe


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tiny_run_files(tmp_path_factory.mktemp("resume"))


def args_for(workdir, out, *extra):
    return guard_args(workdir, out, "logging.tensorboard=false", "checkpoint.keep=5", "craft.dispatch=rule", *extra)


def resumed_from_step_2(workdir, tmp_path, *extra) -> tuple[dict, dict]:
    """(uninterrupted weights, weights of a run killed after its step-2 checkpoint and resumed)."""
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    run(load_recipe(QUICKSTART, args_for(workdir, full, *extra)))
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step-000002", resumed / "checkpoints" / "step-000002")
    run(load_recipe(QUICKSTART, args_for(workdir, resumed, *extra)), resume=True)
    return weights(full), weights(resumed)


def test_resume_restores_the_selection_biases_of_loss_free_balancing(workdir, tmp_path):
    a, b = resumed_from_step_2(workdir, tmp_path, "craft.bias_balance=true", "craft.bias_update_rate=0.05",
                               "grad_accum=2")
    biases = [k for k in a if k.endswith("router_bias")]
    assert biases and any(float(a[k].abs().max()) > 0 for k in biases)  # they moved during the run
    assert a.keys() == b.keys()
    assert all(bool((a[k] == b[k]).all()) for k in a), [k for k in a if not bool((a[k] == b[k]).all())][:3]


def test_a_longer_run_on_resume_needs_apply_changes_when_the_schedule_depends_on_length(workdir, tmp_path):
    out = tmp_path / "cosine"
    cosine = ("optim.schedule=cosine", "optim.warmup_ratio=0.25")
    run(load_recipe(QUICKSTART, args_for(workdir, out, *cosine)))
    with pytest.raises(ConfigError, match=r"recipe changed since the checkpoint \(train.max_steps\)"):
        run(load_recipe(QUICKSTART, args_for(workdir, out, *cosine, "max_steps=8")), resume=True)
    with pytest.raises(ConfigError, match="max_steps 2 .* step 2"):
        run(load_recipe(QUICKSTART, args_for(workdir, out, *cosine, "max_steps=2")), resume=True,
            apply_changes=True)
    summary = run(load_recipe(QUICKSTART, args_for(workdir, out, *cosine, "max_steps=8")), resume=True,
                  apply_changes=True)
    assert summary["steps"] == 8


def test_logged_lr_is_the_one_each_step_used(workdir, tmp_path):
    out = tmp_path / "linear"
    # linear with one warmup step of four: lr 0 at step 1 (warmup from zero), then the full lr decaying
    run(load_recipe(QUICKSTART, args_for(workdir, out, "optim.schedule=linear", "optim.warmup_ratio=0.25",
                                         "lr=1e-3", "checkpoint.every=0")))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in records if "lr" in r]
    assert lrs == pytest.approx([0.0, 1e-3, 2e-3 / 3, 1e-3 / 3])


@pytest.mark.parametrize("samples,batch,accum,epochs", [(20, 4, 2, 3), (12, 4, 4, 3), (48, 4, 2, 1), (40, 4, 3, 2)])
def test_epochs_are_at_least_what_was_asked(samples, batch, accum, epochs):
    plan = BatchPlan(samples, batch, grad_accum=accum)
    steps = plan.total_steps(epochs)
    assert plan.epoch_of(steps) >= epochs and plan.epoch_of(steps - 1) < epochs


@pytest.mark.parametrize("method", ["pesc", "dense", "upcycle"])
def test_a_model_trained_over_nf4_reloads_as_it_was_trained_when_asked(workdir, tmp_path, monkeypatch, method):
    import torch

    import sparsecraft
    import sparsecraft.train.artifacts as artifacts

    x = torch.randint(5, 100, (2, 12))
    seen = {}
    save = artifacts.save_trained

    def spy(built, out_dir, recipe, summary=None, full_state=None):  # the trained model, as the run evaluated it
        built.model.eval()
        with torch.no_grad():
            seen["logits"] = built.model(input_ids=x).logits.float()
        return save(built, out_dir, recipe, summary, full_state)

    monkeypatch.setattr(artifacts, "save_trained", spy)
    out = tmp_path / method
    summary = run(load_recipe(None, args_for(workdir, out, f"method={method}", "quantization=nf4",
                                             "train.precision=fp32", "max_steps=3", "lr=5e-3", "checkpoint.every=0")))
    with torch.no_grad():
        reloaded = sparsecraft.load(summary["model_dir"], as_trained=True)(input_ids=x).logits.float()
        full_precision = sparsecraft.load(summary["model_dir"])(input_ids=x).logits.float()  # the default
    assert float((reloaded - seen["logits"]).abs().max()) < 1e-4
    assert float((full_precision - seen["logits"]).abs().max()) > 1e-3  # the NF4 rounding this undoes is real

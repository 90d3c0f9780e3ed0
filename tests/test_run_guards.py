"""Nothing lost, nothing faked (issue 15): a diverged run is an error and saves nothing; one writer per output
directory; a resumed run is the same run (or changes only what `--apply-changes` applies for real); a finished
run is never silently replaced; context, output paths and half-deleted checkpoints; and, as a standing guard,
real training processes killed at seeded random moments of their checkpoint writes resume to identical weights."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_run_files
from safetensors.torch import load_file

from sparsecraft.cli import main
from sparsecraft.errors import ConfigError
from sparsecraft.train.checkpoints import list_checkpoints, save_checkpoint
from sparsecraft.train.guards import DivergenceGuard
from sparsecraft.train.loop import run
from sparsecraft.train.recipe import load_recipe

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "configs" / "quickstart.yaml"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tiny_run_files(tmp_path_factory.mktemp("guards"))


def args_for(workdir, out, *extra):
    return [f"model={workdir / 'base'}", f"output_dir={out}", f"data={workdir / 'data.jsonl'}", "quantization=none",
            "max_steps=4", "batch_size=4", "lora.r=4", "craft.num_experts=4", "craft.adapter_dim=8",
            "craft.dropout=0.0", "lora.dropout=0.0", "data.max_length=32", "optim.warmup_ratio=0",
            "logging.progress=false", "checkpoint.every=2", *extra]


def weights(out: Path) -> dict:
    tensors = load_file(str(out / "model" / "sparsecraft.safetensors"))
    tensors.update(load_file(str(out / "model" / "lora" / "adapter_model.safetensors")))
    return tensors


def cli(*args, env=None, **kw):
    return subprocess.Popen([sys.executable, "-m", "sparsecraft", *map(str, args)], cwd=REPO,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}, **kw)


def test_a_diverging_run_is_an_error_and_saves_nothing(workdir, tmp_path, capsys):
    out = tmp_path / "diverged"
    assert main(["train", str(QUICKSTART), *args_for(workdir, out, "lr=1e30", "max_steps=8")]) == 2
    err = capsys.readouterr().err
    assert "training diverged" in err and "nothing was saved" in err.lower()
    assert not (out / "model").exists() and not (out / "summary.json").exists()


def test_divergence_guard_skips_and_counts_then_stops():
    guard = DivergenceGuard(limit=3)
    assert guard.step_is_finite(1.0, 0.5, 1)
    assert not guard.step_is_finite(float("nan"), 0.5, 2) and not guard.step_is_finite(1.0, float("inf"), 3)
    assert guard.step_is_finite(1.0, 0.5, 4) and guard.skipped == 2 and guard.in_a_row == 0  # a good step resets
    guard.step_is_finite(float("nan"), None, 5)
    guard.step_is_finite(float("nan"), None, 6)
    with pytest.raises(ConfigError, match="3 steps in a row .the last at step 7"):
        guard.step_is_finite(float("inf"), None, 7)


def test_one_writer_per_output_dir(workdir, tmp_path):
    out = tmp_path / "shared"
    proc = cli("train", QUICKSTART, *args_for(workdir, out, "max_steps=6"), env={"SPARSECRAFT_TEST_SAVE_DELAY": "8"},
               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (out / "checkpoints").is_dir() and time.time() < deadline:
            time.sleep(0.1)
        with pytest.raises(ConfigError, match=rf"in use by another training run \(PID {proc.pid}\)"):
            run(load_recipe(QUICKSTART, args_for(workdir, out)), resume=True)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert (out / ".lock").read_text() == str(proc.pid)  # killed: its lock is left behind, and is stale
    summary = run(load_recipe(QUICKSTART, args_for(workdir, out, "max_steps=6")), resume=True)
    assert summary["steps"] == 6 and not (out / ".lock").exists()


def test_resume_refuses_a_changed_recipe_unless_the_change_is_applied(workdir, tmp_path, capsys):
    out = tmp_path / "resumed"
    run(load_recipe(QUICKSTART, args_for(workdir, out)))  # checkpoint at step 2
    with pytest.raises(ConfigError, match=r"recipe changed since the checkpoint \(optim.lr\)"):
        run(load_recipe(QUICKSTART, args_for(workdir, out, "lr=1e-3")), resume=True)
    with pytest.raises(ConfigError, match="train.batch_size cannot change on resume"):
        run(load_recipe(QUICKSTART, args_for(workdir, out, "batch_size=2")), resume=True, apply_changes=True)
    with pytest.raises(ConfigError, match="craft.*cannot change on resume"):
        run(load_recipe(QUICKSTART, args_for(workdir, out, "craft.num_experts=8")), resume=True, apply_changes=True)
    # max_steps may change freely; the lr change applies for real from the resumed step (constant schedule)
    assert main(["train", str(QUICKSTART), *args_for(workdir, out, "lr=1e-3", "max_steps=5"), "--resume",
                 "--apply-changes"]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in records if r.get("step", 0) >= 3 and "lr" in r] == [1e-3, 1e-3, 1e-3]
    assert "resumed with changed optim.lr" in capsys.readouterr().out


def test_a_finished_run_is_not_replaced_or_mixed_silently(workdir, tmp_path):
    out = tmp_path / "finished"
    args = [a for a in args_for(workdir, out) if not a.startswith("checkpoint.every")] + ["checkpoint.every=0"]
    run(load_recipe(QUICKSTART, args))
    with pytest.raises(ConfigError, match="already holds a run .*--overwrite"):
        run(load_recipe(QUICKSTART, args))
    run(load_recipe(QUICKSTART, args), overwrite=True)
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines if "loss" in json.loads(line)] == [1, 2, 3, 4]


def test_bounds_and_paths_before_work(workdir, tmp_path, capsys):
    out = tmp_path / "capped"
    assert main(["train", str(QUICKSTART), *args_for(workdir, out, "data.max_length=4096", "max_steps=1")]) == 0
    assert "data.max_length 4096 capped to the model's context of 128" in capsys.readouterr().out
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    assert main(["train", str(QUICKSTART), *args_for(workdir, a_file)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {a_file} is a file; the output must be a directory"]


def test_an_interrupted_deletion_never_leaves_a_checkpoint_that_looks_complete(tmp_path):
    param = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([param])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    for step in (1, 2):
        save_checkpoint(tmp_path, step, {"w": param}, optimizer, scheduler, {}, keep=2)
    # as a kill during the old rename-free deletion would have left step 1: renamed, half emptied
    half = tmp_path / "checkpoints" / ".step-000001.deleting"
    os.replace(tmp_path / "checkpoints" / "step-000001", half)
    (half / "trainable.safetensors").unlink()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000002"]
    save_checkpoint(tmp_path, 3, {"w": param}, optimizer, scheduler, {}, keep=1)
    assert not half.exists() and [p.name for p in list_checkpoints(tmp_path)] == ["step-000003"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000003"]


def test_random_kills_during_checkpoint_writes_resume_to_identical_weights(workdir, tmp_path):
    """Standing guard: a real training process is killed at seeded random moments while it writes checkpoints
    (a handful of kills, bounded time); every resume continues from a complete checkpoint and the run ends with
    the weights of one that was never interrupted."""
    # every process would otherwise time its own dispatch choices, and under load pick other winners
    common = args_for(workdir, tmp_path / "clean", "max_steps=8", "checkpoint.keep=2", "craft.dropout=0.1",
                      "craft.dispatch=rule")
    run(load_recipe(QUICKSTART, common))
    expected = weights(tmp_path / "clean")
    out = tmp_path / "killed"
    args = [a if not a.startswith("output_dir=") else f"output_dir={out}" for a in common]
    rng = random.Random(1234)
    kills = 0
    deadline = time.time() + 240
    while kills < 3 and time.time() < deadline:
        proc = cli("train", QUICKSTART, *args, "--resume", env={"SPARSECRAFT_TEST_SAVE_DELAY": "2"},
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # wait until a save is under way (its temp folder exists), then kill at a random moment inside it
        while proc.poll() is None and not list((out / "checkpoints").glob(".step-*.tmp-*")):
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 2.5))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
        for ckpt in list_checkpoints(out):  # every visible checkpoint is complete and readable
            load_file(str(ckpt / "trainable.safetensors"))
    assert kills >= 2
    if not (out / "model").exists():
        run(load_recipe(QUICKSTART, args), resume=True)
    got = weights(out)
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=1e-6, msg=name)

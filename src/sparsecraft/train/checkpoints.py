"""Training checkpoints that survive being killed mid-write, and resume from the last complete one.

A checkpoint is `OUTPUT/checkpoints/step-000050/` holding the trainable weights (safetensors) and optimizer state
(under FSDP or DeepSpeed instead every rank's shard of both, in the engine's format: engine_checkpoint.py), scheduler
state, every rank's RNG state and measured dispatch choices (`dispatch_RANK.json`), and `state.json`
(step, tokens seen, and for a streamed train split the stream's position under `data_stream`). It is written
into `.step-000050.tmp` and renamed into place only when every file is on disk, so a directory named `step-*` is
always complete; a kill during the write leaves only the `.tmp` folder, which the next save removes.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..errors import CheckpointError
from ..moe.probe import PROBE
from .engine_checkpoint import engine_of, read_sharded_trainable

STATE_NAME = "state.json"
BY_RULE_NAME = "by_rule.safetensors"  # state a step changes outside the optimizer (balancing biases)
STREAM_KEY = "data_stream"  # state.json: where a streamed train split stood after the checkpoint's step
_PREFIX = "step-"
# Test hook: seconds to sleep after writing and before the rename, so a test can kill a real process mid-save.
_DELAY_ENV = "SPARSECRAFT_TEST_SAVE_DELAY"


def run_token(world_size: int) -> str:
    """A name every rank of one run shares and another run does not: rank 0's launcher PID for several processes
    (torchrun / accelerate launch start them all; sent to every rank, whose node may have other PIDs), the
    process's own PID for one."""
    if world_size == 1:
        return str(os.getpid())
    token = [str(os.getppid())]
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.broadcast_object_list(token, src=0)
    return token[0]


def saved_recipe(checkpoint: Path | None, output_dir: str | os.PathLike) -> dict | None:
    """The recipe a checkpoint was written with (older checkpoints: the run's recipe.json, if any)."""
    if checkpoint is not None:
        state = json.loads((checkpoint / STATE_NAME).read_text())
        if "recipe" in state:
            return state["recipe"]
    path = Path(output_dir) / "recipe.json"
    return json.loads(path.read_text()) if path.is_file() else None


def checkpoint_root(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(_PREFIX) and (p / STATE_NAME).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(_PREFIX):]))


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def rng_state() -> dict:
    """Every RNG a step consumes (dropout, sampling), as JSON-able lists: no pickle in checkpoints."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def save_checkpoint(
    output_dir: str | os.PathLike,
    step: int,
    trainable: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scheduler,
    state: dict,
    *,
    rank: int = 0,
    world_size: int = 1,
    barrier=lambda: None,
    keep: int = 2,
    engine_save: Callable[[Path], object] | None = None,
    by_rule: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write checkpoint `step` atomically. Every rank calls it (each saves its RNG); rank 0 writes the rest.

    Args:
        trainable: name -> tensor of every trainable parameter (unwrapped names).
        by_rule: name -> tensor of state the optimizer does not own but a step changes (the selection biases of
            auxiliary-loss-free balancing), the same on every rank; written by rank 0 beside the weights.
        state: JSON-serialisable progress (step, tokens seen, ...).
        barrier: synchronises ranks (accelerator.wait_for_everyone) between the phases.
        engine_save: for a sharded run, called by every rank with the checkpoint's folder to write its shard of
            the weights and optimizer state (then `trainable` and `optimizer` are not written by rank 0).
    """
    root = checkpoint_root(output_dir)
    final = root / f"{_PREFIX}{step:06d}"
    tmp = root / f".{final.name}.tmp-{run_token(world_size)}"  # this run's own name: never another writer's
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in [*root.glob(".*.tmp-*"), *root.glob(".*.tmp"), *root.glob(".*.deleting")]:
            shutil.rmtree(stale, ignore_errors=True)  # left by a kill: an unfinished save or deletion
        tmp.mkdir()
    barrier()
    (tmp / f"rng_{rank}.json").write_text(json.dumps(rng_state()))
    # this rank's measured dispatch choices: a resumed run computes each shape the same way (moe/probe.py)
    (tmp / f"dispatch_{rank}.json").write_text(json.dumps(PROBE.export()))
    if engine_save is not None:
        engine_save(tmp)
    if rank == 0:
        if engine_save is None:
            save_file({k: v.detach().cpu().contiguous() for k, v in trainable.items()},
                      str(tmp / "trainable.safetensors"))
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        if by_rule:
            save_file({k: v.detach().cpu().contiguous() for k, v in by_rule.items()}, str(tmp / BY_RULE_NAME))
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        (tmp / STATE_NAME).write_text(json.dumps({**state, "step": step, "world_size": world_size}, indent=2))
    barrier()
    if rank == 0:
        for path in tmp.rglob("*"):  # an engine's shards sit in sub-folders
            if path.is_file():
                with open(path, "rb") as f:
                    os.fsync(f.fileno())
        delay = float(os.environ.get(_DELAY_ENV, "0") or 0)
        if delay:
            time.sleep(delay)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(output_dir)[:-keep]:
            # renamed first: a kill during the deletion leaves a hidden `.deleting` folder the next save
            # removes, never a half-deleted `step-N/` that looks complete
            doomed = old.with_name(f".{old.name}.deleting")
            os.replace(old, doomed)
            shutil.rmtree(doomed, ignore_errors=True)
    barrier()
    return final


def load_checkpoint(
    path: Path,
    trainable: dict[str, torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    scheduler,
    *,
    rank: int = 0,
    world_size: int = 1,
    engine: str | None = None,
    engine_load: Callable[[Path], object] | None = None,
    by_rule: dict[str, torch.Tensor] | None = None,
) -> dict:
    """Restore weights, optimizer, scheduler and this rank's RNG from a checkpoint; returns its state dict.
    `engine` / `engine_load`: for a sharded run, its engine (`fsdp`, `deepspeed`) and the call (every rank) that
    loads this rank's shard of the weights and optimizer state. `by_rule`: tensors written as `save_checkpoint`'s
    `by_rule`, restored in place (a checkpoint from before they were saved has none: they keep their values)."""
    state = json.loads((path / STATE_NAME).read_text())
    if state.get("world_size", 1) != world_size:
        raise CheckpointError(
            f"{path} was written by {state.get('world_size')} processes; resume with the same number ({world_size})"
        )
    written_by = engine_of(path)
    if written_by != engine:
        raise CheckpointError(f"{path} was written by a run under {written_by or 'DDP / one process'}; resume it "
                              f"under the same engine (this run: {engine or 'DDP / one process'})")
    if engine_load is not None:
        engine_load(path)
    else:
        tensors = load_file(str(path / "trainable.safetensors"))
        if set(tensors) != set(trainable):
            missing = sorted(set(trainable) - set(tensors))
            raise CheckpointError(f"{path} does not match this recipe's trainable parameters (e.g. {missing[:1]})")
        with torch.no_grad():
            for name, param in trainable.items():
                param.copy_(tensors[name].to(param.device, param.dtype))
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    if by_rule and (path / BY_RULE_NAME).is_file():
        saved = load_file(str(path / BY_RULE_NAME))
        if set(saved) != set(by_rule):
            raise CheckpointError(f"{path}: its balancing biases do not match this model's ({len(saved)} saved, "
                                  f"{len(by_rule)} here)")
        with torch.no_grad():
            for name, tensor in by_rule.items():
                tensor.copy_(saved[name].to(tensor.device, tensor.dtype))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    set_rng_state(json.loads((path / f"rng_{rank}.json").read_text()))
    choices = path / f"dispatch_{rank}.json"
    if choices.is_file():  # checkpoints from before measured dispatch have none
        PROBE.restore(json.loads(choices.read_text()))
    return state


def read_trainable(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's whole trainable tensors, in one process, whichever way it was written (one process / DDP,
    FSDP, DeepSpeed): name -> CPU tensor."""
    if engine_of(path) is not None:
        return read_sharded_trainable(path)
    return load_file(str(path / "trainable.safetensors"))


def stream_position(state: dict, path: Path, streamed: bool) -> dict | None:
    """The data stream's position saved in checkpoint `path` (None for a run over a fixed dataset); one line when
    the checkpoint and the recipe disagree about streaming, whose positions cannot stand in for each other."""
    if streamed and STREAM_KEY not in state:
        raise CheckpointError(f"{path} was written by a run without data streaming; resume it with the same data "
                              "settings (or start a new output_dir)")
    if not streamed and STREAM_KEY in state:
        raise CheckpointError(f"{path} was written by a run with data streaming; resume it with streaming on")
    return state.get(STREAM_KEY)

"""The sharded part of a resumable checkpoint, for runs under FSDP (1 or 2) or DeepSpeed ZeRO-2/3.

A sharded run cannot write `trainable.safetensors` + `optimizer.pt` from rank 0: no rank holds the whole tensors
or the whole optimizer state. Instead every rank writes its own shard, with the engine's own format:

- FSDP (accelerate's FSDP1, or FSDP2 `fully_shard`): `step-N/sharded/`, torch.distributed.checkpoint (DCP) files of
  the trainable weights and optimizer state under the names a single-process model uses
  (`get_state_dict(..., ignore_frozen_params=True)`: the frozen base is never written);
- DeepSpeed: `step-N/deepspeed/engine/`, `DeepSpeedEngine.save_checkpoint` without the frozen parameters.

`read_sharded_trainable` reads either back whole in one process with no process group (UpIT's expert readout,
inspection); DCP also reshards on load, so the FSDP files load into an unsharded model too.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

ENGINE_DIRS = {"fsdp": "sharded", "deepspeed": "deepspeed"}
_DS_TAG = "engine"  # DeepSpeed writes into <dir>/<tag>/
_MODEL, _OPTIM = "model", "optim"


def _inner_optimizer(optimizer):
    """accelerate hands back an AcceleratedOptimizer; DCP needs the torch optimizer inside it."""
    return optimizer.optimizer if not isinstance(optimizer, torch.optim.Optimizer) else optimizer


def _dcp_options(strict: bool = True):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # not strict on load: the frozen base is not in the files (DCP itself refuses a missing trainable tensor)
    return StateDictOptions(ignore_frozen_params=True, strict=strict)


def save_engine_state(engine: str, model: nn.Module, optimizer, directory: Path) -> Path:
    """Write this rank's shard of the trainable weights and optimizer state under `directory` (every rank calls
    it, into the same folder). `engine`: `fsdp` or `deepspeed`; `model` is the engine-wrapped model. Returns the
    engine's folder."""
    target = Path(directory) / ENGINE_DIRS[engine]
    if engine == "deepspeed":
        model.save_checkpoint(str(target), tag=_DS_TAG, save_latest=False, exclude_frozen_parameters=True)
        return target
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    weights, optim = get_state_dict(model, _inner_optimizer(optimizer), options=_dcp_options())
    dcp.save({_MODEL: weights, _OPTIM: optim}, checkpoint_id=target)
    return target


def load_engine_state(engine: str, model: nn.Module, optimizer, directory: Path) -> None:
    """Restore what `save_engine_state` wrote into the (wrapped) model and optimizer; every rank calls it
    (`checkpoints.load_checkpoint` has checked that `engine` wrote `directory`)."""
    source = Path(directory) / ENGINE_DIRS[engine]
    if engine == "deepspeed":
        model.load_checkpoint(str(source), tag=_DS_TAG, load_module_strict=False, load_optimizer_states=True,
                              load_lr_scheduler_states=False)
        return
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    inner = _inner_optimizer(optimizer)
    weights, optim = get_state_dict(model, inner, options=_dcp_options())
    state = {_MODEL: weights, _OPTIM: optim}
    dcp.load(state, checkpoint_id=source)
    set_state_dict(model, inner, model_state_dict=state[_MODEL], optim_state_dict=state[_OPTIM],
                   options=_dcp_options(strict=False))


def engine_of(directory: Path) -> str | None:
    """Which engine wrote a checkpoint folder (None: a single-process / DDP checkpoint)."""
    for engine, name in ENGINE_DIRS.items():
        if (Path(directory) / name).is_dir():
            return engine
    return None


def read_sharded_trainable(directory: Path) -> dict[str, torch.Tensor]:
    """The whole trainable tensors of a sharded checkpoint, in this process alone (no process group): name (as
    a single-process model names it) -> CPU tensor."""
    engine = engine_of(directory)
    if engine == "deepspeed":
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(Path(directory) / ENGINE_DIRS[engine]), tag=_DS_TAG,
                                                         exclude_frozen_parameters=True)
        return {k: v.detach().cpu() for k, v in state.items()}
    if engine != "fsdp":
        raise ValueError(f"{directory} holds no sharded engine state")
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    source = Path(directory) / ENGINE_DIRS[engine]
    metadata = dcp.FileSystemReader(str(source)).read_metadata()
    prefix = f"{_MODEL}."
    weights = {key[len(prefix):]: torch.empty(meta.size, dtype=meta.properties.dtype)
               for key, meta in metadata.state_dict_metadata.items()
               if key.startswith(prefix) and isinstance(meta, TensorStorageMetadata)}
    state = {_MODEL: weights}
    dcp.load(state, checkpoint_id=source, no_dist=True)
    return state[_MODEL]

"""Sharded training on the engines users already run: FSDP (FSDP2 `fully_shard`, FSDP1 through accelerate) and
DeepSpeed ZeRO-2/3. What sparsecraft adds is only what they cannot know about its MoE blocks:

- **Wrap units.** Each MoE block (router + stacked experts) is its own unit, inside its decoder layer's unit:
  FSDP2 shards every parameter along dim 0, so the stacked experts `[E, r, h]` / `[E, h, r]` are split along the
  expert dimension. PEFT's FSDP1 auto-wrap policy only sees modules with a `.weight` (LoRA layers) and misses the
  experts; `fsdp1_wrap_policy` wraps decoder layers, MoE blocks and LoRA layers.
- **ZeRO-3 gathering.** ZeRO-3 gathers a module's parameters when that module's forward runs; a MoE block reads
  its router weight and stacked experts directly, so they are registered as its external parameters.
- **Gathering for saving.** `full_trainable_state` collects the whole (unsharded) trainable tensors on every rank,
  so a sharded run saves the same files a single process does and any single process reloads them.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..moe.experts import path_by_shape
from ..moe.layers import RoutedBlock
from ..surgery import craft_config_of, find_decoder_layers, is_added_name, is_crafted, set_dispatch


def one_dispatch_path(model: nn.Module, tokens_per_batch: int) -> str | None:
    """Under several processes: fix the crafted layers' adapter dispatch to one named path, the same on every rank.

    DeepSpeed ZeRO-1/2 copy gradients into their buckets in the order the backward produces them and reduce the
    buckets by position, so every rank must run the same backward graph. The timed probe (`dispatch: auto`) can
    pick different paths on different ranks (their timings differ; a busy node makes it likely), and the shape
    rule can too when ranks see different token counts: either silently adds one parameter's gradient to
    another's. The rule's pick for a full micro-batch of `tokens_per_batch` tokens depends on the recipe alone,
    so it is the same everywhere. Returns the path set, or None (no crafted layers, or a path already named).
    """
    if not is_crafted(model):
        return None
    cfg = craft_config_of(model)
    # at least E tokens: the rule's `gathered` (decoding a token or two) is never a training path
    path = path_by_shape(cfg.dispatch, max(tokens_per_batch, cfg.num_experts), cfg.num_experts, cfg.top_k,
                         cfg.adapter_dim)
    if path == cfg.dispatch:
        return None
    set_dispatch(model, path)
    return path


def decoder_layer_class(model: nn.Module) -> type:
    """The class of the model's decoder layers (what every engine wraps as one unit)."""
    _, layers = find_decoder_layers(model)
    return type(layers[0])


def shard_model(model: nn.Module, mesh=None, *, reshard_after_forward: bool = True) -> nn.Module:
    """FSDP2: `fully_shard` each MoE block, each decoder layer, then the whole model (in place; returns it).
    `mesh`: a 1-D device mesh (default: all ranks of the default process group)."""
    from torch.distributed.fsdp import fully_shard

    kwargs = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
    for module in model.modules():
        if isinstance(module, RoutedBlock):
            fully_shard(module, **kwargs)
    _, layers = find_decoder_layers(model)
    for layer in layers:
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    return model


def fsdp1_wrap_policy(model: nn.Module):
    """An FSDP1 `auto_wrap_policy` (for accelerate's FSDP plugin): decoder layers, MoE blocks and peft LoRA
    layers each in their own unit, so trainable and frozen parameters never share a flat parameter."""
    from functools import partial

    from torch.distributed.fsdp.wrap import lambda_auto_wrap_policy

    layer_cls = decoder_layer_class(model)

    def wrap(module: nn.Module) -> bool:
        if isinstance(module, (layer_cls, RoutedBlock)):
            return True
        weight = getattr(module, "weight", None)  # a trainable leaf: peft's LoRA A / B Linears
        return next(module.children(), None) is None and isinstance(weight, nn.Parameter) and weight.requires_grad

    return partial(lambda_auto_wrap_policy, lambda_fn=wrap)


def register_zero3_externals(model: nn.Module) -> int:
    """Register each MoE block's own parameters (router weight, stacked experts) as external parameters of the
    block, so DeepSpeed ZeRO-3 gathers them when the block runs. Returns how many were registered."""
    import deepspeed  # `deepspeed.zero` is an attribute alias, not an importable module path

    count = 0
    for module in model.modules():
        if isinstance(module, RoutedBlock):
            for param in module.parameters():
                deepspeed.zero.register_external_parameter(module, param)
                count += 1
    return count


def deepspeed_config(*, stage: int, micro_batch: int, grad_accum: int, world_size: int, max_grad_norm: float,
                     bf16: bool) -> dict:
    """A DeepSpeed config for ZeRO `stage` (2 or 3) matching a recipe's batch and clipping; the optimizer is the
    training loop's own (a client optimizer), so its settings stay the recipe's."""
    if stage not in (2, 3):
        raise ValueError(f"ZeRO stage must be 2 or 3, got {stage}")
    zero = {"stage": stage, "overlap_comm": False, "contiguous_gradients": True}
    if stage == 3:
        zero.update(stage3_gather_16bit_weights_on_model_save=True)
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch * grad_accum * world_size,
        "gradient_clipping": max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,
    }


def prepare_for_engine(accelerator, model: nn.Module) -> str | None:
    """Before `accelerator.prepare` under FSDP or DeepSpeed: sparsecraft's wrap policy for FSDP, external
    parameters for ZeRO-3. Returns the engine's name (`fsdp`, `deepspeed`), or None for DDP / one process.
    (accelerate refuses these engines on a CPU: this path runs on GPU nodes; docs/scale.md.)"""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind == DistributedType.FSDP:
        plugin = accelerator.state.fsdp_plugin
        plugin.auto_wrap_policy = fsdp1_wrap_policy(model)
        plugin.use_orig_params = True  # frozen base weights and trainable experts/LoRA share units
        return "fsdp"
    if kind == DistributedType.DEEPSPEED:
        plugin = accelerator.state.deepspeed_plugin
        if int(plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0)) == 3:
            register_zero3_externals(model)
        return "deepspeed"
    return None


def full_trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole trainable tensors (router, experts, LoRA) of a model sharded with FSDP2, as CPU tensors under
    the names a single-process model uses; every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                broadcast_from_rank0=False))
    return {k: v for k, v in state.items() if is_added_name(k) or "lora_" in k}

"""`sparsecraft train RECIPE --dry-run`: the recipe's model built on the meta device, its parameters, and the
training memory per GPU on common machines under each engine (DDP, FSDP, DeepSpeed ZeRO-2/3).

The single-device estimate (`memory.estimate_training_memory`, bf16 activations, gradient checkpointing, AdamW)
is split into what each engine keeps whole on every GPU and what it shards over the n GPUs:

- DDP: everything whole, plus the gradient buckets DDP allocates for the trainable parameters (4 B each).
- FSDP (full shard): base weights and trainable state (fp32 weight + grad + Adam, 16 B) / n; while a layer
  runs, its weights are gathered whole (x2: the next layer is prefetched).
- ZeRO-2: base weights and trainable weights (4 B) whole; gradients and Adam state (12 B) / n.
- ZeRO-3: base weights and all trainable state / n; the running layer's weights gathered whole (x2).
Activations (checkpointed inputs, the recomputed layer, router state, logits) are per GPU for its micro-batch
in every engine. Not included: the CUDA context (~0.5-1 GiB), allocator fragmentation, communication buffers.
docs/scale.md works these numbers out by hand for the paper's recipe.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from .data.config import DataConfig
from .errors import ConfigError
from .generation import context_length
from .memory import MemoryEstimate, estimate_training_memory
from .report import ParameterReport, meta_model, parameter_report

ENGINES = ("ddp", "fsdp", "zero2", "zero3")
MACHINES = ((1, 24), (1, 80), (8, 80))  # (GPUs, GiB each)
CONTEXT_GIB = 1.0  # what the CUDA context and library workspaces take on each GPU, roughly
TRAINABLE_WEIGHT_BYTES, TRAINABLE_SHARDABLE_BYTES = 4, 12  # fp32 weight; grad 4 + Adam m, v 8
DDP_BUCKET_BYTES = 4


def per_gpu_bytes(estimate: MemoryEstimate, trainable: int, largest_layer_bytes: int, engine: str,
                  gpus: int) -> int:
    """Peak bytes on one GPU of `gpus` under `engine` (see the module docstring for the split)."""
    c = estimate.components
    weights = c["base weights"]
    state = c["trainable state"]
    activations = sum(v for k, v in c.items() if k not in ("base weights", "trainable state"))
    if engine == "ddp":
        return weights + state + activations + (DDP_BUCKET_BYTES * trainable if gpus > 1 else 0)
    if gpus == 1:  # a sharding engine on one GPU shards nothing
        return weights + state + activations
    if engine == "fsdp":
        return weights // gpus + 2 * largest_layer_bytes + state // gpus + activations
    if engine == "zero2":
        return weights + TRAINABLE_WEIGHT_BYTES * trainable + TRAINABLE_SHARDABLE_BYTES * trainable // gpus \
            + activations
    if engine == "zero3":
        return weights // gpus + 2 * largest_layer_bytes + state // gpus + activations
    raise ValueError(f"unknown engine {engine!r}")


@dataclass
class TrainPlan:
    """What `train --dry-run` reports: parameters, the single-device estimate, and per-GPU memory."""

    model: str
    method: str
    params: ParameterReport
    trainable: int
    estimate: MemoryEstimate
    per_gpu: dict[tuple[int, int, str], int]  # (GPUs, GiB each, engine) -> bytes on one GPU
    micro_batch: int
    seconds: float

    def fits(self, gpus: int, capacity_gib: int, engine: str) -> bool:
        return self.per_gpu[(gpus, capacity_gib, engine)] / 2**30 + CONTEXT_GIB <= capacity_gib

    def format(self) -> str:
        e = self.estimate
        lines = [f"Dry run of the recipe: {self.model}, method {self.method}, {e.quantization} base, micro-batch "
                 f"{self.micro_batch} x {e.seq_len} tokens per GPU",
                 f"  parameters: {self.params.total:,} total, {self.trainable:,} trainable (added "
                 f"{self.params.added:,} + LoRA {self.trainable - self.params.added:,})", "",
                 e.format(), "",
                 "Per-GPU memory ESTIMATE by engine (GiB on one GPU; 'fits' leaves ~1 GiB for the CUDA context):",
                 f"  {'machine':<10}" + "".join(f"{name:>16}" for name in ENGINES)]
        for gpus, capacity in MACHINES:
            cells = []
            for engine in ENGINES:
                used = self.per_gpu[(gpus, capacity, engine)] / 2**30
                cells.append(f"{used:>9.1f} {'fits' if self.fits(gpus, capacity, engine) else 'NO  ':>5}")
            lines.append(f"  {f'{gpus}x{capacity} GB':<10}" + "".join(f"{c:>16}" for c in cells))
        lines.append("  ddp: all whole per GPU; fsdp / zero3: weights and state sharded, one layer gathered at a "
                     "time; zero2: grads and Adam sharded")
        lines.append(f"(from the config alone in {self.seconds:.2f} s, no weights read; docs/scale.md)")
        return "\n".join(lines)

    __str__ = format


def plan_training(recipe) -> TrainPlan:
    """Build the recipe's model on the meta device (config only), apply its method, and estimate memory."""
    from .methods import get_method
    from .sources import load_base_config, resolve_base
    from .surgery import find_decoder_layers

    start = time.perf_counter()
    method = get_method(recipe.method)
    model = meta_model(load_base_config(resolve_base(recipe.model)))
    if method.builds_moe:
        if not method.crafts_from_base:
            raise ConfigError(f"a dry run builds from the base alone; method {method.name} cannot (it needs its "
                              "experts' checkpoints)")
        method.craft(model, recipe.craft_config())
    params = parameter_report(model)
    targets = tuple(recipe.lora.targets) + (tuple(recipe.lora.ffn_targets) if recipe.lora.ffn else ())
    quantization = "nf4" if recipe.quantization == "nf4" else "bf16"
    rank = recipe.lora.r if recipe.lora.enabled else 0
    # the sequence length training uses: the data config's (its default when unset), capped to the context
    seq_len = DataConfig.from_dict(recipe.data).max_length
    context = context_length(model)
    seq_len = min(seq_len, context) if context else seq_len
    estimate = estimate_training_memory(model, batch_size=recipe.train.batch_size, seq_len=seq_len, lora_rank=rank,
                                        lora_targets=targets if rank else (), quantization=quantization)
    trainable = estimate.components["trainable state"] // 16
    _, layers = find_decoder_layers(model)
    per_param = 0.516 if quantization == "nf4" else 2  # bytes per base weight as stored (memory.nf4_bytes)
    largest_layer = int(max(sum(p.numel() for p in layer.parameters()) for layer in layers) * per_param)
    per_gpu = {(g, cap, engine): per_gpu_bytes(estimate, trainable, largest_layer, engine, g)
               for g, cap in MACHINES for engine in ENGINES}
    return TrainPlan(recipe.model, method.name, params, trainable, estimate, per_gpu, recipe.train.batch_size,
                     time.perf_counter() - start)


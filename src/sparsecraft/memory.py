"""Training-memory estimate for a (crafted) model, by component, from its shapes alone.

Everything here reads module shapes and parameter sizes only, so it works on a model built on the meta device
(see `sparsecraft.report.dry_run`). It is an *estimate* of what stays allocated at the peak of one training step
with gradient checkpointing; it leaves out the CUDA context, allocator fragmentation and library workspaces.

Notation: N = B·T tokens per step, L decoder layers (L_moe of them crafted), h hidden size, i FFN width, V vocab,
E experts, k top-k, r adapter width, h_q = n_heads·head_dim, h_kv = n_kv_heads·head_dim, a = 2 (bytes per bf16
activation value).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch.nn as nn

from .config import ATTENTION_LORA_TARGETS
from .methods import method_of
from .moe.layers import RoutedBlock
from .surgery import find_decoder_layers, is_added_name, text_config

ACT_BYTES = 2  # activations in bf16
WEIGHT_BYTES_16BIT = 2  # bf16 base weights
KBIT_KEPT_BYTES = 4  # what a 4-bit base keeps un-quantised, once prepare_model_for_kbit_training made it fp32
# fp32 master weight 4 + fp32 gradient 4 + Adam first and second moments 4 + 4
TRAINABLE_STATE_BYTES = 16
NF4_BLOCK = 64  # bitsandbytes 4-bit block size (one absmax per 64 weights)
NF4_DQ_BLOCK = 256  # double quantisation: the 8-bit absmax values are themselves quantised in blocks of 256

QUANTIZATIONS = ("bf16", "nf4")


def logical_numel(p) -> int:
    """Number of weights a parameter stands for: a bitsandbytes `Params4bit` stores packed uint8 data (two
    weights per byte), so its logical size is `quant_state.shape`."""
    state = getattr(p, "quant_state", None)
    if state is not None and getattr(state, "shape", None) is not None:
        return int(state.shape.numel())
    return int(p.numel())


def nf4_bytes(numel: int) -> int:
    """Bytes of one NF4 tensor with double quantisation, as bitsandbytes stores it.

    n/2 (two 4-bit codes per byte) + ceil(n/64) uint8 absmax + 4·ceil(ceil(n/64)/256) fp32 second-level absmax
    + 4 (fp32 offset). Per weight: 4 + 8/64 + 32/(64·256) ≈ 4.127 bits ≈ 0.516 bytes.
    """
    blocks = math.ceil(numel / NF4_BLOCK)
    return math.ceil(numel / 2) + blocks + 4 * math.ceil(blocks / NF4_DQ_BLOCK) + 4


@dataclass
class ModelShape:
    """The sizes the activation formulas need, read from the model's config and crafted layers."""

    num_layers: int
    crafted_layers: int
    hidden: int
    intermediate: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab: int
    num_experts: int = 0
    top_k: int = 0
    adapter_dim: int = 0
    adapter_dropout: float = 0.0
    dispatch: str = "auto"
    act_bytes: int = 2  # bytes per activation value: 2 in bf16 (GPU training), 4 in fp32 (CPU training)


def model_shape(model: nn.Module) -> ModelShape:
    cfg = text_config(model)
    _, layers = find_decoder_layers(model)
    h = cfg.hidden_size
    heads = getattr(cfg, "num_attention_heads", None) or 1
    head_dim = getattr(cfg, "head_dim", None) or h // heads
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    vocab = getattr(out_emb, "out_features", None) or cfg.vocab_size
    moes = [m for m in model.modules() if isinstance(m, RoutedBlock)]
    shape = ModelShape(
        num_layers=len(layers),
        crafted_layers=len(moes),
        hidden=h,
        intermediate=getattr(cfg, "intermediate_size", None) or 4 * h,
        num_heads=heads,
        num_kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        vocab=vocab,
    )
    if moes:
        c = moes[0].config
        shape.num_experts, shape.top_k, shape.adapter_dim = c.num_experts, c.top_k, c.adapter_dim
        shape.adapter_dropout, shape.dispatch = c.dropout, c.dispatch
    return shape


def _is_linear(m: nn.Module) -> bool:
    return hasattr(m, "in_features") and hasattr(m, "out_features") and hasattr(m, "weight")


def lora_targets_of(model: nn.Module, targets: tuple[str, ...]) -> list[tuple[str, int, int]]:
    """`(name, in_features, out_features)` of each base Linear whose last name component is in `targets`
    (PEFT's rule for a list of short names); crafted router/adapter modules are never targets."""
    wanted = set(targets)
    return [
        (name, m.in_features, m.out_features)
        for name, m in model.named_modules()
        if name.rsplit(".", 1)[-1] in wanted and _is_linear(m) and not is_added_name(name + ".")
    ]


def lora_param_count(model: nn.Module, rank: int, targets: tuple[str, ...]) -> int:
    """LoRA parameters PEFT would add: r·(in + out) per target Linear (A: [r, in], B: [out, r])."""
    return sum(rank * (fin + fout) for _, fin, fout in lora_targets_of(model, targets))


@dataclass
class WeightSplit:
    """Base parameters split by how bitsandbytes 4-bit loading stores them."""

    quantised: list[int] = field(default_factory=list)  # numel of each Linear weight NF4 would quantise
    kept_16bit: int = 0  # embeddings, lm_head, norms, biases: left in 16 bit by bitsandbytes

    @property
    def quantised_total(self) -> int:
        return sum(self.quantised)


def weight_split(model: nn.Module) -> WeightSplit:
    """Split base (non-crafted) parameters into NF4-quantisable Linear weights and 16-bit rest.

    transformers' bitsandbytes integration converts every nn.Linear except the output embedding (lm_head);
    router and adapters are added after quantisation and are counted as trainable state instead.
    """
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    quant_ids = {
        id(m.weight)
        for name, m in model.named_modules()
        if _is_linear(m) and m is not out_emb and not is_added_name(name + ".")
    }
    split = WeightSplit()
    for name, p in model.named_parameters():
        if is_added_name(name) or "lora_" in name:
            continue
        if id(p) in quant_ids:
            split.quantised.append(logical_numel(p))
        else:
            split.kept_16bit += logical_numel(p)
    return split


@dataclass
class MemoryEstimate:
    """Estimated peak training memory in bytes, by component (`components`), with the formula of each."""

    quantization: str
    batch_size: int
    seq_len: int
    components: dict[str, int]
    formulas: dict[str, str]

    @property
    def total(self) -> int:
        return sum(self.components.values())

    def format(self) -> str:
        title = "16-bit (bf16) base" if self.quantization == "bf16" else "4-bit (NF4, double-quant) base"
        lines = [
            f"Training memory ESTIMATE, {title}, batch {self.batch_size} x {self.seq_len} tokens, "
            "gradient checkpointing",
        ]
        width = max(len(k) for k in self.components)
        for key, value in self.components.items():
            lines.append(f"  {key:<{width}}  {gib(value):>10}   {self.formulas[key]}")
        lines.append(f"  {'total':<{width}}  {gib(self.total):>10}")
        lines.append("  (not included: CUDA context ~0.5-1 GiB, allocator fragmentation, library workspaces)")
        return "\n".join(lines)

    __str__ = format


def gib(n: float) -> str:
    return f"{n / 2**30:,.2f} GiB"


def _layer_working_set_per_token(s: ModelShape, lora: list[tuple[int, int]], rank: int, n_tokens: int,
                                 method) -> tuple[int, str]:
    """Bytes per token held while one checkpointed layer is recomputed and back-propagated."""
    a, h, i = s.act_bytes, s.hidden, s.intermediate
    hq, hkv = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
    attn = (
        4 * h + a * h  # input RMSNorm: fp32 upcast of its input + normalised output (the q/k/v input)
        + a * (hq + 2 * hkv)  # q, k, v projections
        + a * (hq + hkv)  # q, k after RoPE
        + a * hq + 4 * s.num_heads  # attention output + fp32 logsumexp per head (SDPA/flash: no T×T scores)
        + a * h  # o_proj output / residual sum
    )
    mlp = (
        4 * h + a * h  # post-attention RMSNorm
        + 4 * a * i  # gate, up, act(gate), act(gate)·up   (gated FFN)
        + a * h  # F = down(...), the shared FFN output the adapters read
    )
    lora_bytes = sum(a * fin + fin + a * rank for fin, _ in lora)  # per target: dropout out, bool mask, x·A
    grads = a * (2 * h + 2 * i)  # backward transients: grad of the layer output and of the widest intermediate
    moe, formula = method.moe_bytes_per_token(s, n_tokens) if s.crafted_layers else (0, "no MoE")
    return attn + mlp + lora_bytes + grads + moe, formula


def estimate_training_memory(
    model: nn.Module,
    *,
    batch_size: int = 1,
    seq_len: int = 2048,
    lora_rank: int = 64,
    lora_targets: tuple[str, ...] = ATTENTION_LORA_TARGETS,
    quantization: str = "bf16",
    act_bytes: int = ACT_BYTES,
) -> MemoryEstimate:
    """Estimate training memory of `model` (crafted or dense, real or meta) with a frozen base, LoRA of rank
    `lora_rank` on `lora_targets`, trainable router + adapters, AdamW, bf16 activations and gradient
    checkpointing of every decoder layer. `quantization` is `bf16` or `nf4` (QLoRA base); `act_bytes` 4 for fp32
    training (what the CPU runs), which also de-quantises NF4 weights to fp32."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}; got {quantization!r}")
    s = model_shape(model)
    s.act_bytes = act_bytes
    n = batch_size * seq_len
    split = weight_split(model)
    targets = lora_targets_of(model, tuple(lora_targets))
    lora_params = sum(lora_rank * (fin + fout) for _, fin, fout in targets)
    added = sum(logical_numel(p) for name, p in model.named_parameters() if is_added_name(name))
    existing_lora = sum(logical_numel(p) for name, p in model.named_parameters() if "lora_" in name)
    trainable = added + lora_params + existing_lora
    layers_name, _ = find_decoder_layers(model)
    first_layer = f"{layers_name}.0." if layers_name else "0."  # the working set is one layer's
    layer_lora = [(fin, fout) for name, fin, fout in targets if name.startswith(first_layer)]

    c: dict[str, int] = {}
    f: dict[str, str] = {}
    base_numel = split.quantised_total + split.kept_16bit
    if quantization == "bf16":
        c["base weights"] = WEIGHT_BYTES_16BIT * base_numel
        f["base weights"] = "2 B × base params"
        c["dequantised weight buffer"] = 0
        f["dequantised weight buffer"] = "none in 16 bit"
    else:
        # bitsandbytes leaves embeddings, lm_head, norms and biases un-quantised, and PEFT's
        # prepare_model_for_kbit_training (which QLoRA training runs) upcasts them to fp32
        c["base weights"] = sum(nf4_bytes(q) for q in split.quantised) + KBIT_KEPT_BYTES * split.kept_16bit
        f["base weights"] = ("Σ_Linear (n/2 + n/64 + 4·n/16384) [≈4.127 bit/param] + 4 B × (embeddings, "
                             "lm_head, norms, biases) [fp32 after prepare_model_for_kbit_training]")
        # each 4-bit Linear is de-quantised to bf16 for its matmul (forward and backward): the largest one
        c["dequantised weight buffer"] = act_bytes * max(split.quantised, default=0)
        f["dequantised weight buffer"] = f"{act_bytes} B × largest quantised Linear weight"
    c["trainable state"] = TRAINABLE_STATE_BYTES * trainable
    f["trainable state"] = (f"16 B × (router + adapters + LoRA r={lora_rank} on {len(targets)} Linears) = 16 × "
                            f"{trainable:,}  [fp32 weight 4 + grad 4 + Adam m,v 8]")
    c["checkpointed layer inputs"] = s.num_layers * n * s.hidden * act_bytes
    f["checkpointed layer inputs"] = f"L·B·T·h·{act_bytes}"
    per_token, moe_formula = _layer_working_set_per_token(s, layer_lora, lora_rank, n, method_of(model))
    c["one layer recomputed"] = n * per_token
    f["one layer recomputed"] = (
        f"B·T·{per_token:,} B: norms (4h+2h)×2, q,k,v,RoPE,attn out 2(3h_q+3h_kv+h)+4·heads, FFN 2(4i+h), "
        f"LoRA Σ(2in+in+2r), grads 2(2h+2i), {moe_formula}"
    )
    # the recorder keeps every crafted layer's fp32 logits for the aux/z losses until backward, which also
    # saves the full softmax (balance loss) and logsumexp (z-loss); expert indices are int64
    c["router state (aux loss)"] = s.crafted_layers * n * (4 * (2 * s.num_experts + 1) + 8 * s.top_k)
    f["router state (aux loss)"] = "L_moe·B·T·(4(2E+1) + 8k)"
    # bf16 logits returned by the model + fp32 log-softmax saved by the cross-entropy for backward
    # at the loss's backward: the logits (the output keeps them), the fp32 log-softmax saved for backward, and
    # the gradient of the logits (measured on the CPU: leaving it out undercounts the training phase by a fifth)
    c["logits + loss"] = n * s.vocab * (2 * act_bytes + 4)
    f["logits + loss"] = f"B·T·V·({act_bytes} + 4 + {act_bytes})  [logits + fp32 log-softmax + logits gradient]"
    return MemoryEstimate(quantization, batch_size, seq_len, c, f)


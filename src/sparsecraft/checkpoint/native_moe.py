"""Export a Sparse-Upcycling model as a standard transformers MoE checkpoint (Mixtral, Qwen2-MoE, Qwen3-MoE).

An upcycled layer is exactly a standard MoE: a bias-free router `[E, h]` on the FFN input, top-k over its logits,
gates that sum to one over the chosen experts, and E gated FFNs. Those runtimes' routing (softmax over all E,
top-k, renormalised: Mixtral always, Qwen with `norm_topk_prob`) gives the same gates as sparsecraft's
`topk_softmax` (softmax over the k kept logits) and its `softmax_topk` with `normalize_topk`. So the exported
checkpoint computes the same logits up to floating-point summation order, and any runtime that serves these
architectures (transformers, vLLM, SGLang, llama.cpp through its converters) serves the model without
sparsecraft. The weights are written in each architecture's published per-expert layout
(`block_sparse_moe.experts.{e}.w1/w2/w3` for Mixtral, `mlp.experts.{e}.{gate,up,down}_proj` for Qwen).

Where no runtime format is exact, export refuses instead of approximating: PESC and MixLoRA experts act on the
FFN's output F(x) (or inside it), which no MoE architecture computes.

Targets: `mixtral` for LLaMA and Mistral bases (every layer must be upcycled: Mixtral has no dense layers),
`qwen2_moe` for Qwen2 bases, `qwen3_moe` for Qwen3 bases (layers left dense become `mlp_only_layers`).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..atomic import atomic_directory
from ..errors import CheckpointError, ConfigError
from ..methods import method_of
from ..moe.upcycle import GatedExperts, UpcycledMLP
from ..surgery import craft_config_of, crafted_layers, find_decoder_layers, text_config

TARGETS = ("mixtral", "qwen2_moe", "qwen3_moe")
# base model_type -> the native MoE architecture with the same attention and norms
FAMILY_TARGET = {"llama": "mixtral", "mistral": "mixtral", "qwen2": "qwen2_moe", "qwen3": "qwen3_moe"}
# Qwen2-MoE always has a shared expert; it is written with zero weights (it then adds exactly 0). Its width is a
# multiple of common tensor-parallel and quantisation block sizes, so runtimes shard it as they would any other.
ZERO_SHARED_EXPERT = 128

NOT_EXACT = {
    "pesc": "PESC experts act on the FFN output F(x), not on x, and no runtime MoE format computes that, so there "
            "is no exact native export; serve it with `sparsecraft serve` or the vLLM plugin (docs/serving.md)",
    "mixlora": "MixLoRA experts are LoRA deltas inside the shared FFN, which no runtime MoE format computes, so "
               "there is no exact native export; serve it with `sparsecraft serve` (docs/serving.md)",
}


@dataclass
class NativePlan:
    """What an export writes: the target architecture, the upcycled layers, and the routing normalisation."""

    target: str
    layers: list[int]
    num_layers: int
    num_experts: int
    top_k: int
    norm_topk: bool


def plan_export(model, target: str) -> NativePlan:
    """Check that `model` has an exact `target` form; `ConfigError` (one line) saying why not otherwise."""
    if target not in TARGETS:
        raise ConfigError(f"--to must be one of {', '.join(TARGETS)}, got {target!r}")
    method = method_of(model).name
    if method in NOT_EXACT:
        raise ConfigError(f"cannot export a {method} model to {target}: {NOT_EXACT[method]}")
    if method != "upcycle":
        kind = "a dense model" if not method_of(model).builds_moe else f"a {method} model"
        raise ConfigError(f"--to {target} exports Sparse-Upcycling models; this is {kind} (`sparsecraft export` "
                          "without --to writes it as a plain transformers model)")
    family = text_config(model).model_type
    if FAMILY_TARGET.get(family) != target:
        hint = f" (use --to {FAMILY_TARGET[family]})" if family in FAMILY_TARGET else ""
        raise ConfigError(f"--to {target} is exact only for {_families(target)} bases; this base is {family}{hint}")
    cfg = craft_config_of(model)
    layers = dict(crafted_layers(model))
    for i, mlp in layers.items():
        if not isinstance(mlp, UpcycledMLP) or not isinstance(mlp.moe.experts, GatedExperts):
            raise ConfigError(f"layer {i}'s experts are not stacked gated FFNs; {target} cannot hold them")
    _, decoder = find_decoder_layers(model)
    if target == "mixtral" and len(layers) != len(decoder):
        raise ConfigError(f"Mixtral has no dense layers, but only layers {sorted(layers)} of {len(decoder)} are "
                          "upcycled; upcycle every layer (layers: all) to export to mixtral")
    biased = [i for i, mlp in layers.items() if getattr(mlp.moe, "router_bias", None) is not None
              and bool(mlp.moe.router_bias.detach().ne(0).any())]
    if biased:
        raise ConfigError(f"layers {biased} choose experts with a balancing bias (bias_balance), which {target} "
                          "routing does not have; no exact export")
    norm_topk = cfg.routing == "topk_softmax" or cfg.normalize_topk
    if target == "mixtral" and not norm_topk:
        raise ConfigError("Mixtral renormalises the top-k gates; this model routes with softmax_topk without "
                          "normalize_topk, which Mixtral cannot compute")
    return NativePlan(target, sorted(layers), len(decoder), cfg.num_experts, cfg.top_k, norm_topk)


def _families(target: str) -> str:
    return " and ".join(sorted(f for f, t in FAMILY_TARGET.items() if t == target))


def native_config(model, plan: NativePlan):
    """The target architecture's config: the base's shared fields, the MoE fields from the crafting settings."""
    from transformers import AutoConfig

    base = text_config(model).to_dict()
    # every base field goes along (head_dim, rope, windows, ... whether or not the target's config declares them:
    # its modeling code and runtimes read them as attributes); only identity and quantisation fields stay behind
    fields = {k: v for k, v in base.items() if k not in ("architectures", "model_type", "transformers_version",
                                                         "auto_map", "quantization_config", "dtype", "torch_dtype")}
    inter = base["intermediate_size"]
    moe = {"num_experts_per_tok": plan.top_k, "output_router_logits": False, "tie_word_embeddings": False,
           "router_aux_loss_coef": craft_config_of(model).aux_loss_coef}
    if plan.target == "mixtral":
        if base.get("attention_bias") or base.get("mlp_bias"):
            raise ConfigError("this LLaMA base has attention or MLP biases, which Mixtral does not have")
        moe.update(num_local_experts=plan.num_experts, intermediate_size=inter, router_jitter_noise=0.0)
    else:
        dense = [i for i in range(plan.num_layers) if i not in plan.layers]
        moe.update(num_experts=plan.num_experts, moe_intermediate_size=inter, intermediate_size=inter,
                   norm_topk_prob=plan.norm_topk, decoder_sparse_step=1, mlp_only_layers=dense)
        if plan.target == "qwen2_moe":
            moe["shared_expert_intermediate_size"] = ZERO_SHARED_EXPERT
    config = AutoConfig.for_model(plan.target, **{**fields, **moe})
    config.architectures = [type(config).__name__.replace("Config", "ForCausalLM")]
    return config


_MOE_KEY = re.compile(r"^(?P<prefix>.*\.layers\.(?P<layer>\d+)\.)mlp\.moe\.(?P<rest>.+)$")


def native_state(model, plan: NativePlan, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The model's weights under the target's published key names (per-expert tensors, CPU, contiguous)."""
    block = "block_sparse_moe" if plan.target == "mixtral" else "mlp"
    names = (("w1", "w3", "w2") if plan.target == "mixtral" else ("gate_proj", "up_proj", "down_proj"))
    out: dict[str, torch.Tensor] = {}

    def put(key: str, tensor: torch.Tensor) -> None:
        tensor = tensor.detach().to("cpu")
        out[key] = (tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor).clone()

    for key, tensor in model.state_dict().items():
        match = _MOE_KEY.match(key)
        if match is None:
            put(key, tensor)
            continue
        prefix, rest = match["prefix"], match["rest"]
        if rest == "router_bias":
            continue  # all zero (checked in plan_export): top-k over unbiased scores is the same choice
        if rest == "router.weight":
            put(f"{prefix}{block}.gate.weight", tensor)
        elif rest == "experts.gate_up_proj":
            inter = tensor.shape[1] // 2
            for e in range(tensor.shape[0]):
                put(f"{prefix}{block}.experts.{e}.{names[0]}.weight", tensor[e, :inter])
                put(f"{prefix}{block}.experts.{e}.{names[1]}.weight", tensor[e, inter:])
        elif rest == "experts.down_proj":
            for e in range(tensor.shape[0]):
                put(f"{prefix}{block}.experts.{e}.{names[2]}.weight", tensor[e])
        else:
            raise CheckpointError(f"{key} has no place in a {plan.target} checkpoint")
    if "lm_head.weight" not in out:
        out["lm_head.weight"] = out["model.embed_tokens.weight"].clone()  # written untied: runtimes differ on ties
    if plan.target == "qwen2_moe":
        _add_zero_shared_experts(out, model, plan, dtype)
    return out


def _add_zero_shared_experts(out: dict, model, plan: NativePlan, dtype) -> None:
    hidden = text_config(model).hidden_size
    ref = out["model.embed_tokens.weight"]
    zeros = dict(dtype=dtype or ref.dtype)
    for i in plan.layers:
        prefix = f"model.layers.{i}.mlp."
        out[prefix + "shared_expert.gate_proj.weight"] = torch.zeros(ZERO_SHARED_EXPERT, hidden, **zeros)
        out[prefix + "shared_expert.up_proj.weight"] = torch.zeros(ZERO_SHARED_EXPERT, hidden, **zeros)
        out[prefix + "shared_expert.down_proj.weight"] = torch.zeros(hidden, ZERO_SHARED_EXPERT, **zeros)
        out[prefix + "shared_expert_gate.weight"] = torch.zeros(1, hidden, **zeros)


def export_native(model, out_dir: str | os.PathLike, target: str, *, tokenizer=None,
                  dtype: torch.dtype | None = None) -> Path:
    """Write `model` (an upcycled model) as a plain `target` checkpoint in `out_dir` (atomically)."""
    plan = plan_export(model, target)
    config = native_config(model, plan)
    if dtype is not None:
        config.dtype = dtype
    state = native_state(model, plan, dtype)
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise CheckpointError(f"{out_dir} exists and is not empty")
    with atomic_directory(out_dir) as tmp:
        config.save_pretrained(str(tmp))
        generation = getattr(model, "generation_config", None)
        if generation is not None:
            generation.save_pretrained(str(tmp))
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt", "producer": "sparsecraft"})
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return out_dir


def max_logit_difference(model, exported, vocab_size: int, seed: int = 0, length: int = 16) -> float:
    """Largest absolute difference between two models' logits on a random token sequence `[2, length]`."""
    ids = torch.randint(0, vocab_size, (2, length), generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        a = model(ids.to(model.device)).logits.float().cpu()
        b = exported(ids.to(exported.device)).logits.float().cpu()
    return float((a - b).abs().max())

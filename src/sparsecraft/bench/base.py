"""What both levels share: the dense base (random weights from a shape, or a real model), the `Variant` record,
and which dispatch path a PESC variant really runs."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn

from ..errors import ConfigError
from .settings import BenchSettings, shape_config


@dataclass
class Variant:
    """One built (level, method) ready to time: `step()` is one training step, `reset()` its zero_grad."""

    level: str
    method: str
    path: str  # the dispatch path actually run ("-" for dense)
    tokens: int  # tokens per step
    flops: int  # matmul FLOP floor of one step
    flops_for_path: Callable[[str], int]  # matmul FLOPs as the path of a label runs them
    step: Callable[[], object]
    reset: Callable[[], None]
    model: nn.Module | None = None  # model level: what decodes
    extra: dict = field(default_factory=dict)
    relabel: Callable[[], str] | None = None  # the path once timed (`auto` is decided by its first call)

    def path_run(self) -> str:
        return self.relabel() if self.relabel is not None else self.path


def autocast_for(settings: BenchSettings, device: torch.device):
    """bf16/fp16 autocast on CUDA when asked for (weights stay in that dtype too); nothing on the CPU, where the
    model is simply built in the dtype."""
    if device.type == "cuda" and settings.torch_dtype in (torch.bfloat16, torch.float16):
        return lambda: torch.autocast("cuda", dtype=settings.torch_dtype)
    return contextlib.nullcontext


def cut_layers(model: nn.Module, num_layers: int | None) -> None:
    """Keep the first `num_layers` decoder layers of a loaded model (config updated to match)."""
    from ..surgery import find_decoder_layers, text_config

    if num_layers is None:
        return
    _, layers = find_decoder_layers(model)
    if num_layers >= len(layers):
        return
    del layers[num_layers:]
    cfg = text_config(model)
    cfg.num_hidden_layers = num_layers
    if isinstance(getattr(cfg, "layer_types", None), list):
        cfg.layer_types = cfg.layer_types[:num_layers]


def load_dense_base(settings: BenchSettings, device: torch.device) -> nn.Module:
    """The dense causal LM every model-level variant starts from: frozen, train mode, on `device`.

    `--model` loads a real dense base through `sparsecraft.load`; otherwise random weights are built from the
    shape's config with `settings.seed`. `--4bit` swaps its linear layers (not `lm_head`) for NF4 ones, as
    `sparsecraft train` does for GGUF bases.
    """
    dtype = settings.torch_dtype
    if settings.model:
        from ..loading import load
        from ..surgery import is_crafted

        model = load(settings.model, dtype=dtype, allow_pickle=settings.allow_pickle)
        if is_crafted(model):
            raise ConfigError(f"--model {settings.model} is a crafted model; the bench needs its dense base")
        cut_layers(model, settings.layers)
    else:
        from transformers import AutoModelForCausalLM

        with torch.random.fork_rng(), torch.device(device):  # initialised where it will run
            torch.manual_seed(settings.seed)
            model = AutoModelForCausalLM.from_config(shape_config(settings), dtype=dtype)
    model.to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    if settings.four_bit:
        from ..train.quantize import quantize_linears_nf4

        quantize_linears_nf4(model, compute_dtype=dtype)
    return model.train()


def block_ffn(settings: BenchSettings, device: torch.device) -> nn.Module:
    """A frozen FFN of the shape (random weights, `initializer_range` normal) or layer 0's FFN of `--model`."""
    from ..surgery import find_decoder_layers, find_ffn, text_config

    dtype = settings.torch_dtype
    if settings.model:
        model = load_dense_base(BenchSettings(**{**settings.to_dict(), "four_bit": False, "layers": 1}), device)
    else:
        from transformers import AutoModelForCausalLM

        cfg = shape_config(BenchSettings(**{**settings.to_dict(), "layers": 1}))
        with torch.device("meta"):  # only the FFN gets real memory
            model = AutoModelForCausalLM.from_config(cfg)
    hidden = text_config(model).hidden_size
    _, layers = find_decoder_layers(model)
    _, ffn = find_ffn(layers[0], hidden)
    if not settings.model:
        ffn = ffn.to_empty(device=device)
        std = getattr(text_config(model), "initializer_range", 0.02)
        gen = torch.Generator().manual_seed(settings.seed)
        with torch.no_grad():
            for p in ffn.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * std)
        ffn = ffn.to(dtype)
    for p in ffn.parameters():
        p.requires_grad_(False)
    return ffn.train()


def dispatch_label(block: nn.Module, dispatch: str, tokens: int, settings: BenchSettings, hidden: int,
                   device: torch.device) -> str:
    """The path a block really runs for `tokens` tokens (see `pesc_path`, `upcycle_path`); `loop` for the
    reference layer."""
    from ..moe.layers import PescMoE
    from ..moe.lora_experts import LoraExpertsMoE
    from .reference import LoopPescBlock

    if isinstance(block, LoopPescBlock):
        return "loop"
    if isinstance(block, PescMoE) and block.compiled:  # traced: the shape rule decides, then what traces
        from ..moe.experts import path_by_shape, traceable_path

        path = path_by_shape(dispatch, tokens, settings.experts, settings.top_k, settings.adapter_dim)
        return f"compiled:{traceable_path(path)}"
    if isinstance(block, PescMoE):
        return pesc_path(dispatch, tokens, settings, hidden, device)
    if isinstance(block, LoraExpertsMoE):
        if dispatch in ("loop", "sorted"):
            return dispatch
        return lora_experts_path(block, tokens, settings, hidden, device)
    return upcycle_path(block.experts, dispatch, tokens, settings, hidden, device)


def pesc_path(dispatch: str, tokens: int, settings: BenchSettings, hidden: int, device: torch.device) -> str:
    """The path `sparsecraft.moe.experts.dispatch` takes for a call of `tokens` tokens: `auto:<path>` for the
    measured choice (the probe's winner once the variant has run; the shape rule's pick before),
    `rule:<path>` for the rule's, `grouped->sorted` where `torch._grouped_mm` cannot run these shapes,
    `triton->grouped` where the Triton kernel cannot."""
    from ..moe.experts import grouped_mm_available, path_by_shape, probed_choice
    from ..moe.triton_adapters import triton_available

    path = path_by_shape(dispatch, tokens, settings.experts, settings.top_k, settings.adapter_dim)
    if dispatch == "auto":
        for training in (True, False):
            measured = probed_choice(tokens, settings.experts, settings.top_k, settings.adapter_dim, hidden,
                                     settings.torch_dtype, device, training)
            if measured is not None:
                path = measured
                break
    probe = torch.empty(0, hidden, dtype=settings.torch_dtype, device=device)
    if path == "triton" and not triton_available(probe, "gelu"):
        path = "triton->grouped"
    if path.endswith("grouped") and not grouped_mm_available(probe, tokens * settings.top_k, settings.adapter_dim):
        path = path.replace("grouped", "grouped->sorted")
    return f"{dispatch}:{path}" if dispatch in ("auto", "rule") else path


def upcycle_path(experts: nn.Module, dispatch: str, tokens: int, settings: BenchSettings, hidden: int,
                 device: torch.device) -> str:
    """`grouped` / `sorted` for stacked copies of a gated FFN (`sorted` and `loop` settings both run `sorted`, as
    `UpcycledMoE` does), `loop` for the deep-copy fallback."""
    from ..moe.experts import grouped_mm_available
    from ..moe.upcycle import GatedExperts

    if not isinstance(experts, GatedExperts):
        return "loop"
    if dispatch in ("sorted", "loop"):
        return "sorted"
    probe = torch.empty(0, hidden, dtype=experts.dtype, device=device)
    ok = grouped_mm_available(probe, tokens * settings.top_k, experts.down_proj.shape[-1])
    return "grouped" if ok else "grouped->sorted"


def lora_experts_path(block: nn.Module, tokens: int, settings: BenchSettings, hidden: int,
                      device: torch.device) -> str:
    """MixLoRA-style experts: `grouped` where `torch._grouped_mm` takes their LoRA pairs, else `grouped->sorted`."""
    from ..moe.experts import grouped_mm_available

    probe = torch.empty(0, hidden, dtype=settings.torch_dtype, device=device)
    pairs = tokens * settings.top_k
    ok = all(grouped_mm_available(probe, pairs, a.shape[1]) and (b.shape[1] * probe.element_size()) % 16 == 0
             for a, b in zip(block.experts.A.values(), block.experts.B.values(), strict=True))  # as `_lora_terms`
    return "grouped" if ok else "grouped->sorted"

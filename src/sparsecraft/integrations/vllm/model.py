"""`SparsecraftPescForCausalLM`: vLLM's own model for the base architecture with PESC blocks on the crafted MLPs.

vLLM constructs it from a directory written by `layout.write_vllm_dir`, whose config.json is the base family's
config (so vLLM's attention, KV cache, tensor parallelism and sampling treat it as that family) plus a
`sparsecraft` entry naming the base architecture, the crafting settings and the crafted layers. The base model
is vLLM's registered class for that architecture; the PESC blocks are added as `mlp.moe` children, so every
checkpoint key (base and `...mlp.moe.*`) loads through the base model's own weight loader. Imported only by vLLM
(through `register`), never by sparsecraft itself.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn as nn
from vllm import ModelRegistry

from .pesc_block import PescBlock, attach


class SparsecraftPescForCausalLM(nn.Module):
    """Wraps vLLM's class for `config.sparsecraft["base_architecture"]`; attributes it lacks are the inner
    model's."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        spec = getattr(config, "sparsecraft", None)
        if not isinstance(spec, dict) or spec.get("method") != "pesc":
            raise ValueError("not a sparsecraft PESC directory for vLLM: write one with "
                             "`sparsecraft export MODEL OUT --to vllm`")
        base_cls, _ = ModelRegistry.resolve_model_cls([spec["base_architecture"]], vllm_config.model_config)
        self.inner = base_cls(vllm_config=vllm_config, prefix=prefix)
        dtype = vllm_config.model_config.dtype
        hidden = config.get_text_config().hidden_size
        layers = self.inner.model.layers
        for i in spec["crafted_layers"]:
            attach(layers[i].mlp, PescBlock(hidden, spec["craft"], dtype=dtype))

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("inner"), name)

    def forward(self, *args, **kwargs):
        return self.inner(*args, **kwargs)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.inner.embed_input_ids(input_ids)

    def compute_logits(self, hidden_states: torch.Tensor, *args, **kwargs):
        return self.inner.compute_logits(hidden_states, *args, **kwargs)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Every key goes to the base model's loader: `...mlp.moe.*` are parameters of its MLP modules now."""
        loaded = self.inner.load_weights(weights)
        return {f"inner.{name}" for name in loaded}

"""PESC models in vLLM, as an out-of-tree model plugin (the `sparsecraft[vllm]` extra).

vLLM calls `register` through its `vllm.general_plugins` entry point in every process it starts; it registers
`SparsecraftPescForCausalLM` lazily (by module path, so nothing of vLLM's model code is imported before vLLM
asks for it). `sparsecraft export MODEL OUT --to vllm` writes the directory vLLM loads (`layout.py`): the base
family's own config.json naming that architecture, the base weights and the PESC routers/adapters in one file.
The vLLM model (`model.py`) builds vLLM's own class for the base (LLaMA, Mistral, Qwen2/3, ...) and attaches
`pesc_block.PescBlock` to the crafted layers' MLPs. `pesc_block` needs torch only.
"""

from __future__ import annotations

ARCHITECTURE = "SparsecraftPescForCausalLM"


def register() -> None:
    """The `vllm.general_plugins` entry point: make `ARCHITECTURE` known to vLLM's model registry."""
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "sparsecraft.integrations.vllm.model:SparsecraftPescForCausalLM")

"""Shared fixtures: tiny random decoders of several families, built from configs (no hub, no files)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from transformers import AutoModelForCausalLM  # noqa: E402

_COMMON = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)


def tiny_config(family: str):
    """A tiny config of a decoder family: llama, mistral, qwen2, qwen3, gemma3, phi3."""
    import transformers as tf

    if family == "llama":
        return tf.LlamaConfig(**_COMMON)
    if family == "mistral":
        return tf.MistralConfig(**_COMMON, sliding_window=None)
    if family == "qwen2":
        return tf.Qwen2Config(**_COMMON)
    if family == "qwen3":
        return tf.Qwen3Config(**_COMMON, head_dim=8)
    if family == "gemma3":
        return tf.Gemma3TextConfig(**_COMMON, head_dim=8, sliding_window=16)
    if family == "phi3":
        return tf.Phi3Config(**{**_COMMON, "num_key_value_heads": 4}, pad_token_id=0)
    raise ValueError(family)


FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma3", "phi3")


def tiny_model(family: str = "llama", seed: int = 0, dtype=torch.float32):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family), dtype=dtype)
    return model.eval()


@pytest.fixture
def llama():
    return tiny_model("llama")

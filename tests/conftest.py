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


def greedy_continuation(model, ids: torch.Tensor, n: int) -> torch.Tensor:
    """The `n` greedy next tokens after `ids` `[1, T]` -> `[n]`, end-of-sequence tokens kept as ordinary tokens (what
    the engine's `ignore_eos` does; `generate(min_new_tokens=n)` masks EOS instead, a different continuation).
    Each step re-reads the whole sequence, no cache: a reference independent of any cache implementation."""
    with torch.inference_mode():
        for _ in range(n):
            logits = model(ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[0, ids.shape[1] - n:]


@pytest.fixture
def llama():
    return tiny_model("llama")


def tiny_tokenizer():
    """A character-level fast tokenizer with 128 ids (fits the tiny models' vocab) and a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    chars = [chr(c) for c in range(32, 127)]
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    vocab.update({f"<extra_{i}>": i for i in range(len(vocab), 128)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    fast.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    return fast


def save_tiny_base(path, hidden: int = 64, max_positions: int = 128, **config):
    """Save a seeded tiny random LLaMA (2 layers, 4 heads, 2 KV heads, FFN 2·hidden, vocab 128) with the character
    tokenizer as a model folder at `path`, as a user's base would be. Returns `path`."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=128, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
                         **config)
    tf.AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def tiny_run_files(root, records: int = 48):
    """What a training test needs on disk: `root/base` (a tiny LLaMA, hidden 64: the smallest bitsandbytes' CPU
    NF4 kernel takes, with a tokenizer) and `root/data.jsonl` (`records` arithmetic queries). Returns `root`."""
    import json


    save_tiny_base(root / "base")
    with open(root / "data.jsonl", "w") as f:
        for i in range(records):
            f.write(json.dumps({"query": f"{i % 7}+{i % 5}?", "response": f"{i % 7 + i % 5}"}) + "\n")
    return root


def load_script(name: str):
    """A module of the repository's `scripts/` folder (not a package), imported by file name: `load_script("x")`
    runs `scripts/x.py` as a module and returns it."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

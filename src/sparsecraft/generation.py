"""Text generation from any model sparsecraft loads: chat template when the tokenizer has one, KV cache,
greedy or sampling, optional streaming to the terminal."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .errors import CheckpointError


def load_tokenizer_for(path: str | os.PathLike, model=None):
    """The tokenizer saved in a model directory (for a hub ID, in the downloaded folder the model was loaded
    from), else the one of the base it refers to."""
    from transformers import AutoTokenizer

    from .sources import load_tokenizer, resolve_base

    for folder in (Path(str(path)), getattr(model, "_sparsecraft_path", None)):
        if folder is not None and (Path(folder) / "tokenizer_config.json").is_file():
            return AutoTokenizer.from_pretrained(str(folder))
    source = getattr(model, "_sparsecraft_base", None)
    if source is None:
        source = resolve_base(path)
    tokenizer = load_tokenizer(source)
    if tokenizer is None:
        raise CheckpointError(f"no tokenizer found for {path} (nor for its base {source.spec})")
    return tokenizer


def build_prompt_ids(tokenizer, prompt: str, chat: bool = True, system: str | None = None) -> torch.Tensor:
    """Token ids `[1, T]` for a prompt, through the chat template when there is one and `chat` is set."""
    if chat and getattr(tokenizer, "chat_template", None):
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    return tokenizer(prompt, return_tensors="pt").input_ids


def context_length(model) -> int | None:
    """The longest sequence the model was built for (`max_position_embeddings` of its text config), if known."""
    config = getattr(model, "config", None)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    value = getattr(config, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and value > 0 else None


def fit_new_tokens(model, prompt_tokens: int, max_new_tokens: int) -> int:
    """`max_new_tokens`, capped (with a note on stderr) so prompt + answer stay within the model's context;
    ConfigError when the prompt alone fills it."""
    import sys

    from .errors import ConfigError

    context = context_length(model)
    if context is None or prompt_tokens + max_new_tokens <= context:
        return max_new_tokens
    room = context - prompt_tokens
    if room <= 0:
        raise ConfigError(f"the prompt is {prompt_tokens} tokens, the model's context is {context}: shorten it")
    print(f"note: max new tokens capped from {max_new_tokens} to {room}: the prompt takes {prompt_tokens} of the "
          f"model's {context}-token context", file=sys.stderr)
    return room


def generate_text(
    model,
    tokenizer,
    prompt: str,
    *,
    max_new_tokens: int = 128,
    do_sample: bool = False,
    temperature: float = 0.7,
    top_p: float = 0.9,
    seed: int | None = None,
    chat: bool = True,
    system: str | None = None,
    stream: bool = False,
    use_cache: bool = True,
) -> str:
    """Generate a completion and return only the new text. With `stream`, print tokens as they come."""
    from transformers import TextStreamer

    if seed is not None:
        torch.manual_seed(seed)
    input_ids = build_prompt_ids(tokenizer, prompt, chat, system).to(model.device)
    max_new_tokens = fit_new_tokens(model, input_ids.shape[1], max_new_tokens)
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, use_cache=use_cache)
    if do_sample:
        kwargs.update(temperature=temperature, top_p=top_p)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    if tokenizer.pad_token_id is None:
        kwargs["pad_token_id"] = tokenizer.eos_token_id
    if stream:
        kwargs["streamer"] = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    with torch.inference_mode():
        output = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), **kwargs)
    return tokenizer.decode(output[0, input_ids.shape[1]:], skip_special_tokens=True)

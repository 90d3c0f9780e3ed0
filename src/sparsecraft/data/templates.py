"""Chat templates as Jinja strings, rendered by the tokenizer's own `apply_chat_template`.

The named templates are written as Jinja too, so one masking code path serves every template: the tokenizer's,
`camelidae` (the PESC reference's prompt format) and `chatml`.
"""

from __future__ import annotations

from ..errors import ConfigError
from .formats import Message

# `### System:\n{system}\n` (optional), then per turn `### Human:\n{input}\n### Assistant:\n{output}` + EOS:
# the Camelidae reference format; EOS ends each answer so the model learns to stop.
CAMELIDAE_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}### System:\n{{ m['content'] }}\n"
    "{% elif m['role'] == 'user' %}### Human:\n{{ m['content'] }}\n"
    "{% else %}### Assistant:\n{{ m['content'] }}{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}### Assistant:\n{% endif %}"
)

CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

NAMED = {"camelidae": CAMELIDAE_TEMPLATE, "chatml": CHATML_TEMPLATE}


def tokenizer_template(tokenizer) -> str | None:
    """The tokenizer's default chat template, if it has one."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates: the default one
        template = template.get("default")
    return template or None


def resolve_template(tokenizer, template: str = "auto") -> str:
    """The Jinja text for `template`: auto | tokenizer | camelidae | chatml | a literal Jinja template.

    Set it as `tokenizer.chat_template` before saving a trained model so generation uses the same format.
    """
    if template == "auto":
        return tokenizer_template(tokenizer) or CAMELIDAE_TEMPLATE
    if template == "tokenizer":
        found = tokenizer_template(tokenizer)
        if found is None:
            raise ConfigError("data.template: the tokenizer has no chat template; use camelidae or chatml")
        return found
    if template in NAMED:
        if template == "camelidae" and not getattr(tokenizer, "eos_token", None):
            raise ConfigError("data.template: camelidae ends answers with EOS, and the tokenizer has no eos_token")
        return NAMED[template]
    if "{" in template:
        return template
    raise ConfigError(f"data.template: unknown template {template!r} (auto, tokenizer, camelidae, chatml)")


def render(tokenizer, messages: list[Message], chat_template: str, add_generation_prompt: bool = False) -> str:
    """The conversation as text (special tokens as text, e.g. `<|im_end|>`)."""
    return tokenizer.apply_chat_template(messages, chat_template=chat_template, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def bos_to_add(tokenizer) -> int | None:
    """The BOS id when the tokenizer puts one in front of text it encodes (a tokenizer may define a BOS and not
    use it, e.g. Qwen2), else None."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bos if ids and ids[0] == bos else None

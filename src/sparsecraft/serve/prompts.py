"""Request -> prompt token ids, checked against the context length.

Chat messages go through the tokenizer's own chat template (with the generation prompt); a tokenizer without
one gets a plain `role: content` transcript. Text completions take a string, a one-string list or token ids.
"""

from __future__ import annotations

from .errors import APIError
from .protocol import ChatCompletionRequest, ChatMessage, CompletionRequest, SamplingFields


def message_text(message: ChatMessage, index: int) -> str:
    """A message's content as one string (text parts joined); 400 for non-text parts."""
    content = message.content
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for j, part in enumerate(content):
        if part.type != "text" or part.text is None:
            raise APIError(400, f"content part of type {part.type!r} is not supported by a text model",
                           param=f"messages[{index}].content[{j}]", code="unsupported_content")
        texts.append(part.text)
    return "".join(texts)


def unsupported(param: str, what: str) -> APIError:
    """The 400 for a request field this server cannot honour (`what ... is not supported by this server`)."""
    return APIError(400, f"{what} not supported by this server", param=param, code="unsupported_parameter")


def check_chat_fields(request: ChatCompletionRequest) -> None:
    """Refuse what would be answered wrongly if ignored: tools and the older function calling, and any response
    format but plain text (the server cannot constrain output to JSON)."""
    extra = request.model_extra or {}
    if request.tools:
        raise unsupported("tools", "tools are")
    for name in ("functions", "function_call"):
        if extra.get(name) is not None:
            raise unsupported(name, f"{name} (function calling) is")
    response_format = extra.get("response_format")
    if response_format is not None:
        kind = response_format.get("type") if isinstance(response_format, dict) else response_format
        if kind != "text":
            raise unsupported("response_format", f"response_format {kind!r} (only 'text') is")


def chat_prompt_ids(tokenizer, request: ChatCompletionRequest) -> list[int]:
    check_chat_fields(request)
    messages = [{"role": m.role, "content": message_text(m, i)} for i, m in enumerate(request.messages)]
    if getattr(tokenizer, "chat_template", None):
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # noqa: BLE001 - a template may raise on roles or orders it does not accept
            raise APIError(400, f"the model's chat template rejected these messages: {exc}", param="messages",
                           code="invalid_messages") from None
        return tokenizer(text, add_special_tokens=False).input_ids
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
    return tokenizer(text).input_ids


def completion_prompt_ids(tokenizer, request: CompletionRequest) -> list[int]:
    prompt = request.prompt
    if request.echo or request.suffix:
        name = "echo" if request.echo else "suffix"
        raise unsupported(name, f"{name} is")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return tokenizer(prompt).input_ids
    if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
        vocab = len(tokenizer)
        if any(t < 0 or t >= vocab for t in prompt):
            raise APIError(400, f"token ids must be in 0..{vocab - 1}", param="prompt", code="invalid_value")
        return list(prompt)
    raise APIError(400, "one prompt per request (a string or a list of token ids)", param="prompt",
                   code="invalid_value")


def check_sampling(request: SamplingFields) -> None:
    if request.n != 1:
        raise unsupported("n", "n other than 1 is")
    if request.logprobs is not None and request.logprobs is not False:  # completions' logprobs=0 asks too
        raise unsupported("logprobs", "logprobs are")


def completion_budget(prompt_len: int, request: SamplingFields, context: int, prompt_param: str = "messages") -> int:
    """max_tokens for this request: what it asked for, or the rest of the context; 400 when it cannot fit."""
    if prompt_len == 0:
        raise APIError(400, "the prompt is empty", param=prompt_param, code="invalid_value")
    asked = request.token_limit()
    param = "max_completion_tokens" if request.max_completion_tokens is not None else "max_tokens"
    if prompt_len >= context:
        raise APIError(400, f"This model's maximum context length is {context} tokens, but the prompt has "
                            f"{prompt_len} tokens. Shorten the prompt.", param=prompt_param,
                       code="context_length_exceeded")
    if asked is not None and prompt_len + asked > context:
        raise APIError(400, f"This model's maximum context length is {context} tokens. However, you requested "
                            f"{prompt_len + asked} tokens ({prompt_len} in the prompt, {asked} for the completion). "
                            f"Reduce the prompt or {param}.", param=param, code="context_length_exceeded")
    return asked if asked is not None else context - prompt_len

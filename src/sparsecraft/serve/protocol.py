"""The request bodies of the OpenAI-compatible endpoints, as pydantic models.

Fields OpenAI defines and this server does not act on (penalties, `user`, `logit_bias` ...) are accepted and
ignored, so ordinary clients work; those whose answer would be wrong if ignored (`n` > 1, `logprobs`, tools)
are refused with a 400 naming the field. `ignore_eos` is vLLM's extension (fixed-length outputs for benchmarks).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

ROLES = ("system", "developer", "user", "assistant", "tool")


class ContentPart(BaseModel):
    """One part of a message's content; only text parts can be served by a text model."""

    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class SamplingFields(BaseModel):
    """What chat and text completions share."""

    model_config = ConfigDict(extra="allow")
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**64)  # what a torch generator takes
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: bool | int | None = None
    ignore_eos: bool = False

    @field_validator("temperature", "top_p", "n", "stream", "ignore_eos", mode="before")
    @classmethod
    def _null_is_default(cls, value, info):
        """OpenAI's API takes null for these optional fields: the default."""
        return cls.model_fields[info.field_name].default if value is None else value

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, value):
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must not be empty")
        return stops

    def stop_list(self) -> list[str]:
        return list(self.stop or [])

    def token_limit(self) -> int | None:
        """The completion length asked for (`max_completion_tokens` is the newer name of `max_tokens`)."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list | None = None


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    suffix: str | None = None

    @field_validator("echo", mode="before")
    @classmethod
    def _null_echo(cls, value):
        return False if value is None else value

"""What the engine is asked and what it answers: requests, their events, a running request's state, queue errors."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from .sampling import make_generator
from .textstream import TextStream


@dataclass
class Event:
    """What a request hears: `text` (a delta), `done` (finish reason and token counts) or `error`."""

    kind: str
    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(eq=False)
class GenerationRequest:
    """One completion to generate. `temperature` 0 is greedy; `stop` strings end it early."""

    prompt_ids: list[int]
    max_tokens: int
    sink: Callable[[Event], None]
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    cancelled: bool = False
    finished: bool = False  # set by the engine with the final event (done or error): there is only one


class QueueFull(Exception):
    """The waiting queue is at its bound."""


class EngineStopped(Exception):
    """The engine is shutting down and takes no new work."""


class RunningRequest:
    """A running request: its text stream, generator, token count and last token."""

    def __init__(self, request: GenerationRequest, tokenizer) -> None:
        self.request = request
        self.stream = TextStream(tokenizer, request.stop)
        self.generator = make_generator(request.seed)
        self.generated = 0
        self.last = 0


def eos_ids(model, tokenizer) -> set[int]:
    """End-of-sequence ids: the generation config's (one or several) and the tokenizer's."""
    ids = set()
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (config_eos, tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids

"""lm-eval's `generate_until` requests answered through the serving engine's continuous batching.

lm-eval's own HF path (`HFLM.generate_until` -> `model.generate`) decodes a fixed batch until its longest answer
ends, so rows that stopped early are computed to the end, and a sampled task's repeats (`repeats: 10`) prefill the
same prompt ten times. The engine (`serve.engine.Engine`) frees a finished row at once, writes the next request
into it, and prefills identical prompts once. The answers are cut at the stop sequences as lm-eval cuts them;
greedy answers equal `model.generate`'s up to floating-point summation order; sampled ones draw from a generator
seeded per request (torch's seed and the request's index), so a rerun gives the same answers whatever the batch.

Requests with generation options the engine does not have (top_k, beams, repetition penalty, ...) go to lm-eval's
path unchanged; `engine_can_run` says which.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from ..serve.engine import Engine
from ..serve.requests import Event, GenerationRequest

# Keys of lm-eval's normalised generation kwargs that the engine honours; anything else goes to model.generate.
ENGINE_OPTIONS = frozenset({"do_sample", "temperature", "top_p", "until", "max_gen_toks"})


@dataclass
class Prompt:
    """One answer to generate: token ids (already truncated), limits and sampling settings."""

    ids: list[int]
    max_tokens: int
    stop: list[str] = field(default_factory=list)
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None


def engine_can_drive(model) -> bool:
    """The engine calls `forward` with a KV cache, masks and position ids: a transformers model takes them; a
    stand-in with only `generate` (test doubles, foreign wrappers) stays on lm-eval's path."""
    from transformers import PreTrainedModel

    return isinstance(model, PreTrainedModel)


def engine_can_run(normalised_kwargs: dict) -> bool:
    """True when every option in lm-eval's normalised generation kwargs is one the engine honours (a key set to
    None or to its neutral value counts as absent)."""
    neutral = {"top_k": (None, 0), "num_beams": (None, 1), "repetition_penalty": (None, 1.0)}
    for key, value in normalised_kwargs.items():
        if key in ENGINE_OPTIONS:
            continue
        if key in neutral and value in neutral[key]:
            continue
        return False
    return True


def request_seed(base_seed: int, index: int) -> int:
    """The seed of the `index`-th request of a run seeded with `base_seed` (distinct, reproducible, < 2**63)."""
    return (base_seed * 1_000_003 + index) % (1 << 63)


def generate_all(model, tokenizer, prompts: list[Prompt], *, max_batch_size: int,
                 on_done: Callable[[int], None] | None = None, max_prefill_tokens: int = 16384) -> list[str]:
    """The answer text of every prompt, in the order given; `on_done(i)` after each one ends (progress bars).

    Prompts are admitted longest first (identical ones side by side, so their repeats share a prefill); the text
    excludes the stop sequence that ended it. Raises RuntimeError with the engine's message if a step failed.
    """
    # the repeats of a prompt are submitted side by side but admitted as slots free up: keep the last few prompts'
    # KV so each is computed once
    engine = Engine(model, tokenizer, max_batch_size=max_batch_size, max_queue=max(1, len(prompts)),
                    max_prefill_tokens=max_prefill_tokens, prefix_cache=4)
    texts: list[list[str]] = [[] for _ in prompts]
    errors: list[str] = []

    def sink_for(index: int) -> Callable[[Event], None]:
        def sink(event: Event) -> None:
            if event.kind == "text":
                texts[index].append(event.text)
            elif event.kind == "error":
                errors.append(event.text)
            if event.kind in ("done", "error") and on_done is not None:
                on_done(index)
        return sink

    order = sorted(range(len(prompts)), key=lambda i: (-len(prompts[i].ids), prompts[i].ids))
    for i in order:
        p = prompts[i]
        engine.submit(GenerationRequest(prompt_ids=p.ids, max_tokens=p.max_tokens, sink=sink_for(i),
                                        temperature=p.temperature, top_p=p.top_p, seed=p.seed, stop=p.stop))
    engine.drain()
    if errors:
        raise RuntimeError(f"generation failed for {len(errors)} request(s): {errors[0]}")
    return ["".join(parts) for parts in texts]

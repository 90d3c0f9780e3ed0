"""The next token of every row of a batch: greedy, or sampled with the row's temperature, top-p and generator.

Each request owns a `torch.Generator`, seeded from its `seed`, so a seeded request draws the same tokens
whichever requests share its batch.
"""

from __future__ import annotations

import os

import torch


def make_generator(seed: int | None) -> torch.Generator:
    """A CPU generator seeded with `seed`, or with fresh OS entropy when there is none."""
    gen = torch.Generator()
    gen.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(8), "little") & ((1 << 63) - 1))
    return gen


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability reaches `top_p` (at least one); `probs: [V]` -> `[V]`
    renormalised."""
    if top_p >= 1.0:
        return probs
    sorted_probs, order = probs.sort(descending=True)
    before = sorted_probs.cumsum(0) - sorted_probs  # mass of the tokens ranked above each one
    sorted_probs = torch.where(before < top_p, sorted_probs, torch.zeros_like(sorted_probs))
    kept = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    return kept / kept.sum()


def choose_tokens(logits: torch.Tensor, temperatures: list[float], top_ps: list[float],
                  generators: list[torch.Generator]) -> list[int]:
    """`logits: [B, V]` -> one token id per row. Temperature 0 is greedy (argmax)."""
    greedy = logits.argmax(-1).tolist()
    out = []
    for row, (temp, top_p, gen) in enumerate(zip(temperatures, top_ps, generators, strict=True)):
        if temp <= 0:
            out.append(int(greedy[row]))
            continue
        probs = torch.softmax(logits[row].float().cpu() / temp, dim=-1)
        probs = top_p_filter(probs, top_p)
        out.append(int(torch.multinomial(probs, 1, generator=gen)))
    return out

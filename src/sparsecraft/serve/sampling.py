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


CANDIDATES = 256  # most likely tokens looked at first; the nucleus almost always ends inside them
# Below this a temperature is greedy (vLLM's rule): dividing by it would overflow the logits into inf/NaN
MIN_TEMPERATURE = 1e-5


def nucleus(top_probs: torch.Tensor, top_ids: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The smallest set of tokens whose probability reaches `top_p` (at least one), renormalised.

    `top_probs: [K]` sorted descending with their ids `top_ids: [K]` -> `(ids [K'], probs [K'])`. Exact when
    the K tokens hold at least `top_p` of the mass (the caller passes the whole sorted vocabulary otherwise).
    """
    before = top_probs.cumsum(0) - top_probs  # mass of the tokens ranked above each one
    keep = before < top_p
    keep[0] = True
    kept = top_probs[keep]
    return top_ids[keep], kept / kept.sum()


def choose_tokens(logits: torch.Tensor, temperatures: list[float], top_ps: list[float],
                  generators: list[torch.Generator]) -> list[int]:
    """`logits: [B, V]` -> one token id per row. Temperature 0 (or below `MIN_TEMPERATURE`) is greedy (argmax).

    Sampled rows are softened and ranked together (one softmax and one top-`CANDIDATES` over the batch, instead of
    a full-vocabulary sort per row); each row then draws from its own nucleus with its own generator. A row whose
    nucleus reaches past the candidates (a very flat distribution) is ranked over the whole vocabulary.
    """
    out = logits.argmax(-1).tolist()
    rows = [i for i, t in enumerate(temperatures) if t >= MIN_TEMPERATURE]
    if not rows:
        return [int(t) for t in out]
    temps = torch.tensor([temperatures[i] for i in rows], dtype=torch.float32)
    chosen = logits[rows].float().cpu()
    chosen = chosen - chosen.amax(-1, keepdim=True)  # <= 0 before dividing: a small temperature cannot overflow
    probs = torch.softmax(chosen / temps[:, None], dim=-1)  # [R, V]
    k = min(CANDIDATES, probs.shape[-1])
    top_probs, top_ids = probs.topk(k, dim=-1)  # [R, k], sorted descending
    for j, row in enumerate(rows):
        top_p = float(top_ps[row])
        if top_p >= 1.0:
            out[row] = int(torch.multinomial(probs[j], 1, generator=generators[row]))
            continue
        if float(top_probs[j].sum()) >= top_p:
            ids, p = nucleus(top_probs[j], top_ids[j], top_p)
        else:
            ids, p = nucleus(*probs[j].sort(descending=True), top_p)
        out[row] = int(ids[torch.multinomial(p, 1, generator=generators[row])])
    return [int(t) for t in out]

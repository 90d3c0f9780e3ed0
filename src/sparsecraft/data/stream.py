"""The train split as a stream, for sets larger than memory: records read lazily, mixed by weight with a fixed
seed, tokenised on the fly, never materialised.

- Each source is read pass after pass without end: a streamed one in file order through a seeded shuffle buffer,
  one read whole in a fresh seeded order per pass.
- Draw k takes the next record of the source `choice(p = weights)` names, from an RNG seeded by
  `(seed, k // BLOCK)`: which source a draw names is a pure function of `(seed, k)`.
- So where the stream is, is one number, the records drawn: the records taken from each source follow from it, and
  each source's order is a pure function of `(seed, pass)`. A checkpoint stores that number (`state_dict()`);
  resuming rebuilds the sources and reads past what was drawn (reading, not tokenising, the records again).
"""

from __future__ import annotations

from collections import Counter
from itertools import count, islice
from typing import Iterable, Iterator

import numpy as np

from .config import DataConfig, DataError
from .mixing import rng_for
from .read import OpenedSource
from .templates import bos_to_add, resolve_template
from .tokenize import encode_record

BLOCK = 4096  # draws computed at a time
MAX_DROPS_IN_A_ROW = 10_000  # a stream whose samples all lose their answers to truncation would never yield
_DRAW, _ORDER = 3, 4  # RNG purposes (load.py's are 0-2)


def shuffled(items: Iterable, size: int, rng: np.random.Generator) -> Iterator:
    """`items` through a shuffle buffer holding `size` of them (as datasets' `IterableDataset.shuffle`)."""
    if size <= 1:
        yield from items
        return
    buffer: list = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        j = int(rng.integers(size))
        yield buffer[j]
        buffer[j] = item
    for j in rng.permutation(len(buffer)):
        yield buffer[j]


class SourceStream:
    """One source's conversations without end, pass after pass, each pass in its own seeded order.

    `lazy`: read the source on the fly through a shuffle buffer of `buffer` records; else read it whole now (it
    fails here if no record is usable) and draw each pass in a fresh permutation.
    """

    def __init__(self, opened: OpenedSource, index: int, seed: int, lazy: bool = True, buffer: int = 1000):
        self.opened, self.index, self.seed, self.buffer = opened, index, seed, buffer
        self.pool = None if lazy else list(opened.conversations())
        if self.pool is not None and not self.pool:
            raise opened.no_usable_record()

    def __iter__(self) -> Iterator[dict]:
        for n_pass in count():
            rng = rng_for(self.seed, self.index, _ORDER, n_pass)
            if self.pool is not None:
                items: Iterable = (self.pool[j] for j in rng.permutation(len(self.pool)))
            else:  # only the first pass adds to the report; later ones read the same records again
                items = shuffled(self.opened.conversations(count=n_pass == 0), self.buffer, rng)
            empty = True
            for record in items:
                empty = False
                yield record
            if empty:
                raise self.opened.no_usable_record()


class RecordStream:
    """Conversations of every train source, mixed: `next()` -> `{"messages", "source"}`, endless."""

    def __init__(self, sources: list[SourceStream], weights: list[float], seed: int):
        self.sources, self.seed = sources, seed
        self.weights = [float(w) for w in weights]
        self.p = np.asarray(self.weights) / sum(self.weights)
        self.draws = 0
        self._iters: list[Iterator[dict]] | None = None
        self._block: tuple[int, np.ndarray | None] = (-1, None)

    def choices(self, block: int) -> np.ndarray:
        """The sources draws `[block * BLOCK, (block + 1) * BLOCK)` take from."""
        if self._block[0] != block:
            self._block = (block, rng_for(self.seed, block, _DRAW).choice(len(self.p), size=BLOCK, p=self.p))
        return self._block[1]

    def __iter__(self) -> "RecordStream":
        return self

    def __next__(self) -> dict:
        if self._iters is None:
            self._start()
        block, offset = divmod(self.draws, BLOCK)
        source = int(self.choices(block)[offset])
        self.draws += 1
        return next(self._iters[source])

    def _start(self) -> None:
        """Open every source and read past the records the first `draws` draws took (a resumed stream)."""
        taken = np.zeros(len(self.sources), dtype=np.int64)
        for block in range(-(-self.draws // BLOCK)):
            part = self.choices(block)[: self.draws - block * BLOCK]
            taken += np.bincount(part, minlength=len(self.sources))
        self._iters = [iter(s) for s in self.sources]
        for it, n in zip(self._iters, taken.tolist()):
            next(islice(it, n, n), None)

    def names(self) -> list[str]:
        return [s.opened.source.path for s in self.sources]

    def state_dict(self) -> dict:
        """Where the stream is (JSON): the records drawn, and what they were drawn from, to check on resume."""
        return {"draws": self.draws, "sources": self.names(), "weights": self.weights, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state_dict()` of a stream over the same sources; before anything is drawn."""
        if self._iters is not None:
            raise RuntimeError("a stream's position is restored before it is read")
        mine = {k: v for k, v in self.state_dict().items() if k != "draws"}
        theirs = {k: state.get(k) for k in mine}
        if mine != theirs:
            changed = next(k for k in mine if mine[k] != theirs[k])
            raise DataError(f"data: the checkpoint's stream was drawn with other {changed} ({theirs[changed]}, now "
                            f"{mine[changed]}); resume with the same data settings")
        self.draws = int(state["draws"])


class TokenStream:
    """Training samples tokenised on the fly: `next()` -> `{"input_ids": [T], "labels": [T], "source": str}`,
    T <= max_length; samples with no trained token left (or that the template refuses) are skipped and counted in
    `dropped`."""

    def __init__(self, records: RecordStream, tokenizer, config: DataConfig):
        self.records, self.tokenizer = records, tokenizer
        self.template = resolve_template(tokenizer, config.template)
        self.bos_id = bos_to_add(tokenizer)
        self.max_length, self.truncation = config.max_length, config.truncation
        self.dropped: Counter = Counter()

    def __iter__(self) -> "TokenStream":
        return self

    def __next__(self) -> dict:
        for _ in range(MAX_DROPS_IN_A_ROW):
            record = next(self.records)
            ids, labels, drop = encode_record(self.tokenizer, record["messages"], self.template, self.bos_id,
                                              self.max_length, self.truncation)
            if not drop:
                return {"input_ids": ids, "labels": labels, "source": record["source"]}
            self.dropped[drop] += 1
        raise DataError(f"data: {MAX_DROPS_IN_A_ROW:,} streamed samples in a row had no trained token left after "
                        f"tokenisation (max_length={self.max_length}; dropped: {dict(self.dropped)})")

    def state_dict(self) -> dict:
        return {**self.records.state_dict(), "dropped": dict(self.dropped)}

    def load_state_dict(self, state: dict) -> None:
        self.records.load_state_dict(state)
        self.dropped = Counter(state.get("dropped", {}))


def open_sources(config: DataConfig, opened: list[OpenedSource]) -> RecordStream:
    """The mixed stream of `config`'s train sources (already opened, in order); weight 1 where none is given."""
    streams = [SourceStream(o, i, config.seed, config.streamed(o.source), config.shuffle_buffer)
               for i, o in enumerate(opened)]
    return RecordStream(streams, [o.source.weight or 1.0 for o in opened], config.seed)

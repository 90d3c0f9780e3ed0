"""A deterministic, resumable, rank-sharded order of training samples.

Epoch `e` visits the samples in `randperm(N, seed + e)`. Each micro-step takes the next `batch_size *
world_size` indices of that order and rank r keeps its own `batch_size`; an optimizer step is `grad_accum`
micro-steps. Where a run is in the data is a pure function of the step number, so resuming at step s
replays exactly what an uninterrupted run would have seen, and global token counts need no communication.

A streamed train split (`StreamBatches`) has no length and no index: the steps come off the stream in order, the
micro-batches split over ranks the same way, and the stream's position is saved with each checkpoint instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator, Protocol

import torch


@dataclass(frozen=True)
class BatchPlan:
    num_samples: int
    batch_size: int  # per rank, per micro-step
    world_size: int = 1
    rank: int = 0
    grad_accum: int = 1
    seed: int = 0

    @property
    def global_micro_batch(self) -> int:
        return self.batch_size * self.world_size

    @property
    def micro_steps_per_epoch(self) -> int:
        return self.num_samples // self.global_micro_batch  # the last incomplete global batch is dropped

    @property
    def steps_per_epoch(self) -> int:
        return self.micro_steps_per_epoch // self.grad_accum

    def total_steps(self, epochs: float, max_steps: int = 0) -> int:
        """`max_steps` if set, else the fewest optimizer steps that cover `epochs` (counted in micro-steps: with
        `grad_accum` not dividing an epoch's micro-steps, steps straddle epochs)."""
        return max_steps if max_steps > 0 else max(1, math.ceil(epochs * self.micro_steps_per_epoch / self.grad_accum))

    def _order(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_samples, generator=generator)

    def global_indices(self, step: int) -> list[list[int]]:
        """All ranks' samples for optimizer step `step`: `grad_accum` lists of `batch_size * world_size`."""
        if self.micro_steps_per_epoch == 0:
            raise ValueError(
                f"{self.num_samples} training samples cannot fill one global batch of {self.global_micro_batch}"
            )
        out = []
        for j in range(self.grad_accum):
            micro = step * self.grad_accum + j
            epoch, pos = divmod(micro, self.micro_steps_per_epoch)
            order = self._order(epoch)
            start = pos * self.global_micro_batch
            out.append(order[start:start + self.global_micro_batch].tolist())
        return out

    def rank_indices(self, step: int) -> list[list[int]]:
        """This rank's `grad_accum` micro-batches for optimizer step `step`."""
        lo, hi = self.rank * self.batch_size, (self.rank + 1) * self.batch_size
        return [micro[lo:hi] for micro in self.global_indices(step)]

    def epoch_of(self, step: int) -> float:
        return step * self.grad_accum / max(1, self.micro_steps_per_epoch)


class SampleStream(Protocol):
    """What `StreamBatches` reads: endless samples, and a JSON-able position to save and restore."""

    def __next__(self) -> dict[str, Any]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class StreamBatches:
    """Optimizer steps taken off an endless sample stream, in order.

    Every rank reads the whole stream and keeps its own `batch_size` of each global micro-batch of `batch_size *
    world_size` samples, so the ranks agree on every batch with no communication (each tokenises every sample,
    cheap next to the model's forward and backward). After step s, `state_dict()` is where step s + 1 starts.
    """

    def __init__(self, stream: SampleStream | Iterator, batch_size: int, world_size: int = 1, rank: int = 0,
                 grad_accum: int = 1):
        self.stream, self.batch_size, self.world_size = stream, batch_size, world_size
        self.rank, self.grad_accum = rank, grad_accum

    def rank_samples(self) -> list[list[dict]]:
        """This rank's `grad_accum` micro-batches (lists of `batch_size` samples) for the next optimizer step."""
        lo, hi = self.rank * self.batch_size, (self.rank + 1) * self.batch_size
        micro = [[next(self.stream) for _ in range(self.batch_size * self.world_size)] for _ in range(self.grad_accum)]
        return [m[lo:hi] for m in micro]

    def state_dict(self) -> dict:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state)

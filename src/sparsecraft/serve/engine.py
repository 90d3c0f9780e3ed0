"""The batching engine: one thread owns the model and decodes every running request one token per step.

Requests wait in a bounded queue. Before each decode step the engine admits waiting requests into free slots (up to
`max_batch_size`): their prompts are prefilled together, left-padded, and their rows join the running batch's KV
cache, so a request that arrives mid-generation starts on the next step instead of waiting for the batch to end.
Identical prompts admitted together are prefilled once (with `prefix_cache`, also ones admitted later: the KV rows
of recent prompts are kept). A finished or cancelled row is freed at once and the next admitted request's KV row is
written into it in place (`KVBatch.place`); the batch is copied only to grow, to shrink once a quarter of its rows
stay free with nothing waiting, or to widen for a prompt longer than the batch is wide. Each row keeps its own
positions, mask, sampling settings and generator, so its tokens do not depend on which rows share its batch (greedy
output equals the solo run up to floating-point summation order).

Results go out through each request's `sink` (called on the engine thread; the server hands them to its event
loop), so a client that reads slowly never holds up the step. Batch jobs (evaluation) submit everything and
call `drain()`, which runs the same steps in their own thread.
"""

from __future__ import annotations

import inspect
import logging
import threading
import time
from collections import OrderedDict, deque

import torch
from transformers import DynamicCache

from .kvbatch import KVBatch, cache_argument, left_pad, positions_from_mask
from .requests import EngineStopped, Event, GenerationRequest, QueueFull, RunningRequest, eos_ids
from .sampling import choose_tokens

log = logging.getLogger("sparsecraft.serve")


class Engine:
    """Continuous batching over a causal LM (any model `sparsecraft.load` returns) and its tokenizer."""

    def __init__(self, model, tokenizer, *, max_batch_size: int = 8, max_queue: int = 64,
                 max_prefill_tokens: int = 4096, prefix_cache: int = 0) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.max_prefill_tokens = max_prefill_tokens
        # recent prompts whose KV rows and next-token logits are kept (0: none; evaluation's repeated prompts)
        self.prefix_cache = prefix_cache
        self._prefixes: OrderedDict[tuple[int, ...], tuple[KVBatch, torch.Tensor]] = OrderedDict()
        self.prefilled_tokens = 0  # prompt tokens that went through the model (the rest came from _prefixes)
        self.device = next(model.parameters()).device
        self.eos = eos_ids(model, tokenizer)
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (min(self.eos) if self.eos else 0)
        self._cache_arg = cache_argument(model)
        self._keep_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
        self._cond = threading.Condition()
        self._waiting: deque[GenerationRequest] = deque()
        self._slots: list[RunningRequest | None] = []  # per batch row; None: a free row (decoded, token ignored)
        self._batch: KVBatch | None = None
        self._stopping = False
        self._stop_reason = "the server is shutting down"
        self._thread: threading.Thread | None = None
        self._admitting: list[GenerationRequest] = []  # taken from the queue, not yet in a row (count as running)
        self.steps = 0
        self.peak_running = 0  # most requests ever decoded together (shows that batching happened)

    # -- called from the server's threads -------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="sparsecraft-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = 30.0) -> None:
        """Stop taking work, end what is left with an error event, join the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, request: GenerationRequest) -> None:
        """Queue a request; `QueueFull` when `max_queue` requests already wait, `EngineStopped` when stopping,
        ValueError for an empty prompt (a row needs one real column)."""
        if not request.prompt_ids:
            raise ValueError("the prompt has no tokens")
        with self._cond:
            if self._stopping:
                raise EngineStopped(self._stop_reason)
            if len(self._waiting) >= self.max_queue and any(r.cancelled for r in self._waiting):
                self._waiting = deque(r for r in self._waiting if not r.cancelled)  # their clients have left
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting")
            self._waiting.append(request)
            self._cond.notify_all()

    def cancel(self, request: GenerationRequest) -> None:
        """Forget a request (its client left): its slot is freed before the next step."""
        request.cancelled = True
        with self._cond:
            self._cond.notify_all()

    def stats(self) -> dict:
        with self._cond:
            return {"running": self._running_count() + len(self._admitting), "waiting": len(self._waiting),
                    "steps": self.steps,
                    "peak_running": self.peak_running,
                    "alive": self._thread is not None and self._thread.is_alive()}

    # -- the engine thread -----------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            with torch.inference_mode():
                while True:
                    with self._cond:
                        while not self._stopping and not self._waiting and not self._slots:
                            self._cond.wait()
                        if self._stopping:
                            self._abort_all("the server is shutting down")
                            return
                        new = self._take_waiting()
                    self._step(new)
        except BaseException as exc:  # the thread dies: nothing may wait for it, and it takes no more work
            log.exception("the engine thread failed")
            with self._cond:
                self._stopping = True
                self._stop_reason = f"the engine failed: {type(exc).__name__}: {exc}"
                self._abort_all(self._stop_reason)

    def drain(self) -> None:
        """Run steps in the calling thread until no request waits or runs: for batch jobs (evaluation) that
        submit everything first. Not while the engine thread runs."""
        if self._thread is not None and self._thread.is_alive():
            raise RuntimeError("drain() while the engine thread runs")
        with torch.inference_mode():
            while self._waiting or self._slots:
                with self._cond:
                    new = self._take_waiting()
                self._step(new)

    def _step(self, new: list[GenerationRequest]) -> None:
        """Prefill the newly admitted requests, then decode one token for every running row."""
        try:
            if new:
                self._prefill(new)
                self._admitting = []
            self._drop_cancelled()
            if self._slots:
                self._decode()
        except Exception as exc:  # noqa: BLE001 - a failed step ends its requests, never the server
            log.exception("generation step failed")
            # the running rows, and those being admitted that have no row yet: every one gets its final event
            for request in [s.request for s in self._slots if s] + list(new):
                self._finish_error(request, f"generation failed: {type(exc).__name__}: {exc}")
            self._slots, self._batch = [], None
        finally:
            self._admitting = []

    def _take_waiting(self) -> list[GenerationRequest]:
        """Waiting requests for the free slots, within the prefill token budget (one always fits). Repeats of a
        prompt already taken cost nothing: `_prefill` computes each distinct prompt once."""
        taken: list[GenerationRequest] = []
        distinct: set[tuple[int, ...]] = set()
        width = 0
        running = self._running_count()
        while self._waiting and running + len(taken) < self.max_batch_size:
            head = self._waiting[0]
            if head.cancelled:
                self._waiting.popleft()
                continue
            key = tuple(head.prompt_ids)
            new_width = max(width, len(key))
            rows = len(distinct) + (key not in distinct)
            if taken and new_width * rows > self.max_prefill_tokens:
                break
            taken.append(self._waiting.popleft())
            distinct.add(key)
            width = new_width
        self._admitting = taken  # set under the lock, so `stats` never sees them nowhere
        return taken

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache) -> torch.Tensor:
        """Logits of the last position `[B, V]` (fp32)."""
        kwargs = {self._cache_arg: cache, "use_cache": True}
        if self._keep_logits:
            kwargs["logits_to_keep"] = 1
        out = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                         position_ids=positions.to(self.device), **kwargs)
        self.steps += 1
        return out.logits[:, -1].float()

    def _prefill(self, requests: list[GenerationRequest]) -> None:
        """Prefill each distinct prompt once, or take it from the recent-prompt cache (a sampled benchmark's
        repeats of one prompt arrive one slot at a time), then give every request its own row: the cache rows of a
        repeated prompt are copies, their samples are their own."""
        prompts: dict[tuple[int, ...], int] = {}
        slots = []
        for r in requests:
            try:
                slots.append(RunningRequest(r, self.tokenizer))
            except Exception as exc:  # noqa: BLE001 - e.g. a seed the generator refuses: this request alone fails
                log.exception("request could not start")
                self._finish_error(r, f"request could not start: {type(exc).__name__}: {exc}")
        requests = [slot.request for slot in slots]
        if not requests:
            return
        row_of = [prompts.setdefault(tuple(r.prompt_ids), len(prompts)) for r in requests]
        try:
            group, rows, logits = self._prompt_rows(list(prompts))
            logits = logits[torch.tensor(row_of, device=logits.device)]
            keep = self._accept(slots, self._choose_each(logits, slots))
        except Exception as exc:  # noqa: BLE001 - these requests fail; the running batch goes on
            log.exception("prefill failed")
            for r in requests:
                self._finish_error(r, f"prefill failed: {type(exc).__name__}: {exc}")
            return
        try:
            self._admit([slots[i] for i in keep], group, [rows[row_of[i]] for i in keep])
        except Exception as exc:  # the step's handler ends the running rows; these may not be among them yet
            running = {id(slot) for slot in self._slots if slot}
            for i in keep:
                if id(slots[i]) not in running:
                    self._finish_error(slots[i].request, f"generation failed: {type(exc).__name__}: {exc}")
            raise

    def _admit(self, slots: list[RunningRequest], group: KVBatch, group_rows: list[int]) -> None:
        """Give each slot its row: a free row first (written in place), else a new one (the batch grows)."""
        free = [row for row, slot in enumerate(self._slots) if slot is None][:len(slots)]
        if free:
            self._batch.place(free, group, group_rows[:len(free)])
            for row, slot in zip(free, slots, strict=False):
                self._slots[row] = slot
        if len(slots) > len(free):
            joined = group.select(group_rows[len(free):])
            self._batch = joined if self._batch is None else self._batch.merge(joined)
            self._slots += slots[len(free):]
        self.peak_running = max(self.peak_running, self._running_count())
        self._tidy()

    def _prompt_rows(self, prompts: list[tuple[int, ...]]) -> tuple[KVBatch, list[int], torch.Tensor]:
        """KV rows for the prompts: `(group, rows, logits)`, where `group.select([rows[i]])` is prompt i's row and
        `logits[i]` `[V]` its next token's logits. Prompts in the recent-prompt cache are not computed again."""
        fresh = [p for p in prompts if p not in self._prefixes]
        found = [p for p in prompts if p in self._prefixes]
        blocks: list[KVBatch] = []
        row_in_group: dict[tuple[int, ...], int] = {}
        next_logits: dict[tuple[int, ...], torch.Tensor] = {}
        if fresh:
            ids, mask = left_pad([list(p) for p in fresh], self.pad_id)
            cache = DynamicCache()
            logits = self._forward(ids, mask, positions_from_mask(mask), cache)
            self.prefilled_tokens += sum(len(p) for p in fresh)
            computed = KVBatch(cache, mask)
            blocks.append(computed)
            for j, prompt in enumerate(fresh):
                row_in_group[prompt], next_logits[prompt] = j, logits[j]
                if self.prefix_cache > 0:  # a copy of the row: later batches never write into it
                    self._prefixes[prompt] = (computed.select([j]), logits[j].clone())
        for prompt in found:
            self._prefixes.move_to_end(prompt)
            row, logits_row = self._prefixes[prompt]
            row_in_group[prompt], next_logits[prompt] = sum(b.size for b in blocks), logits_row
            blocks.append(row)
        while len(self._prefixes) > self.prefix_cache:
            self._prefixes.popitem(last=False)
        group = blocks[0] if len(blocks) == 1 else KVBatch.concat(blocks)
        return group, [row_in_group[p] for p in prompts], torch.stack([next_logits[p] for p in prompts])

    def _decode(self) -> None:
        mask, positions = self._batch.step_inputs(self.device)
        ids = torch.tensor([[slot.last if slot else self.pad_id] for slot in self._slots], dtype=torch.long)
        logits = self._forward(ids, mask, positions, self._batch.cache)
        self._batch.advance()
        live = [row for row, slot in enumerate(self._slots) if slot is not None]
        if len(live) < len(self._slots):
            logits = logits[torch.tensor(live, device=logits.device)]
        slots = [self._slots[row] for row in live]
        going = set(self._accept(slots, self._choose_each(logits, slots)))
        self._release([row for j, row in enumerate(live) if j not in going])

    def _choose(self, logits: torch.Tensor, slots: list[RunningRequest]) -> list[int]:
        return choose_tokens(logits, [s.request.temperature for s in slots], [s.request.top_p for s in slots],
                             [s.generator for s in slots])

    def _choose_each(self, logits: torch.Tensor, slots: list[RunningRequest]) -> list[int | None]:
        """The next token of every row (`logits: [B, V]`); where choosing fails for the batch (one row's logits
        not finite), each row is chosen alone and only the rows that fail end, with an error (their token None)."""
        try:
            return self._choose(logits, slots)
        except Exception:  # noqa: BLE001 - find the failing rows instead of ending every request
            log.exception("choosing the next tokens failed; choosing row by row")
        tokens: list[int | None] = []
        for j, slot in enumerate(slots):
            try:
                tokens.append(self._choose(logits[j:j + 1], [slot])[0])
            except Exception as exc:  # noqa: BLE001
                self._finish_error(slot.request, f"generation failed: {type(exc).__name__}: {exc}")
                tokens.append(None)
        return tokens

    def _drop_cancelled(self) -> None:
        self._release([row for row, slot in enumerate(self._slots) if slot and slot.request.cancelled])

    def _running_count(self) -> int:
        return sum(slot is not None for slot in self._slots)

    def _release(self, rows: list[int]) -> None:
        """Free the rows of ended requests."""
        if rows:
            for row in rows:
                self._slots[row] = None
            self._batch.release(rows)
            self._tidy()

    def _tidy(self) -> None:
        """Shrink the batch once a quarter of it is free and nothing waits (free rows still cost their share of
        every decode step); otherwise cut the leading columns no row uses any more."""
        live = [row for row, slot in enumerate(self._slots) if slot is not None]
        if not live:
            self._slots, self._batch = [], None
        elif not self._waiting and 4 * (len(self._slots) - len(live)) >= len(self._slots):
            self._batch = self._batch.select(live)
            self._slots = [self._slots[row] for row in live]
        else:
            self._batch.trim()

    def _accept(self, slots: list[RunningRequest], tokens: list[int | None]) -> list[int]:
        """Record each row's new token and send its text; returns the rows that go on (not those without a
        token: they ended with an error)."""
        going = []
        for i, (slot, token) in enumerate(zip(slots, tokens, strict=True)):
            request = slot.request
            if request.cancelled or token is None:
                continue
            slot.generated += 1
            slot.last = token
            if token in self.eos and not request.ignore_eos:
                self._finish(slot, "stop")
                continue
            delta, stopped = slot.stream.push(token)
            if delta:
                request.sink(Event("text", delta))
            if stopped:
                self._finish(slot, "stop")
            elif slot.generated >= request.max_tokens:
                self._finish(slot, "length")
            else:
                going.append(i)
        return going

    def _finish(self, slot: RunningRequest, reason: str) -> None:
        tail, stopped = slot.stream.finish()
        if tail:
            slot.request.sink(Event("text", tail))
        reason = "stop" if stopped else reason
        slot.request.finished = True
        slot.request.sink(Event("done", finish_reason=reason, prompt_tokens=len(slot.request.prompt_ids),
                                completion_tokens=slot.generated))

    @staticmethod
    def _finish_error(request: GenerationRequest, message: str) -> None:
        """End `request` with an error, unless it was cancelled or has had its final event already."""
        if not request.cancelled and not request.finished:
            request.finished = True
            request.sink(Event("error", message))

    def _abort_all(self, message: str) -> None:
        for request in [s.request for s in self._slots if s] + self._admitting + list(self._waiting):
            self._finish_error(request, message)
        self._slots, self._batch, self._admitting = [], None, []
        self._waiting.clear()


def wait_until_idle(engine: Engine, timeout: float) -> bool:
    """Poll until nothing runs or waits (tests, shutdown); True when idle in time."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = engine.stats()
        if not stats["running"] and not stats["waiting"]:
            return True
        time.sleep(0.01)
    return False

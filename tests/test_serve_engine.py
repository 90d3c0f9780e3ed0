"""The batching engine without HTTP: greedy output of every request equals the model's own solo `generate`,
whether requests run alone, together, or join a batch mid-generation (PESC, MixLoRA, upcycled, dense; several
families); seeded sampling does not depend on the batch; stop strings; the KV batch operations; text streaming."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from conftest import greedy_continuation, tiny_model, tiny_tokenizer

import sparsecraft
from sparsecraft.config import CraftConfig
from sparsecraft.serve.engine import Engine
from sparsecraft.serve.requests import EngineStopped, GenerationRequest, QueueFull
from sparsecraft.serve.textstream import TextStream

PROMPTS = ["hello there", "a", "the quick brown fox jumps", "MoE!", "x y z", "0123456789abcdef", "ok", "why?"]


def crafted(method: str, family: str = "llama"):
    model = tiny_model(family)
    if method != "dense":
        sparsecraft.craft(model, CraftConfig(num_experts=4, top_k=2, adapter_dim=8, dropout=0.0), seed=0,
                          method=method)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():  # trained-looking experts: zero-initialised W_up would hide them
            for p in sparsecraft.new_parameters(model).values():
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


def solo_generate(model, tokenizer, prompt: str, n: int) -> str:
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    return tokenizer.decode(greedy_continuation(model, ids, n), skip_special_tokens=True)


class Collector:
    """A request's sink: text pieces and the final event."""

    def __init__(self) -> None:
        self.pieces: list[str] = []
        self.done = threading.Event()
        self.final = None

    def __call__(self, event) -> None:
        if event.kind == "text":
            self.pieces.append(event.text)
        else:
            self.final = event
            self.done.set()

    @property
    def text(self) -> str:
        return "".join(self.pieces)


def request(tokenizer, prompt: str, n: int, **kw) -> tuple[GenerationRequest, Collector]:
    sink = Collector()
    kw.setdefault("ignore_eos", True)
    return GenerationRequest(tokenizer(prompt).input_ids, n, sink, **kw), sink


@pytest.fixture
def engine_for():
    started = []

    def make(model, tokenizer, **kw):
        engine = Engine(model, tokenizer, **kw)
        engine.start()
        started.append(engine)
        return engine

    yield make
    for engine in started:
        engine.stop()


@pytest.mark.parametrize("method, family", [("pesc", "llama"), ("pesc", "qwen3"), ("pesc", "gemma3"),
                                            ("mixlora", "llama"), ("upcycle", "mistral"), ("dense", "phi3")])
def test_batched_greedy_equals_solo_generate(engine_for, method, family):
    model, tok = crafted(method, family), tiny_tokenizer()
    n = 12
    want = [solo_generate(model, tok, p, n) for p in PROMPTS]
    engine = engine_for(model, tok, max_batch_size=8)
    # four requests together, then the rest join while the first ones are mid-generation
    first = [request(tok, p, n) for p in PROMPTS[:4]]
    for r, _ in first:
        engine.submit(r)
    deadline = time.monotonic() + 30
    while engine.stats()["steps"] < 4 and time.monotonic() < deadline:
        time.sleep(0.001)
    rest = [request(tok, p, n) for p in PROMPTS[4:]]
    for r, _ in rest:
        engine.submit(r)
    sinks = [s for _, s in first + rest]
    assert all(s.done.wait(60) for s in sinks)
    assert [s.text for s in sinks] == want
    assert all(s.final.finish_reason == "length" and s.final.completion_tokens == n for s in sinks)
    assert engine.peak_running > 1 and engine.steps < len(PROMPTS) * n  # they really ran together


def test_seeded_sampling_does_not_depend_on_the_batch(engine_for):
    model, tok = crafted("pesc"), tiny_tokenizer()
    engine = engine_for(model, tok)
    alone, sink = request(tok, "sample me", 16, temperature=0.9, top_p=0.8, seed=7)
    engine.submit(alone)
    assert sink.done.wait(30)
    together = [request(tok, p, 16, temperature=0.9, top_p=0.8, seed=7 if i == 2 else i) for i, p in
                enumerate(["noise", "more noise", "sample me", "other"])]
    for r, _ in together:
        engine.submit(r)
    assert all(s.done.wait(30) for _, s in together)
    assert together[2][1].text == sink.text
    assert len({s.text for _, s in together}) > 1


def test_stop_strings_and_eos_end_a_request(engine_for):
    model, tok = crafted("pesc"), tiny_tokenizer()
    free = solo_generate(model, tok, "hello there", 20)
    stop = free[5:7]
    engine = engine_for(model, tok)
    r, sink = request(tok, "hello there", 20, stop=[stop])
    engine.submit(r)
    assert sink.done.wait(30)
    assert sink.final.finish_reason == "stop" and sink.text == free[:free.index(stop)]
    # the eos id ends generation unless ignore_eos
    ids = tok("hello there", return_tensors="pt").input_ids
    with torch.inference_mode():
        first = int(model(ids).logits[0, -1].argmax())
    engine.eos = {first}
    r, sink = request(tok, "hello there", 20, ignore_eos=False)
    engine.submit(r)
    assert sink.done.wait(30) and sink.final.finish_reason == "stop" and sink.final.completion_tokens == 1


def test_bounded_queue_and_cancelled_requests_leave(engine_for):
    model, tok = crafted("pesc"), tiny_tokenizer()
    engine = Engine(model, tok, max_batch_size=1, max_queue=2)  # not started: nothing leaves the queue
    for _ in range(2):
        engine.submit(request(tok, "q", 4)[0])
    with pytest.raises(QueueFull):
        engine.submit(request(tok, "q", 4)[0])
    engine = engine_for(model, tok, max_batch_size=1)
    long, long_sink = request(tok, "long one", 100)
    engine.submit(long)
    while not long_sink.pieces:
        time.sleep(0.001)
    engine.cancel(long)
    short, short_sink = request(tok, "short", 3)
    engine.submit(short)
    assert short_sink.done.wait(30) and not long_sink.done.is_set()
    deadline = time.time() + 10  # the engine thread removes a finished request just after signalling it
    while engine.stats()["running"] and time.time() < deadline:
        time.sleep(0.001)
    assert engine.stats()["running"] == 0 and engine.steps < 100


def test_text_stream_holds_back_stop_prefixes_and_split_characters():
    tok = tiny_tokenizer()
    stream = TextStream(tok, stop=["END"])
    out = []
    for ch in "abcENxEND tail":
        delta, stopped = stream.push(tok.convert_tokens_to_ids(ch))
        out.append(delta)
        if stopped:
            break
    assert "".join(out) == "abcENx" and stream.stopped
    assert out[3] == out[4] == ""  # "E", "EN" could have been the stop string: held until "x"

    class Bytes:  # a byte-level tokenizer: one token per UTF-8 byte
        def decode(self, ids, **kw):
            return bytes(ids).decode("utf-8", errors="replace")

    stream = TextStream(Bytes())
    deltas = [stream.push(b)[0] for b in "né€".encode()]
    assert "".join(deltas) + stream.finish()[0] == "né€" and "\ufffd" not in "".join(deltas)


def test_a_stop_string_in_the_text_released_at_the_end_is_cut():
    """Text held back for a split character is searched for stop strings when generation ends there too."""

    class ByteBPE:  # a token may end with the lead byte of a two-byte character, as in GPT-2's byte-level BPE
        vocab = {0: b"Hi", 1: b" \xc3"}  # the stop string "Hi " ends inside the second token

        def decode(self, ids, **kw):
            return b"".join(self.vocab[i] for i in ids).decode("utf-8", errors="replace")

    stream = TextStream(ByteBPE(), stop=["Hi "])
    assert [stream.push(0), stream.push(1)] == [("", False), ("", False)]  # "Hi" could start the stop string
    assert stream.finish() == ("", True)  # all before the stop string "Hi "


def test_a_request_that_cannot_start_fails_alone(engine_for):
    """A request whose seed the generator refuses ends with an error; the requests running beside it go on."""
    model, tok = crafted("dense"), tiny_tokenizer()
    engine = engine_for(model, tok, max_batch_size=4)
    good, good_sink = request(tok, "hello there", 40)
    engine.submit(good)
    while not good_sink.pieces:
        time.sleep(0.001)
    bad, bad_sink = request(tok, "x", 5, temperature=1.0, seed=2**70)
    engine.submit(bad)
    assert bad_sink.done.wait(30) and bad_sink.final.kind == "error"
    assert good_sink.done.wait(30) and good_sink.final.kind == "done"
    assert good_sink.text == solo_generate(model, tok, "hello there", 40)


def test_requests_being_prefilled_count_as_running(monkeypatch):
    model, tok = crafted("dense"), tiny_tokenizer()
    engine = Engine(model, tok, max_batch_size=4)
    seen = []
    prefill = Engine._prefill
    monkeypatch.setattr(Engine, "_prefill", lambda self, new: (seen.append(self.stats()), prefill(self, new))[1])
    for prompt in ("one", "two"):
        engine.submit(request(tok, prompt, 2)[0])
    engine.drain()
    assert [(s["running"], s["waiting"]) for s in seen] == [(2, 0)]  # out of the queue, not yet in a row
    assert engine.stats()["running"] == 0


def test_a_dead_engine_thread_ends_its_requests_and_refuses_new_ones(engine_for, monkeypatch):
    model, tok = crafted("dense"), tiny_tokenizer()

    def crash(self, new):
        raise SystemError("interpreter trouble")  # escapes the step's own handler only if it is not an Exception

    monkeypatch.setattr(Engine, "_step", crash)
    engine = engine_for(model, tok)
    r, sink = request(tok, "hello", 4)
    engine.submit(r)
    assert sink.done.wait(30) and sink.final.kind == "error" and "engine failed" in sink.final.text
    engine._thread.join(30)
    assert not engine.stats()["alive"]
    with pytest.raises(EngineStopped, match="the engine failed: SystemError: interpreter trouble"):
        engine.submit(request(tok, "again", 2)[0])

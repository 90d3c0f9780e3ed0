"""The running batch's cache operations against a model's own uncached forward: a finished row freed and a new
request written into it in place (narrower and wider than the batch), leading padding cut without a copy, and the
engine reusing freed rows with every answer still equal to the model's solo `generate`."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model, tiny_tokenizer
from test_serve_engine import crafted, request, solo_generate
from transformers import DynamicCache

from sparsecraft.serve.engine import Engine
from sparsecraft.serve.kvbatch import GrowingLayer, KVBatch, cache_argument, left_pad, positions_from_mask


def prefill(model, rows: list[list[int]]) -> tuple[KVBatch, torch.Tensor]:
    """The engine's prefill: left-padded rows through the model into a fresh cache; last logits `[n, V]`."""
    ids, mask = left_pad(rows, 0)
    cache = DynamicCache()
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask),
                **{cache_argument(model): cache}, use_cache=True)
    return KVBatch(cache, mask), out.logits[:, -1]


def decode(model, batch: KVBatch, tokens: list[int]) -> torch.Tensor:
    """One decode step of every row; logits `[B, V]`."""
    mask, positions = batch.step_inputs("cpu")
    out = model(input_ids=torch.tensor(tokens)[:, None], attention_mask=mask, position_ids=positions,
                **{cache_argument(model): batch.cache}, use_cache=True)
    batch.advance()
    return out.logits[:, -1]


def uncached(model, tokens: list[int]) -> torch.Tensor:
    """The next-token logits `[V]` of one sequence computed from scratch."""
    return model(input_ids=torch.tensor([tokens])).logits[0, -1]


@torch.inference_mode()
def test_freed_rows_take_new_requests_in_place_and_match_the_uncached_model():
    model = tiny_model("llama")
    seqs = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16]]
    batch, _ = prefill(model, seqs)
    batch = batch.select([0, 1, 2])  # as the engine holds it: growing layers
    for token in (20, 21):
        decode(model, batch, [token] * 3)
        seqs = [s + [token] for s in seqs]
    keys_before = batch.cache.layers[0].keys.data_ptr()

    batch.release([1])  # row 1 finished; a narrower new request takes its place
    new, _ = prefill(model, [[30, 31, 32]])
    batch.place([1], new, [0])
    seqs[1] = [30, 31, 32]
    logits = decode(model, batch, [22, 40, 22])
    seqs = [s + [t] for s, t in zip(seqs, [22, 40, 22], strict=True)]
    assert batch.cache.layers[0].keys.data_ptr() == keys_before  # nothing was copied
    for row, seq in enumerate(seqs):
        torch.testing.assert_close(logits[row], uncached(model, seq), rtol=0, atol=1e-5)

    batch.release([0])  # a group with a long and a short prompt: placing the short one leaves the width alone
    long = list(range(40, 60))
    new, _ = prefill(model, [[50, 51], long])
    width = batch.width
    batch.place([0], new, [0])
    assert batch.width == width
    batch.release([0])  # a request longer than every row: the batch widens
    batch.place([0], new, [1])
    seqs[0] = long
    logits = decode(model, batch, [41, 42, 43])
    seqs = [s + [t] for s, t in zip(seqs, [41, 42, 43], strict=True)]
    assert batch.width == len(long) + 1
    for row, seq in enumerate(seqs):
        torch.testing.assert_close(logits[row], uncached(model, seq), rtol=0, atol=1e-5)

    batch.release([0])  # the long row leaves; decoded while free, it keeps no column
    logits = decode(model, batch, [44, 45, 46])
    seqs = [s + [t] for s, t in zip(seqs, [44, 45, 46], strict=True)]
    assert int(batch.mask[0].sum()) == 0 and int(batch.lengths[0]) == 0
    free_columns = batch.width - max(len(s) for s in seqs[1:])  # the columns only the long row used are cut
    assert batch.trim(min_columns=1000) == 0 and batch.trim(min_columns=1) == free_columns
    logits = decode(model, batch, [47, 48, 49])
    for row in (1, 2):
        torch.testing.assert_close(logits[row], uncached(model, seqs[row] + [[47, 48, 49][row]]), rtol=0, atol=1e-5)


def test_growing_layer_drops_leading_columns_without_copying():
    g = torch.Generator().manual_seed(0)
    chunks = [torch.randn(2, 3, n, 4, generator=g) for n in (6, 1, 1)]
    layer = GrowingLayer()
    layer.update(chunks[0], -chunks[0])
    layer.drop_leading(4)
    cut = layer.keys.data_ptr()
    keys, values = layer.update(chunks[1], -chunks[1])
    assert keys.data_ptr() == cut  # written into the same buffer, behind the cut
    want = torch.cat([chunks[0][..., 4:, :], chunks[1]], -2)
    assert torch.equal(keys, want) and torch.equal(values, -want)
    layer.batch_select_indices(torch.tensor([0]))  # replaced from outside, then cut: copied on the next update
    layer.drop_leading(1)
    keys, _ = layer.update(chunks[2][:1], -chunks[2][:1])
    assert torch.equal(keys, torch.cat([want[:1, :, 1:], chunks[2][:1]], -2))


@pytest.mark.parametrize("method", ["pesc", "dense"])
def test_engine_reuses_freed_rows_and_answers_stay_solo(method, monkeypatch):
    model, tok = crafted(method), tiny_tokenizer()
    long = "a long prompt that ends soon, after which its columns are cut " * 2
    prompts = ["hello there", "a", long, "the quick brown fox jumps", "MoE!", "x y z", "0123456789abcdef", "ok", "why?"]
    lengths = [3, 9, 2, 5, 12, 2, 7, 4, 10]  # rows finish at different steps while others wait
    want = [solo_generate(model, tok, p, n) for p, n in zip(prompts, lengths, strict=True)]
    placed, cut = [], []
    place, trim = KVBatch.place, KVBatch.trim
    monkeypatch.setattr(KVBatch, "place", lambda self, rows, *a: (placed.append(len(rows)), place(self, rows, *a)))
    monkeypatch.setattr(KVBatch, "trim", lambda self, *a: cut.append(trim(self, *a)) or cut[-1])
    engine = Engine(model, tok, max_batch_size=3)
    sinks = []
    for prompt, n in zip(prompts, lengths, strict=True):
        r, sink = request(tok, prompt, n)
        engine.submit(r)
        sinks.append(sink)
    engine.drain()
    assert [s.text for s in sinks] == want
    assert sum(placed) >= 4 and engine.peak_running == 3  # finished rows took new requests in place
    assert max(cut) >= len(tok(long).input_ids) - 20  # the long prompt's columns went once it ended


def test_a_failed_admission_ends_every_request_and_the_engine_goes_on(monkeypatch):
    model, tok = crafted("pesc"), tiny_tokenizer()

    def broken(self, *args):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(KVBatch, "place", broken)
    engine = Engine(model, tok, max_batch_size=2)
    sinks = []
    for prompt, n in [("first", 2), ("second", 6), ("third", 6), ("fourth", 3)]:
        r, sink = request(tok, prompt, n)
        engine.submit(r)
        sinks.append(sink)
    engine.drain()  # "third" goes into the row "first" freed: that fails, ending "third" and the running "second"
    assert all(s.done.is_set() for s in sinks)
    assert [s.final.kind for s in sinks] == ["done", "error", "error", "done"]
    assert "out of memory" in sinks[2].final.text
    assert sinks[3].text == solo_generate(model, tok, "fourth", 3)  # the next request starts a fresh batch


@torch.inference_mode()
def test_a_reused_rows_old_columns_cannot_poison_the_new_request():
    """A finished request's values (NaN after an fp16/bf16 overflow, say) in columns the new request leaves masked:
    a mask does not neutralise NaN in attention, so placing must clear them."""
    model = tiny_model("llama")
    batch, _ = prefill(model, [[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]])
    batch = batch.select([0, 1])
    for layer in batch.cache.layers:
        layer.values[1, :, :3] = float("nan")
        layer.keys[1, :, :3] = float("inf")
    batch.release([1])
    new, _ = prefill(model, [[30, 31]])
    batch.place([1], new, [0])  # narrower than the batch: columns 0-3 of row 1 are masked, not overwritten
    assert batch.mask[1].tolist() == [0, 0, 0, 0, 1, 1]
    logits = decode(model, batch, [20, 40])
    torch.testing.assert_close(logits[1], uncached(model, [30, 31, 40]), rtol=0, atol=1e-5)
    torch.testing.assert_close(logits[0], uncached(model, [5, 6, 7, 8, 9, 10, 20]), rtol=0, atol=1e-5)


@pytest.mark.parametrize("when", ["prefill", "decode"])
def test_a_request_whose_next_token_cannot_be_chosen_ends_alone(when, monkeypatch):
    """Choosing fails for one row (its logits not finite, say): that request ends with one error event; the
    others, admitted in the same step or running beside it, go on to their solo answers."""
    model, tok = crafted("pesc"), tiny_tokenizer()
    engine = Engine(model, tok, max_batch_size=4)
    running, running_sink = request(tok, "already running", 6)
    engine.submit(running)
    engine._step(engine._take_waiting())
    bad, bad_sink = request(tok, "the bad one", 6)
    good, good_sink = request(tok, "admitted with it", 6)
    calls = {"bad": 0}
    choose = Engine._choose

    def failing(self, logits, slots):
        if any(slot.request is bad for slot in slots):
            calls["bad"] += 1
            if when == "prefill" or calls["bad"] > 2:  # in decode: after two tokens
                raise RuntimeError("probability tensor contains either inf, nan or element < 0")
        return choose(self, logits, slots)

    monkeypatch.setattr(Engine, "_choose", failing)
    for r in (bad, good):
        engine.submit(r)
    engine.drain()
    assert bad_sink.final.kind == "error" and "probability tensor" in bad_sink.final.text
    assert bad.finished and [s.final.kind for s in (running_sink, good_sink)] == ["done", "done"]
    assert running_sink.text == solo_generate(model, tok, "already running", 6)
    assert good_sink.text == solo_generate(model, tok, "admitted with it", 6)


def test_a_tiny_temperature_is_greedy_not_nan():
    from sparsecraft.serve.sampling import choose_tokens, make_generator

    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0)) * 10
    gens = [make_generator(0) for _ in range(3)]
    assert choose_tokens(logits, [1e-40, 1e-6, 0.0], [1.0, 0.5, 1.0], gens) == logits.argmax(-1).tolist()
    sharp = choose_tokens(logits, [1e-4] * 3, [1.0] * 3, gens)  # sampled, but far too sharp to leave the argmax
    assert sharp == logits.argmax(-1).tolist()

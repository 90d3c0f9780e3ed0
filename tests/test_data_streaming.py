"""Streaming: sources read lazily, mixed by weight with a fixed seed, tokenised on the fly; the position saved in
checkpoints so that a run interrupted and resumed sees the same batches and ends with the same weights."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_base, tiny_tokenizer
from safetensors.torch import load_file

import sparsecraft.train.loop as loop_module
from sparsecraft.data import DataConfig, DataError, DataSource, TokenStream, load_records, open_stream, prepare_data
from sparsecraft.errors import CheckpointError, ConfigError
from sparsecraft.train.batches import StreamBatches
from sparsecraft.train.loop import run
from sparsecraft.train.recipe import load_recipe

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "configs" / "quickstart.yaml"
TRAIN_STEP = loop_module.train_step


def numbered(path: Path, stem: str, n: int) -> str:
    path.write_text("".join(json.dumps({"query": f"{stem}{i}", "response": f"{i % 10}"}) + "\n" for i in range(n)))
    return str(path)


def prompts(stream, n: int) -> list[str]:
    return [next(stream)["messages"][0]["content"] for _ in range(n)]


@pytest.fixture
def two(tmp_path) -> tuple[str, str]:
    return numbered(tmp_path / "a.jsonl", "a", 300), numbered(tmp_path / "b.jsonl", "b", 40)


def stream_config(a: str, b: str, **kw) -> DataConfig:
    lazy_b = kw.pop("lazy_b", True)
    return DataConfig([DataSource(a, weight=3), DataSource(b, weight=1, streaming=None if lazy_b else False)],
                      streaming=True, **{"shuffle_buffer": 16, **kw})


def test_stream_mixes_by_weight_with_a_fixed_seed_and_cycles(two):
    a, b = two
    stream, _, report = open_stream(stream_config(a, b, seed=3))
    drawn = prompts(stream, 4000)
    shares = Counter(p[0] for p in drawn)
    assert 0.72 < shares["a"] / 4000 < 0.78  # weights 3:1
    assert drawn == prompts(open_stream(stream_config(a, b, seed=3))[0], 4000)  # same seed, same stream
    assert drawn != prompts(open_stream(stream_config(a, b, seed=4))[0], 4000)
    # b (40 records) went round many times, each pass in another order, every record once per pass
    b_drawn = [p for p in drawn if p[0] == "b"]
    assert Counter(b_drawn[:40]) == Counter(f"b{i}" for i in range(40))
    assert b_drawn[:40] != b_drawn[40:80] and b_drawn[:40] != [f"b{i}" for i in range(40)]
    assert report.streamed and "streamed train" in report.format()


def test_a_streamed_source_is_read_lazily(tmp_path):
    big = numbered(tmp_path / "big.jsonl", "x", 20_000)
    stream, _, report = open_stream(DataConfig([DataSource(big)], streaming=True, shuffle_buffer=8))
    prompts(stream, 10)
    assert report.sources[0].read <= 20  # the buffer and the records drawn, not the file
    assert "streamed: counts are of what was read so far" in report.format()


@pytest.mark.parametrize("lazy_b", [True, False], ids=["both-streamed", "one-read-whole"])
def test_resume_from_a_saved_position_continues_exactly(two, lazy_b):
    a, b = two
    whole = prompts(open_stream(stream_config(a, b, lazy_b=lazy_b))[0], 1000)
    first, _, _ = open_stream(stream_config(a, b, lazy_b=lazy_b))
    assert prompts(first, 613) == whole[:613]
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint's state.json holds
    resumed, _, _ = open_stream(stream_config(a, b, lazy_b=lazy_b))
    resumed.load_state_dict(state)
    assert prompts(resumed, 387) == whole[613:]
    other, _, _ = open_stream(stream_config(a, b, lazy_b=lazy_b, seed=9))
    with pytest.raises(DataError, match=r"the checkpoint's stream was drawn with other seed \(0, now 9\)"):
        other.load_state_dict(state)


def test_take_and_tokenising_on_the_fly(tmp_path):
    tok = tiny_tokenizer()
    path = tmp_path / "m.jsonl"
    rows = [{"query": "x" * 60, "response": "long"}] + [{"query": f"q{i}", "response": f"a{i}"} for i in range(5)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = DataConfig([DataSource(str(path), take=4)], streaming=True, shuffle_buffer=0, max_length=24)
    prepared = prepare_data(config, tok)
    assert isinstance(prepared.train, TokenStream)
    samples = [next(prepared.train) for _ in range(6)]  # the first record loses its answer to truncation
    assert [tok.decode([t for t in s["labels"] if t >= 0]) for s in samples] == \
        ["a0<|im_end|>", "a1<|im_end|>", "a2<|im_end|>"] * 2  # take 4 = the long one and a0..a2, cycled
    assert all(len(s["input_ids"]) <= 24 for s in samples)
    state = prepared.train.state_dict()
    assert state["dropped"] == {"dropped_no_target": 2} and state["draws"] == 8
    batch = prepared.collator(samples[:2])
    assert batch["input_ids"].shape[0] == 2


def test_ranks_split_each_global_micro_batch():
    def numbers():
        n = 0
        while True:
            yield {"n": n}
            n += 1

    one = StreamBatches(numbers(), batch_size=4, grad_accum=2)
    ranks = [StreamBatches(numbers(), batch_size=2, world_size=2, rank=r, grad_accum=2) for r in range(2)]
    for _ in range(3):
        whole = one.rank_samples()
        parts = [r.rank_samples() for r in ranks]
        for j in range(2):
            assert parts[0][j] + parts[1][j] == whole[j]


def test_streaming_refuses_what_needs_the_whole_set(two):
    a, b = two
    for kw, message in (({"packing": True}, "data.packing: not available with streaming"),
                        ({"total": 10}, "data.total: a stream has no total"),
                        ({"eval_fraction": 0.1}, "data.eval_fraction: a stream has no length")):
        with pytest.raises(ConfigError, match=message) as e:
            DataConfig([DataSource(a)], streaming=True, **kw)
        assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=r"sources\[1\].samples: counts need the whole set"):
        DataConfig([DataSource(a, streaming=True), DataSource(b, samples=5)])
    with pytest.raises(DataError, match="streamed sources have no fixed list of records"):
        load_records(DataConfig([DataSource(a)], streaming=True))


# ---------------------------------------------------------------- training on a stream, interrupted and resumed

@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    save_tiny_base(root / "base")
    numbered(root / "math.jsonl", "", 64)
    (root / "chat.jsonl").write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"echo {i}"}, {"role": "assistant", "content": f"{i}"}]}) + "\n"
        for i in range(16)))
    return root


def stream_args(workdir: Path, out: Path, *extra: str) -> list[str]:
    sources = [{"path": str(workdir / "math.jsonl"), "weight": 3}, {"path": str(workdir / "chat.jsonl"), "weight": 1}]
    return [f"model={workdir / 'base'}", f"output_dir={out}", f"data.sources={json.dumps(sources)}",
            "data.eval_sources=[]", "data.streaming=true", "data.shuffle_buffer=8", "data.max_length=32",
            "quantization=none", "max_steps=6", "batch_size=3", "grad_accum=2", "lora.r=4", "craft.num_experts=4",
            "craft.adapter_dim=8", "craft.dropout=0.1", "lora.dropout=0.1", "lr=5e-3", "optim.warmup_ratio=0",
            "logging.progress=false", "checkpoint.every=2", "checkpoint.keep=5", *extra]


def weights(out: Path) -> dict:
    tensors = load_file(str(out / "model" / "sparsecraft.safetensors"))
    tensors.update(load_file(str(out / "model" / "lora" / "adapter_model.safetensors")))
    return tensors


class Killed(Exception):
    """The run stopping mid-way, as a kill would stop it."""


def recording(monkeypatch, seen: list, stop_after: int | None = None):
    """Record each step's input_ids (and stop the run like a kill after `stop_after` steps)."""
    def step(model, batches, accelerator, craft_cfg, recorder=None):
        if stop_after is not None and len(seen) == stop_after:
            raise Killed
        seen.append([b["input_ids"].tolist() for b in batches])
        return TRAIN_STEP(model, batches, accelerator, craft_cfg, recorder)

    monkeypatch.setattr(loop_module, "train_step", step)


def test_streamed_run_interrupted_and_resumed_matches_uninterrupted(workdir, tmp_path, monkeypatch):
    full_seen: list = []
    recording(monkeypatch, full_seen)
    summary = run(load_recipe(QUICKSTART, stream_args(workdir, tmp_path / "full")))
    assert summary["steps"] == 6 and summary["data_stream"]["draws"] >= 36
    state = json.loads((tmp_path / "full" / "checkpoints" / "step-000004" / "state.json").read_text())
    assert state["data_stream"]["draws"] >= 24 and state["data_stream"]["sources"][0].endswith("math.jsonl")

    cut_seen: list = []
    recording(monkeypatch, cut_seen, stop_after=4)  # dies in step 5, after the checkpoint of step 4
    with pytest.raises(Killed):
        run(load_recipe(QUICKSTART, stream_args(workdir, tmp_path / "cut")))
    assert cut_seen == full_seen[:4]

    resumed_seen: list = []
    recording(monkeypatch, resumed_seen)
    summary = run(load_recipe(QUICKSTART, stream_args(workdir, tmp_path / "cut")), resume=True)
    assert summary["steps"] == 6 and resumed_seen == full_seen[4:]  # steps 5 and 6, the same batches
    expected, got = weights(tmp_path / "full"), weights(tmp_path / "cut")
    assert set(got) == set(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-6, msg=name)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert losses[-1] < losses[0]

    # a checkpoint of a streamed run does not resume a run over a fixed dataset (nor the reverse)
    with pytest.raises((CheckpointError, ConfigError), match="data streaming|data.streaming"):
        run(load_recipe(QUICKSTART, stream_args(workdir, tmp_path / "full", "data.streaming=false",
                                                "checkpoint.every=0")), resume=True)


def test_streaming_needs_max_steps_before_the_model_loads(workdir, tmp_path):
    args = stream_args(workdir, tmp_path / "o", "max_steps=0", "model=/no/such/model")
    with pytest.raises(ConfigError, match="data.streaming needs train.max_steps") as e:
        run(load_recipe(QUICKSTART, args))
    assert "\n" not in str(e.value)

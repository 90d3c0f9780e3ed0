"""`sparsecraft bench --serve`: a crafted model and its dense base each behind a server process on 127.0.0.1,
driven by concurrent streaming clients in alternating rounds; the table and the JSON record come out."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
from conftest import tiny_model, tiny_tokenizer  # noqa: E402

import sparsecraft  # noqa: E402
import sparsecraft.cli  # noqa: E402
from sparsecraft.bench.serve_bench import merge  # noqa: E402
from sparsecraft.bench.serve_load import LoadResult, RequestTiming, percentile  # noqa: E402


def test_bench_serve_runs_both_models(tmp_path, capsys):
    tiny_model("llama").save_pretrained(tmp_path / "base")
    tiny_tokenizer().save_pretrained(tmp_path / "base")
    model = sparsecraft.load(tmp_path / "base")
    sparsecraft.craft(model, sparsecraft.CraftConfig(num_experts=4, top_k=2, adapter_dim=8), seed=0)
    sparsecraft.save(model, tmp_path / "pesc")
    capsys.readouterr()
    code = sparsecraft.cli.main(["bench", "--serve", str(tmp_path / "pesc"), "--clients", "3", "--duration", "2",
                                 "--rounds", "2", "--max-tokens", "4", "--json", str(tmp_path / "load.json")])
    assert code == 0
    out = capsys.readouterr().out
    assert "| dense " in out and "| crafted " in out and "crafted/dense generated tokens/s" in out
    record = json.loads((tmp_path / "load.json").read_text())
    dense, crafted = record["results"]
    for r in (dense, crafted):
        assert r["requests"] > 0 and r["errors"] == 0 and r["generated_tokens"] == 4 * r["requests"]
        assert 0 < r["ttft_p50_s"] <= r["latency_p95_s"]
    assert record["settings"]["rounds"] == 2 and record["machine"]["cores"] >= 1


def test_merged_rounds_and_percentiles():
    part = LoadResult("m", 2, 2.0, 2, 0, 8, 1.0, 4.0, 0, 0, 0, 0, [RequestTiming(0.1, 1.0, 4),
                                                                    RequestTiming(0.3, 2.0, 4)])
    merged = merge("m", [part, part])
    assert merged.wall_s == 4.0 and merged.requests == 4 and merged.tokens_per_s == 4.0
    assert merged.ttft_p50_s == pytest.approx(0.2) and percentile([1.0, 2.0, 3.0], 50) == 2.0

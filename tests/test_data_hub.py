"""Hub dataset IDs as sources: a test-built dataset repo in a temporary hub cache, loaded by ID offline (as on a
cluster's compute node after `hf download --repo-type dataset` on a login node), the paper's sets' ready mapping,
revisions, subsets, and one-line errors naming the ID."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sparsecraft.data import DataConfig, DataError, DataSource, load_records, load_source, open_stream
from sparsecraft.train.recipe import load_recipe

MAIN, OLD = "a" * 40, "b" * 40
SLIMORCA = [{"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": f"hi {i}"},
                               {"from": "gpt", "value": f"yo {i}"}]} for i in range(5)]


def jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def parquet(rows: list[dict]) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows), sink)
    return sink.getvalue().to_pybytes()


def cache_repo(cache: Path, repo_id: str, files: dict[str, bytes], commit: str = MAIN, ref: str = "main") -> Path:
    """A dataset repo laid out as huggingface_hub caches it: blobs, a snapshot of symlinks, and a ref."""
    repo = cache / f"datasets--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture
def hub(tmp_path, monkeypatch) -> Path:
    """An empty hub cache, offline (huggingface_hub and datasets read these at import, so they are patched)."""
    import datasets.config
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)  # no local folder shadows an ID
    return cache


def test_cached_repo_loads_by_id_offline(hub):
    cache_repo(hub, "org/math-set", {
        "data/train-00000-of-00001.parquet": parquet([{"query": f"{i}+1?", "response": str(i + 1)} for i in range(4)]),
        "data/test-00000-of-00001.parquet": parquet([{"query": "9+1?", "response": "10"}]),
        "README.md": b"# math\n"})
    records, report = load_source(DataSource("org/math-set"))
    assert [r["messages"][1]["content"] for r in records] == ["1", "2", "3", "4"]
    assert (report.name, report.path, report.format) == ("math-set", "org/math-set", "metamath")
    test, _ = load_source(DataSource("org/math-set", split="test"))
    assert test[0]["messages"][0]["content"] == "9+1?"
    with pytest.raises(DataError, match=r"org/math-set: no split 'validation' \(splits: train, test\)"):
        load_source(DataSource("org/math-set", split="validation"))


def test_paper_sets_have_a_ready_mapping(hub):
    cache_repo(hub, "Open-Orca/SlimOrca", {"oo-labeled_correct.gpt4.sharegpt.jsonl": jsonl(SLIMORCA)})
    cache_repo(hub, "meta-math/MetaMathQA", {"MetaMathQA-395K.json": json.dumps(
        [{"query": "2+2?", "response": "4", "type": "GSM_AnsAug", "original_question": "2+2?"}]).encode()})
    cache_repo(hub, "ise-uiuc/Magicoder-OSS-Instruct-75K", {"data-oss_instruct-decontaminated.jsonl": jsonl(
        [{"problem": "Sum a list.", "solution": "sum(xs)", "lang": "python", "seed": "..."}])})
    cache_repo(hub, "ise-uiuc/Magicoder-Evol-Instruct-110K", {"data-evol_instruct-decontaminated.jsonl": jsonl(
        [{"instruction": "Reverse a string.", "response": "s[::-1]"}])})
    config = DataConfig.from_dict({"sources": [
        {"path": "Open-Orca/SlimOrca", "weight": 2}, {"path": "meta-math/MetaMathQA", "weight": 1},
        "ise-uiuc/Magicoder-OSS-Instruct-75K", "ise-uiuc/Magicoder-Evol-Instruct-110K"]})
    train, _, report = load_records(config)
    assert [s.format for s in report.sources] == ["sharegpt", "metamath", "magicoder", "magicoder"]
    assert Counter(train["source"]) == {"slimorca": 2, "metamathqa": 1, "magicoder": 2}
    convo = next(r["messages"] for r in train if r["source"] == "slimorca")
    assert [m["role"] for m in convo] == ["system", "user", "assistant"]
    # a bad line in a hub JSON Lines file costs one record, named by ID and file
    cache_repo(hub, "org/chat", {"train.jsonl": jsonl(SLIMORCA[:2]) + b"{oops\n"})
    _, report = load_source(DataSource("org/chat"))
    assert report.skipped == Counter({"malformed_json": 1}) and report.examples[0].startswith("org/chat/train.jsonl:3")


def test_a_cached_hub_set_streams(hub):
    cache_repo(hub, "Open-Orca/SlimOrca", {"data/train-00000-of-00001.parquet": parquet(SLIMORCA)})
    stream, _, report = open_stream(DataConfig([DataSource("Open-Orca/SlimOrca")], streaming=True, shuffle_buffer=0))
    drawn = [next(stream)["messages"][1]["content"] for _ in range(7)]
    assert drawn == [f"hi {i}" for i in range(5)] + ["hi 0", "hi 1"]  # file order, then the next pass
    assert report.sources[0].format == "sharegpt" and report.sources[0].read == 5


def test_revision_subset_and_files(hub):
    rows = [{"query": "new?", "response": "new"}]
    cache_repo(hub, "org/multi", {"README.md": b"---\nconfigs:\n- config_name: easy\n  data_files: easy/*.jsonl\n"
                                               b"- config_name: hard\n  data_files: hard/*.jsonl\n---\n",
                                  "easy/part.jsonl": jsonl(rows), "hard/part.jsonl": jsonl(rows * 2)})
    cache_repo(hub, "org/multi", {"old.jsonl": jsonl([{"query": "old?", "response": "old"}])}, commit=OLD, ref="v1")
    assert len(load_source(DataSource("org/multi", subset="hard"))[0]) == 2
    assert len(load_source(DataSource("org/multi", files="easy/*.jsonl"))[0]) == 1
    for revision in ("v1", OLD):  # a tag or branch through refs/, or a commit hash
        records, _ = load_source(DataSource("org/multi", revision=revision))
        assert records[0]["messages"][1]["content"] == "old"
    with pytest.raises(DataError, match=r"org/multi: has several subsets; pick one with subset: \(easy, hard\)"):
        load_source(DataSource("org/multi"))
    with pytest.raises(DataError, match=r"no subset 'medium' \(subsets: easy, hard\)"):
        load_source(DataSource("org/multi", subset="medium"))


def test_partly_cached_repo_reads_the_files_it_has(hub):
    """`hf download --include "data/*.parquet"`: the cache knows the repo's whole file list but holds only part."""
    from huggingface_hub._snapshot_download import TreeCacheEntry, write_tree_cache

    rows = [{"query": "q?", "response": "r"}]
    cache_repo(hub, "org/big", {"data/train.parquet": parquet(rows)})
    listing = {name: TreeCacheEntry(size=1, blob_id="0" * 40, lfs_sha256=None, lfs_size=None, xet_hash=None)
               for name in ("data/train.parquet", "extra/huge.parquet", "README.md")}
    write_tree_cache(str(hub / "datasets--org--big"), MAIN, listing)
    with pytest.raises(DataError, match=r"org/big: the cache holds only part of it \(missing: .*extra/huge.parquet"):
        load_source(DataSource("org/big"))
    assert len(load_source(DataSource("org/big", files="data/*.parquet"))[0]) == 1


def test_not_cached_while_offline_names_the_id_and_the_setting(hub):
    for source, shown in ((DataSource("org/absent"), "hub dataset org/absent:"),
                          (DataSource("Open-Orca/SlimOrca", revision="v9"), "hub dataset Open-Orca/SlimOrca@v9:")):
        with pytest.raises(DataError) as e:
            load_source(source)
        message = str(e.value)
        assert shown in message and "HF_HUB_OFFLINE is set" in message and "\n" not in message
        assert "hf download --repo-type dataset" in message


def test_hub_unreachable_when_online_is_one_line(hub, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # refuses connections at once
    with pytest.raises(DataError, match="hub dataset org/absent: cannot reach the hub and it is not in the cache"):
        load_source(DataSource("org/absent"))


@pytest.mark.parametrize("error,message", [
    ("RepositoryNotFoundError", "hub dataset org/x@v2: no such dataset on the hub and no such local path"),
    ("GatedRepoError", "hub dataset org/x@v2 is gated: accept its terms on the hub"),
    ("RevisionNotFoundError", "hub dataset org/x@v2: no such revision on the hub"),
])
def test_hub_answers_become_one_line_errors(hub, monkeypatch, error, message):
    """What the hub answers online (simulated: these tests never reach it), as the user reads it."""
    import huggingface_hub
    from huggingface_hub import errors

    def answer(*args, **kwargs):
        raise getattr(errors, error)("404 Client Error\nmore detail",
                                     response=SimpleNamespace(headers={}, status_code=404, request=None))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", answer)
    with pytest.raises(DataError, match=message) as e:
        load_source(DataSource("org/x", revision="v2"))
    assert "\n" not in str(e.value)


def test_ids_in_recipes_and_the_data_shorthand(hub, tmp_path):
    recipe = load_recipe(None, ["data=Open-Orca/SlimOrca"])
    assert recipe.data["sources"] == [{"path": "Open-Orca/SlimOrca"}]
    config = DataConfig.from_dict({"sources": ["Open-Orca/SlimOrca", "local.jsonl"]}, base_dir=tmp_path / "cfg")
    assert [s.path for s in config.sources] == ["Open-Orca/SlimOrca", str(tmp_path / "cfg" / "local.jsonl")]
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "mine.jsonl").write_bytes(jsonl(SLIMORCA))  # an existing local path is never an ID
    assert load_source(DataSource("org/mine.jsonl"))[1].path == "org/mine.jsonl"


def test_fresh_process_with_hub_variables_set_loads_from_the_cache(tmp_path):
    """What a compute node does: HF_HUB_OFFLINE=1 and HF_HUB_CACHE in the environment before Python starts."""
    cache = tmp_path / "hub"
    cache_repo(cache, "Open-Orca/SlimOrca", {"data/train-00000-of-00001.parquet": parquet(SLIMORCA)})
    code = ("from sparsecraft.data import DataConfig, load_records\n"
            "train, _, report = load_records(DataConfig.from_dict({'sources': ['Open-Orca/SlimOrca']}))\n"
            "print(len(train), report.sources[0].name, report.sources[0].format)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path / "home")}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["5", "slimorca", "sharegpt"]

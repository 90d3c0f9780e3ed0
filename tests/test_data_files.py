"""Local data in every common file type (JSON, JSON Lines, Parquet, CSV, Arrow, `save_to_disk` folders, folders of
files with splits and subsets), column mapping onto the known formats, `take`, one-line errors, and no network."""

from __future__ import annotations

import json
import socket
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest
from datasets import Dataset, DatasetDict

from sparsecraft.data import DataConfig, DataError, DataSource, load_records, load_source
from sparsecraft.errors import ConfigError

ROWS = [{"query": f"{i}+1?", "response": str(i + 1)} for i in range(6)]
ANSWERS = [str(i + 1) for i in range(6)]


def answers(records) -> list[str]:
    return [r["messages"][-1]["content"] for r in records]


def write(path: Path, rows: list[dict]) -> Path:
    """`rows` in the file type `path`'s extension names."""
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(rows)
    kind = path.name.split(".", 1)[1]
    if kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif kind == "json":
        path.write_text(json.dumps(rows))
    elif kind == "parquet":
        pq.write_table(table, path)
    elif kind == "csv":
        pcsv.write_csv(table, path)
    elif kind == "arrow":  # what save_to_disk and the datasets cache write: an Arrow IPC stream
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    else:
        raise ValueError(kind)
    return path


@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet", "csv", "arrow"])
def test_each_file_type_reads_in_order(tmp_path, kind):
    path = write(tmp_path / f"math.{kind}", ROWS)
    records, report = load_source(DataSource(str(path)))
    assert answers(records) == ANSWERS and report.format == "metamath" and report.name == "math"
    assert (report.read, report.valid) == (6, 6)


def test_save_to_disk_folders(tmp_path):
    Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "one"))
    DatasetDict({"train": Dataset.from_list(ROWS), "test": Dataset.from_list(ROWS[:2])}).save_to_disk(
        str(tmp_path / "two"))
    assert answers(load_source(DataSource(str(tmp_path / "one")))[0]) == ANSWERS
    assert answers(load_source(DataSource(str(tmp_path / "two")))[0]) == ANSWERS
    assert answers(load_source(DataSource(str(tmp_path / "two"), split="test"))[0]) == ANSWERS[:2]
    with pytest.raises(DataError, match=r"two: no split 'dev' \(splits: train, test\)"):
        load_source(DataSource(str(tmp_path / "two"), split="dev"))
    with pytest.raises(DataError, match="has no splits to choose"):
        load_source(DataSource(str(tmp_path / "one"), split="test"))


def test_folder_of_files_by_split_and_subset(tmp_path):
    folder = tmp_path / "set"
    write(folder / "data" / "train-00000-of-00002.parquet", ROWS[:3])
    write(folder / "data" / "train-00001-of-00002.parquet", ROWS[3:])
    write(folder / "data" / "test-00000-of-00001.parquet", ROWS[:1])
    train, report = load_source(DataSource(str(folder)))
    assert answers(train) == ANSWERS and report.name == "set"
    assert answers(load_source(DataSource(str(folder), split="test"))[0]) == ANSWERS[:1]
    with pytest.raises(DataError, match=r"no split 'validation' \(splits: train, test\)"):
        load_source(DataSource(str(folder), split="validation"))

    # subsets named in the README's `configs:`, as on the hub
    multi = tmp_path / "multi"
    write(multi / "math" / "train.jsonl", ROWS)
    write(multi / "code" / "train.csv", [{"problem": "p", "solution": "s"}])
    (multi / "README.md").write_text("---\nconfigs:\n- config_name: math\n  data_files: math/*.jsonl\n"
                                     "- config_name: code\n  data_files: code/*.csv\n---\n")
    assert answers(load_source(DataSource(str(multi), subset="math"))[0]) == ANSWERS
    code, report = load_source(DataSource(str(multi), subset="code"))
    assert answers(code) == ["s"] and report.format == "magicoder"
    with pytest.raises(DataError, match=r"has several subsets; pick one with subset: \(math, code\)"):
        load_source(DataSource(str(multi)))
    with pytest.raises(DataError, match=r"no subset 'chat' \(subsets: math, code\)"):
        load_source(DataSource(str(multi), subset="chat"))
    # or pick files by pattern
    picked, _ = load_source(DataSource(str(multi), files=["code/*.csv"]))
    assert answers(picked) == ["s"]
    with pytest.raises(DataError, match="no data file matches files: nothing/"):
        load_source(DataSource(str(multi), files="nothing/*"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty: no data files"):
        load_source(DataSource(str(tmp_path / "empty")))


def test_columns_map_any_schema_onto_a_format(tmp_path):
    qa = write(tmp_path / "qa.csv", [{"question": f"q{i}", "answer": f"a{i}", "hint": "h"} for i in range(3)])
    records, report = load_source(DataSource(str(qa), format="alpaca",
                                             columns={"instruction": "question", "output": "answer"}))
    assert records[0]["messages"] == [{"role": "user", "content": "q0"}, {"role": "assistant", "content": "a0"}]
    assert report.format == "alpaca"
    # with format auto the mapped fields decide the layout
    records, report = load_source(DataSource(str(qa), columns={"query": "question", "response": "answer"}))
    assert report.format == "metamath" and answers(records) == ["a0", "a1", "a2"]
    # turn fields rename inside each turn: a chat list under `dialog` with `speaker` / `text`
    chat = write(tmp_path / "chat.jsonl", [{"dialog": [{"speaker": "user", "text": "hi"},
                                                       {"speaker": "assistant", "text": "yo"}]}])
    records, _ = load_source(DataSource(str(chat), format="messages",
                                        columns={"messages": "dialog", "role": "speaker", "content": "text"}))
    assert records[0]["messages"] == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    with pytest.raises(DataError, match=r"unknown column 'answr' in columns: \(its records have: answer, hint, "
                                        r"question\)"):
        load_source(DataSource(str(qa), format="alpaca", columns={"instruction": "question", "output": "answr"}))
    with pytest.raises(DataError, match="unknown column 'txt'"):
        load_source(DataSource(str(chat), format="messages",
                               columns={"messages": "dialog", "role": "speaker", "content": "txt"}))
    for columns, fmt, message in (({"answer": "x"}, "alpaca", "'answer' is not a field of alpaca"),
                                  ({"role": "speaker"}, "auto", "set format: messages to rename turn fields"),
                                  ({"output": 3}, "alpaca", r"columns.output: expected a column name"),
                                  ([], "auto", "expected a mapping")):
        with pytest.raises(ConfigError, match=message) as e:
            DataSource.from_dict({"path": "x.csv", "format": fmt, "columns": columns})
        assert "\n" not in str(e.value)


def test_take_keeps_the_first_usable_records_and_bad_lines_still_cost_one(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n{oops\n" + "".join(json.dumps(r) + "\n" for r in ROWS[1:]))
    records, report = load_source(DataSource(str(path), take=3))
    assert answers(records) == ANSWERS[:3] and report.skipped == Counter({"malformed_json": 1})
    assert report.examples == [f"{path}:2 malformed_json: Expecting property name enclosed in double quotes at "
                               "column 2"]
    train, _, _ = load_records(DataConfig([DataSource(str(path), take=2), DataSource(str(path), name="all")]))
    assert Counter(train["source"]) == {"m": 2, "all": 6}


def test_damaged_files_and_wrong_options_are_one_line_errors(tmp_path):
    good = write(tmp_path / "good.jsonl", ROWS)
    for name, message in (("broken.csv", "cannot read CSV"), ("broken.arrow", "cannot read Arrow")):
        (tmp_path / name).write_bytes(b"\x00\x01 not a table \xff" if name.endswith("arrow") else b'a,b\n"1,2\n')
        with pytest.raises(DataError, match=message) as e:
            load_source(DataSource(str(tmp_path / name)))
        assert "\n" not in str(e.value)
    for kw, message in (({"split": "test"}, "a single file holds one split"),
                        ({"subset": "x"}, "subset applies to folders and hub datasets"),
                        ({"revision": "main"}, "revision applies to hub datasets")):
        with pytest.raises(DataError, match=message):
            load_source(DataSource(str(good), **kw))
    for path in (tmp_path / "missing.parquet", "./nowhere", "/abs/nothing", "not/a/hub/id"):
        with pytest.raises(DataError, match="data source not found"):
            load_source(DataSource(str(path)))


def test_config_fields_for_hub_and_streaming_are_checked():
    source = DataSource.from_dict({"path": "org/set", "split": "test", "subset": "en", "revision": "v1",
                                   "columns": {"query": "q"}, "take": 5, "streaming": True})
    assert (source.split, source.subset, source.revision, source.take, source.streaming) == \
        ("test", "en", "v1", 5, True)
    assert DataSource.from_dict({"path": "org/set", "files": "data/*.parquet"}).files == ["data/*.parquet"]
    bad = [({"path": "a", "take": 0}, "take: expected a positive integer"),
           ({"path": "a", "split": ""}, "split: expected a non-empty string"),
           ({"path": "a", "streaming": "yes"}, "streaming: expected true or false"),
           ({"path": "a", "files": ["x"], "split": "train"}, "give files or split/subset, not both"),
           ({"path": "a", "files": []}, "files: expected a glob pattern")]
    for d, message in bad:
        with pytest.raises(ConfigError, match=message):
            DataSource.from_dict(d)


def test_local_files_never_touch_the_network(tmp_path, monkeypatch):
    """Even with offline mode off, reading local files and folders opens no connection."""
    import datasets.config
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)

    def refuse(*args, **kwargs):
        raise AssertionError("a network connection was attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    folder = tmp_path / "folder"
    sources = [DataSource(str(write(tmp_path / f"m.{kind}", ROWS)), name=kind)
               for kind in ("jsonl", "json", "parquet", "csv", "arrow")]
    write(folder / "train.parquet", ROWS)
    train, _, report = load_records(DataConfig(sources + [DataSource(str(folder))]))
    assert len(train) == 36 and report.skipped == Counter()

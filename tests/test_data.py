"""Instruction data: formats, files, bad records, mixing, held-out split, masks token by token, truncation."""

from __future__ import annotations

import gzip
import json
import re
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import tiny_tokenizer

from sparsecraft.data import (
    IGNORE_INDEX,
    DataConfig,
    DataError,
    DataSource,
    PaddingCollator,
    detect_format,
    encode_conversation,
    load_records,
    prepare_data,
    resolve_template,
    split_batch,
    tokenize_records,
)
from sparsecraft.errors import ConfigError

SPECIALS = re.compile(r"(<\|im_start\|>|<\|im_end\|>|</s>|<s>)")


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def ids_of(tok, text: str) -> list[int]:
    """Ids of `text` from the vocabulary itself (char-level, specials whole): independent of encode()."""
    vocab, out = tok.get_vocab(), []
    for part in SPECIALS.split(text):
        out += [vocab[part]] if SPECIALS.fullmatch(part) else [vocab.get(c, vocab["<pad>"]) for c in part]
    return out  # "\n" is not in the vocabulary: the model's unknown token, <pad> (id 0)


def expected(tok, pieces: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
    """(ids, labels) for text pieces marked trained or not."""
    ids, labels = [], []
    for text, trained in pieces:
        piece = ids_of(tok, text)
        ids += piece
        labels += piece if trained else [IGNORE_INDEX] * len(piece)
    return ids, labels


def write_jsonl(path: Path, records: list) -> Path:
    path.write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in records))
    return path


def write_json(path: Path, value) -> Path:
    path.write_text(json.dumps(value, indent=2))
    return path


def write_parquet(path: Path, records: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist(records), path)
    return path


def user_assistant(u: str, a: str, system: str | None = None) -> list[dict]:
    head = [{"role": "system", "content": system}] if system else []
    return head + [{"role": "user", "content": u}, {"role": "assistant", "content": a}]


# ---------------------------------------------------------------- formats, files

MULTI = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
         {"role": "assistant", "content": "Yo."}, {"role": "user", "content": "2+2?"},
         {"role": "assistant", "content": "4"}]

# (format, record, expected conversation, how the file is written)
CASES = [
    ("sharegpt", {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi?"},
                                    {"from": "gpt", "value": "Yo."}, {"from": "user", "value": "2+2?"},
                                    {"from": "assistant", "value": "4"}]}, MULTI, "jsonl"),
    ("messages", {"messages": MULTI}, MULTI, "json-array"),
    ("alpaca", {"instruction": "Add.", "input": "2+2", "output": "4"}, user_assistant("Add.\n\n2+2", "4"), "parquet"),
    ("metamath", {"query": "2+2?", "response": "4", "type": "GSM_AnsAug"}, user_assistant("2+2?", "4"), "json-object"),
    ("magicoder", {"problem": "Sum a list.", "solution": "sum(xs)"}, user_assistant("Sum a list.", "sum(xs)"),
     "jsonl.gz"),
    ("camelidae", {"instruction": "Be brief.",
                   "conversation": [{"input": "Hi?", "output": "Yo."}, {"input": "2+2?", "output": "4"}]},
     MULTI, "json-array"),
]


def write_records(tmp_path: Path, stem: str, records: list[dict], how: str) -> Path:
    if how == "jsonl":
        return write_jsonl(tmp_path / f"{stem}.jsonl", records)
    if how == "jsonl.gz":
        path = tmp_path / f"{stem}.jsonl.gz"
        path.write_bytes(gzip.compress(b"".join(json.dumps(r).encode() + b"\n" for r in records)))
        return path
    if how == "json-array":
        return write_json(tmp_path / f"{stem}.json", records)
    if how == "json-object":
        return write_json(tmp_path / f"{stem}.json", {"name": "x", "data": records})
    return write_parquet(tmp_path / f"{stem}.parquet", records)


def test_detect_format():
    for fmt, record, _, _ in CASES:
        assert detect_format(record) == fmt
    assert detect_format({"instruction": "x", "response": "y"}) == "magicoder"  # Evol-Instruct
    assert detect_format({"instruction": "x", "input": "", "output": "y"}) == "alpaca"
    assert detect_format({"text": "x"}) is None and detect_format([1]) is None


@pytest.mark.parametrize("fmt,record,conversation,how", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("named", [False, True], ids=["auto", "named"])
def test_each_format_parses_and_masks(tmp_path, tok, fmt, record, conversation, how, named):
    path = write_records(tmp_path, f"{fmt}_set", [record, record], how)
    config = DataConfig([DataSource(str(path), format=fmt if named else "auto")])
    train, evaluation, report = load_records(config)
    assert evaluation is None and len(train) == 2 and report.sources[0].format == fmt
    assert train[0] == {"messages": conversation, "source": f"{fmt}_set"}
    # Every answer (and its <|im_end|>) is trained, nothing else.
    ds, dropped = tokenize_records(train, tok, "auto", 512)
    trained = [i for i, label in zip(ds[0]["input_ids"], ds[0]["labels"]) if label != IGNORE_INDEX]
    answers = "".join(m["content"] + "<|im_end|>" for m in conversation if m["role"] == "assistant")
    assert trained == ids_of(tok, answers) and not dropped


def test_alpaca_input_is_optional_and_system_kept(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Hi", "output": "Yo"},
                                              {"instruction": "Hi", "input": "", "output": "Yo", "system": "S"}])
    train, _, _ = load_records(DataConfig([DataSource(str(path))], seed=3))
    got = sorted((r["messages"] for r in train), key=len)
    assert got == [user_assistant("Hi", "Yo"), user_assistant("Hi", "Yo", system="S")]


def test_a_blank_system_prompt_is_left_out_not_the_record(tmp_path):
    # ShareGPT exports often carry {"from": "system", "value": ""}; alpaca and camelidae already drop it
    sharegpt = write_jsonl(tmp_path / "s.jsonl", [{"conversations": [
        {"from": "system", "value": ""}, {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]}])
    messages = write_jsonl(tmp_path / "m.jsonl", [
        {"messages": [{"role": "system", "content": " \n"}, *user_assistant("Hi", "Yo")]}])
    train, _, _ = load_records(DataConfig([DataSource(str(sharegpt)), DataSource(str(messages))]))
    assert [r["messages"] for r in train] == [user_assistant("Hi", "Yo")] * 2


def test_csv_saved_by_pandas_with_its_index_column(tmp_path):
    path = tmp_path / "qa.csv"  # DataFrame.to_csv's default: a first column with a blank header
    path.write_text(",instruction,output\n0,What is 2+2?,4\n1,Name a colour.,Red\n")
    train, _, _ = load_records(DataConfig([DataSource(str(path))]))
    assert sorted(r["messages"][-1]["content"] for r in train) == ["4", "Red"]


def test_upper_case_gz_suffix_is_decompressed(tmp_path):
    path = tmp_path / "UP.JSONL.GZ"
    path.write_bytes(gzip.compress(json.dumps({"messages": user_assistant("a", "b")}).encode() + b"\n"))
    assert load_records(DataConfig([DataSource(str(path))]))[0][0]["messages"] == user_assistant("a", "b")


def test_json_lines_saved_as_json_and_single_object(tmp_path):
    path = tmp_path / "lines.json"  # many hub datasets ship JSON Lines under a .json name
    path.write_text("\n".join(json.dumps({"query": f"q{i}", "response": "r"}) for i in range(3)))
    assert len(load_records(DataConfig([DataSource(str(path))]))[0]) == 3
    single = write_json(tmp_path / "one.json", {"messages": user_assistant("a", "b")})
    assert load_records(DataConfig([DataSource(str(single))]))[0][0]["messages"] == user_assistant("a", "b")


# ---------------------------------------------------------------- masks, token by token

def test_chatml_mask_token_by_token(tok):
    ids, labels = encode_conversation(tok, MULTI, resolve_template(tok, "auto"))
    want = expected(tok, [
        ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n", False),
        ("Yo.<|im_end|>", True),
        ("\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n", False),
        ("4<|im_end|>", True),
        ("\n", False),
    ])
    assert (ids, labels) == want
    assert tok.bos_token_id not in ids  # this tokenizer adds no BOS, so none is added


def test_camelidae_mask_token_by_token(tok):
    ids, labels = encode_conversation(tok, MULTI, resolve_template(tok, "camelidae"))
    want = expected(tok, [
        ("### System:\nBe brief.\n### Human:\nHi?\n### Assistant:\n", False),
        ("Yo.</s>", True),
        ("### Human:\n2+2?\n### Assistant:\n", False),
        ("4</s>", True),
    ])
    assert (ids, labels) == want
    # auto falls back to camelidae when the tokenizer has no chat template
    bare = tiny_tokenizer()
    bare.chat_template = None
    assert encode_conversation(bare, MULTI, resolve_template(bare, "auto")) == want


def test_offsets_and_piecewise_masks_agree(tok):
    for template in ("chatml", "camelidae"):
        text = resolve_template(tok, template)
        assert encode_conversation(tok, MULTI, text, use_offsets=True) == \
            encode_conversation(tok, MULTI, text, use_offsets=False)


def bos_tokenizer():
    """The tiny tokenizer made to put <s> in front of what it encodes, like LLaMA's."""
    from tokenizers import processors

    t = tiny_tokenizer()
    t.backend_tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    assert t("a").input_ids == [1, 70]
    return t


def test_exactly_one_bos():
    t = bos_tokenizer()
    convo = user_assistant("Hi", "Yo")
    for template in ("chatml", "camelidae", "{{ bos_token }}" + resolve_template(t, "chatml")):
        ids, labels = encode_conversation(t, convo, resolve_template(t, template), bos_id=1)
        assert ids[0] == 1 and ids.count(1) == 1 and labels[0] == IGNORE_INDEX, template
    records = load_records_from_list([{"messages": convo}])
    ds, _ = tokenize_records(records, t, "camelidae", 64)
    assert ds[0]["input_ids"][:2] == [1, t.convert_tokens_to_ids("#")]
    ds, _ = tokenize_records(records, t, "camelidae", 12, truncation="left")  # the BOS survives a left cut
    assert ds[0]["input_ids"] == [1] + ids_of(t, "istant:\nYo</s>") and ds[0]["labels"][-3:] == ids_of(t, "Yo</s>")


def load_records_from_list(records: list[dict]):
    from datasets import Dataset

    return Dataset.from_list([{"messages": r["messages"], "source": "x"} for r in records])


def test_template_fallback_when_renders_are_not_prefixes(tok):
    # A template that marks the final answer differently, so a prefix render is not a prefix of the whole.
    template = ("{% for m in messages %}{% if m['role'] == 'user' %}U:{{ m['content'] }}\n"
                "{% elif loop.last %}FINAL:{{ m['content'] }}<|im_end|>\n{% else %}A:{{ m['content'] }}<|im_end|>\n"
                "{% endif %}{% endfor %}{% if add_generation_prompt %}A:{% endif %}")
    convo = MULTI[1:]
    ids, labels = encode_conversation(tok, convo, template)
    assert (ids, labels) == expected(tok, [("U:Hi?\nA:", False), ("Yo.<|im_end|>", True),
                                           ("\nU:2+2?\nFINAL:", False), ("4<|im_end|>", True), ("\n", False)])



def test_template_fallback_does_not_train_an_answer_quoted_in_the_prompt(tok):
    # Qwen3's shape: answers after the last question get a think block, earlier ones not, so the renders are not
    # prefixes and the answer is searched for; "Yes" also appears in the question and must not be taken from there.
    # (The last answer's renders are prefixes: everything after the generation prompt is trained, think block too.)
    template = ("{%- set ns = namespace(last=0) -%}{%- for m in messages %}{% if m['role'] == 'user' %}"
                "{% set ns.last = loop.index0 %}{% endif %}{% endfor -%}{%- for m in messages -%}"
                "{%- if m['role'] == 'user' -%}U:{{ m['content'] }}\n"
                "{% elif loop.index0 > ns.last -%}A:<think></think>{{ m['content'] }}<|im_end|>\n"
                "{% else -%}A:{{ m['content'] }}<|im_end|>\n{% endif -%}{%- endfor -%}"
                "{%- if add_generation_prompt %}A:{% endif %}")
    convo = [{"role": "user", "content": "Yes or No: 2 even?"}, {"role": "assistant", "content": "Yes"},
             {"role": "user", "content": "3 even?"}, {"role": "assistant", "content": "No"}]
    ids, labels = encode_conversation(tok, convo, template)
    assert (ids, labels) == expected(tok, [("U:Yes or No: 2 even?\nA:", False), ("Yes<|im_end|>", True),
                                           ("\nU:3 even?\nA:", False), ("<think></think>No<|im_end|>", True),
                                           ("\n", False)])


# ---------------------------------------------------------------- bad records

def test_bad_records_are_counted_with_reasons_and_lines(tmp_path):
    good = {"messages": user_assistant("q", "a")}
    lines = [
        json.dumps(good).encode(),                                                              # 1 ok
        b"{not json",                                                                           # 2 malformed_json
        b'{"messages": [{"role": "user", "content": "caf\xe9"}, {"role": "assistant", "content": "x"}]}',  # 3 utf8
        b"[1, 2]",                                                                              # 4 not_an_object
        json.dumps({"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}).encode(),  # 5 missing
        json.dumps({"messages": [{"role": "user", "content": 3},
                                 {"role": "assistant", "content": "x"}]}).encode(),             # 6 wrong_type
        json.dumps({"messages": user_assistant("q", "  ")}).encode(),                            # 7 empty_turn
        json.dumps({"messages": [{"role": "tool", "content": "q"},
                                 {"role": "assistant", "content": "x"}]}).encode(),             # 8 unknown_role
        json.dumps({"messages": user_assistant("q", "a") + [{"role": "system", "content": "s"},
                                                             {"role": "assistant", "content": "b"}]}).encode(),  # 9
        json.dumps({"messages": [{"role": "user", "content": "q"}]}).encode(),                   # 10 no assistant
        json.dumps({"messages": user_assistant("q", "a") + [{"role": "user", "content": "q"}]}).encode(),  # 11
        b"",                                                                                    # blank: ignored
        json.dumps({"messages": "hello"}).encode(),                                             # 13 wrong_type
        json.dumps({"messages": [{"role": "user", "content": "\ud800"},
                                 {"role": "assistant", "content": "x"}]}).encode(),             # 14 lone surrogate
        json.dumps(good).encode(),                                                              # 15 ok
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    train, _, report = load_records(DataConfig([DataSource(str(path))]))
    assert len(train) == 2
    assert report.skipped == Counter({
        "malformed_json": 1, "invalid_utf8": 2, "not_an_object": 1, "missing_field": 1, "wrong_type": 2,
        "empty_turn": 1, "unknown_role": 1, "misplaced_system": 1, "no_assistant_turn": 1,
        "not_ending_with_assistant": 1})
    src = report.sources[0]
    assert (src.read, src.valid) == (14, 2)
    assert src.examples[:3] == [f"{path}:2 malformed_json: Expecting property name enclosed in double quotes "
                                "at column 2",
                                f"{path}:3 invalid_utf8: byte 46 of the line",
                                f"{path}:4 not_an_object: got list"]
    assert len(src.examples) == 5  # only the first few are kept
    text = report.format()
    assert "skipped 12 (invalid_utf8 2, malformed_json 1, not_an_object 1" in text and f"{path}:5 missing_field" in text
    assert report.per_source["mixed"] == {"read": 14, "valid": 2, "skipped": 12, "train": 2, "eval": 0}


def test_invalid_utf8_and_bad_element_in_json_array(tmp_path):
    good = json.dumps({"query": "q", "response": "r"})
    path = tmp_path / "arr.json"
    path.write_bytes(b"[\n" + good.encode() + b",\n" + b'{"query": "\xff\xfe", "response": "r"},\n'
                     + good.encode() + b",\n" + b'{"query": oops}\n]')
    train, _, report = load_records(DataConfig([DataSource(str(path))]))
    assert len(train) == 2
    assert report.skipped == Counter({"invalid_utf8": 1, "malformed_json": 1})
    assert report.sources[0].examples[0].startswith(f"{path}:3 invalid_utf8")
    assert report.sources[0].examples[1].startswith(f"{path}:5 malformed_json")


def test_file_with_no_usable_record_is_a_one_line_error(tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"query": "q", "response": ""}, {"query": "q"}])
    with pytest.raises(DataError) as e:
        load_records(DataConfig([DataSource(str(bad))]))
    assert isinstance(e.value, ConfigError) and "\n" not in str(e.value)
    assert "no usable metamath record out of 2" in str(e.value) and "bad.jsonl:1 empty_turn" in str(e.value)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="holds no record"):
        load_records(DataConfig([DataSource(str(empty), format="alpaca")]))
    unknown = write_jsonl(tmp_path / "unknown.jsonl", [{"text": "x"}])
    with pytest.raises(DataError, match=r"cannot tell the record format \(first record keys: text\)"):
        load_records(DataConfig([DataSource(str(unknown))]))
    with pytest.raises(DataError, match="data source not found"):
        load_records(DataConfig([DataSource(str(tmp_path / "missing.jsonl"))]))
    for name, message in (("broken.parquet", "cannot read Parquet"), ("broken.jsonl.gz", "cannot read"),
                          ("notes.txt", "unknown file type")):
        (tmp_path / name).write_bytes(b"not what it says")
        with pytest.raises(DataError, match=message) as e:
            load_records(DataConfig([DataSource(str(tmp_path / name))]))
        assert "\n" not in str(e.value)


# ---------------------------------------------------------------- mixing, held-out split

def numbered(tmp_path: Path, stem: str, n: int) -> str:
    return str(write_jsonl(tmp_path / f"{stem}.jsonl", [{"query": f"{stem}{i}", "response": "r"} for i in range(n)]))


def prompts(ds) -> list[str]:
    return [r["messages"][0]["content"] for r in ds]


def test_mixture_counts_and_determinism(tmp_path):
    a, b, c = numbered(tmp_path, "a", 100), numbered(tmp_path, "b", 50), numbered(tmp_path, "c", 30)

    def mix(**kw):
        sources = [DataSource(a, weight=3), DataSource(b, weight=1, replace=kw.pop("replace", False)),
                   DataSource(c, samples=kw.pop("samples", 10))]
        return load_records(DataConfig(sources, **kw))

    # No total: the largest total no weighted source must repeat for (a limits it: 100 of 133 = 3/4).
    train, _, report = mix()
    assert Counter(train["source"]) == {"a": 100, "b": 33, "c": 10}
    assert (report.train_records, report.notes) == (143, [])
    train, _, _ = mix(total=40)
    assert Counter(train["source"]) == {"a": 30, "b": 10, "c": 10}
    # Asking for more than a source has: capped with a note, unless replace is set.
    train, _, report = mix(total=400, samples=50)
    assert Counter(train["source"]) == {"a": 100, "b": 50, "c": 30}
    assert any("c: asked for 50 records, has 30" in n for n in report.notes) and "note: b: asked" in report.format()
    train, _, _ = mix(total=400, replace=True)
    b_prompts = Counter(p for p in prompts(train) if p.startswith("b"))
    assert sum(b_prompts.values()) == 100 and set(b_prompts.values()) == {2}
    # Deterministic for a seed; another seed draws and orders differently.
    first, second, other = (prompts(mix(total=40, seed=s)[0]) for s in (7, 7, 8))
    assert first == second and first != other


def test_eval_fraction_is_per_source_and_disjoint(tmp_path):
    a, b = numbered(tmp_path, "a", 40), numbered(tmp_path, "b", 10)
    config = DataConfig([DataSource(a), DataSource(b)], eval_fraction=0.1, seed=1)
    train, evaluation, report = load_records(config)
    assert Counter(evaluation["source"]) == {"a": 4, "b": 1} and len(train) == 45
    assert not set(prompts(train)) & set(prompts(evaluation))
    assert prompts(load_records(config)[1]) == prompts(evaluation)
    assert report.per_source["b"]["eval"] == 1 and report.eval_records == 5


def test_explicit_eval_sources(tmp_path):
    a, held = numbered(tmp_path, "a", 5), numbered(tmp_path, "held", 3)
    train, evaluation, report = load_records(DataConfig([DataSource(a)], eval_sources=[DataSource(held)]))
    assert len(train) == 5 and sorted(prompts(evaluation)) == ["held0", "held1", "held2"]
    assert "held [eval]" in report.format()


# ---------------------------------------------------------------- truncation, collation, config

def test_truncation_drops_samples_without_target(tok):
    records = load_records_from_list([{"messages": user_assistant("x" * 40, "yes")},
                                      {"messages": user_assistant("short", "ok")}])
    ds, dropped = tokenize_records(records, tok, "chatml", max_length=30)
    assert dropped == Counter({"dropped_no_target": 1}) and len(ds) == 1
    assert all(len(x) <= 30 for x in ds["input_ids"]) and any(x != IGNORE_INDEX for x in ds[0]["labels"])
    # Cut from the left instead: the answer survives, the start of the prompt goes.
    ds, dropped = tokenize_records(records, tok, "chatml", max_length=30, truncation="left")
    assert not dropped and len(ds) == 2 and tok.decode(ds[0]["input_ids"]).endswith("yes<|im_end|><pad>")


def test_padding_collator(tok):
    features = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [-100]}]
    batch = PaddingCollator(pad_token_id=0, pad_to_multiple_of=4)(features)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0], [8, 0, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100], [-100] * 4]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]
    inputs, counts = split_batch(batch)
    assert set(inputs) == {"input_ids", "labels", "attention_mask"}
    assert counts == {"num_tokens": 4, "num_target_tokens": 2, "num_samples": 2}


def test_config_from_dict(tmp_path):
    config = DataConfig.from_dict({"sources": ["a.jsonl", {"path": "/abs/b.json", "weight": 2, "name": "b"}],
                                   "eval_fraction": 0, "packing": True}, base_dir=tmp_path)
    assert config.sources[0] == DataSource(str(tmp_path / "a.jsonl"))
    assert config.sources[1].weight == 2 and config.packing and config.template == "auto"
    bad = [({"sources": ["a"], "shuffle": True}, "data: unknown field 'shuffle'"),
           ({"sources": [{"path": "a", "weigth": 1}]}, r"data.sources\[0\]: unknown field 'weigth'"),
           ({"sources": [{"path": "a", "samples": "10"}]}, r"data.sources\[0\].samples: expected a positive integer"),
           ({"sources": [{"path": "a", "samples": True}]}, "samples: expected a positive integer"),
           ({"sources": [{"path": "a", "weight": 1, "samples": 2}]}, "give weight or samples, not both"),
           ({"sources": [{"path": "a", "format": "csv"}]}, "format: 'csv' is not one of"),
           ({"sources": ["a"], "max_length": "512"}, "max_length: expected an integer"),
           ({"sources": ["a"], "eval_fraction": 1.5}, r"eval_fraction: expected a number in \[0, 1\)"),
           ({"sources": ["a"], "eval_sources": ["b"], "eval_fraction": 0.1}, "not both"),
           ({"sources": ["a"], "template": "vicuna"}, "data.template: expected one of"),
           ({"sources": []}, "at least one source"), ({}, "missing 'sources'")]
    for d, message in bad:
        with pytest.raises(ConfigError, match=message) as e:
            DataConfig.from_dict(d)
        assert "\n" not in str(e.value)


def test_prepare_data_end_to_end(tmp_path, tok):
    a = write_jsonl(tmp_path / "chat.jsonl", [{"messages": user_assistant(f"q{i}", f"answer {i}")} for i in range(12)])
    b = write_parquet(tmp_path / "math.parquet", [{"query": f"{i}+1?", "response": str(i + 1)} for i in range(8)])
    config = DataConfig([DataSource(str(a)), DataSource(str(b))], eval_fraction=0.25, max_length=64)
    prepared = prepare_data(config, tok)
    assert len(prepared.train) == 15 and len(prepared.eval) == 5
    assert set(prepared.train.column_names) == {"input_ids", "labels", "source"}
    batch = prepared.collator([prepared.train[i] for i in range(4)])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    stats = prepared.report.tokens["train"]
    assert stats["samples"] == 15 and 0 < stats["targets"] < stats["tokens"]
    assert "train: 15 samples" in prepared.report.format()


def test_prepare_data_packed_reuses_loaded_records_and_cache(tmp_path, tok, monkeypatch):
    import sparsecraft.data.prepare as prepare_module

    a = write_jsonl(tmp_path / "chat.jsonl", [{"messages": user_assistant(f"q{i}", f"answer {i}")} for i in range(10)])
    config = DataConfig([DataSource(str(a))], eval_fraction=0.2, max_length=64, packing=True)
    loaded = load_records(config)  # what a trainer does first: bad data fails before the model is loaded
    first = prepare_data(config, tok, loaded=loaded, cache_dir=tmp_path / "cache")
    assert set(first.train.column_names) == {"input_ids", "labels", "position_ids", "num_samples"}
    assert sum(first.train["num_samples"]) == 8 and sum(first.eval["num_samples"]) == 2
    assert "use_cache" in first.collator([first.train[0]])
    monkeypatch.setattr(prepare_module, "tokenize_records", lambda *a, **k: pytest.fail("cache not used"))
    second = prepare_data(config, tok, cache_dir=tmp_path / "cache")
    assert second.train["input_ids"] == first.train["input_ids"]
    assert second.report.tokens == first.report.tokens


@pytest.mark.parametrize("fmt,record,reason", [
    ("sharegpt", {"conversations": [{"from": "bing", "value": "q"}, {"from": "gpt", "value": "a"}]}, "unknown_role"),
    ("sharegpt", {"conversations": [{"from": "human", "value": "q"}, "a"]}, "wrong_type"),
    ("camelidae", {"instruction": "", "conversation": [{"input": "q"}]}, "missing_field"),
    ("camelidae", {"instruction": "s", "conversation": []}, "no_assistant_turn"),
    ("alpaca", {"instruction": "q", "output": ["a"]}, "wrong_type"),
    ("alpaca", {"instruction": " ", "input": "", "output": "a"}, "empty_turn"),
    ("metamath", {"query": "q"}, "missing_field"),
    ("magicoder", {"problem": "q", "solution": ""}, "empty_turn"),
])
def test_bad_records_in_each_format(tmp_path, fmt, record, reason):
    good = next(c[1] for c in CASES if c[0] == fmt)
    path = write_jsonl(tmp_path / "f.jsonl", [good, record])
    _, _, report = load_records(DataConfig([DataSource(str(path), format=fmt)]))
    assert report.skipped == Counter({reason: 1}) and report.sources[0].examples[0].startswith(f"{path}:2 {reason}")


def test_template_refusal_is_dropped_and_counted(tok):
    template = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
                + resolve_template(tok, "chatml"))
    records = load_records_from_list([{"messages": MULTI}, {"messages": user_assistant("q", "a")}])
    ds, dropped = tokenize_records(records, tok, template, 64)
    assert dropped == Counter({"template_error": 1}) and len(ds) == 1

"""Conversations → `input_ids` and `labels` that train only the assistant's answers.

How the mask is found: the conversation is rendered whole, and again up to each assistant turn (with the
generation prompt) and through it. When those renders are prefixes of the whole text, the answer's characters
are `[len(before), len(through))` minus trailing whitespace: the content plus the template's end-of-turn marker
(`<|im_end|>`, EOS), so the model learns to stop. Characters map to tokens by offsets (fast tokenizers) or by
encoding the text piece by piece. A token is trained iff its first character is in an answer span.
"""

from __future__ import annotations

from collections import Counter

import pyarrow.compute as pc
from datasets import Dataset
from datasets.fingerprint import Hasher
from jinja2 import TemplateError

from .formats import BadRecord, Message
from .templates import bos_to_add, render, resolve_template

IGNORE_INDEX = -100


def answer_spans(tokenizer, messages: list[Message], chat_template: str, full: str) -> list[tuple[int, int]]:
    """Character spans `[start, end)` of each assistant answer (with its end-of-turn marker) in `full`."""
    spans: list[tuple[int, int]] = []
    cursor = 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        try:
            before = render(tokenizer, messages[:i], chat_template, add_generation_prompt=True)
            through = render(tokenizer, messages[: i + 1], chat_template).rstrip()
        except TemplateError:  # e.g. a template that cannot render a conversation cut before its first answer
            before = through = ""
        if cursor <= len(before) < len(through) and full.startswith(through) and through.startswith(before):
            span = (len(before), len(through))
        else:  # a template whose earlier turns change with what follows (e.g. drops past reasoning)
            span = _locate(tokenizer, full, m["content"], _after_prompt(full, messages, i, before, cursor))
        spans.append(span)
        cursor = span[1]
    return spans


def _after_prompt(full: str, messages: list[Message], i: int, before: str, cursor: int) -> int:
    """Where answer `i` may start in `full`: past the turns that ask for it, so that an answer quoted in the
    question ("Yes or No?") is not taken from the prompt."""
    floor = max(cursor, len(before)) if before and full.startswith(before) else cursor
    j = i
    while j > 0 and messages[j - 1]["role"] != "assistant":
        j -= 1
    for turn in messages[j:i]:
        for text in (turn["content"], turn["content"].strip()):
            at = full.find(text, floor) if text else -1
            if at >= 0:
                floor = at + len(text)
                break
    return floor


def _locate(tokenizer, full: str, content: str, cursor: int) -> tuple[int, int]:
    """Fallback: the answer's text found after `cursor`, plus a special token right after it (end of turn)."""
    start = full.find(content, cursor)
    if start < 0:
        content = content.strip()  # templates often trim
        start = full.find(content, cursor)
    if start < 0:
        raise BadRecord("template_mismatch", "an answer is not found in the rendered conversation")
    end = start + len(content)
    after = len(full) - len(full[end:].lstrip(" "))
    for token in sorted(tokenizer.all_special_tokens, key=len, reverse=True):
        if token and full.startswith(token, after):
            return start, after + len(token)
    return start, end


def encode_conversation(tokenizer, messages: list[Message], chat_template: str, bos_id: int | None = None,
                        use_offsets: bool | None = None) -> tuple[list[int], list[int]]:
    """`(input_ids, labels)`, both length T; labels are the ids on answer tokens and -100 elsewhere.

    `bos_id`: put this BOS first unless the rendered text already starts with it (never two).
    `use_offsets`: map spans through offsets (default: when the tokenizer is fast) or encode piece by piece.
    """
    try:
        full = render(tokenizer, messages, chat_template)
        spans = answer_spans(tokenizer, messages, chat_template, full)
    except TemplateError as e:
        raise BadRecord("template_error", str(e).splitlines()[0] if str(e) else type(e).__name__) from None
    if use_offsets is None:
        use_offsets = bool(getattr(tokenizer, "is_fast", False))
    if use_offsets:
        enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        labels = [IGNORE_INDEX] * len(ids)
        k = 0
        for t, (s, _) in enumerate(enc["offset_mapping"]):
            while k < len(spans) and s >= spans[k][1]:
                k += 1
            if k < len(spans) and spans[k][0] <= s:
                labels[t] = ids[t]
    else:
        ids, labels, pos = [], [], 0
        for start, end in spans + [(len(full), len(full))]:
            for text, train in ((full[pos:start], False), (full[start:end], True)):
                piece = tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
                ids += piece
                labels += piece if train else [IGNORE_INDEX] * len(piece)
            pos = end
    if bos_id is not None and (not ids or ids[0] != bos_id):
        ids, labels = [bos_id] + ids, [IGNORE_INDEX] + labels
    return ids, labels


def truncate(ids: list[int], labels: list[int], max_length: int, side: str = "right",
             bos_id: int | None = None) -> tuple[list[int], list[int]]:
    """Cut to `max_length` tokens; `left` keeps the end (and the BOS, if the sample starts with it)."""
    if len(ids) <= max_length:
        return ids, labels
    if side == "right":
        return ids[:max_length], labels[:max_length]
    keep = 1 if bos_id is not None and ids[0] == bos_id else 0
    return ids[:keep] + ids[len(ids) - max_length + keep:], labels[:keep] + labels[len(ids) - max_length + keep:]


def encode_record(tokenizer, messages: list[Message], chat_template: str, bos_id: int | None, max_length: int,
                  truncation: str) -> tuple[list[int], list[int], str]:
    """`(input_ids, labels, drop)` of one conversation cut to `max_length`; `drop` is "" for a usable sample, else
    why it is not: `dropped_no_target`, `template_error`, `template_mismatch` (see `tokenize_records`)."""
    try:
        ids, labels = encode_conversation(tokenizer, messages, chat_template, bos_id)
        ids, labels = truncate(ids, labels, max_length, truncation, tokenizer.bos_token_id)
    except BadRecord as bad:
        return [], [], bad.reason
    return ids, labels, "dropped_no_target" if all(x == IGNORE_INDEX for x in labels) else ""


def tokenize_fingerprint(records: Dataset, tokenizer, chat_template: str, max_length: int,
                         truncation: str) -> str:
    """A hash of everything the tokenised result depends on: records, tokenizer, template, length, side."""
    # Hash the tokenizer's definition ourselves: datasets would otherwise pickle the whole tokenizer object.
    backend = getattr(tokenizer, "backend_tokenizer", None)
    tok = backend.to_str() if backend is not None else repr(tokenizer)
    return Hasher.hash(("sparsecraft.data.tokenize/1", records._fingerprint, tok, str(tokenizer.all_special_tokens),
                        chat_template, max_length, truncation))


def tokenize_records(records: Dataset, tokenizer, template: str = "auto", max_length: int = 512,
                     truncation: str = "right") -> tuple[Dataset, Counter]:
    """(Dataset with `input_ids`, `labels` (lists of ints, length ≤ max_length) and `source`; drop counts).

    Dropped: `dropped_no_target` (no trained token left after truncation), `template_error` (the template
    refused the conversation), `template_mismatch` (an answer could not be placed in the rendered text).
    """
    chat_template = resolve_template(tokenizer, template)
    bos_id = bos_to_add(tokenizer)

    def encode_batch(batch: dict) -> dict:
        out: dict[str, list] = {"input_ids": [], "labels": [], "source": [], "drop": []}
        for messages, source in zip(batch["messages"], batch["source"]):
            ids, labels, drop = encode_record(tokenizer, messages, chat_template, bos_id, max_length, truncation)
            out["input_ids"].append(ids)
            out["labels"].append(labels)
            out["source"].append(source)
            out["drop"].append(drop)
        return out

    fingerprint = tokenize_fingerprint(records, tokenizer, chat_template, max_length, truncation)
    encoded = records.map(encode_batch, batched=True, remove_columns=records.column_names,
                          new_fingerprint=fingerprint, desc="Tokenising")
    dropped = Counter(d for d in encoded["drop"] if d)
    if dropped:
        encoded = encoded.filter(lambda drops: [d == "" for d in drops], input_columns="drop", batched=True)
    return encoded.remove_columns("drop"), dropped


def token_stats(ds: Dataset) -> dict[str, int]:
    """Samples, tokens and trained tokens of a tokenised dataset, computed in Arrow (no Python loop)."""
    table = ds.with_format("arrow")[:] if len(ds) else None
    if table is None:
        return {"samples": 0, "tokens": 0, "targets": 0}
    labels = pc.list_flatten(table.column("labels"))
    return {"samples": len(ds), "tokens": int(pc.sum(pc.list_value_length(table.column("input_ids"))).as_py()),
            "targets": int(pc.sum(pc.not_equal(labels, IGNORE_INDEX)).as_py() or 0)}

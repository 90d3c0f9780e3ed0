"""Record layouts → one conversation shape: `[{role: system|user|assistant, content: str}]`.

Each normaliser raises `BadRecord(reason, detail)` for a record it cannot use; the loader counts the reasons.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Callable

Message = dict[str, str]

# Skip reasons, in the order the report lists them.
REASONS = (
    "invalid_utf8", "malformed_json", "not_an_object", "missing_field", "wrong_type", "empty_turn",
    "unknown_role", "misplaced_system", "no_assistant_turn", "not_ending_with_assistant",
)

# Each format's field names: the record's own, and those of each turn of its list of turns (None: no turns).
# `columns:` in a source maps its own column names onto these.
FIELDS: dict[str, tuple[str, ...]] = {
    "sharegpt": ("conversations",), "messages": ("messages",), "alpaca": ("instruction", "input", "output", "system"),
    "metamath": ("query", "response"), "magicoder": ("problem", "solution", "instruction", "response"),
    "camelidae": ("instruction", "conversation"),
}
TURNS: dict[str, tuple[str, tuple[str, ...]]] = {  # format -> (list field, fields of each turn)
    "sharegpt": ("conversations", ("from", "value")), "messages": ("messages", ("role", "content")),
    "camelidae": ("conversation", ("input", "output")),
}

SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
MESSAGE_ROLES = ("system", "user", "assistant")


class BadRecord(Exception):
    """A record that cannot be used; `reason` is one of `REASONS` (or a tokenisation reason)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def detect_format(record: Any) -> str | None:
    """The layout a record looks like, by its keys; None if it looks like none of them."""
    if not isinstance(record, dict):
        return None
    if "conversations" in record:
        return "sharegpt"
    if "messages" in record:
        return "messages"
    if "conversation" in record:  # before alpaca: Camelidae records also carry `instruction`
        return "camelidae"
    if "query" in record and "response" in record:
        return "metamath"
    if "problem" in record and "solution" in record:
        return "magicoder"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if "instruction" in record and "response" in record:
        return "magicoder"  # Magicoder-Evol-Instruct's layout
    return None


def detect_file_format(records: list[Any]) -> str | None:
    """The most common layout among a file's first records (ties: the one seen first)."""
    found = [f for f in map(detect_format, records) if f is not None]
    return Counter(found).most_common(1)[0][0] if found else None


def _field(record: dict, key: str, required: bool = True) -> str | None:
    if key not in record or record[key] is None:
        if required:
            raise BadRecord("missing_field", repr(key))
        return None
    value = record[key]
    if not isinstance(value, str):
        raise BadRecord("wrong_type", f"{key!r} is {type(value).__name__}, expected str")
    return value


def _list_field(record: dict, key: str) -> list:
    if key not in record or record[key] is None:
        raise BadRecord("missing_field", repr(key))
    if not isinstance(record[key], list):
        raise BadRecord("wrong_type", f"{key!r} is {type(record[key]).__name__}, expected list")
    return record[key]


def _turn(item: Any, where: str) -> dict:
    if not isinstance(item, dict):
        raise BadRecord("wrong_type", f"{where} is {type(item).__name__}, expected an object")
    return item


def finish(messages: list[Message]) -> list[Message]:
    """Checks every format shares: text is valid Unicode and non-blank, system first, ends with the assistant.
    A blank system prompt is left out (exports often carry `{"from": "system", "value": ""}`)."""
    if messages and messages[0]["role"] == "system" and not messages[0]["content"].strip():
        messages = messages[1:]
    for i, m in enumerate(messages):
        try:
            m["content"].encode("utf-8")  # lone surrogates: from undecodable bytes or `\ud800` escapes
        except UnicodeEncodeError as e:
            raise BadRecord("invalid_utf8", f"turn {i}: {e.reason}") from None
        if not m["content"].strip():
            raise BadRecord("empty_turn", f"turn {i} ({m['role']})")
        if m["role"] == "system" and i != 0:
            raise BadRecord("misplaced_system", f"turn {i}")
    if not any(m["role"] == "assistant" for m in messages):
        raise BadRecord("no_assistant_turn")
    if messages[-1]["role"] != "assistant":
        raise BadRecord("not_ending_with_assistant", f"last turn is {messages[-1]['role']}")
    return messages


def from_sharegpt(record: dict) -> list[Message]:
    """`conversations: [{from, value}]`, from ∈ system/human/user/gpt/assistant (ShareGPT, SlimOrca)."""
    out = []
    for i, item in enumerate(_list_field(record, "conversations")):
        turn = _turn(item, f"conversations[{i}]")
        who = _field(turn, "from")
        role = SHAREGPT_ROLES.get(who.strip().lower())
        if role is None:
            raise BadRecord("unknown_role", f"conversations[{i}].from = {who!r}")
        out.append({"role": role, "content": _field(turn, "value")})
    return finish(out)


def from_messages(record: dict) -> list[Message]:
    """`messages: [{role, content}]` with role ∈ system/user/assistant."""
    out = []
    for i, item in enumerate(_list_field(record, "messages")):
        turn = _turn(item, f"messages[{i}]")
        role = _field(turn, "role")
        if role not in MESSAGE_ROLES:
            raise BadRecord("unknown_role", f"messages[{i}].role = {role!r}")
        out.append({"role": role, "content": _field(turn, "content")})
    return finish(out)


def from_alpaca(record: dict) -> list[Message]:
    """`instruction`, optional `input` (appended after a blank line), `output`; optional `system`."""
    instruction, output = _field(record, "instruction"), _field(record, "output")
    extra, system = _field(record, "input", required=False), _field(record, "system", required=False)
    if instruction.strip() and extra and extra.strip():
        prompt = f"{instruction}\n\n{extra}"
    else:
        prompt = instruction if instruction.strip() else (extra or "")  # blank instruction: the input alone
    head = [{"role": "system", "content": system}] if system and system.strip() else []
    return finish(head + [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}])


def _pair(prompt_key: str, answer_key: str) -> Callable[[dict], list[Message]]:
    def convert(record: dict) -> list[Message]:
        prompt, answer = _field(record, prompt_key), _field(record, answer_key)
        return finish([{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}])

    convert.__doc__ = f"`{prompt_key}` → user, `{answer_key}` → assistant."
    return convert


from_metamath = _pair("query", "response")
_magicoder_oss, _magicoder_evol = _pair("problem", "solution"), _pair("instruction", "response")


def from_magicoder(record: dict) -> list[Message]:
    """`problem/solution` (OSS-Instruct) or `instruction/response` (Evol-Instruct)."""
    if "problem" not in record and "instruction" in record:
        return _magicoder_evol(record)
    return _magicoder_oss(record)


def from_camelidae(record: dict) -> list[Message]:
    """`instruction` (system prompt, may be empty) and `conversation: [{input, output}]`, multi-turn."""
    system = _field(record, "instruction", required=False)
    out = [{"role": "system", "content": system}] if system and system.strip() else []
    for i, item in enumerate(_list_field(record, "conversation")):
        turn = _turn(item, f"conversation[{i}]")
        out += [{"role": "user", "content": _field(turn, "input")},
                {"role": "assistant", "content": _field(turn, "output")}]
    return finish(out)


NORMALISERS: dict[str, Callable[[dict], list[Message]]] = {
    "sharegpt": from_sharegpt, "messages": from_messages, "alpaca": from_alpaca,
    "metamath": from_metamath, "magicoder": from_magicoder, "camelidae": from_camelidae,
}


def normalise(record: Any, fmt: str) -> list[Message]:
    """The conversation of one record in layout `fmt`; raises `BadRecord`."""
    if not isinstance(record, dict):
        raise BadRecord("not_an_object", f"got {type(record).__name__}")
    return NORMALISERS[fmt](record)

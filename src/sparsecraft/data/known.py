"""What a source's `path` names, and hub datasets with a ready mapping.

A path that exists locally is a file or a folder; anything else that looks like a hub repo ID (`name` or
`org/name`) is a hub dataset ID, as transformers and datasets treat names. A missing path with a data file's
extension, or one starting with `/`, `.` or `~`, is a local file that is not there, never an ID.

`KNOWN_SETS`: the paper's three training sets (SlimOrca, Magicoder, MetaMathQA) and a few common ones, so that
`path: Open-Orca/SlimOrca` needs no `format:`, `columns:` or `split:`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..hub import looks_like_repo_id

# file types read by extension; `.gz` only for JSON / JSON Lines
DATA_SUFFIXES = (".json", ".jsonl", ".ndjson", ".parquet", ".csv", ".arrow", ".gz")


def looks_like_hub_id(text: str) -> bool:
    """Whether `text` could be a hub dataset ID (callers check that no such local path exists first)."""
    return looks_like_repo_id(text) and "@" not in text and "--" not in text and \
        not text.lower().endswith(DATA_SUFFIXES)


@dataclass(frozen=True)
class KnownSet:
    """How a hub dataset's records read: its format, the report's name for it, the split to take, its columns."""

    format: str
    name: str
    split: str = "train"
    columns: dict[str, str] = field(default_factory=dict)


KNOWN_SETS: dict[str, KnownSet] = {  # keys lower-case: hub IDs are matched case-insensitively
    # ShareGPT layout: `conversations: [{from, value}]`, from in system/human/gpt
    "open-orca/slimorca": KnownSet("sharegpt", "slimorca"),
    "open-orca/slimorca-dedup": KnownSet("sharegpt", "slimorca"),
    # `problem` / `solution` (OSS-Instruct) and `instruction` / `response` (Evol-Instruct)
    "ise-uiuc/magicoder-oss-instruct-75k": KnownSet("magicoder", "magicoder"),
    "ise-uiuc/magicoder-evol-instruct-110k": KnownSet("magicoder", "magicoder"),
    # `query` / `response` (plus `type` and `original_question`, unused)
    "meta-math/metamathqa": KnownSet("metamath", "metamathqa"),
    "tatsu-lab/alpaca": KnownSet("alpaca", "alpaca"),
    "yahma/alpaca-cleaned": KnownSet("alpaca", "alpaca"),
    "huggingfaceh4/ultrachat_200k": KnownSet("messages", "ultrachat", split="train_sft"),
}


def known_set(path: str) -> KnownSet | None:
    """The ready mapping of a hub dataset ID, if it has one."""
    return KNOWN_SETS.get(path.lower())

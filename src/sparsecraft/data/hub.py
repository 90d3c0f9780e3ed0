"""Hub datasets through huggingface_hub's cache: an ID (and revision, file patterns) -> its local snapshot folder.

datasets' `load_dataset("org/name")` does not load offline even when the repo's files are in the hub cache, so
the files are resolved by huggingface_hub (which finds them in the cache under `HF_HUB_OFFLINE=1`, and downloads
them otherwise, with the user's token, `HF_ENDPOINT` and cache) and then read from the folder with datasets'
builders. sparsecraft never sets a hub variable: offline mode, cache and token are the user's.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import CheckpointError
from ..hub import snapshot
from .config import DataError


def snapshot_folder(repo_id: str, revision: str | None = None, allow_patterns: list[str] | None = None) -> Path:
    """The snapshot folder of hub dataset `repo_id` in huggingface_hub's cache (downloaded unless offline).

    `allow_patterns`: fetch (or, offline, expect in the cache) only the files matching these globs.
    Raises a one-line `DataError` naming the ID (`hub.snapshot`'s errors: not on the hub, gated, no such
    revision, offline and not cached, cached only in part).
    """
    try:
        return snapshot(repo_id, repo_type="dataset", revision=revision, allow_patterns=allow_patterns)
    except CheckpointError as exc:
        raise DataError(str(exc)) from None

"""The Hugging Face hub, through huggingface_hub's own download and cache: repo IDs, revisions, and one-line errors.

Everything the hub needs (token, `HF_ENDPOINT`, the cache folder, offline mode) is huggingface_hub's: sparsecraft
never sets a hub variable. `HF_HUB_OFFLINE=1` (the user's choice) makes every lookup come from the cache.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import CheckpointError

# what a hub repo ID looks like: `name` or `org/name` (letters, digits, `-`, `_`, `.`; no `..`, no leading `.`)
_REPO_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}$")


def split_revision(text: str) -> tuple[str, str | None]:
    """`"org/name@rev"` -> `("org/name", "rev")`; `"org/name"` -> `("org/name", None)`."""
    name, sep, revision = text.partition("@")
    return (name, revision or None) if sep else (text, None)


def looks_like_repo_id(text: str) -> bool:
    """Whether `text` (without an `@revision`) could name a hub repo. Paths that exist are checked first by the
    callers, as transformers and datasets do: an existing local path is never a hub ID."""
    name, _ = split_revision(text)
    return bool(_REPO_ID.match(name)) and ".." not in name and not name.endswith((".json", ".gguf", ".jsonl"))


def is_offline() -> bool:
    """The user's `HF_HUB_OFFLINE` setting, as huggingface_hub read it."""
    from huggingface_hub import constants

    return bool(constants.is_offline_mode())


def snapshot(
    repo_id: str,
    *,
    repo_type: str = "model",
    revision: str | None = None,
    allow_patterns: list[str] | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> Path:
    """The local snapshot folder of a hub repo (downloaded into, or found in, huggingface_hub's cache); its name
    is the resolved commit hash. `allow_patterns` limits what is fetched (e.g. `["config.json"]`).

    Raises `CheckpointError` with one line for: a repo that does not exist (or is private without a token), a
    gated repo without access, an unknown revision, and offline mode (or no network) with nothing cached.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        IncompleteSnapshotError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    what = f"hub {repo_type} {repo_id}" + (f"@{revision}" if revision else "")
    try:
        folder = snapshot_download(repo_id, repo_type=repo_type, revision=revision, allow_patterns=allow_patterns,
                                   token=token, cache_dir=cache_dir, local_files_only=is_offline())
    except GatedRepoError:
        raise CheckpointError(f"{what} is gated: accept its terms on the hub, then log in (`hf auth login`) or set "
                              "HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise CheckpointError(f"{what}: no such {repo_type} on the hub and no such local path (a private one needs a "
                              "token: `hf auth login` or HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise CheckpointError(f"{what}: no such revision on the hub") from None
    except IncompleteSnapshotError as exc:  # e.g. `hf download --include ...` fetched only some files
        text = str(exc)
        missing = text.split(" are missing (", 1)[-1].split(")", 1)[0] if " are missing (" in text else ""
        raise CheckpointError(f"{what}: the cache holds only part of it (missing: {missing or _first_line(exc)}); "
                              "fetch the rest, or name the files you have") from None
    except LocalEntryNotFoundError as exc:
        if is_offline():
            kind = " --repo-type dataset" if repo_type == "dataset" else ""
            raise CheckpointError(f"{what}: not in the hub cache while HF_HUB_OFFLINE is set; fetch it where the hub "
                                  f"is reachable (`hf download{kind} {repo_id}`) or unset HF_HUB_OFFLINE") from None
        raise CheckpointError(f"{what}: cannot reach the hub and it is not in the cache ({_first_line(exc)})") \
            from None
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise CheckpointError(f"{what}: cannot fetch it: {_first_line(exc)}") from None
    return Path(folder)


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__

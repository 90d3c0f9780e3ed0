"""Hub datasets through huggingface_hub's cache: an ID (and revision, file patterns) -> its local snapshot folder.

datasets' `load_dataset("org/name")` does not load offline even when the repo's files are in the hub cache, so
the files are resolved by huggingface_hub (which finds them in the cache under `HF_HUB_OFFLINE=1`, and downloads
them otherwise, with the user's token, `HF_ENDPOINT` and cache) and then read from the folder with datasets'
builders. sparsecraft never sets a hub variable: offline mode, cache and token are the user's.
"""

from __future__ import annotations

from pathlib import Path

from .config import DataError


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def snapshot_folder(repo_id: str, revision: str | None = None, allow_patterns: list[str] | None = None) -> Path:
    """The snapshot folder of hub dataset `repo_id` in huggingface_hub's cache (downloaded unless offline).

    `allow_patterns`: fetch (or, offline, expect in the cache) only the files matching these globs.
    Raises a one-line `DataError` naming the ID: not on the hub, gated, no such revision, offline and not cached,
    cached only in part.
    """
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        IncompleteSnapshotError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    what = f"hub dataset {repo_id}" + (f"@{revision}" if revision else "")
    offline = constants.is_offline_mode()
    try:
        folder = snapshot_download(repo_id, repo_type="dataset", revision=revision, allow_patterns=allow_patterns,
                                   local_files_only=offline)
    except GatedRepoError:
        raise DataError(f"{what} is gated: accept its terms on the hub, then log in (`hf auth login`) or set "
                        "HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise DataError(f"{what}: no such dataset on the hub and no such local path (a private one needs a token: "
                        "`hf auth login` or HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise DataError(f"{what}: no such revision on the hub") from None
    except IncompleteSnapshotError as exc:  # e.g. `hf download --include ...` fetched only some files
        missing = str(exc).split(" are missing (", 1)[-1].split(")", 1)[0] if " are missing (" in str(exc) else ""
        raise DataError(f"{what}: the cache holds only part of it (missing: {missing or _first_line(exc)}); "
                        "fetch the rest, or name the files you have with files:") from None
    except LocalEntryNotFoundError as exc:
        if offline:
            raise DataError(f"{what}: no such local path, and not in the hub cache while HF_HUB_OFFLINE is set; "
                            f"fetch it where the hub is reachable (`hf download --repo-type dataset {repo_id}`) "
                            "or unset HF_HUB_OFFLINE") from None
        raise DataError(f"{what}: cannot reach the hub and it is not in the cache ({_first_line(exc)})") from None
    except (HfHubHTTPError, OSError, ValueError) as exc:  # an incomplete snapshot, a bad ID, the hub failing
        raise DataError(f"{what}: cannot fetch it: {_first_line(exc)}") from None
    return Path(folder)

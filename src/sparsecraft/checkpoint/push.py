"""Uploading a model directory to the hub with huggingface_hub (`create_repo` + `upload_folder`): its token,
endpoint and retries; sparsecraft only checks first that what is sent can be loaded by someone else."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import CheckpointError
from ..hub import looks_like_repo_id
from .card import CARD_NAME, write_model_card


def check_pushable(directory: Path) -> dict:
    """The directory's config.json; CheckpointError (one line) when it is not a model directory or refers to a
    base only this machine has (a local path: others could not load it)."""
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{directory} is not a model directory: no config.json")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{config_path} is not valid JSON: {exc}") from exc
    base = config.get("base") if isinstance(config.get("base"), dict) else None
    if base and not base.get("relative") and not base.get("revision"):
        from ..sources import BUILTIN_MODELS

        spec = str(base.get("spec"))
        if spec not in BUILTIN_MODELS:
            raise CheckpointError(f"{directory} refers to its base at a local path ({spec}), which others cannot "
                                  "load: save it with --standalone (or craft from a hub ID) before pushing")
    return config


def push_to_hub(directory: str | os.PathLike, repo_id: str, *, private: bool = False, token: str | None = None,
                commit_message: str | None = None) -> str:
    """Upload `directory` as the model repo `repo_id` (created if needed; `private` for a new repo). A missing
    README.md model card is written first. Returns the URL of the commit."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    directory = Path(directory)
    if not looks_like_repo_id(repo_id) or "@" in repo_id:
        raise CheckpointError(f"not a hub repo ID: {repo_id!r} (expected org/name)")
    config = check_pushable(directory)
    if not (directory / CARD_NAME).is_file():
        write_model_card(directory, config, standalone=bool((config.get("base") or {}).get("relative")))
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        info = api.upload_folder(folder_path=str(directory), repo_id=repo_id, repo_type="model",
                                 commit_message=commit_message or f"Upload {directory.name} with sparsecraft")
    except HfHubHTTPError as exc:
        first = str(exc).strip().splitlines()
        raise CheckpointError(f"push to {repo_id} failed: {first[0] if first else type(exc).__name__}") from None
    return str(getattr(info, "commit_url", info))

"""Atomic writes of directories and files: build in a temporary sibling, then rename into place.

A reader never sees a half-written directory or file, and a crash during the write leaves the previous version
intact (only a temporary sibling is left behind; the next directory write removes its own).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any


def check_output_path(target: str | os.PathLike, *, directory: bool = True, empty: bool = False) -> Path:
    """Check before any work that `target` can be written: not a file where a directory goes (or the reverse),
    not a non-empty directory when `empty`, a parent that is a writable directory. One-line CheckpointError."""
    from .errors import CheckpointError

    target = Path(target)
    if target.exists():
        if directory and not target.is_dir():
            raise CheckpointError(f"{target} is a file; the output must be a directory")
        if not directory and target.is_dir():
            raise CheckpointError(f"{target} is a directory; the output must be a file")
        if directory and empty and any(target.iterdir()):
            raise CheckpointError(f"{target} exists and is not empty")
    parent = target.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise CheckpointError(f"cannot write {target}: {parent} is not a directory")
    if not os.access(parent, os.W_OK):
        raise CheckpointError(f"cannot write {target}: {parent} is not writable")
    return target


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike):
    """Yield a temporary directory beside `target`; on success it replaces `target` in one rename."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{target.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        _fsync_tree(tmp)
        if target.exists():
            old = target.parent / f".{target.name}.old-{os.getpid()}"
            os.replace(target, old)
            try:
                os.replace(tmp, target)
            except BaseException:
                os.replace(old, target)  # put the previous version back
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fsync_tree(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def atomic_write(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write `data` to `path` through a fsynced temporary sibling and one rename; creates the parent folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")  # "x": never someone else's
    try:
        with open(tmp, "xb") as f:  # the usual permissions (mkstemp would make the file 0600)
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_json(path: str | os.PathLike, data: Any, *, indent: int = 2, **dumps_kwargs) -> Path:
    """`atomic_write` of `json.dumps(data)` plus a final newline."""
    return atomic_write(path, json.dumps(data, indent=indent, **dumps_kwargs) + "\n")

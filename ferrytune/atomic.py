"""Writes that matter, made atomic: a temporary file beside the target, fsync, rename, fsync the folder.

A reader (or a run resumed after a crash) sees the old content or the new one, never a torn one.
Every package writes its state files through these (checkpoint states, job records, eval results).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename or a new entry in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic_bytes(path: str | os.PathLike, data: bytes, *, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` atomically (created with ``mode``)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def write_atomic_json(path: str | os.PathLike, obj: Any, *, mode: int = 0o644) -> None:
    """``write_atomic_bytes`` of ``obj`` as indented JSON."""
    write_atomic_bytes(path, (json.dumps(obj, indent=2) + "\n").encode(), mode=mode)

"""What a tenant may read of an error: one short line, no server path, no other job's id.

The full exception, with its traceback, goes to the server log; the tenant gets
:func:`public_message`, which keeps the message but rewrites paths inside the tenant's own
area relative to it (``work/checkpoint.pt``), replaces every other absolute path by
``<server path>`` and every job id but the tenant's own by ``<another job>``.
"""

from __future__ import annotations

import re
from pathlib import Path

from ferrytune.errors import FerrytuneError

__all__ = ["MAX_PUBLIC_CHARS", "public_message", "scrub"]

MAX_PUBLIC_CHARS = 300
_ABS_PATH = re.compile(r"(?<![\w.~-])/[^\s'\"`,;:()\[\]{}<>]*")
_JOB_ID = re.compile(r"\bj-[0-9a-f]{16}\b")


def scrub(text: str, *, own_dirs: tuple[str | Path, ...] = (), job_id: str | None = None) -> str:
    """``text`` on one line, paths under ``own_dirs`` made relative, other paths and job ids hidden."""
    text = " ".join(str(text).split())
    for d in sorted((str(d).rstrip("/") for d in own_dirs if d), key=len, reverse=True):
        text = text.replace(d + "/", "").replace(d, ".")
    text = _ABS_PATH.sub("<server path>", text)
    text = _JOB_ID.sub(lambda m: m.group(0) if m.group(0) == job_id else "<another job>", text)
    if len(text) > MAX_PUBLIC_CHARS:
        text = text[:MAX_PUBLIC_CHARS - 3] + "..."
    return text


def public_message(e: BaseException, *, own_dirs: tuple[str | Path, ...] = (), job_id: str | None = None) -> str:
    """One clean line for the tenant: our own errors as they are, others with their type's name."""
    text = str(e).strip()
    if not (isinstance(e, FerrytuneError) and text):
        text = f"{type(e).__name__}: {text}" if text else type(e).__name__
    return scrub(text, own_dirs=own_dirs, job_id=job_id)

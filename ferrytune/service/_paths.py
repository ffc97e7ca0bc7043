"""The state dir's layout, and the one check that keeps a tenant's paths inside its area.

::

    STATE_DIR/
      ferrytune.db                        the job store (SQLite default)
      tenants/<tenant>/files/<name>       datasets the tenant uploaded
      tenants/<tenant>/jobs/<job id>/     spec.yaml, train.jsonl (a copy taken at submit),
                                          work/checkpoint.pt, adapter/ (PEFT, on success)

A tenant names files only *relative to its own area*; :func:`resolve_inside` refuses
absolute paths, ``..``, and anything whose real path (symlinks followed) leaves the area.
The server never opens a server-side path a tenant names.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

from ferrytune.errors import FerrytuneError

__all__ = ["StateLayout", "UnsafePathError", "check_file_name", "resolve_inside"]

_MAX_NAME = 200


class UnsafePathError(FerrytuneError, ValueError):
    """A tenant-given path is absolute, climbs with '..', or leads out of the tenant's area."""


def resolve_inside(root: Path, relative: str, *, field: str) -> Path:
    """``root / relative`` with symlinks resolved, guaranteed inside ``root``.

    ``field`` names the spec key in the error message (``data.train: ...``).
    """
    if not isinstance(relative, str) or not relative.strip():
        raise UnsafePathError(f"{field}: must be a non-empty relative path")
    if "\x00" in relative or "\\" in relative:
        raise UnsafePathError(f"{field}: {relative!r} has a forbidden character")
    pure = PurePosixPath(relative)
    if pure.is_absolute() or relative.startswith("~"):
        raise UnsafePathError(f"{field}: {relative!r} is absolute; name a file of your own area, e.g. 'train.jsonl'")
    if any(part == ".." for part in pure.parts):
        raise UnsafePathError(f"{field}: {relative!r} contains '..'; paths must stay inside your area")
    real_root = Path(os.path.realpath(root))
    real = Path(os.path.realpath(real_root / pure))
    if real != real_root and real_root not in real.parents:
        raise UnsafePathError(f"{field}: {relative!r} leads outside your area (through a symlink)")
    return real


def check_file_name(name: str) -> str:
    """An upload name: one path component of printable characters."""
    if (not name or len(name) > _MAX_NAME or name in (".", "..") or "/" in name or "\\" in name
            or name.startswith(".") or not name.isprintable()):
        raise UnsafePathError(f"file name {name!r}: use one plain file name (no '/', not starting with '.')")
    return name


class StateLayout:
    """Where things live under the service's state dir."""

    def __init__(self, state_dir: str | os.PathLike):
        self.root = Path(state_dir).absolute()

    @property
    def default_db_url(self) -> str:
        return f"sqlite:///{self.root / 'ferrytune.db'}"

    def tenant_root(self, tenant: str) -> Path:
        return self.root / "tenants" / tenant

    def files_dir(self, tenant: str) -> Path:
        return self.tenant_root(tenant) / "files"

    def job_dir(self, tenant: str, job_id: str) -> Path:
        return self.tenant_root(tenant) / "jobs" / job_id

    def ensure_tenant(self, tenant: str) -> None:
        self.files_dir(tenant).mkdir(parents=True, exist_ok=True)
        (self.tenant_root(tenant) / "jobs").mkdir(parents=True, exist_ok=True)

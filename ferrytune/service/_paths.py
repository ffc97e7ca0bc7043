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

Everything under the state dir is private to the service's user: folders are created
``0700`` and files ``0600`` (:func:`write_private`, :func:`copy_private`; workers run with
umask 077).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path, PurePosixPath

from ferrytune.errors import FerrytuneError

__all__ = ["StateLayout", "UnsafePathError", "check_file_name", "copy_private", "make_private_dir",
           "resolve_inside", "tree_bytes", "write_private"]

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


def make_private_dir(path: Path) -> None:
    """``mkdir -p`` with every folder it creates ``0700``."""
    path = Path(path)
    if path.is_dir():
        return
    make_private_dir(path.parent)
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        if not path.is_dir():
            raise
    os.chmod(path, 0o700)


def write_private(path: Path, data: bytes) -> None:
    """Create ``path`` (it must not exist) ``0600`` and write ``data``."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def copy_private(src: Path, dst: Path) -> None:
    """Copy ``src`` to a new ``0600`` file ``dst``."""
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with open(src, "rb") as fin, os.fdopen(fd, "wb") as fout:
        shutil.copyfileobj(fin, fout, 1 << 20)


def tree_bytes(root: Path) -> int:
    """Bytes of the regular files under ``root`` (symlinks not followed); 0 when it does not exist."""
    total, stack = 0, [os.fspath(root)]
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except (FileNotFoundError, NotADirectoryError):
            continue
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                elif entry.is_file(follow_symlinks=False):
                    total += entry.stat(follow_symlinks=False).st_size
            except FileNotFoundError:
                continue
    return total


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

    def outputs_dir(self, tenant: str) -> Path:
        return self.tenant_root(tenant) / "outputs"

    def job_dir(self, tenant: str, job_id: str) -> Path:
        return self.tenant_root(tenant) / "jobs" / job_id

    def ensure_root(self) -> None:
        make_private_dir(self.root)

    def ensure_tenant(self, tenant: str) -> None:
        self.ensure_root()
        make_private_dir(self.files_dir(tenant))
        make_private_dir(self.tenant_root(tenant) / "jobs")
        make_private_dir(self.outputs_dir(tenant))

    def disk_bytes(self, tenant: str) -> int:
        """What the tenant's area holds now (datasets, job copies, checkpoints, adapters)."""
        return tree_bytes(self.tenant_root(tenant))

    def job_dirs(self) -> list[tuple[str, Path]]:
        """(tenant, job folder) of every job folder on disk."""
        out = []
        tenants = self.root / "tenants"
        for tenant in sorted(tenants.iterdir()) if tenants.is_dir() else []:
            jobs = tenant / "jobs"
            for job in sorted(jobs.iterdir()) if jobs.is_dir() else []:
                out.append((tenant.name, job))
        return out

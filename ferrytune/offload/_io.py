"""Direct (O_DIRECT) file IO for the NVMe block store.

Why a thread pool of ``preadv``/``pwritev`` is the default and not libaio or
io_uring: on this class of machine 8 threads x 4 MiB requests read at 1.29 GB/s
where dd reaches 0.97 and fio (libaio, depth 16) 1.07; PyPI io_uring bindings
crash or need Python >= 3.12; DeepSpeed's aio op needs a JIT build (minutes)
and aborts the process on misaligned sizes. Here a misaligned request raises
:class:`StoreError`. DeepSpeed's libaio handle is the opt-in alternative
(``offload.io_backend: deepspeed_aio``, ``_aio.py``, which guards its traps);
:func:`ferrytune.offload.make_io_backend` (``_backends.py``) builds either by name.

Every request is cut into ``chunk_bytes`` pieces issued in parallel. A caller may
pass ``chunk_fn``, run in the IO thread on each piece (after a read, before a
write), so that work such as a checksum overlaps the other pieces' IO instead
of running serially after it.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import mmap
import os
import struct
import threading
import time
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable, Protocol, Sequence

import torch

from ferrytune.errors import StoreError

logger = logging.getLogger(__name__)

PAGE_BYTES = 4096
"""Alignment of every offset, length and buffer address (O_DIRECT needs the
device's logical block size; 4096 covers every NVMe and 512e disk)."""

ChunkFn = Callable[[int, memoryview], Any]
"""``chunk_fn(pos, view)``: ``pos`` is the piece's offset inside the request's buffer."""


def round_up(nbytes: int, multiple: int = PAGE_BYTES) -> int:
    """``nbytes`` rounded up to a multiple of ``multiple``."""
    return -(-nbytes // multiple) * multiple


def aligned_buffer(nbytes: int) -> mmap.mmap:
    """Page-aligned anonymous memory of ``nbytes`` rounded up to 4096.

    ``mmap`` gives page alignment for free and its pages are touched lazily, so
    a large buffer costs nothing until it is filled.
    """
    if nbytes <= 0:
        raise ValueError(f"aligned_buffer needs nbytes > 0, got {nbytes}")
    return mmap.mmap(-1, round_up(nbytes))


def as_uint8_tensor(buf: Any) -> torch.Tensor:
    """A ``torch.uint8`` tensor sharing memory with ``buf`` (mmap or memoryview)."""
    return torch.frombuffer(buf, dtype=torch.uint8)


def buffer_address(buf: memoryview) -> int:
    """Address of the first byte of ``buf`` (works on read-only buffers too)."""
    if buf.readonly:
        import numpy as np  # only for read-only views; ctypes refuses those

        return int(np.frombuffer(buf, dtype=np.uint8).ctypes.data)
    return ctypes.addressof(ctypes.c_char.from_buffer(buf))


def fd_path(fd: int) -> str:
    """Best-effort path of ``fd`` for error messages."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return f"<fd {fd}>"


def is_direct(fd: int) -> bool:
    """Whether ``fd`` was opened with O_DIRECT (asked of the kernel, so never stale)."""
    return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT)


def open_direct(path: str | os.PathLike[str], *, write: bool) -> int:
    """Open ``path`` (created if ``write``) for O_DIRECT IO; returns the fd.

    Filesystems that refuse O_DIRECT (EINVAL, e.g. older tmpfs, some FUSE) fall
    back to buffered IO with a warning; the backend then drops the pages it
    touched (``posix_fadvise(DONTNEED)``) so the page cache stays bounded.
    Use :func:`is_direct` to learn which mode a fd is in.
    """
    flags = (os.O_RDWR | os.O_CREAT) if write else os.O_RDONLY
    try:
        return os.open(path, flags | os.O_DIRECT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise StoreError(f"cannot open {path}: {exc.strerror}; check offload.nvme_dir") from exc
    logger.warning(
        "filesystem of %s refuses O_DIRECT; using buffered IO with posix_fadvise(DONTNEED) "
        "(slower, and page-cache use is bounded only per request)", path)
    try:
        return os.open(path, flags | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise StoreError(f"cannot open {path}: {exc.strerror}; check offload.nvme_dir") from exc


def checked_view(offset: int, buf: Any) -> memoryview:
    """``buf`` as a flat byte view (:func:`as_byte_view`), checked for direct IO at ``offset``."""
    view = as_byte_view(buf)
    check_aligned(offset, view)
    return view


def check_aligned(offset: int, buf: memoryview) -> None:
    """Raise :class:`StoreError` unless offset, length and address are page-aligned."""
    if buf.ndim != 1 or buf.itemsize != 1 or not buf.contiguous:
        raise StoreError("IO buffers must be flat, contiguous byte buffers (memoryview.cast('B'))")
    if offset % PAGE_BYTES or buf.nbytes % PAGE_BYTES or buf.nbytes == 0:
        raise StoreError(
            f"direct IO needs offset and length that are non-zero multiples of {PAGE_BYTES}, "
            f"got offset={offset} length={buf.nbytes}")
    if buffer_address(buf) % PAGE_BYTES:
        raise StoreError(
            f"direct IO needs a {PAGE_BYTES}-byte aligned buffer; allocate it with "
            "aligned_buffer() or take it from HostBufferPool")


@dataclass(frozen=True)
class IOStats:
    """Counters of one backend. ``read_s``/``write_s`` are busy time: wall seconds
    during which at least one read (write) request was in flight, so
    ``bytes_read / read_s`` is the achieved bandwidth even with overlapping requests."""

    bytes_read: int = 0
    bytes_written: int = 0
    read_s: float = 0.0
    write_s: float = 0.0
    num_reads: int = 0
    num_writes: int = 0


class IOCounters:
    """Per-kind (``"read"``, ``"write"``) bytes, request counts and busy time of one backend; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._in_flight = {"read": 0, "write": 0}
        self._since = {"read": 0.0, "write": 0.0}
        self._busy_s = {"read": 0.0, "write": 0.0}
        self._bytes = {"read": 0, "write": 0}
        self._count = {"read": 0, "write": 0}

    def start(self, kind: str) -> None:
        """A request of ``kind`` is in flight from now."""
        with self._lock:
            if self._in_flight[kind] == 0:
                self._since[kind] = time.perf_counter()
            self._in_flight[kind] += 1

    def stop(self, kind: str, nbytes: int | None) -> None:
        """A request of ``kind`` ended, having moved ``nbytes`` (None: it failed)."""
        with self._lock:
            self._in_flight[kind] -= 1
            if self._in_flight[kind] == 0:
                self._busy_s[kind] += time.perf_counter() - self._since[kind]
            if nbytes is not None:
                self._bytes[kind] += nbytes
                self._count[kind] += 1

    def stats(self) -> IOStats:
        with self._lock:
            n, s, c = self._bytes, self._busy_s, self._count
            return IOStats(n["read"], n["write"], s["read"], s["write"], c["read"], c["write"])


class IOBackend(Protocol):
    """What the block store needs from an IO engine. All offsets, lengths and
    buffer addresses are multiples of 4096; violations raise StoreError.
    ``chunk_bytes`` (the piece size given to ``chunk_fn``) must be a multiple of
    GRANULE_BYTES so that checksums do not depend on the backend."""

    chunk_bytes: int

    def read_into(self, fd: int, offset: int, buf: memoryview) -> None:
        """Fill ``buf`` from ``fd`` at ``offset``; blocks until done."""
        self.submit_read(fd, offset, buf).result()

    def write_from(self, fd: int, offset: int, buf: memoryview) -> None:
        """Write ``buf`` to ``fd`` at ``offset``; blocks until done (no fsync)."""
        self.submit_write(fd, offset, buf).result()

    def submit_read(self, fd: int, offset: int, buf: memoryview, *,
                    chunk_fn: ChunkFn | None = None) -> Future[list[Any]]: ...
    def submit_write(self, fd: int, offset: int, buf: memoryview, *,
                     chunk_fn: ChunkFn | None = None) -> Future[list[Any]]: ...
    @property
    def stats(self) -> IOStats: ...
    def close(self) -> None: ...


class ThreadedDirectIO(IOBackend):
    """Default :class:`IOBackend`: ``os.preadv``/``os.pwritev`` from a thread pool.

    ``num_threads`` bounds the requests the disk sees at once (the queue depth);
    ``chunk_bytes`` is the size of one request. Both syscalls release the GIL.
    """

    def __init__(self, *, num_threads: int = 8, chunk_bytes: int = 4 << 20) -> None:
        if num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {num_threads}")
        if chunk_bytes < PAGE_BYTES or chunk_bytes % PAGE_BYTES:
            raise ValueError(f"chunk_bytes must be a positive multiple of {PAGE_BYTES}, got {chunk_bytes}")
        self.num_threads = num_threads
        self.chunk_bytes = chunk_bytes
        self._pool = ThreadPoolExecutor(num_threads, thread_name_prefix="ferrytune-io")
        self._lock = threading.Lock()
        self._counters = IOCounters()

    # -- public API (read_into / write_from: IOBackend's, over these) -----------------------------
    def submit_read(self, fd: int, offset: int, buf: memoryview, *,
                    chunk_fn: ChunkFn | None = None) -> Future[list[Any]]:
        """Start a read; the future yields ``chunk_fn``'s results in chunk order."""
        return self._submit("read", fd, offset, buf, chunk_fn)

    def submit_write(self, fd: int, offset: int, buf: memoryview, *,
                     chunk_fn: ChunkFn | None = None) -> Future[list[Any]]:
        """Start a write; ``chunk_fn`` sees each piece just before it is written."""
        return self._submit("write", fd, offset, buf, chunk_fn)

    @property
    def stats(self) -> IOStats:
        return self._counters.stats()

    def close(self) -> None:
        """Wait for requests in flight, then stop the threads."""
        self._pool.shutdown(wait=True)

    # -- internals ----------------------------------------------------------------------------
    def _submit(self, kind: str, fd: int, offset: int, buf: memoryview,
                chunk_fn: ChunkFn | None) -> Future[list[Any]]:
        buf = checked_view(offset, buf)
        direct = is_direct(fd)
        pieces = [(pos, buf[pos:pos + self.chunk_bytes]) for pos in range(0, buf.nbytes, self.chunk_bytes)]
        outer: Future[list[Any]] = Future()
        outer.set_running_or_notify_cancel()
        results: list[Any] = [None] * len(pieces)
        state = {"left": len(pieces), "error": None}
        self._counters.start(kind)

        def finish() -> None:
            # Runs once, in the thread that completed the last piece: no worker ever
            # blocks on another worker, so nested submissions cannot deadlock the pool.
            if state["error"] is None and not direct:
                state["error"] = _drop_cache(kind, fd, offset, buf.nbytes)
            self._counters.stop(kind, buf.nbytes if state["error"] is None else None)
            if state["error"] is None:
                outer.set_result(results)
            else:
                outer.set_exception(state["error"])

        def on_done(index: int, fut: Future[Any]) -> None:
            exc = fut.exception()
            with self._lock:
                if exc is not None and state["error"] is None:
                    state["error"] = exc
                elif exc is None:
                    results[index] = fut.result()
                state["left"] -= 1
                last = state["left"] == 0
            if last:
                finish()

        run = _read_piece if kind == "read" else _write_piece
        for index, (pos, view) in enumerate(pieces):
            try:
                fut = self._pool.submit(run, fd, offset + pos, pos, view, chunk_fn)
            except RuntimeError as exc:  # pool shut down
                fut = Future()
                fut.set_exception(StoreError(f"IO backend is closed: {exc}"))
            fut.add_done_callback(lambda f, i=index: on_done(i, f))
        return outer




def _io_error(kind: str, fd: int, offset: int, exc: OSError) -> StoreError:
    path = fd_path(fd)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StoreError(f"disk full writing {path}: free space or choose another offload.nvme_dir")
    return StoreError(f"{kind} of {path} at offset {offset} failed: {exc.strerror} (errno {exc.errno})")


def _read_piece(fd: int, offset: int, pos: int, view: memoryview, chunk_fn: ChunkFn | None) -> Any:
    _transfer("read", fd, offset, view)
    return chunk_fn(pos, view) if chunk_fn is not None else None


def _write_piece(fd: int, offset: int, pos: int, view: memoryview, chunk_fn: ChunkFn | None) -> Any:
    result = chunk_fn(pos, view) if chunk_fn is not None else None
    _transfer("write", fd, offset, view)
    return result


def _transfer(kind: str, fd: int, offset: int, view: memoryview) -> None:
    """All of ``view`` from (read) or to (write) ``fd`` at ``offset``, across short transfers."""
    call = os.preadv if kind == "read" else os.pwritev
    done = 0
    while done < view.nbytes:
        try:
            n = call(fd, [view[done:]], offset + done)
        except OSError as exc:
            raise _io_error(kind, fd, offset + done, exc) from exc
        if n == 0 and kind == "read":
            raise StoreError(
                f"short read of {fd_path(fd)}: end of file at offset {offset + done}, "
                f"{view.nbytes - done} bytes missing; the store file is truncated")
        if n == 0:  # the kernel wrote nothing and reported no error: the device is full
            raise _io_error(kind, fd, offset + done, OSError(errno.ENOSPC, "no space"))
        done += n


def _drop_cache(kind: str, fd: int, offset: int, nbytes: int) -> Exception | None:
    """Buffered fallback only: push written pages out and drop them from the page cache."""
    try:
        if kind == "write":
            os.fdatasync(fd)  # DONTNEED skips dirty pages, so write them back first
        os.posix_fadvise(fd, offset, nbytes, os.POSIX_FADV_DONTNEED)
    except OSError as exc:
        return _io_error(kind, fd, offset, exc)
    return None


# -- checksums, computed by the IO threads -------------------------------------------------------
# The payload is hashed per 64 KiB granule inside the IO threads (so hashing overlaps the other
# pieces' IO and uses every core), and the record checksum is the same hash over the granule
# digests, so it does not depend on chunk_bytes. xxh3_64 (PyPI ``xxhash``) is preferred: zlib.crc32
# runs at 2.2 GB/s per core on the 2-core dev machine and cut store throughput to 0.36-0.55x (write)
# and 0.52-0.74x (read) of no checksum there, xxh3 (10-13 GB/s per core) to 0.90-0.97x and 0.99-1.01x
# (medians of 3 runs of benchmarks/bench_store_io.py). Both release the GIL. Headers name the algorithm.
GRANULE_BYTES = 64 << 10
CHECKSUM_NONE, CHECKSUM_CRC32, CHECKSUM_XXH3 = 0, 1, 2
CHECKSUM_NAMES = {"none": CHECKSUM_NONE, "crc32": CHECKSUM_CRC32, "xxh3_64": CHECKSUM_XXH3}


@lru_cache(maxsize=None)
def hash_fn(algo: int) -> Callable[[Any], int]:
    """The hash function of checksum algorithm id ``algo``."""
    if algo == CHECKSUM_CRC32:
        return zlib.crc32  # releases the GIL above 5 KiB
    if algo == CHECKSUM_XXH3:
        try:
            import xxhash  # optional dependency, imported on first use
        except ImportError:
            raise StoreError("this store's records use xxh3_64 checksums: pip install xxhash") from None
        return xxhash.xxh3_64_intdigest
    raise StoreError(f"unknown checksum algorithm id {algo}")


def default_checksum() -> str:
    """``xxh3_64`` when ``xxhash`` is installed, else ``crc32``."""
    try:
        import xxhash  # noqa: F401
    except ImportError:
        return "crc32"
    return "xxh3_64"


def granule_digests(algo: int, nbytes: int) -> Callable[[int, memoryview], list[int]]:
    """chunk_fn: digests of the granules of one IO piece that hold payload (not padding)."""
    fn = hash_fn(algo)

    def digests(pos: int, view: memoryview) -> list[int]:
        if pos % GRANULE_BYTES:
            raise StoreError(f"IO pieces must start on {GRANULE_BYTES}-byte boundaries; "
                             f"set the backend's chunk_bytes to a multiple of {GRANULE_BYTES}")
        end = max(0, min(view.nbytes, nbytes - pos))
        return [fn(view[i:min(i + GRANULE_BYTES, end)]) for i in range(0, end, GRANULE_BYTES)]
    return digests


def record_checksum(algo: int, parts: list[list[int]]) -> int:
    """The record checksum from the per-piece digest lists, in piece order."""
    flat = [d for part in parts for d in part]
    return hash_fn(algo)(struct.pack(f"<{len(flat)}Q", *flat))


def as_byte_view(buf: Any) -> memoryview:
    """A flat byte memoryview over ``buf`` (memoryview, mmap, bytearray or CPU tensor)."""
    if isinstance(buf, torch.Tensor):
        if buf.device.type != "cpu" or not buf.is_contiguous():
            raise StoreError("IO tensors must be contiguous CPU tensors")
        buf = buf.view(torch.uint8).reshape(-1).numpy()
    view = memoryview(buf)
    if view.format == "B" and view.ndim == 1:
        return view
    if not view.c_contiguous:
        raise StoreError("IO buffers must be C-contiguous")
    return view.cast("B")


__all__: Sequence[str] = (
    "CHECKSUM_CRC32", "CHECKSUM_NAMES", "CHECKSUM_NONE", "CHECKSUM_XXH3", "GRANULE_BYTES",
    "PAGE_BYTES", "IOBackend", "IOCounters", "IOStats", "ThreadedDirectIO", "aligned_buffer", "as_byte_view", "as_uint8_tensor",
    "check_aligned", "checked_view", "default_checksum", "granule_digests", "hash_fn", "is_direct", "open_direct",
    "record_checksum", "round_up",
)

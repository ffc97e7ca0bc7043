"""DeepSpeed's async IO (libaio) as an :class:`~ferrytune.offload._io.IOBackend`.

``offload.io_backend: deepspeed_aio`` moves the store's O_DIRECT records with
DeepSpeed's ``AsyncIOBuilder().load().aio_handle(...)`` (``async_pread`` /
``async_pwrite`` / ``wait``) instead of the thread pool of ``preadv``/``pwritev``.
The store uses it unchanged: same methods, same ``chunk_fn`` pieces in order.

How it runs: one dispatcher thread owns the handle(s). Each request is cut into
ops of at most ``op_bytes``; the dispatcher takes as many queued ops as it has
staging buffers, submits them all (each op is split across the handle's
``intra_op_parallelism`` threads, each keeping ``queue_depth`` libaio requests
of ``block_size`` in flight) and calls ``wait()`` once. ``chunk_fn`` (the store's
checksums) runs on a small thread pool: before a write is queued, and after a
read completed, so hashing overlaps the next batch's IO.

DeepSpeed's traps and what this module does about each (the op is compiled
with assertions on, so most of them abort the process):

* **mlock failure aborts**: every locked buffer is requested up front, once,
  after an ``mlock`` probe of the same size; a refusal raises
  :class:`FerrytuneError` naming ``ulimit -l``. Buffers the handle does not
  manage would get a *per-op* locked bounce buffer (an mlock mid-run), so they
  never reach it: they go through this backend's own locked staging buffers.
* **"file_offset + buffer nbytes > file bytes"** (an assert in ``pread``; the
  sync ``read`` asserts ``buffer nbytes == file bytes``): reads are checked
  against the file size first and raise the same short-read StoreError as the
  thread backend; the sync ``read``/``write`` are never used.
* **byte count not divisible by the parallelism**: ops for the main handle are
  multiples of ``intra_op_parallelism * 4096`` (so each thread's share is
  O_DIRECT-aligned); a remainder (a record's tail, a header page) goes to a
  second handle with parallelism 1. A ``chunk_bytes`` that the parallelism
  cannot split is refused at construction.
* **wait() with nothing pending** asserts: each handle's pending count is kept
  here and ``wait`` is called only when it is positive.
* **destroying a handle with ops pending** asserts: ``close`` drains first.

Not avoidable: the op ignores each libaio request's result, so an EIO or a short
write (disk full) is silent here; the store's checksum / write counter catches it
on the next read (``CorruptRecordError``). Keep ``verify_checksums`` on.

Records are read through ``/proc/self/fd/N`` (DeepSpeed opens reads by name),
so the store's own fds decide which file is read. A filesystem without
O_DIRECT is refused (the thread backend falls back to buffered IO there).

``DeepSpeedGDS`` (GPUDirect Storage, ``gds_handle``) has the same interface and
reads into CUDA tensors directly (``read_into_device``); it needs CUDA and
``libcufile``. Nothing here imports DeepSpeed until a backend is built.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import logging
import mmap
import os
import queue
import resource
import shutil
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from ferrytune.errors import FerrytuneError, StoreError
from ferrytune.offload._io import PAGE_BYTES, ChunkFn, IOBackend, IOCounters, IOStats, checked_view, is_direct

logger = logging.getLogger(__name__)

__all__ = ["DeepSpeedAIO", "DeepSpeedGDS", "aio_available", "load_aio_op"]

_load_lock = threading.Lock()
# DeepSpeed's first IO op of a process logs a warning from C++ inside std::call_once, calling
# Python's logging, which needs the GIL; pybind11 holds the GIL during async_pread/async_pwrite.
# Two lanes issuing their first op at once deadlock (one holds the GIL and waits in call_once,
# the other holds call_once and waits for the GIL: seen in CI). Until one op has been issued in
# this process (per kind: the warning may be for writes only), ops of that kind are issued one at
# a time under this lock (released while waiting).
_first_op_lock = threading.Lock()
_first_op_done = {"read": False, "write": False}
_loaded: dict[str, Any] = {}
_failed: dict[str, FerrytuneError] = {}


# -- building / loading the op ----------------------------------------------------------------------
def _missing_pieces() -> list[str]:
    """What a JIT build of the op needs and this machine lacks (checked before DeepSpeed tries)."""
    missing = []
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        missing.append(f"a C++ compiler ({cxx} not on PATH: apt-get install g++)")
    try:
        from torch.utils.cpp_extension import is_ninja_available
        ninja_ok = is_ninja_available()
    except Exception:
        ninja_ok = shutil.which("ninja") is not None
    if not ninja_ok:
        missing.append("ninja (pip install ninja)")
    if ctypes.util.find_library("aio") is None or not os.path.exists("/usr/include/libaio.h"):
        missing.append("libaio-dev (apt-get install libaio-dev)")
    return missing


def _prebuilt(name: str) -> bool:
    """Whether DeepSpeed was installed with this op compiled in (DS_BUILD_AIO=1 / DS_BUILD_GDS=1)."""
    try:
        from deepspeed.git_version_info import installed_ops
    except Exception:
        return False
    return bool(installed_ops.get(name, False))


def load_aio_op(kind: str = "async_io") -> Any:
    """DeepSpeed's ``async_io`` (or ``gds``) op module, built by JIT on first use.

    The JIT build lands in ``TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``)
    and is reused by later processes. Raises :class:`FerrytuneError` (one line naming the
    missing piece: deepspeed, libaio-dev, a C++ compiler, ninja, CUDA) when it cannot.
    A failure is remembered for the process, so ``auto`` does not retry a failed build.
    """
    if kind not in ("async_io", "gds"):
        raise ValueError(f"kind must be 'async_io' or 'gds', got {kind!r}")
    label = "deepspeed_aio" if kind == "async_io" else "deepspeed_gds"
    with _load_lock:
        if kind in _loaded:
            return _loaded[kind]
        if kind in _failed:
            raise _failed[kind]
        try:
            module = _build(kind, label)
        except FerrytuneError as exc:
            _failed[kind] = exc
            raise
        _loaded[kind] = module
        return module


def _build(kind: str, label: str) -> Any:
    if importlib.util.find_spec("deepspeed") is None:
        raise FerrytuneError(f"offload.io_backend {label} needs DeepSpeed: pip install deepspeed "
                             "(or set offload.io_backend: threads)")
    if kind == "gds" and not torch.cuda.is_available():
        raise FerrytuneError(f"offload.io_backend {label} (GPUDirect Storage) needs a CUDA device; "
                             "use deepspeed_aio or threads")
    if not _prebuilt(kind):
        missing = _missing_pieces()
        if missing:
            raise FerrytuneError(f"offload.io_backend {label}: DeepSpeed's {kind} op cannot be built here, "
                                 f"missing {', '.join(missing)} (or set offload.io_backend: threads)")
    try:
        from deepspeed.ops.op_builder import AsyncIOBuilder, GDSBuilder
        builder = AsyncIOBuilder() if kind == "async_io" else GDSBuilder()
        if not _prebuilt(kind) and not builder.is_compatible(verbose=False):
            what = "libaio-dev (apt-get install libaio-dev)" if kind == "async_io" else "libcufile (CUDA GDS)"
            raise FerrytuneError(f"offload.io_backend {label}: DeepSpeed's {kind} op is not compatible with "
                                 f"this machine: {what} not found by the compiler")
        start = time.perf_counter()
        module = builder.load(verbose=False)
    except FerrytuneError:
        raise
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt):
            raise
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise FerrytuneError(f"offload.io_backend {label}: building/loading DeepSpeed's {kind} op failed "
                             f"({type(exc).__name__}: {first}); check libaio-dev, c++ and ninja, or "
                             "set offload.io_backend: threads") from None
    logger.info("DeepSpeed %s op loaded in %.1f s", kind, time.perf_counter() - start)
    return module


def aio_available() -> FerrytuneError | None:
    """None when the async_io op loads (building it if needed), else the error saying why."""
    try:
        load_aio_op("async_io")
    except FerrytuneError as exc:
        return exc
    return None


# -- locked memory ----------------------------------------------------------------------------------
def _probe_mlock(nbytes: int, label: str) -> None:
    """Fail with one line where DeepSpeed's mlock of ``nbytes`` would abort the process."""
    libc = ctypes.CDLL(None, use_errno=True)
    probe = mmap.mmap(-1, nbytes)
    try:
        addr = ctypes.addressof(ctypes.c_char.from_buffer(probe))
        if libc.mlock(ctypes.c_void_p(addr), ctypes.c_size_t(nbytes)) != 0:
            err = ctypes.get_errno()
            soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
            limit = "unlimited" if soft == resource.RLIM_INFINITY else f"{soft / 2**20:.0f} MiB"
            raise FerrytuneError(
                f"offload.io_backend {label}: cannot lock {nbytes / 2**20:.0f} MiB of host memory for its "
                f"IO buffers (mlock: {os.strerror(err)}; RLIMIT_MEMLOCK {limit}): raise `ulimit -l` "
                "(e.g. `ulimit -l unlimited`, or memlock in /etc/security/limits.conf) or use threads")
        libc.munlock(ctypes.c_void_p(addr), ctypes.c_size_t(nbytes))
    finally:
        del addr
        probe.close()


# -- requests ---------------------------------------------------------------------------------------
@dataclass
class _Request:
    kind: str  # "read" | "write"
    nbytes: int
    future: Future
    chunk_fn: ChunkFn | None
    num_pieces: int
    results: list[Any] = field(default_factory=list)
    buf: memoryview | None = None  # the whole request's bytes (reads: for pieces that straddle two ops)
    hashed: list[bool] = field(default_factory=list)
    left: int = 0  # ops not yet finished
    error: BaseException | None = None


@dataclass
class _Op:
    req: _Request
    fd: int
    offset: int  # in the file
    pos: int  # in the request's buffer
    view: memoryview  # the caller's bytes of this op
    direct: torch.Tensor | None  # the caller's memory as a tensor when the handle manages it (no copy)
    tail: bool  # goes to the parallelism-1 handle
    staging: torch.Tensor | None = None
    lane: "_Lane | None" = None  # the lane that submitted it (its staging goes back there)


@dataclass
class _Lane:
    """One dispatcher thread with its own handles (main + parallelism-1 tail) and staging buffers.
    Two lanes alternate: one submits its batch while the other waits on its own."""

    handles: dict[bool, Any]
    free: queue.SimpleQueue
    pending: dict[bool, int] = field(default_factory=lambda: {False: 0, True: 0})
    thread: threading.Thread | None = None


class DeepSpeedAIO(IOBackend):
    """:class:`IOBackend` on DeepSpeed's ``aio_handle`` (libaio, O_DIRECT).

    ``num_threads`` is the handle's ``intra_op_parallelism`` (threads splitting each op);
    ``queue_depth`` x ``block_size`` is what each of them keeps in flight. ``op_bytes`` is
    the largest single op and the size of each of ``num_staging`` locked staging buffers per
    lane; ``lanes`` dispatchers (each its own handles) overlap one batch's wait with the next.
    """

    _builder_kind = "async_io"
    label = "deepspeed_aio"

    def __init__(self, *, num_threads: int = 8, chunk_bytes: int = 4 << 20, op_bytes: int = 32 << 20,
                 block_size: int = 4 << 20, queue_depth: int = 8, num_staging: int = 2, lanes: int = 2,
                 hash_threads: int | None = None) -> None:
        label = self.label
        if num_threads < 1:
            raise FerrytuneError(f"offload.io_threads must be >= 1 for {label}, got {num_threads}")
        unit = num_threads * PAGE_BYTES
        if chunk_bytes < PAGE_BYTES or chunk_bytes % unit:
            raise FerrytuneError(
                f"offload.io_backend {label}: the IO piece of {chunk_bytes} bytes cannot be split across "
                f"offload.io_threads={num_threads} handle threads in 4096-byte units (DeepSpeed needs the "
                f"byte count divisible by its intra_op_parallelism); use a power of two up to "
                f"{max(1, chunk_bytes // PAGE_BYTES)}")
        if op_bytes < chunk_bytes or op_bytes % chunk_bytes:
            raise FerrytuneError(f"op_bytes ({op_bytes}) must be a positive multiple of chunk_bytes ({chunk_bytes})")
        if block_size < PAGE_BYTES or block_size % PAGE_BYTES or min(queue_depth, num_staging, lanes) < 1:
            raise FerrytuneError(f"{label}: block_size must be a multiple of {PAGE_BYTES} and queue_depth, "
                                 f"num_staging, lanes >= 1 (got {block_size}, {queue_depth}, {num_staging}, {lanes})")
        self.num_threads = num_threads
        self.chunk_bytes = chunk_bytes
        self.op_bytes = op_bytes
        self._unit = unit
        self._op = load_aio_op(self._builder_kind)
        self._lanes: list[_Lane] = []
        self._locked: list[torch.Tensor] = []
        self._closed = False
        self._lock = threading.Lock()
        self._counters = IOCounters()
        self._queue: queue.SimpleQueue[_Op | None] = queue.SimpleQueue()
        self._pool: ThreadPoolExecutor | None = None
        self._num_staging = num_staging
        try:
            for _ in range(lanes):
                main = self._new_handle(block_size, queue_depth, num_threads)
                tail = self._new_handle(block_size, queue_depth, 1) if num_threads > 1 else main
                self._lanes.append(_Lane({False: main, True: tail}, queue.SimpleQueue()))
            _probe_mlock(op_bytes * num_staging * lanes, label)
            for lane in self._lanes:
                for _ in range(num_staging):
                    lane.free.put(self._new_locked(op_bytes))
            self._pool = ThreadPoolExecutor(hash_threads or max(2, min(num_threads, os.cpu_count() or 1)),
                                            thread_name_prefix="ferrytune-aio-hash")
            for i, lane in enumerate(self._lanes):
                lane.thread = threading.Thread(target=self._dispatch, args=(lane,), name=f"ferrytune-aio-{i}",
                                               daemon=True)
                lane.thread.start()
        except BaseException:
            self.close()
            raise

    # -- memory ---------------------------------------------------------------------------------
    def _new_handle(self, block_size: int, queue_depth: int, parallelism: int) -> Any:
        return self._op.aio_handle(block_size, queue_depth, False, True, parallelism)

    def _new_locked(self, nbytes: int) -> torch.Tensor:
        """A page-locked uint8 tensor from the handle (never mlock'd mid-run)."""
        t = self._lanes[0].handles[False].new_cpu_locked_tensor(nbytes, torch.empty(0, dtype=torch.uint8))
        self._locked.append(t)
        return t

    def new_buffer(self, nbytes: int) -> memoryview:
        """A page-aligned, page-locked buffer of ``nbytes`` (rounded up to 4096) that the handle
        reads and writes without a staging copy; freed by :meth:`close`."""
        if nbytes <= 0:
            raise ValueError(f"new_buffer needs nbytes > 0, got {nbytes}")
        nbytes = -(-nbytes // PAGE_BYTES) * PAGE_BYTES
        _probe_mlock(nbytes, self.label)
        with self._lock:
            if self._closed:
                raise StoreError("IO backend is closed")
            return memoryview(self._new_locked(nbytes).numpy())

    def _managed(self, view: memoryview) -> torch.Tensor | None:
        """``view`` as a tensor when the handle already manages (has locked) its memory."""
        if view.readonly:
            return None
        t = torch.frombuffer(view, dtype=torch.uint8)
        return t if self._lanes[0].handles[False].is_pinned(t) else None  # one manager per process

    # -- public API (IOBackend; read_into / write_from are its, over these) ----------------------
    def submit_read(self, fd: int, offset: int, buf: memoryview, *,
                    chunk_fn: ChunkFn | None = None) -> Future[list[Any]]:
        """Start a read; the future yields ``chunk_fn``'s results in chunk order."""
        buf = checked_view(offset, buf)
        self._check_fd(fd)
        size = os.fstat(fd).st_size
        if offset + buf.nbytes > size:  # DeepSpeed asserts (aborts) here: say it as the thread backend does
            raise StoreError(
                f"short read of /proc/self/fd/{fd}: end of file at offset {max(size, offset)}, "
                f"{offset + buf.nbytes - max(size, offset)} bytes missing; the store file is truncated")
        return self._submit("read", fd, offset, buf, chunk_fn)

    def submit_write(self, fd: int, offset: int, buf: memoryview, *,
                     chunk_fn: ChunkFn | None = None) -> Future[list[Any]]:
        """Start a write; ``chunk_fn`` sees each piece before it is written."""
        self._check_fd(fd)
        return self._submit("write", fd, offset, checked_view(offset, buf), chunk_fn)

    @property
    def stats(self) -> IOStats:
        return self._counters.stats()

    def close(self) -> None:
        """Finish the requests in flight, stop the threads, free the locked buffers and handles."""
        with self._lock:
            already, self._closed = self._closed, True
        if already and not any(lane.thread for lane in self._lanes):
            return
        for lane in self._lanes:
            if lane.thread is not None:
                self._queue.put(None)  # one sentinel per running lane
        for lane in self._lanes:
            if lane.thread is not None:
                lane.thread.join()
                lane.thread = None
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        if self._lanes:
            for t in self._locked:
                self._lanes[0].handles[False].free_cpu_locked_tensor(t)
        self._locked.clear()
        for lane in self._lanes:
            while not lane.free.empty():
                lane.free.get()
            lane.handles.clear()  # no op is pending: the handles' destructors join their threads cleanly
        self._lanes.clear()

    def __enter__(self) -> "DeepSpeedAIO":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- internals ------------------------------------------------------------------------------
    def _check_fd(self, fd: int) -> None:
        if self._closed:
            raise StoreError("IO backend is closed")
        if not is_direct(fd):
            raise StoreError(f"offload.io_backend {self.label} needs O_DIRECT, which the filesystem of "
                             f"/proc/self/fd/{fd} refuses; move offload.nvme_dir or use offload.io_backend: threads")

    def _submit(self, kind: str, fd: int, offset: int, buf: memoryview,
                chunk_fn: ChunkFn | None) -> Future[list[Any]]:
        with self._lock:
            if self._closed:
                raise StoreError("IO backend is closed")
            self._counters.start(kind)
        outer: Future[list[Any]] = Future()
        outer.set_running_or_notify_cancel()
        num_pieces = -(-buf.nbytes // self.chunk_bytes)
        req = _Request(kind, buf.nbytes, outer, chunk_fn, num_pieces, [None] * num_pieces, buf,
                       [False] * num_pieces)
        ops = self._ops(req, fd, offset, buf)
        req.left = len(ops)
        if kind == "read" or chunk_fn is None:
            for op in ops:
                self._queue.put(op)
            return outer
        # Writes: hash each piece on the pool first (overlapping other IO), then queue the ops.
        hashed = {"left": num_pieces}

        def hash_piece(index: int) -> None:
            pos = index * self.chunk_bytes
            try:
                req.results[index] = chunk_fn(pos, buf[pos:pos + self.chunk_bytes])
            except BaseException as exc:
                with self._lock:
                    req.error = req.error or exc
            with self._lock:
                hashed["left"] -= 1
                last = hashed["left"] == 0
            if last:
                for op in ops:
                    self._queue.put(op)

        for index in range(num_pieces):
            self._pool.submit(hash_piece, index)
        return outer

    def _ops(self, req: _Request, fd: int, offset: int, buf: memoryview) -> list[_Op]:
        """Cut the request into ops of <= op_bytes; a remainder the parallelism cannot split is a tail op."""
        ops: list[_Op] = []
        whole = buf.nbytes - buf.nbytes % self._unit
        for pos in range(0, whole, self.op_bytes):
            view = buf[pos:min(whole, pos + self.op_bytes)]
            ops.append(_Op(req, fd, offset + pos, pos, view, self._managed(view), tail=False))
        if whole < buf.nbytes:
            view = buf[whole:]
            ops.append(_Op(req, fd, offset + whole, whole, view, self._managed(view), tail=True))
        return ops

    def _dispatch(self, lane: _Lane) -> None:
        """The one thread that talks to the handles: batch, submit, wait, hand off.

        A batch never needs more staging buffers than exist, and every staging buffer held
        outside the batch is freed by the pool without waiting on this thread: no deadlock."""
        carry: _Op | None = None
        stop = False
        while not stop:
            op = carry if carry is not None else self._queue.get()
            carry = None
            if op is None:
                break
            batch, need = [op], int(op.direct is None)
            while True:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                if need + (nxt.direct is None) > self._num_staging:
                    carry = nxt
                    break
                batch.append(nxt)
                need += nxt.direct is None
            self._run_batch(lane, batch)
        if carry is not None:
            self._queue.put(carry)
        # Drain: a request queued after the sentinel (a close race) fails rather than hangs; another
        # lane's sentinel goes back for that lane.
        while True:
            try:
                op = self._queue.get_nowait()
            except queue.Empty:
                break
            if op is None:
                self._queue.put(None)
                break
            self._op_done(op, StoreError("IO backend is closed"))

    def _run_batch(self, lane: _Lane, batch: list[_Op]) -> None:
        submitted: list[_Op] = []
        for op in batch:
            if op.req.error is not None:  # an earlier op or the write's hashing failed: skip the IO
                self._op_done(op, None)
                continue
            try:
                self._start(lane, op)
            except BaseException as exc:
                self._release(op)
                self._op_done(op, exc)
                continue
            submitted.append(op)
        for tail in (False, True):  # never wait() with nothing pending: DeepSpeed asserts there
            handle = lane.handles[tail]
            if lane.pending[tail] == 0 or (tail and handle is lane.handles[False]):
                continue
            expected, lane.pending[tail] = lane.pending[tail], 0
            completed = handle.wait()
            if completed != expected:
                err = StoreError(f"{self.label}: wait() completed {completed} of {expected} ops")
                for op in submitted:
                    if op.tail == tail and op.req.error is None:
                        op.req.error = err
        for op in submitted:  # completions run on the pool: a caller's callback never blocks this thread
            if op.req.kind == "read" and op.req.error is None:
                self._pool.submit(self._finish_read, op)
            else:
                self._release(op)
                self._pool.submit(self._op_done, op, None)

    def _start(self, lane: _Lane, op: _Op) -> None:
        handle = lane.handles[op.tail]
        if op.direct is not None:
            tensor = op.direct
        else:
            op.staging = lane.free.get()  # blocks until a read's post-processing frees one
            op.lane = lane
            tensor = op.staging[:op.view.nbytes]
            if op.req.kind == "write":
                tensor.copy_(torch.frombuffer(op.view, dtype=torch.uint8))
        if _first_op_done[op.req.kind]:
            rc = self._issue(handle, op, tensor)
        else:
            with _first_op_lock:
                rc = self._issue(handle, op, tensor)
                _first_op_done[op.req.kind] = True
        if rc != 0:
            raise StoreError(f"{self.label}: {op.req.kind} of /proc/self/fd/{op.fd} at offset {op.offset} "
                             f"was refused (rc {rc}); see DeepSpeed's message above")
        # The main handle is also the tail handle when the parallelism is 1.
        lane.pending[op.tail and lane.handles[True] is not lane.handles[False]] += 1

    @staticmethod
    def _issue(handle, op: _Op, tensor: torch.Tensor) -> int:
        if op.req.kind == "read":
            return handle.async_pread(tensor, f"/proc/self/fd/{op.fd}", op.offset)
        return handle.async_pwrite(tensor, op.fd, op.offset)

    def _finish_read(self, op: _Op) -> None:
        """Pool: copy out of staging, then hash the request's pieces that lie wholly inside this op."""
        err: BaseException | None = None
        try:
            if op.staging is not None:
                torch.frombuffer(op.view, dtype=torch.uint8).copy_(op.staging[:op.view.nbytes])
            req = op.req
            if req.chunk_fn is not None:
                end = op.pos + op.view.nbytes
                for index in range(-(-op.pos // self.chunk_bytes), req.num_pieces):
                    lo = index * self.chunk_bytes
                    hi = min(lo + self.chunk_bytes, req.nbytes)
                    if hi > end:
                        break
                    req.results[index] = req.chunk_fn(lo, op.view[lo - op.pos:hi - op.pos])
                    req.hashed[index] = True
        except BaseException as exc:
            err = exc
        self._release(op)
        self._op_done(op, err)

    def _release(self, op: _Op) -> None:
        if op.staging is not None:
            op.lane.free.put(op.staging)
            op.staging = None

    def _op_done(self, op: _Op, exc: BaseException | None) -> None:
        req = op.req
        op.direct = op.view = None  # drop the exports of the caller's buffer (an mmap can close again)
        with self._lock:
            if exc is not None and req.error is None:
                req.error = exc
            req.left -= 1
            if req.left:
                return
        self._counters.stop(req.kind, req.nbytes if req.error is None else None)
        if req.error is None and req.kind == "read" and req.chunk_fn is not None:
            try:  # pieces that straddled two ops (a record's tail): hashed once all their bytes are in
                for index in range(req.num_pieces):
                    if not req.hashed[index]:
                        lo = index * self.chunk_bytes
                        req.results[index] = req.chunk_fn(lo, req.buf[lo:min(lo + self.chunk_bytes, req.nbytes)])
            except BaseException as hash_exc:  # noqa: BLE001 - reported through the future
                req.error = hash_exc
        req.buf = None
        if req.error is None:
            req.future.set_result(req.results)
        else:
            req.future.set_exception(req.error)


class DeepSpeedGDS(DeepSpeedAIO):
    """GPUDirect Storage (DeepSpeed ``gds_handle``): host buffers as :class:`DeepSpeedAIO`, and
    :meth:`read_into_device` / :meth:`write_from_device` move records to and from CUDA memory
    without a host copy. Needs CUDA and ``libcufile``; refused with one line otherwise."""

    _builder_kind = "gds"
    label = "deepspeed_gds"

    def __init__(self, **kw: Any) -> None:
        if not torch.cuda.is_available():
            raise FerrytuneError("offload.io_backend deepspeed_gds (GPUDirect Storage) needs a CUDA device")
        super().__init__(**kw)
        self._pinned_device: list[torch.Tensor] = []

    def _new_handle(self, block_size: int, queue_depth: int, parallelism: int) -> Any:
        return self._op.gds_handle(block_size, queue_depth, False, True, parallelism)

    def _device_io(self, kind: str, fd: int, offset: int, tensor: torch.Tensor) -> None:
        """Through the dispatcher like every op, so no wait() ever races another."""
        if not tensor.is_cuda or not tensor.is_contiguous():
            raise StoreError("read_into_device/write_from_device need a contiguous CUDA tensor")
        flat = tensor.view(-1).view(torch.uint8)
        nbytes = flat.numel()
        if offset % PAGE_BYTES or nbytes % self._unit or nbytes == 0:
            raise StoreError(f"{self.label}: device IO needs an offset multiple of {PAGE_BYTES} and a size "
                             f"multiple of {self._unit} (4096 x io_threads), got {offset}, {nbytes}")
        self._check_fd(fd)
        if kind == "read" and offset + nbytes > os.fstat(fd).st_size:
            raise StoreError(f"short read of /proc/self/fd/{fd}: the store file is truncated")
        with self._lock:
            if self._closed:
                raise StoreError("IO backend is closed")
            self._counters.start(kind)
        handle = self._lanes[0].handles[False]  # cuFile registrations are per process
        handle.pin_device_tensor(flat)
        try:
            outer: Future[list[Any]] = Future()
            outer.set_running_or_notify_cancel()
            req = _Request(kind, nbytes, outer, None, 0, [])
            ops = [_Op(req, fd, offset + pos, pos, None, flat[pos:pos + self.op_bytes], tail=False)
                   for pos in range(0, nbytes, self.op_bytes)]
            req.left = len(ops)
            for op in ops:
                self._queue.put(op)
            outer.result()
        finally:
            handle.unpin_device_tensor(flat)

    def read_into_device(self, fd: int, offset: int, tensor: torch.Tensor) -> None:
        """Fill the CUDA ``tensor`` from ``fd`` at ``offset`` (GPUDirect, no host bounce)."""
        self._device_io("read", fd, offset, tensor)

    def write_from_device(self, fd: int, offset: int, tensor: torch.Tensor) -> None:
        """Write the CUDA ``tensor`` to ``fd`` at ``offset``."""
        self._device_io("write", fd, offset, tensor)

"""A fixed pool of page-aligned host buffers, allocated once.

Why fixed: ZeRO-Infinity's pinned buffers are known to exhaust host RAM
(DeepSpeed #3000, #4867, #7074) and torch's pinned allocator rounds sizes up to
a power of two (pytorch#95823). Here every buffer is one ``mmap`` of exactly
``round_up(buffer_bytes, 4096)`` bytes, made in the constructor, registered
with CUDA in place (``cudaHostRegister``) when pinning is asked for and
possible, and never replaced: host memory is ``num_buffers * buffer_bytes``.

A buffer is either free (in the pool) or held (acquired); releasing a free buffer, or one of
another pool, raises instead of corrupting data. What a held buffer is doing (filling, being
written back) is the state of the streamer slot that owns it (``_ferry.py``, one checked
machine), not a second machine here.
"""

from __future__ import annotations

import logging
import mmap
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch

from ferrytune.errors import FerrytuneError
from ferrytune.offload._io import aligned_buffer, buffer_address, round_up

logger = logging.getLogger(__name__)


class PoolError(FerrytuneError):
    """A misuse of the pool (a double release, a buffer of another pool): a bug in the caller."""


@dataclass(frozen=True)
class PoolStats:
    """Counters of one pool. ``wait_s`` is time callers spent blocked in acquire()."""

    num_buffers: int
    buffer_bytes: int
    total_bytes: int
    pinned: bool
    num_allocations: int
    num_acquires: int
    num_waits: int
    wait_s: float


class HostBuffer:
    """One page-aligned buffer of the pool. Hand it to the store as-is."""

    def __init__(self, pool: "HostBufferPool", index: int, mem: mmap.mmap) -> None:
        self.pool = pool
        self.index = index
        self._mem = mem
        self.nbytes = len(mem)
        self.held = False
        with memoryview(mem) as view:
            self.address = buffer_address(view)  # an mmap never moves

    @property
    def view(self) -> memoryview:
        """The whole buffer as a flat writable byte view (what the IO backend takes)."""
        return memoryview(self._mem)

    def tensor(self, dtype: torch.dtype, numel: int, offset: int = 0) -> torch.Tensor:
        """A 1-D ``dtype`` tensor of ``numel`` elements at byte ``offset``, sharing memory."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        if offset < 0 or offset % itemsize:
            raise ValueError(f"offset {offset} must be a non-negative multiple of {itemsize} for {dtype}")
        if numel < 0 or offset + numel * itemsize > self.nbytes:
            raise ValueError(
                f"{numel} x {dtype} at offset {offset} does not fit host buffer of {self.nbytes} bytes")
        if numel == 0:
            return torch.empty(0, dtype=dtype)
        return torch.frombuffer(self._mem, dtype=dtype, count=numel, offset=offset)

    def __repr__(self) -> str:
        return f"HostBuffer(index={self.index}, nbytes={self.nbytes}, held={self.held})"


class HostBufferPool:
    """``num_buffers`` host buffers of ``buffer_bytes`` (rounded up to 4096) each.

    ``acquire()`` blocks while none is free; every wait is timed and counted in
    :attr:`stats` so stalls show in the step metrics.
    """

    def __init__(self, num_buffers: int, buffer_bytes: int, *, pin: bool) -> None:
        if num_buffers < 1:
            raise ValueError(f"num_buffers must be >= 1, got {num_buffers}")
        if buffer_bytes < 1:
            raise ValueError(f"buffer_bytes must be >= 1, got {buffer_bytes}")
        self.buffer_bytes = round_up(buffer_bytes)
        self._cond = threading.Condition()
        self._num_allocations = 0
        self._buffers: list[HostBuffer] = []
        for index in range(num_buffers):
            self._buffers.append(HostBuffer(self, index, aligned_buffer(self.buffer_bytes)))
            self._num_allocations += 1
        self._free: list[HostBuffer] = list(reversed(self._buffers))
        self.pinned = self._pin() if pin else False
        self._num_acquires = 0
        self._num_waits = 0
        self._wait_s = 0.0
        self._closed = False

    @property
    def num_buffers(self) -> int:
        return len(self._buffers)

    @property
    def total_bytes(self) -> int:
        """Host memory this pool holds, in bytes."""
        return self.num_buffers * self.buffer_bytes

    @property
    def num_free(self) -> int:
        with self._cond:
            return len(self._free)

    @property
    def stats(self) -> PoolStats:
        with self._cond:
            return PoolStats(self.num_buffers, self.buffer_bytes, self.total_bytes, self.pinned,
                             self._num_allocations, self._num_acquires, self._num_waits, self._wait_s)

    def acquire(self, timeout_s: float | None = None) -> HostBuffer:
        """Take a free buffer, waiting up to ``timeout_s``.

        Raises :class:`FerrytuneError` on timeout: with a correct schedule the pool
        can only run dry transiently, so a long wait means a leak or too few buffers.
        """
        with self._cond:
            if self._closed:
                raise FerrytuneError("host buffer pool is closed")
            if not self._free:
                start = time.perf_counter()
                self._num_waits += 1
                ok = self._cond.wait_for(lambda: bool(self._free) or self._closed, timeout_s)
                self._wait_s += time.perf_counter() - start
                if self._closed:
                    raise FerrytuneError("host buffer pool was closed while waiting")
                if not ok:
                    raise FerrytuneError(
                        f"no host buffer free after {timeout_s} s (pool of {self.num_buffers} x "
                        f"{self.buffer_bytes} bytes): a buffer was not released, or the pool is "
                        "too small for offload.prefetch_depth; raise offload.host_budget_gib")
            buf = self._free.pop()
            buf.held = True
            self._num_acquires += 1
            return buf

    def release(self, buf: HostBuffer) -> None:
        """Return a held ``buf`` to the pool (a double release raises)."""
        if buf.pool is not self:
            raise PoolError(f"{buf!r} does not belong to this pool")
        with self._cond:
            if not buf.held:
                raise PoolError(f"host buffer {buf.index} released twice")
            buf.held = False
            self._free.append(buf)
            self._cond.notify()

    def close(self) -> None:
        """Unregister pinned memory and unmap the buffers.

        A buffer whose memory is still viewed by a live tensor cannot be unmapped
        now; it is freed when the last view goes away (logged at debug level).
        """
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        if self.pinned:
            cudart = torch.cuda.cudart()
            for buf in self._buffers:
                cudart.cudaHostUnregister(buf.address)
        for buf in self._buffers:
            try:
                buf._mem.close()
            except BufferError:
                logger.debug("host buffer %d still has views; it is freed with them", buf.index)

    def __enter__(self) -> "HostBufferPool":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _pin(self) -> bool:
        """Page-lock the buffers for async device copies; False (with a log) if not possible."""
        if not torch.cuda.is_available():
            logger.debug("pin=True ignored: CUDA is not available, host buffers stay pageable")
            return False
        cudart = torch.cuda.cudart()
        done: list[HostBuffer] = []
        for buf in self._buffers:
            try:
                err: Any = int(cudart.cudaHostRegister(buf.address, buf.nbytes, 0))
            except Exception as exc:  # a broken driver must not stop training: run unpinned
                err = exc
            if err != 0:
                for pinned in done:
                    cudart.cudaHostUnregister(pinned.address)
                logger.warning(
                    "cudaHostRegister of a %d-byte host buffer failed (%s); continuing with pageable "
                    "buffers (slower host-to-device copies). Lower offload.host_budget_gib or raise "
                    "the locked-memory limit (ulimit -l) to pin.", buf.nbytes, err)
                return False
            done.append(buf)
        logger.info("pinned %d host buffers, %d bytes", len(done), self.total_bytes)
        return True

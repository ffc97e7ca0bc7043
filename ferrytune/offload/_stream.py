"""The block streamer: ferry blocks to the device in visiting order, overlapped with compute.

One class owns the buffers, the background threads and (on CUDA) the copy
stream and its events. A *pass* is a visiting order of block ids (a ZO step:
``outer, layer.0 .. layer.N-1``; a LoRA step: forward then the layers again in
reverse). The compute thread calls ``acquire(b)`` / ``release(b, dirty=)`` in
that order; the streamer keeps ``prefetch_depth`` blocks in flight ahead of it
and writes dirty blocks back behind it.

Each device *slot* moves through an explicit state machine::

    FREE -> LOADING -> READY -> IN_USE -> (WRITING ->) FREE

and every wait of the compute thread is timed and counted (``stall_s``), so a
step that is IO bound shows it in the metrics.

Block homes (decided by the planner): ``DEVICE`` masters are device tensors in
the store dtype; ``HOST`` masters live in one page-aligned host allocation;
``NVME`` masters are O_DIRECT records read into page-aligned staging buffers.
A clean block that is still in a free slot is reused without IO (the turn of a
LoRA step: the last layers of the forward are the first of the backward).
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ferrytune.errors import FerrytuneError
from ferrytune.offload._io import aligned_buffer, as_uint8_tensor, make_io_backend
from ferrytune.offload._plan import Plan, Tier
from ferrytune.offload._pool import HostBufferPool
from ferrytune.offload._store import NvmeBlockStore

logger = logging.getLogger(__name__)


class SlotState(enum.Enum):
    FREE = "free"
    LOADING = "loading"
    READY = "ready"
    IN_USE = "in_use"
    WRITING = "writing"


@dataclass
class StreamStats:
    """Counters of one streamer; ``snapshot()`` deltas give per-step figures."""

    bytes_read: dict[str, int] = field(default_factory=lambda: {t.value: 0 for t in Tier})
    bytes_written: dict[str, int] = field(default_factory=lambda: {t.value: 0 for t in Tier})
    read_s: float = 0.0
    write_s: float = 0.0
    stall_s: float = 0.0
    num_stalls: int = 0
    num_loads: int = 0
    cache_hits: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    # Loads and writes run on several threads: counting goes through these (a bare ``+=`` on
    # a shared counter from two threads can lose an update).
    def count_read(self, tier: str, nbytes: int, seconds: float) -> None:
        with self._lock:
            self.bytes_read[tier] += nbytes
            self.read_s += seconds
            self.num_loads += 1

    def count_write(self, tier: str, nbytes: int, seconds: float = 0.0) -> None:
        with self._lock:
            self.bytes_written[tier] += nbytes
            self.write_s += seconds

    def snapshot(self) -> dict:
        return {"bytes_read": dict(self.bytes_read), "bytes_written": dict(self.bytes_written),
                "read_s": self.read_s, "write_s": self.write_s, "stall_s": self.stall_s,
                "num_stalls": self.num_stalls, "num_loads": self.num_loads, "cache_hits": self.cache_hits}


@dataclass
class _Slot:
    index: int
    working: torch.Tensor  # flat, compute dtype, on the device
    staging: object | None  # HostBuffer for NVMe reads/writes (None when zero-copy or not NVMe)
    state: SlotState = SlotState.FREE
    holds: str | None = None  # block whose clean contents the slot has (or is loading)
    refs: int = 0  # acquisitions of the current pass that share the slot (LoRA's forward/backward turn)
    last_use: float = 0.0
    ready: Future | None = None  # the load in flight
    written: Future | None = None  # the write-back in flight
    event: object | None = None  # CUDA: the copy stream's event for the load


class BlockStreamer:
    """Owns the homes of all blocks and ferries them through device slots."""

    def __init__(self, plan: Plan, block_numel: dict[str, int], *, device: torch.device,
                 compute_dtype: torch.dtype, store_dtype: torch.dtype, nvme_dir: str | None = None,
                 io_threads: int = 8, verify_checksums: bool = True, io_backend: str = "threads") -> None:
        self.plan = plan
        self.numel = dict(block_numel)
        self.device = torch.device(device)
        self.compute_dtype = compute_dtype
        self.store_dtype = store_dtype
        self.nvme_dir = Path(nvme_dir) if nvme_dir else None
        self.io_threads = io_threads
        self.io_backend = io_backend
        self.verify = verify_checksums
        self.stats = StreamStats()
        self._opened = False

    # ------------------------------------------------------------------ setup
    def open(self, init: Callable[[str, torch.Tensor], None], *, reuse_store: bool = False) -> None:
        """Allocate every buffer once and fill each block's home via ``init(block_id, flat_store_tensor)``.

        ``init`` writes the block's parameters into a flat CPU tensor of the
        store dtype; blocks are initialised one at a time, so host memory never
        holds more than one block beyond the homes themselves.
        """
        plan, dev = self.plan, self.device
        self._cuda = dev.type == "cuda"
        self._copy_stream = torch.cuda.Stream(dev) if self._cuda else None
        self._masters: dict[str, torch.Tensor] = {}
        nvme_blocks = [b for b, t in plan.home.items() if t == Tier.NVME]
        host_blocks = [b for b, t in plan.home.items() if t == Tier.HOST]
        esize = _esize(self.store_dtype)
        # HOST homes: one page-aligned allocation, carved into blocks (allocated once).
        if host_blocks:
            offsets, total = {}, 0
            for b in host_blocks:
                offsets[b] = total
                total += -(-self._home_numel(b) * esize // 4096) * 4096
            self._host_mem = aligned_buffer(total)
            raw = as_uint8_tensor(self._host_mem)
            if self._cuda:
                _try_pin(raw)
            for b in host_blocks:
                self._masters[b] = raw[offsets[b]:offsets[b] + self._home_numel(b) * esize].view(self.store_dtype)
        # NVME homes: one record per block in the store.
        self._io = None
        self._store = None
        if nvme_blocks:
            if self.nvme_dir is None:
                raise FerrytuneError("offload.nvme_dir must be set when offload.tier is nvme")
            self._io = make_io_backend(self.io_backend, num_threads=self.io_threads)
            records = {b: self._home_numel(b) * esize for b in nvme_blocks}
            if reuse_store and (self.nvme_dir / "store.json").exists():
                self._store = NvmeBlockStore.open(self.nvme_dir, backend=self._io, verify=self.verify)
            else:
                _remove_store(self.nvme_dir)  # the store is scratch: rebuilt from the checkpoint each run
                self._store = NvmeBlockStore.create(self.nvme_dir, records, backend=self._io, verify=self.verify)
        self._build_slots()
        self._alloc_extra()
        scratch = torch.empty(self._scratch_numel(), dtype=self.store_dtype)
        for b, tier in plan.home.items():
            if not (reuse_store and tier == Tier.NVME):
                self._fill_home(b, tier, init, scratch)
        del scratch
        self._lock = threading.Lock()
        self._pending_write: dict[str, Future] = {}
        self._in_use: dict[str, list[_Slot]] = {}
        self._order: list[str] = []
        self._pos = 0
        self._start_threads()
        self._opened = True

    # Seams for subclasses whose homes hold something other than whole blocks (sliced loading).
    def _home_numel(self, b: str) -> int:
        """Elements of block ``b``'s home on the host or NVMe tier."""
        return self.numel[b]

    def _alloc_extra(self) -> None:
        """Allocate buffers beyond the slots (once, at open)."""

    def _scratch_numel(self) -> int:
        return max(self.numel.values())

    def _fill_home(self, b: str, tier: Tier, init: Callable[[str, torch.Tensor], None],
                   scratch: torch.Tensor) -> None:
        """Build block ``b`` with ``init`` in ``scratch`` and store it in its home."""
        flat = scratch[: self.numel[b]]
        flat.zero_()
        init(b, flat)
        self._store_home(b, tier, flat)

    def _store_home(self, b: str, tier: Tier, values: torch.Tensor) -> None:
        """Put ``values`` (what this streamer's home of ``b`` holds) into that home."""
        if tier == Tier.DEVICE:
            self._masters[b] = values.to(self.device, copy=True)
        elif tier == Tier.HOST:
            self._masters[b].copy_(values)
        else:
            self._write_record(b, values)

    # Two loaders: one block's O_DIRECT read overlaps the previous block's bf16 -> fp32 cast.
    num_loaders = 2

    def _start_threads(self) -> None:
        self._ferry = ThreadPoolExecutor(self.num_loaders, thread_name_prefix="ferrytune-load")
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="ferrytune-write")

    def _build_slots(self) -> None:
        plan = self.plan
        layer_numel = max(n for b, n in self.numel.items() if b != plan.outer_block)
        outer_numel = self.numel[plan.outer_block]
        nvme = any(t == Tier.NVME for t in plan.home.values())
        zero_copy_nvme = plan.zero_copy and nvme
        self._pool = None
        ring = max(plan.ring_size, plan.staging_buffers, 1) if plan.tier != "resident" or not plan.zero_copy else 0
        esize = _esize(self.compute_dtype if zero_copy_nvme else self.store_dtype)
        if nvme:
            self._pool = HostBufferPool(ring, layer_numel * esize, pin=self._cuda)
            self._outer_pool = HostBufferPool(1, outer_numel * esize, pin=self._cuda)
        self._slots: list[_Slot] = []
        self._outer_slot: _Slot | None = None
        needs_working = not (plan.zero_copy and plan.tier == "resident")
        if not needs_working:
            return
        for i in range(ring):
            self._slots.append(self._make_slot(i, layer_numel, self._pool if nvme else None, zero_copy_nvme))
        self._outer_slot = self._make_slot(-1, outer_numel, self._outer_pool if nvme else None, zero_copy_nvme)

    def _make_slot(self, index: int, numel: int, pool: HostBufferPool | None, zero_copy: bool) -> _Slot:
        staging = None
        if pool is not None:
            staging = pool.acquire()  # slots own their staging buffer for the streamer's life
        if zero_copy and staging is not None:
            working = staging.tensor(self.compute_dtype, numel)
        else:
            working = torch.empty(numel, dtype=self.compute_dtype, device=self.device)
        return _Slot(index, working, staging)

    # ------------------------------------------------------------------ passes
    def start_pass(self, order: list[str]) -> None:
        """Declare the visiting order of the next pass and start prefetching."""
        assert self._opened, "BlockStreamer.open() first"
        self._order = list(order)
        self._pos = 0
        self._futures: dict[int, tuple[_Slot | None, Future | None]] = {}
        self._submitted = 0
        self._kick()

    def _kick(self) -> None:
        limit = min(self._pos + 1 + self.plan.prefetch_depth, len(self._order))
        while self._submitted < limit:
            self._futures[self._submitted] = self._submit_load(self._order[self._submitted])
            self._submitted += 1

    def stays_resident(self, b: str) -> bool:
        """Whether block ``b``'s working tensor is its master, valid for the whole run."""
        return self._zero_copy_device(b)

    def _zero_copy_device(self, b: str) -> bool:
        return self.plan.home[b] == Tier.DEVICE and self.store_dtype == self.compute_dtype

    def _submit_load(self, b: str) -> tuple[_Slot | None, Future | None]:
        if self._zero_copy_device(b):
            return None, None
        with self._lock:
            # A slot that holds b's clean contents (loaded, in use, or free) serves again without IO.
            for s in self._all_slots():
                if s.holds == b and s.written is None and s.state in (SlotState.FREE, SlotState.LOADING,
                                                                        SlotState.READY, SlotState.IN_USE):
                    if s.state == SlotState.FREE:
                        s.state = SlotState.READY
                    s.refs += 1
                    self.stats.cache_hits += 1
                    return s, s.ready
        slot = self._outer_slot if b == self.plan.outer_block else self._take_slot()
        with self._lock:
            slot.state = SlotState.LOADING
            slot.holds = b
            slot.refs = 1
            wait_for = [f for f in (slot.written, self._pending_write.get(b)) if f is not None]
            slot.ready = self._ferry.submit(self._load, b, slot, wait_for)
            return slot, slot.ready

    def _all_slots(self) -> list[_Slot]:
        return self._slots + ([self._outer_slot] if self._outer_slot is not None else [])

    def _take_slot(self) -> _Slot:
        """The least recently used free slot; waits (counted as a stall) while all are busy writing."""
        while True:
            with self._lock:
                free = [s for s in self._slots if s.state == SlotState.FREE and s.refs == 0]
                if free:
                    return min(free, key=lambda s: s.last_use)
                writing = [s.written for s in self._slots if s.written is not None]
            if not writing:
                raise RuntimeError("streamer: no free slot (prefetch_depth exceeds the planned ring)")
            t0 = time.perf_counter()
            writing[0].result()
            self.stats.stall_s += time.perf_counter() - t0
            self.stats.num_stalls += 1

    def _load(self, b: str, slot: _Slot, wait_for: list[Future]) -> None:
        for f in wait_for:
            f.result()
        t0 = time.perf_counter()
        tier = self.plan.home[b]
        n = self.numel[b]
        work = slot.working[:n]
        if tier == Tier.NVME:
            self._store.read(b, slot.staging)
            if not self.plan.zero_copy:  # with zero copy the staging bytes are the working copy
                self._h2d(slot.staging.tensor(self.store_dtype, n), work)
            read = (Tier.NVME.value, n * _esize(self.store_dtype))
        elif tier == Tier.HOST:
            self._h2d(self._masters[b], work)
            read = (Tier.HOST.value, n * _esize(self.store_dtype))
        else:
            work.copy_(self._masters[b])
            read = (Tier.DEVICE.value, n * _esize(self.store_dtype))
        if self._cuda:
            slot.event = torch.cuda.Event()
            slot.event.record(self._copy_stream)
        self.stats.count_read(*read, time.perf_counter() - t0)

    def _h2d(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        if self._cuda:
            with torch.cuda.stream(self._copy_stream):
                dst.copy_(src, non_blocking=True)
        else:
            dst.copy_(src)

    def acquire(self, b: str) -> torch.Tensor:
        """Wait for block ``b`` (the next in the pass order) and return its flat working tensor."""
        if self._pos >= len(self._order) or self._order[self._pos] != b:
            expected = self._order[self._pos] if self._pos < len(self._order) else "<end of pass>"
            raise RuntimeError(f"streamer: acquire({b}) out of order, expected {expected}")
        slot, fut = self._futures.pop(self._pos)
        self._pos += 1
        self._kick()
        if slot is None:
            return self._masters[b]
        if fut is not None:
            if not fut.done():
                t0 = time.perf_counter()
                fut.result()
                self.stats.stall_s += time.perf_counter() - t0
                self.stats.num_stalls += 1
            fut.result()  # re-raises a failed load (a corrupt record, a short read)
        if self._cuda and slot.event is not None:
            torch.cuda.current_stream(self.device).wait_event(slot.event)
        slot.state = SlotState.IN_USE
        self._in_use.setdefault(b, []).append(slot)
        return slot.working[: self.numel[b]]

    def release(self, b: str, *, dirty: bool) -> None:
        """Hand block ``b`` back; a dirty block is written to its home in the background."""
        slots = self._in_use.get(b)
        if not slots:  # zero-copy device master: updated in place
            return
        slot = slots.pop()
        if not slots:
            del self._in_use[b]
        slot.last_use = time.perf_counter()
        with self._lock:
            slot.refs -= 1
            if not dirty:
                if slot.refs == 0:
                    slot.state = SlotState.FREE
                return
            assert slot.refs == 0, "a dirty block must not be shared"
            slot.state = SlotState.WRITING
            slot.holds = None  # its compute-dtype contents differ from the rounded master: never reuse
        ev = None
        if self._cuda:
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream(self.device))
        fut = self._writer.submit(self._write_back, b, slot, ev)
        with self._lock:
            slot.written = fut
            self._pending_write[b] = fut
        fut.add_done_callback(lambda f, slot=slot, b=b: self._write_done(f, slot, b))

    def _write_done(self, fut: Future, slot: _Slot, b: str) -> None:
        with self._lock:
            if slot.written is fut:
                slot.written = None
                slot.state = SlotState.FREE
            if self._pending_write.get(b) is fut:
                del self._pending_write[b]

    def _write_back(self, b: str, slot: _Slot, ev) -> None:
        t0 = time.perf_counter()
        tier = self.plan.home[b]
        n = self.numel[b]
        work = slot.working[:n]
        if self._cuda:
            self._copy_stream.wait_event(ev)
        if tier == Tier.NVME:
            if not self.plan.zero_copy:
                with torch.cuda.stream(self._copy_stream) if self._cuda else _nullctx():
                    slot.staging.tensor(self.store_dtype, n).copy_(work, non_blocking=self._cuda)
                if self._cuda:
                    self._copy_stream.synchronize()
            self._store.write(b, slot.staging, n * _esize(self.store_dtype))
        else:
            with torch.cuda.stream(self._copy_stream) if self._cuda else _nullctx():
                self._masters[b].copy_(work, non_blocking=self._cuda)
            if self._cuda:
                self._copy_stream.synchronize()
        self.stats.count_write(tier.value, n * _esize(self.store_dtype), time.perf_counter() - t0)

    def finish_pass(self) -> None:
        """Wait for every write of the pass (errors surface here)."""
        for f in list(self._pending_write.values()):
            f.result()
        for s in self._slots + ([self._outer_slot] if self._outer_slot else []):
            if s.written is not None:
                s.written.result()
        for slot, fut in list(self._futures.values()):  # prefetched beyond a shortened pass
            if fut is not None:
                fut.result()
            if slot is not None:
                with self._lock:
                    slot.refs -= 1
                    if slot.refs <= 0:
                        slot.refs = 0
                        slot.state = SlotState.FREE
        self._futures.clear()
        if self._in_use:
            raise RuntimeError(f"streamer: blocks still in use at the end of a pass: {sorted(self._in_use)}")

    def abort_pass(self) -> None:
        """End a pass that failed part-way: wait for IO in flight, drop every slot's contents, raise nothing.

        The caller is unwinding an error (a corrupt record, an interrupt); the original
        exception is the one to report, so errors of the IO in flight are only logged.
        """
        futures = [f for f in self._pending_write.values()]
        futures += [f for _, f in self._futures.values() if f is not None]
        futures += [s.written for s in self._all_slots() if s.written is not None]
        for f in futures:
            try:
                f.result()
            except BaseException as e:  # noqa: BLE001 - see docstring
                logger.debug("IO error while aborting a pass: %s", e)
        with self._lock:
            for s in self._all_slots():
                s.state, s.refs, s.holds, s.written, s.ready = SlotState.FREE, 0, None, None, None
            self._pending_write.clear()
        self._futures.clear()
        self._in_use.clear()

    # ---------------------------------------------------------------- helpers
    def _scratch_staging(self, b: str):
        """A staging buffer to use between passes. Its slot forgets what it held: with zero copy
        the staging bytes are the slot's working copy, and a later pass must not reuse them."""
        slot = self._outer_slot if b == self.plan.outer_block else self._slots[0]
        if slot.written is not None:
            slot.written.result()
        slot.holds = None
        return slot.staging

    def _write_record(self, b: str, flat: torch.Tensor) -> None:
        buf = self._scratch_staging(b)
        n = flat.numel()
        buf.tensor(self.store_dtype, n).copy_(flat)
        self._store.write(b, buf, n * _esize(self.store_dtype))
        self.stats.count_write(Tier.NVME.value, n * _esize(self.store_dtype))

    def read_master(self, b: str, out: torch.Tensor) -> None:
        """Copy block ``b``'s master (store dtype) into CPU tensor ``out``; only between passes."""
        tier = self.plan.home[b]
        if tier == Tier.NVME:
            buf = self._scratch_staging(b)
            self._store.read(b, buf)
            out.copy_(buf.tensor(self.store_dtype, self.numel[b]))
        else:
            out.copy_(self._masters[b])

    def host_bytes(self) -> int:
        n = getattr(self, "_host_mem", None)
        total = len(n) if n is not None else 0
        if self._pool is not None:
            total += self._pool.total_bytes + self._outer_pool.total_bytes
        return total

    def close(self) -> None:
        if not self._opened:
            return
        self.finish_pass()
        self._ferry.shutdown(wait=True)
        self._writer.shutdown(wait=True)
        if self._io is not None:
            self._io.close()
        self._opened = False


class _nullctx:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def _remove_store(directory: Path) -> None:
    """Delete a previous run's store files — only those, never the rest of the folder (unlike a rmtree)."""
    manifest = directory / "store.json"
    if not manifest.exists():
        return
    for f in directory.glob("store-*.bin"):
        f.unlink()
    manifest.unlink()


def _esize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _try_pin(t: torch.Tensor) -> None:
    try:
        torch.cuda.cudart().cudaHostRegister(t.data_ptr(), t.numel(), 0)
    except Exception as e:  # pinning is an optimisation: never abort for it
        logger.warning("could not pin %d MiB of host memory (%s); transfers stay pageable", t.numel() >> 20, e)

"""The streamer: ferry blocks to the device in visiting order, overlapped with compute.

It holds only slots, threads and events; where a block's master lives and how its bytes move
there and back is its *home*'s business (``_home*.py``), and every copy goes through one
``Copier`` (``_copy.py``). A *pass* is a visiting order of block ids (a ZO step:
``outer, layer.0 .. layer.N-1``; a LoRA step: forward then the layers again in reverse). The
compute thread calls ``acquire(b)`` / ``release(b, dirty=)`` in that order; the streamer keeps
``prefetch_depth`` blocks in flight ahead of it and writes dirty blocks back behind it.

Each device *slot* moves through a checked state machine (``MOVES``; ``_move`` is the only
place a state changes)::

    FREE -> LOADING -> IN_USE -> FREE                 a load, a clean release
    FREE -> READY -> IN_USE                           its clean contents serve again (no IO)
    IN_USE -> WRITING -> FREE                         a dirty release: written back behind
    WRITING -> LOADING                                reused: the load waits for that write

Which slot serves a block is a pure function of main-thread state (``choose_slot``): the slot
that holds the block's clean contents, else the least recently released unclaimed one. So the
same pass takes the same slots on every rank and run, whatever the IO timing (sliced loading
needs that: its loads are collective).

**Routed-only MoE reads** (``expert_ranges``; a pass started with ``routed=True``): a MoE layer's
block is loaded as its dense part only (attention, norms, router), and ``fetch_experts(b, ids)``
reads the routed experts' ranges into the slot when the router has run: synchronously, with all of
the layer's missing ranges in flight at once. A slot remembers which experts it holds (``Slot.experts``; ``None``: the whole block), so a slot shared at
LoRA's forward/backward turn or served again reads no expert twice; a pass that is not routed never
serves a partly filled slot. Bytes are counted per (block, expert) (``StreamStats.expert_bytes``).
Every wait of the compute thread is timed and counted
(``stall_s``), so a step that is IO bound shows it in the metrics.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ferrytune.errors import FerrytuneError
from ferrytune.offload._copy import Copier
from ferrytune.offload._home import Home, esize, read_into, read_master, read_range_into, read_ranges_into, write_from
from ferrytune.offload._plan import Plan, Tier
from ferrytune.offload._pool import HostBufferPool

logger = logging.getLogger(__name__)


class SlotState(enum.Enum):
    FREE = "free"
    LOADING = "loading"
    READY = "ready"
    IN_USE = "in_use"
    WRITING = "writing"


S = SlotState
MOVES: dict[SlotState, frozenset[SlotState]] = {
    S.FREE: frozenset({S.LOADING, S.READY}),
    S.LOADING: frozenset({S.IN_USE, S.FREE}),  # FREE: prefetched past a shortened pass, or an abort
    S.READY: frozenset({S.IN_USE, S.FREE}),
    S.IN_USE: frozenset({S.IN_USE, S.FREE, S.WRITING}),  # IN_USE again: shared at LoRA's turn
    S.WRITING: frozenset({S.FREE, S.LOADING}),
}
"""Legal slot transitions (the module docstring draws them)."""


class StreamerError(FerrytuneError):
    """A misuse of the streamer (an illegal slot transition, acquire out of order): a bug, not user input."""


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
    expert_bytes: dict[str, int] = field(default_factory=dict)  # "layer.3/5": bytes read for expert 5 of layer.3
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

    def count_expert_read(self, tier: str, block: str, expert: int, nbytes: int, seconds: float) -> None:
        with self._lock:
            self.bytes_read[tier] += nbytes
            self.read_s += seconds
            key = f"{block}/{expert}"
            self.expert_bytes[key] = self.expert_bytes.get(key, 0) + nbytes

    def count_stall(self, seconds: float) -> None:
        with self._lock:
            self.stall_s += seconds
            self.num_stalls += 1

    def snapshot(self) -> dict:
        return {"bytes_read": dict(self.bytes_read), "bytes_written": dict(self.bytes_written),
                "read_s": self.read_s, "write_s": self.write_s, "stall_s": self.stall_s,
                "num_stalls": self.num_stalls, "num_loads": self.num_loads, "cache_hits": self.cache_hits,
                "bytes_by_expert": dict(self.expert_bytes)}


@dataclass
class Slot:
    index: int
    working: torch.Tensor  # flat, compute dtype, on the device
    staging: Any  # the slot's HostBuffer for NVMe records (None without an NVMe home)
    state: SlotState = SlotState.FREE
    holds: str | None = None  # block whose clean contents the slot has (or is loading)
    refs: int = 0  # acquisitions of the current pass that share the slot (LoRA's forward/backward turn)
    released: int = 0  # release counter at its last release (LRU order, the same on every rank)
    ready: Future | None = None  # the load in flight
    written: Future | None = None  # the write-back in flight
    freed_ev: Any = None  # CUDA: the compute stream's event at its last release
    loaded_ev: Any = None  # CUDA: the copy stream's event of its last load
    experts: set[int] | None = None  # routed-only: the experts its working copy holds (None: all of it)


def _move(slot: Slot, new: SlotState) -> None:
    if new not in MOVES[slot.state]:
        raise StreamerError(f"streamer: slot {slot.index} cannot go from {slot.state.name} to {new.name}")
    slot.state = new


@dataclass(frozen=True)
class SlotView:
    index: int
    holds: str | None
    refs: int
    released: int


def choose_slot(slots: Sequence[SlotView], block: str) -> tuple[bool, int]:
    """``(reuse, index)``: the slot holding ``block``'s clean contents (reuse, no IO), else the least
    recently released unclaimed slot (a load; it waits for that slot's write-back, if any).

    ``holds == block`` only after a clean release (a dirty one clears it), so a write still in
    flight on such a slot belongs to an older block, which the load of ``block`` waited for.
    """
    for s in slots:
        if s.holds == block:
            return True, s.index
    free = [s for s in slots if s.refs == 0]
    if not free:
        raise StreamerError("streamer: no free slot (prefetch_depth exceeds the planned ring)")
    return False, min(free, key=lambda s: s.released).index


class BlockStreamer:
    """Ferries blocks between their homes and device slots. Made by ``build_streamer``."""

    def __init__(self, plan: Plan, block_numel: dict[str, int], *, device: torch.device,
                 compute_dtype: torch.dtype, store_dtype: torch.dtype,
                 make_homes: Callable[[Copier], dict[Tier, Home]], num_loaders: int = 2,
                 nvme_dir: str | Path | None = None, in_place_tiers: frozenset[Tier] = frozenset({Tier.DEVICE}),
                 expert_ranges: dict[str, tuple[int, list[list[tuple[int, int]]]]] | None = None) -> None:
        """``make_homes(copier)`` builds the homes at ``open`` (they allocate). ``num_loaders``:
        two let one block's O_DIRECT read overlap the previous block's cast; collective homes need one.
        ``in_place_tiers``: tiers whose masters, in the compute dtype, are the working copies themselves
        (the device; and the host arena when the device is the CPU).
        ``expert_ranges``: per MoE layer block, ``(dense_numel, ranges)`` with ``ranges[e]`` the element
        ranges of expert ``e``; given, passes started with ``routed=True`` read only the routed experts."""
        self.plan = plan
        self.numel = dict(block_numel)
        self.device = torch.device(device)
        self.compute_dtype = compute_dtype
        self.store_dtype = store_dtype
        self.nvme_dir = Path(nvme_dir) if nvme_dir else None
        self.stats = StreamStats()
        self.in_place_tiers = frozenset(in_place_tiers)
        self._make_homes = make_homes
        self._num_loaders = num_loaders
        self.expert_ranges = dict(expert_ranges or {})
        self._routed_pass = False
        self._opened = False

    # ------------------------------------------------------------------ setup
    def open(self, init: Callable[[str, torch.Tensor], None]) -> None:
        """Allocate every buffer once and fill each block's home via ``init(block_id, flat_store_tensor)``.

        ``init`` writes the block's parameters into a flat CPU tensor of the store dtype;
        blocks are initialised one at a time, so host memory never holds more than one block
        beyond the homes themselves.
        """
        self._copier = Copier(self.device)
        self._homes: dict[Tier, Home] = {}
        self._pool = self._outer_pool = None
        self._ferry = self._writer = None
        try:
            self._homes = self._make_homes(self._copier)
            self._build_slots()
            scratch = torch.empty(max(self.numel.values()), dtype=self.store_dtype)
            for b, tier in self.plan.home.items():
                flat = scratch[: self.numel[b]]
                flat.zero_()
                init(b, flat)
                self._homes[tier].fill(b, flat, self._scratch_staging(b))
                if tier == Tier.NVME:
                    self.stats.count_write(tier.value, self.numel[b] * esize(self.store_dtype))
            del scratch
        except BaseException:
            self._release_resources()
            raise
        self._lock = threading.Lock()
        self._futures: dict[int, tuple[Slot | None, Future | None]] = {}
        self._pending_write: dict[str, Future] = {}
        self._failed_writes: list[Future] = []
        self._in_use: dict[str, list[Slot]] = {}
        self._order: list[str] = []
        self._pos = 0
        self._releases = 0
        thread_init = (lambda: torch.cuda.set_device(self.device)) if self._copier.cuda else None
        self._ferry = ThreadPoolExecutor(self._num_loaders, thread_name_prefix="ferrytune-load",
                                         initializer=thread_init)
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="ferrytune-write", initializer=thread_init)
        self._opened = True

    def _build_slots(self) -> None:
        plan = self.plan
        layer_numel = max(n for b, n in self.numel.items() if b != plan.outer_block)
        outer_numel = self.numel[plan.outer_block]
        nvme = Tier.NVME in self._homes
        zero_copy_nvme = plan.zero_copy and nvme
        self._slots: list[Slot] = []
        self._outer_slot: Slot | None = None
        if all(self.stays_resident(b) for b in plan.home):
            return  # every working copy is its master: no slot, no staging
        ring = max(plan.ring_size, plan.staging_buffers, 1)
        es = esize(self.compute_dtype if zero_copy_nvme else self.store_dtype)
        if nvme:
            self._pool = HostBufferPool(ring, layer_numel * es, pin=self._copier.cuda)
            self._outer_pool = HostBufferPool(1, outer_numel * es, pin=self._copier.cuda)
        for i in range(ring):
            self._slots.append(self._make_slot(i, layer_numel, self._pool, zero_copy_nvme))
        self._outer_slot = self._make_slot(-1, outer_numel, self._outer_pool, zero_copy_nvme)

    def _make_slot(self, index: int, numel: int, pool: HostBufferPool | None, zero_copy: bool) -> Slot:
        staging = pool.acquire() if pool is not None else None  # owned for the streamer's life
        if zero_copy and staging is not None:
            working = staging.tensor(self.compute_dtype, numel)
        else:
            working = torch.empty(numel, dtype=self.compute_dtype, device=self.device)
        return Slot(index, working, staging)

    # ------------------------------------------------------------------ passes
    @property
    def routed_experts(self) -> bool:
        """Whether routed passes read MoE layers' experts on demand (``fetch_experts``)."""
        return bool(self.expert_ranges) and self._opened and not self.sliced

    def start_pass(self, order: list[str], *, routed: bool = False) -> None:
        """Declare the visiting order of the next pass and start prefetching. ``routed``: MoE layers
        are loaded as their dense part, and their experts come with ``fetch_experts``."""
        if not self._opened:
            raise StreamerError("streamer: open() it first")
        self._routed_pass = routed and self.routed_experts
        if not self._routed_pass:
            with self._lock:
                for slot in self._all_slots():
                    if slot.experts is not None:  # partly filled: a whole-block pass must load it again
                        slot.holds, slot.experts = None, None
        self._order = list(order)
        self._pos = 0
        self._futures = {}
        self._submitted = 0
        self._kick()

    def _kick(self) -> None:
        limit = min(self._pos + 1 + self.plan.prefetch_depth, len(self._order))
        while self._submitted < limit:
            self._futures[self._submitted] = self._submit_load(self._order[self._submitted])
            self._submitted += 1

    def stays_resident(self, b: str) -> bool:
        """Whether block ``b``'s working tensor is its master, valid for the whole run (nothing moves)."""
        return self.plan.home[b] in self.in_place_tiers and self.store_dtype == self.compute_dtype

    @property
    def sliced(self) -> bool:
        """Whether some home holds only this rank's slice of its blocks (reads are then collective)."""
        return any(h.collective for h in self._homes.values())

    def _submit_load(self, b: str) -> tuple[Slot | None, Future | None]:
        if self.stays_resident(b):
            return None, None
        slots = [self._outer_slot] if b == self.plan.outer_block else self._slots
        with self._lock:
            reuse, i = choose_slot([SlotView(k, s.holds, s.refs, s.released) for k, s in enumerate(slots)], b)
            slot = slots[i]
            if reuse:
                if slot.state == SlotState.FREE:
                    _move(slot, SlotState.READY)
                slot.refs += 1
                self.stats.cache_hits += 1
                return slot, slot.ready
            wait_for = [f for f in (slot.written, self._pending_write.get(b)) if f is not None]
            _move(slot, SlotState.LOADING)
            slot.holds = b
            slot.refs = 1
            partial = self._routed_pass and b in self.expert_ranges and hasattr(self._homes[self.plan.home[b]],
                                                                               "source_range")
            slot.experts = set() if partial else None
            slot.ready = self._ferry.submit(self._load, b, slot, wait_for, slot.freed_ev, partial)
            return slot, slot.ready

    def _load(self, b: str, slot: Slot, wait_for: list[Future], freed_ev, partial: bool = False) -> None:
        for f in wait_for:
            f.result()
        t0 = time.perf_counter()
        tier = self.plan.home[b]
        copier = self._copier
        copier.after(freed_ev)  # the compute that last read this slot comes first
        work = slot.working[: self.numel[b]]
        if partial:  # the dense part only: the experts come with fetch_experts
            nbytes = read_range_into(self._homes[tier], b, work, 0, self.expert_ranges[b][0], slot.staging, copier)
        else:
            nbytes = read_into(self._homes[tier], b, work, slot.staging, copier)
        ev = copier.loaded()
        copier.settle(ev)  # the transfer itself is timed, and the staging buffer is free again
        slot.loaded_ev = ev
        self.stats.count_read(tier.value, nbytes, time.perf_counter() - t0)

    def acquire(self, b: str) -> torch.Tensor:
        """Wait for block ``b`` (the next in the pass order) and return its flat working tensor."""
        if self._pos >= len(self._order) or self._order[self._pos] != b:
            expected = self._order[self._pos] if self._pos < len(self._order) else "<end of pass>"
            raise StreamerError(f"streamer: acquire({b}) out of order, expected {expected}")
        slot, fut = self._futures.pop(self._pos)
        self._pos += 1
        self._kick()
        if slot is None:
            return self._homes[self.plan.home[b]].resident(b)
        if fut is not None:
            if not fut.done():
                t0 = time.perf_counter()
                fut.result()
                self.stats.count_stall(time.perf_counter() - t0)
            fut.result()  # re-raises a failed load (a corrupt record, a short read)
        self._copier.use(slot.loaded_ev)
        with self._lock:
            _move(slot, SlotState.IN_USE)
        self._in_use.setdefault(b, []).append(slot)
        return slot.working[: self.numel[b]]

    def fetch_experts(self, b: str, experts) -> int:
        """Read the experts ``experts`` of block ``b`` (acquired, in a routed pass) that its slot does not
        hold yet; synchronous, on the calling thread. Returns the bytes read (0: nothing was missing)."""
        slots = self._in_use.get(b)
        if not slots or slots[-1].experts is None:
            return 0  # a whole block (or a resident master): every expert is there
        slot = slots[-1]
        tier = self.plan.home[b]
        home, copier = self._homes[tier], self._copier
        missing = sorted({int(e) for e in experts} - slot.experts)
        if not missing:
            return 0
        t0 = time.perf_counter()
        owner = [e for e in missing for _ in self.expert_ranges[b][1][e]]
        ranges = [r for e in missing for r in self.expert_ranges[b][1][e]]
        nbytes = read_ranges_into(home, b, slot.working[: self.numel[b]], ranges, slot.staging, copier)
        ev = copier.loaded()
        copier.settle(ev)
        copier.use(ev)
        seconds = (time.perf_counter() - t0) / len(missing)
        for e in missing:
            slot.experts.add(e)
            self.stats.count_expert_read(tier.value, b, e, sum(n for o, n in zip(owner, nbytes) if o == e), seconds)
        return sum(nbytes)

    def release(self, b: str, *, dirty: bool, ranges: list[tuple[int, int]] | None = None) -> None:
        """Hand block ``b`` back; a dirty block is written to its home in the background (only its element
        ``ranges``, when given and the home can: the rest of the block did not change)."""
        slots = self._in_use.get(b)
        if not slots:  # a resident master: updated in place
            return
        slot = slots.pop()
        if not slots:
            del self._in_use[b]
        freed = self._copier.compute_done()  # clean or dirty: the next copy into the slot waits for it
        with self._lock:
            self._releases += 1
            slot.released = self._releases
            slot.freed_ev = freed
            slot.refs -= 1
            if not dirty:
                if slot.refs == 0:
                    _move(slot, SlotState.FREE)
                return
            if slot.refs != 0:
                raise StreamerError(f"streamer: a dirty block ({b}) must not be shared")
            if slot.experts is not None:
                raise StreamerError(f"streamer: block {b} holds only its routed experts; it cannot be written back")
            _move(slot, SlotState.WRITING)
            slot.holds = None  # its compute-dtype contents differ from the rounded master: never reuse
            fut = self._writer.submit(self._write_back, b, slot, freed, ranges)
            slot.written = fut
            self._pending_write[b] = fut
        fut.add_done_callback(lambda f, slot=slot, b=b: self._write_done(f, slot, b))

    def _write_done(self, fut: Future, slot: Slot, b: str) -> None:
        with self._lock:
            if not fut.cancelled() and fut.exception() is not None:
                self._failed_writes.append(fut)  # a block's master was not written: finish_pass raises it
            if slot.written is fut:
                slot.written = None
                if slot.state == SlotState.WRITING:
                    _move(slot, SlotState.FREE)
            if self._pending_write.get(b) is fut:
                del self._pending_write[b]

    def _write_back(self, b: str, slot: Slot, freed_ev, ranges: list[tuple[int, int]] | None = None) -> None:
        t0 = time.perf_counter()
        tier = self.plan.home[b]
        self._copier.after(freed_ev)
        nbytes = write_from(self._homes[tier], b, slot.working[: self.numel[b]], slot.staging, self._copier,
                            ranges=ranges)
        self.stats.count_write(tier.value, nbytes, time.perf_counter() - t0)

    def finish_pass(self) -> None:
        """Wait for every write of the pass (errors surface here, also of writes already done)."""
        for f in list(self._pending_write.values()):
            f.result()
        with self._lock:
            failed, self._failed_writes = self._failed_writes, []
        for f in failed:
            f.result()
        for s in self._all_slots():
            if s.written is not None:
                s.written.result()
        for slot, fut in list(self._futures.values()):  # prefetched beyond a shortened pass
            if fut is not None:
                fut.result()
            if slot is not None:
                with self._lock:
                    slot.refs = max(slot.refs - 1, 0)
                    if slot.refs == 0 and slot.state != SlotState.FREE:
                        _move(slot, SlotState.FREE)
        self._futures.clear()
        if self._in_use:
            raise StreamerError(f"streamer: blocks still in use at the end of a pass: {sorted(self._in_use)}")

    def abort_pass(self) -> None:
        """End a pass that failed part-way: wait for IO in flight, drop every slot's contents, raise nothing.

        The caller is unwinding an error (a corrupt record, an interrupt); the original
        exception is the one to report, so errors of the IO in flight are only logged.
        """
        futures = list(self._pending_write.values()) + self._failed_writes
        futures += [f for _, f in self._futures.values() if f is not None]
        futures += [s.written for s in self._all_slots() if s.written is not None]
        for f in futures:
            try:
                f.result()
            except BaseException as e:  # noqa: BLE001 - see docstring
                logger.debug("IO error while aborting a pass: %s", e)
        with self._lock:
            for s in self._all_slots():
                if s.state != SlotState.FREE:
                    _move(s, SlotState.FREE)
                s.refs, s.holds, s.written, s.ready, s.experts = 0, None, None, None, None
            self._pending_write.clear()
            self._failed_writes.clear()  # logged above; the error being unwound is the one to report
        self._futures.clear()
        self._in_use.clear()

    # ---------------------------------------------------------------- between passes
    def _all_slots(self) -> list[Slot]:
        return self._slots + ([self._outer_slot] if self._outer_slot is not None else [])

    def _scratch_staging(self, b: str):
        """A staging buffer to use between passes. Its slot forgets what it held: with zero copy
        the staging bytes are the slot's working copy, and a later pass must not reuse them."""
        slot = self._outer_slot if b == self.plan.outer_block else (self._slots[0] if self._slots else None)
        if slot is None:
            return None
        if slot.written is not None:
            slot.written.result()
        slot.holds = None
        return slot.staging

    def read_master(self, b: str, out: torch.Tensor) -> None:
        """Copy block ``b``'s master (store dtype) into CPU tensor ``out``; only between passes.
        Collective where the home is sliced: every rank calls it, in the same order."""
        read_master(self._homes[self.plan.home[b]], b, out, self._scratch_staging(b))

    def serve_master_reads(self, blocks: list[str]) -> None:
        """The other ranks' half of one rank's ``read_master`` calls over ``blocks`` (in that order)."""
        scratch = torch.empty(max(self.numel.values()), dtype=self.store_dtype)
        for b in blocks:
            if self._homes[self.plan.home[b]].collective:
                self.read_master(b, scratch[: self.numel[b]])

    @property
    def nvme_store(self):
        """The NVMe home's block store (None without one): its records, for inspection."""
        home = self._homes.get(Tier.NVME)
        return getattr(getattr(home, "inner", home), "store", None)

    def host_bytes(self) -> int:
        total = sum(h.host_bytes for h in self._homes.values())
        for pool in (self._pool, self._outer_pool):
            if pool is not None:
                total += pool.total_bytes
        return total

    def close(self) -> None:
        """Wait for the writes in flight, then release everything the streamer opened: its threads,
        the homes (store files, IO backend, pinned memory) and the host pools — on every path, also
        when a write failed (that error is raised after the release)."""
        if not self._opened:
            return
        self._opened = False
        try:
            self.finish_pass()
        finally:
            self._release_resources()

    def _release_resources(self) -> None:
        for pool in (self._ferry, self._writer):
            if pool is not None:
                pool.shutdown(wait=True)
        self._ferry = self._writer = None
        with contextlib.ExitStack() as stack:  # every close runs, the first error is raised
            for home in self._homes.values():
                stack.callback(home.close)
            for pool in (self._pool, self._outer_pool):
                if pool is not None:
                    stack.callback(pool.close)

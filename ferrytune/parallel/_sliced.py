"""Sliced block loading: each rank reads 1/N of a block from its tier, the ranks all-gather the rest.

DistZO2 (Sec. "sliced loading") observes that N ranks on one host each pulling
the same whole block over PCIe pay N times the host (or NVMe) bandwidth for one
block's worth of information. Here every rank's home (host memory or NVMe
store) holds only its slice of every offloaded block::

    block (n elements, padded to N*S, S = ceil(n / N)):  | rank 0 | rank 1 | ... | rank N-1 |
    rank r's home:                                          [r*S, (r+1)*S)

A load reads the own slice (S elements instead of n: the per-rank tier traffic
drops to ~1/N) and all-gathers the block over the interconnect (NVLink with
nccl, loopback TCP with gloo); a write-back writes only the own slice. This is
correct because every rank holds bit-identical weights: it applies the same
update (same seed, same projected gradients) to the whole gathered block, so
the slice it writes is the slice any other rank would have written.

Blocks homed on the device stay whole (they never cross PCIe).

The all-gathers run on the streamer's ferry thread, in a process group of
their own (``new_side_group``): collectives of one group must be issued in the
same order on every rank, and the main thread's all-reduces must not interleave
with them. The same order on every rank also needs the same *set* of loads, so
this streamer decides slot reuse from main-thread state only (see
``_submit_load``): the base class also looks at whether a finished write's
callback has run yet, which is timing, and would let one rank skip a load (and
its all-gather) that another rank issues.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import torch
import torch.distributed as dist

from ferrytune.errors import DistributedError
from ferrytune.offload._plan import Tier
from ferrytune.offload._stream import BlockStreamer, SlotState, _esize, _Slot
from ferrytune.parallel._mesh import Mesh, new_side_group

logger = logging.getLogger(__name__)

_SLICED_TIERS = (Tier.HOST, Tier.NVME)


class SlicedBlockStreamer(BlockStreamer):
    """A :class:`BlockStreamer` whose host/NVMe homes hold this rank's slice of each block."""

    def __init__(self, *args, mesh: Mesh, group=None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.mesh = mesh
        self.group = group  # the side group of the ferry thread (None: the default group; tests only)
        n = mesh.world_size
        self.sliced = frozenset(b for b, t in self.plan.home.items() if t in _SLICED_TIERS)
        self.slice_numel = {b: -(-self.numel[b] // n) for b in self.sliced}  # S = ceil(n / N)
        self.bytes_gathered = 0  # received from the other ranks (interconnect traffic)

    # ------------------------------------------------------------------ setup
    # ------------------------------------------------------------------ setup
    # BlockStreamer.open with slice-sized homes (its seams below); ``init`` still builds each
    # whole block (the initial read of the checkpoint is not sliced: it happens once).
    def _home_numel(self, b: str) -> int:
        return self.slice_numel[b] if b in self.sliced else self.numel[b]

    def _alloc_extra(self) -> None:
        # Gather buffers on the compute device (nccl gathers there; on CUDA the own slice is copied
        # up first). One of each suffices: the ferry thread does one load at a time, and
        # read_master runs only between passes.
        max_padded = max([self.slice_numel[b] * self.mesh.world_size for b in self.sliced] + [1])
        self._gather_buf = torch.empty(max_padded, dtype=self.store_dtype, device=self.device)
        self._slice_buf = torch.empty(max_padded // self.mesh.world_size if self._cuda else 0,
                                      dtype=self.store_dtype, device=self.device)

    def _scratch_numel(self) -> int:
        return max(self._gather_buf.numel(), *self.numel.values())

    def _fill_home(self, b, tier, init, scratch) -> None:
        if b not in self.sliced:
            return super()._fill_home(b, tier, init, scratch)
        padded = scratch[: self.slice_numel[b] * self.mesh.world_size]
        padded.zero_()
        init(b, padded[: self.numel[b]])
        self._store_home(b, tier, padded.view(self.mesh.world_size, -1)[self.mesh.rank])

    # ONE loader thread, unlike the base's two: every load all-gathers, and the gathers of a
    # group must be issued in the same order on every rank; two loaders would race.
    num_loaders = 1

    # ------------------------------------------------------- slot decisions
    def _submit_load(self, b: str):
        """The base decision, made from main-thread state only (the same on every rank)."""
        if self._zero_copy_device(b):
            return None, None
        with self._lock:
            for s in self._all_slots():
                # holds == b means the slot's last release was clean (a dirty release clears
                # holds), so a write still in flight on it belongs to an older block and the load
                # already waited for it: whether its callback has run yet must not matter.
                if s.holds == b:
                    if s.refs == 0:
                        s.state = SlotState.READY
                    s.refs += 1
                    self.stats.cache_hits += 1
                    return s, s.ready
        slot = self._outer_slot if b == self.plan.outer_block else self._take_slot()
        with self._lock:
            wait_for = [f for f in (slot.written, self._pending_write.get(b)) if f is not None]
            slot.state = SlotState.LOADING
            slot.holds = b
            slot.refs = 1
            slot.ready = self._ferry.submit(self._load, b, slot, wait_for)
            return slot, slot.ready

    def _take_slot(self) -> _Slot:
        """The least recently released unclaimed slot, whether or not its write-back has finished.

        The load waits for that write (``wait_for``), so a slow disk shows as load
        time instead of changing which slot is chosen.
        """
        with self._lock:
            free = [s for s in self._slots if s.refs == 0]
        if not free:
            raise RuntimeError("streamer: no free slot (prefetch_depth exceeds the planned ring)")
        return min(free, key=lambda s: s.last_use)

    # ------------------------------------------------------------- transfers
    def _load(self, b: str, slot: _Slot, wait_for) -> None:
        if b not in self.sliced:
            return super()._load(b, slot, wait_for)
        for f in wait_for:
            f.result()
        t0 = time.perf_counter()
        tier = self.plan.home[b]
        S, n = self.slice_numel[b], self.numel[b]
        nbytes = S * _esize(self.store_dtype)
        if tier == Tier.NVME:
            self._store.read(b, slot.staging)  # the record is the own slice: S elements
            src = slot.staging.tensor(self.store_dtype, S)
        else:
            src = self._masters[b]
        read = (tier.value, nbytes)
        full = self._gather_buf[: S * self.mesh.world_size]
        work = slot.working[:n]
        with torch.cuda.stream(self._copy_stream) if self._cuda else _nullctx():
            own = src
            if self._cuda:
                own = self._slice_buf[:S]
                own.copy_(src, non_blocking=True)
            self._all_gather(full, own, what=f"load of {b}")
            work.copy_(full[:n], non_blocking=self._cuda)  # cast to the compute dtype
            if self._cuda:
                slot.event = torch.cuda.Event()
                slot.event.record(self._copy_stream)
        self.bytes_gathered += nbytes * (self.mesh.world_size - 1)
        self.stats.count_read(*read, time.perf_counter() - t0)

    def _write_back(self, b: str, slot: _Slot, ev) -> None:
        if b not in self.sliced:
            return super()._write_back(b, slot, ev)
        t0 = time.perf_counter()
        tier = self.plan.home[b]
        S, n, r = self.slice_numel[b], self.numel[b], self.mesh.rank
        lo, hi = min(r * S, n), min((r + 1) * S, n)
        part = slot.working[lo:hi]  # the own slice; the padding past n stays zero in the home
        if self._cuda:
            self._copy_stream.wait_event(ev)
        if tier == Tier.NVME:
            # In zero-copy mode the staging buffer *is* the working buffer: part [lo, hi) and the
            # destination [0, hi - lo) are either the same memory (rank 0) or disjoint (lo >= S).
            dst = slot.staging.tensor(self.store_dtype, S)
            with torch.cuda.stream(self._copy_stream) if self._cuda else _nullctx():
                dst[: hi - lo].copy_(part, non_blocking=self._cuda)
            if self._cuda:
                self._copy_stream.synchronize()
            dst[hi - lo:].zero_()
            self._store.write(b, slot.staging, S * _esize(self.store_dtype))
        else:
            with torch.cuda.stream(self._copy_stream) if self._cuda else _nullctx():
                self._masters[b][: hi - lo].copy_(part, non_blocking=self._cuda)
            if self._cuda:
                self._copy_stream.synchronize()
        self.stats.count_write(tier.value, S * _esize(self.store_dtype), time.perf_counter() - t0)

    def _all_gather(self, full: torch.Tensor, own: torch.Tensor, *, what: str) -> None:
        if full.device.type == "cpu":
            # gloo: move raw bytes, so any store dtype (bf16 included) crosses bit for bit
            full, own = full.view(torch.uint8), own.view(torch.uint8)
        try:
            dist.all_gather_into_tensor(full, own, group=self.group)
        except RuntimeError as e:
            line = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise DistributedError(f"rank {self.mesh.rank}: all-gather for the {what} failed ({line}); "
                                   "another rank probably died — see its log") from e

    # ------------------------------------------------------------ checkpoints
    def read_master(self, b: str, out: torch.Tensor) -> None:
        """Block ``b``'s whole master into CPU ``out``. Collective for sliced blocks: every rank calls it."""
        if b not in self.sliced:
            return super().read_master(b, out)
        S, n = self.slice_numel[b], self.numel[b]
        if self.plan.home[b] == Tier.NVME:
            slot = self._outer_slot if b == self.plan.outer_block else self._slots[0]
            with self._lock:
                slot.holds = None  # with zero copy the staging buffer is the slot's working copy: now stale
            buf = slot.staging
            self._store.read(b, buf)
            src = buf.tensor(self.store_dtype, S)
        else:
            src = self._masters[b]
        own = src
        if self._cuda:
            own = self._slice_buf[:S]
            own.copy_(src)
        full = self._gather_buf[: S * self.mesh.world_size]
        self._all_gather(full, own, what=f"read of {b}")
        out.copy_(full[:n])

    def serve_master_reads(self, blocks: list[str]) -> None:
        """The non-main ranks' half of rank 0's ``read_master`` calls over ``blocks`` (in that order)."""
        scratch = torch.empty(max(self.numel.values()), dtype=self.store_dtype)
        for b in blocks:
            if b in self.sliced:
                self.read_master(b, scratch[: self.numel[b]])


def apply_sliced_loading(rt, mesh: Mesh):
    """``rt`` with its (unopened) streamer replaced by a :class:`SlicedBlockStreamer`.

    Collective (creates the side group): every rank calls it at the same point.
    A single process, or a plan with every block on the device, keeps ``rt``.
    """
    s = rt.streamer
    if not mesh.distributed:
        return rt
    if not any(t in _SLICED_TIERS for t in rt.plan.home.values()):
        logger.info("parallel.sliced_loading: every block is on the device; nothing to slice")
        return rt
    group = new_side_group(mesh)
    sliced = SlicedBlockStreamer(s.plan, s.numel, device=s.device, compute_dtype=s.compute_dtype,
                                 store_dtype=s.store_dtype, nvme_dir=None if s.nvme_dir is None else str(s.nvme_dir),
                                 io_threads=s.io_threads, verify_checksums=s.verify, io_backend=s.io_backend,
                                 mesh=mesh, group=group)
    logger.info("sliced loading: rank %d holds 1/%d of %d blocks", mesh.rank, mesh.world_size, len(sliced.sliced))
    return dataclasses.replace(rt, streamer=sliced)


class _nullctx:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False

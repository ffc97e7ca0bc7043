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

It is a *home* (``ferrytune.offload``'s interface) wrapped around the host or NVMe home
that keeps the slices; blocks homed on the device stay whole (they never cross PCIe).

The all-gathers run on the streamer's loader thread, in a process group of their own
(``new_side_group``): collectives of one group must be issued in the same order on every
rank, and the main thread's all-reduces must not interleave with them. The same order on
every rank also needs the same *set* of loads: the streamer decides slot reuse from
main-thread state only (``ferrytune.offload.choose_slot``), and one loader thread issues
them (``num_loaders = 1``).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist

from ferrytune.errors import DistributedError
from ferrytune.offload import Copier, Home, Plan, Tier
from ferrytune.parallel._mesh import Mesh, new_side_group

logger = logging.getLogger(__name__)

_SLICED_TIERS = (Tier.HOST, Tier.NVME)


class SlicedLoading:
    """The ``slicing`` of ``ferrytune.offload.build_streamer``: homes keep this rank's slice."""

    num_loaders = 1  # every load all-gathers: two loaders would race the group's order

    def __init__(self, mesh: Mesh, group=None) -> None:
        self.mesh = mesh
        self.group = group  # the side group of the loader thread (None: the default group; tests only)

    def home_numel(self, numel: int) -> int:
        return -(-numel // self.mesh.world_size)  # S = ceil(n / N)

    def wrap(self, inner: Home, numel: dict[str, int], copier: Copier) -> "SlicedHome":
        return SlicedHome(inner, numel, self, copier)


class SlicedHome:
    """Whole blocks on top of a home that holds this rank's slice of each; ``source`` is collective."""

    collective = True

    def __init__(self, inner, numel: dict[str, int], slicing: SlicedLoading, copier: Copier) -> None:
        self.inner = inner
        self.tier = inner.tier
        self.host_bytes = inner.host_bytes
        self.numel = dict(numel)
        self.mesh, self.group = slicing.mesh, slicing.group
        self.cuda = copier.cuda
        n = self.mesh.world_size
        self.slice_numel = {b: slicing.home_numel(k) for b, k in numel.items()}
        # Gather buffers on the compute device (nccl gathers there; on CUDA the own slice is copied up
        # first). One of each suffices: one loader, and read_master runs only between passes.
        dtype = inner.store_dtype
        max_padded = max(S * n for S in self.slice_numel.values())
        self._gather = torch.empty(max_padded, dtype=dtype, device=copier.device)
        self._own = torch.empty(max_padded // n if self.cuda else 0, dtype=dtype, device=copier.device)
        self.bytes_gathered = 0  # received from the other ranks (interconnect traffic)

    def fill(self, b: str, values: torch.Tensor, staging: Any) -> None:
        padded = torch.zeros(self.slice_numel[b] * self.mesh.world_size, dtype=values.dtype)
        padded[: self.numel[b]] = values
        self.inner.fill(b, padded.view(self.mesh.world_size, -1)[self.mesh.rank], staging)

    def source(self, b: str, staging: Any) -> torch.Tensor:
        """The whole block (store dtype, on the device): the own slice all-gathered with the others'."""
        S = self.slice_numel[b]
        own = self.inner.source(b, staging)  # S elements (an NVMe record is read into staging)
        if self.cuda:
            self._own[:S].copy_(own, non_blocking=True)
            own = self._own[:S]
        full = self._gather[: S * self.mesh.world_size]
        if full.device.type == "cpu":
            # gloo: move raw bytes, so any store dtype (bf16 included) crosses bit for bit
            full, own = full.view(torch.uint8), own.view(torch.uint8)
        try:
            dist.all_gather_into_tensor(full, own, group=self.group)
        except RuntimeError as e:
            line = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise DistributedError(f"rank {self.mesh.rank}: all-gather of {b} failed ({line}); "
                                   "another rank probably died — see its log") from e
        self.bytes_gathered += self.nbytes(b) * (self.mesh.world_size - 1)
        return self._gather[: self.numel[b]]

    def span(self, b: str) -> tuple[int, int]:
        """This rank's part of the block: the write-back writes only it."""
        S, n, r = self.slice_numel[b], self.numel[b], self.mesh.rank
        return min(r * S, n), min((r + 1) * S, n)

    def target(self, b: str, staging: Any) -> torch.Tensor:
        return self.inner.target(b, staging)  # S elements

    partial_target = False  # the slice is written whole (its record's checksum covers it)

    def commit(self, b: str, staging: Any, ranges: list[tuple[int, int]] | None = None) -> int:
        """Writes this rank's slice whole (``ranges`` are the block's, not the slice's)."""
        return self.inner.commit(b, staging)

    def nbytes(self, b: str) -> int:
        return self.inner.nbytes(b)

    def close(self) -> None:
        self.inner.close()


def sliced_loading(mesh: Mesh, plan: Plan) -> SlicedLoading | None:
    """The slicing for ``plan`` on ``mesh``, or None where there is nothing to slice (one process,
    or every block on the device). Collective (creates the side group): every rank calls it."""
    if not mesh.distributed:
        return None
    if not any(t in _SLICED_TIERS for t in plan.home.values()):
        logger.info("parallel.sliced_loading: every block is on the device; nothing to slice")
        return None
    group = new_side_group(mesh)
    blocks = sum(1 for t in plan.home.values() if t in _SLICED_TIERS)
    logger.info("sliced loading: rank %d holds 1/%d of %d blocks", mesh.rank, mesh.world_size, blocks)
    return SlicedLoading(mesh, group)

"""Masters in host memory: one page-aligned allocation, carved into blocks, allocated once.

On CUDA the allocation is page-locked in place (``cudaHostRegister``) so copies to the device are
asynchronous DMA; a failed pin is reported (the run continues pageable), and ``close`` unregisters it.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from ferrytune.offload._home import esize
from ferrytune.offload._io import aligned_buffer, as_uint8_tensor
from ferrytune.offload._plan import Tier

logger = logging.getLogger(__name__)

_PAGE = 4096


class HostArenaHome:
    tier = Tier.HOST
    collective = False

    def __init__(self, numel: dict[str, int], store_dtype: torch.dtype, *, pin: bool) -> None:
        """``numel``: elements of each block's home (the whole block, or this rank's slice)."""
        self.store_dtype = store_dtype
        self.numel = dict(numel)
        self._es = es = esize(store_dtype)
        offsets, total = {}, 0
        for b, n in numel.items():
            offsets[b] = total
            total += -(-n * es // _PAGE) * _PAGE
        self._mem = aligned_buffer(max(total, _PAGE))
        raw = as_uint8_tensor(self._mem)
        self.host_bytes = len(self._mem)
        self._pinned_ptr = _pin(raw) if pin else None
        self._masters = {b: raw[offsets[b]:offsets[b] + n * es].view(store_dtype) for b, n in numel.items()}

    def fill(self, b: str, values: torch.Tensor, staging: Any = None) -> None:
        self._masters[b].copy_(values)

    def source(self, b: str, staging: Any = None) -> torch.Tensor:
        return self._masters[b]

    def source_range(self, b: str, lo: int, hi: int, staging: Any = None) -> tuple[torch.Tensor, int]:
        """Elements ``[lo, hi)`` of the master and the bytes they take."""
        return self._masters[b][lo:hi], (hi - lo) * self._es

    def resident(self, b: str) -> torch.Tensor:
        """The master as the working copy (the streamer asks only when the device is the CPU and the
        store dtype is the compute dtype: then a copy into a slot would be a plain memcpy)."""
        return self._masters[b]

    target = source

    def span(self, b: str) -> tuple[int, int]:
        return 0, self.numel[b]

    partial_target = True  # the target is the master itself: writing a range writes just it

    def commit(self, b: str, staging: Any = None, ranges: list[tuple[int, int]] | None = None) -> int:
        """Nothing to make durable; the bytes the write-back changed."""
        return self.nbytes(b) if ranges is None else sum(hi - lo for lo, hi in ranges) * self._es

    def nbytes(self, b: str) -> int:
        return self.numel[b] * self._es

    def close(self) -> None:
        """Unpin and drop the arena (idempotent): its memory goes back when the last view of it goes,
        not when the garbage collector next breaks the trainer's reference cycles."""
        if self._pinned_ptr is not None:
            torch.cuda.cudart().cudaHostUnregister(self._pinned_ptr)
            self._pinned_ptr = None
        self._masters.clear()
        self._mem = None
        self.host_bytes = 0


def _pin(t: torch.Tensor) -> int | None:
    """Page-lock ``t`` in place; its address, or None (with a warning) when CUDA refuses."""
    try:
        err = int(torch.cuda.cudart().cudaHostRegister(t.data_ptr(), t.numel(), 0))
    except Exception as e:  # pinning is an optimisation: never abort for it
        err = e
    if err != 0:
        logger.warning("could not pin %d MiB of host memory (%s); transfers stay pageable. Raise the "
                       "locked-memory limit (ulimit -l) or lower offload.host_budget_gib", t.numel() >> 20, err)
        return None
    return t.data_ptr()

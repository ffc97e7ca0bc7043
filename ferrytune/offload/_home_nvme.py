"""Masters on NVMe: one O_DIRECT record per block in a checksummed block store.

The store is scratch, rebuilt from the checkpoint at every open (a previous run's store in the
folder is removed first). Reads and writes go through the slot's page-aligned staging buffer;
with zero copy (CPU device, store dtype == compute dtype) that buffer *is* the working copy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ferrytune.errors import FerrytuneError
from ferrytune.offload._home import esize
from ferrytune.offload._backends import make_io_backend
from ferrytune.offload._io import PAGE_BYTES
from ferrytune.offload._plan import Tier
from ferrytune.offload._store import NvmeBlockStore


class NvmeHome:
    tier = Tier.NVME
    collective = False
    host_bytes = 0  # the staging buffers belong to the streamer's slots

    def __init__(self, directory: str | Path | None, numel: dict[str, int], store_dtype: torch.dtype, *,
                 io_threads: int = 8, verify: bool = True, io_backend: str = "threads") -> None:
        if directory is None:
            raise FerrytuneError("offload.nvme_dir must be set when offload.tier is nvme")
        self.numel = dict(numel)
        self.store_dtype = store_dtype
        self._es = esize(store_dtype)
        self._io = make_io_backend(io_backend, num_threads=io_threads)
        try:
            NvmeBlockStore.remove(directory)  # scratch: rebuilt from the checkpoint each run
            self.store = NvmeBlockStore.create(directory, {b: n * self._es for b, n in numel.items()},
                                               backend=self._io, verify=verify)
        except BaseException:
            self._io.close()
            raise

    def fill(self, b: str, values: torch.Tensor, staging: Any) -> None:
        self.target(b, staging).copy_(values)
        self.commit(b, staging)

    def source(self, b: str, staging: Any) -> torch.Tensor:
        self.store.read(b, staging)  # verifies the record's checksum
        return self.target(b, staging)

    def source_range(self, b: str, lo: int, hi: int, staging: Any) -> tuple[torch.Tensor, int]:
        """Elements ``[lo, hi)`` of the master (store dtype) and the bytes read for them: the page-aligned
        byte range that covers them, read into the same bytes of ``staging`` (not verified: a part)."""
        return self.source_ranges(b, [(lo, hi)], staging)[0]

    def source_ranges(self, b: str, ranges: list[tuple[int, int]], staging: Any) -> list[tuple[torch.Tensor, int]]:
        """``source_range`` of several ranges, their reads in flight at once."""
        padded = self.store.record(b).padded_bytes
        futs = []
        for lo, hi in ranges:
            lo_b = lo * self._es // PAGE_BYTES * PAGE_BYTES
            hi_b = min(-(-hi * self._es // PAGE_BYTES) * PAGE_BYTES, padded)
            futs.append(self.store.submit_read_range(b, staging, lo_b, hi_b))
        nbytes = [f.result() for f in futs]
        whole = self.target(b, staging)
        return [(whole[lo:hi], n) for (lo, hi), n in zip(ranges, nbytes)]

    def span(self, b: str) -> tuple[int, int]:
        return 0, self.numel[b]

    def target(self, b: str, staging: Any) -> torch.Tensor:
        return staging.tensor(self.store_dtype, self.numel[b])

    partial_target = False  # the record's checksum covers the whole block: staging gets all of it

    def commit(self, b: str, staging: Any, ranges: list[tuple[int, int]] | None = None) -> int:
        """Write the record; with ``ranges`` only those elements of it (``staging`` holds the whole
        block: the checksum covers it all), each widened to whole pages. Returns the bytes written."""
        if ranges is None:
            self.store.write(b, staging, self.nbytes(b))
            return self.nbytes(b)
        padded = self.store.record(b).padded_bytes
        pages = [(lo * self._es // PAGE_BYTES * PAGE_BYTES, min(-(-hi * self._es // PAGE_BYTES) * PAGE_BYTES, padded))
                 for lo, hi in ranges if hi > lo]
        return self.store.write_ranges(b, staging, pages) if pages else 0

    def nbytes(self, b: str) -> int:
        return self.numel[b] * self._es

    def close(self) -> None:
        if self._io is None:
            return
        try:
            self.store.close()
        finally:
            self._io.close()
            self._io = None

"""A *home* is where the master copies of some blocks live; the streamer ferries working copies.

Every home has the same small interface, so the streamer never knows which tier it talks to, and
a home can wrap another (sliced loading wraps the host and NVMe homes: ``parallel/_sliced.py``):

* ``fill(b, values, staging)`` — at open: the whole block ``b`` (CPU, store dtype) becomes its master;
* ``source(b, staging)`` — the master as a store-dtype tensor (an NVMe record is read into the
  slot's ``staging`` buffer; a sliced home all-gathers the slices);
* ``span(b)`` — the ``(lo, hi)`` elements of the block this home keeps (the whole block, or this
  rank's slice); ``target(b, staging)`` — where those elements' new bytes go, then
  ``commit(b, staging, ranges=None)`` makes them durable (NVMe: writes the record) and returns the
  bytes written. With ``ranges`` only those element ranges changed (MoE ZO: the dense part and the
  experts that changed): a home that can write less writes only them (a sliced home writes its
  slice whole). ``partial_target``: the target is the master itself, so only the ranges need copying
  into it; otherwise the whole block is cast into the target (an NVMe record's checksum covers all of it);
* ``source_range(b, lo, hi, staging)`` (optional: NVMe and host homes) — elements ``[lo, hi)`` of the
  master and the tier's bytes for them (MoE routed-only reads: one expert's ranges, or the dense part);
* ``nbytes(b)`` — bytes the tier moves per read or write of ``b``; ``collective`` — whether ``source``
  is a collective call; ``host_bytes`` — host memory held; ``close()`` — release it all (idempotent).

The streamer does the transfers with these (``read_into``, ``write_from``, ``read_master`` below),
so the arithmetic of a copy (cast, rounding to the store dtype) is the same for every tier.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from ferrytune.offload._copy import Copier
from ferrytune.offload._plan import Tier


class Home(Protocol):
    tier: Tier
    collective: bool
    host_bytes: int
    partial_target: bool

    def fill(self, b: str, values: torch.Tensor, staging: Any) -> None: ...

    def source(self, b: str, staging: Any) -> torch.Tensor: ...

    def span(self, b: str) -> tuple[int, int]: ...

    def target(self, b: str, staging: Any) -> torch.Tensor: ...

    def commit(self, b: str, staging: Any, ranges: list[tuple[int, int]] | None = None) -> int: ...

    def nbytes(self, b: str) -> int: ...

    def close(self) -> None: ...


def read_into(home: Home, b: str, work: torch.Tensor, staging: Any, copier: Copier) -> int:
    """The working copy (device, compute dtype) from the master; returns the tier's bytes."""
    with copier.loading():  # a gather runs on the copy stream too
        copier.copy_in(work, home.source(b, staging))
    return home.nbytes(b)


def read_range_into(home: Home, b: str, work: torch.Tensor, lo: int, hi: int, staging: Any, copier: Copier) -> int:
    """Elements ``[lo, hi)`` of the working copy from the master (``work`` is the whole block); returns bytes."""
    src, nbytes = home.source_range(b, lo, hi, staging)
    with copier.loading():
        copier.copy_in(work[lo:hi], src)
    return nbytes


def read_ranges_into(home: Home, b: str, work: torch.Tensor, ranges: list[tuple[int, int]], staging: Any,
                     copier: Copier) -> list[int]:
    """``read_range_into`` of several ranges (an NVMe home reads them at once); bytes per range."""
    many = getattr(home, "source_ranges", None)
    srcs = many(b, ranges, staging) if many else [home.source_range(b, lo, hi, staging) for lo, hi in ranges]
    with copier.loading():
        for (lo, hi), (src, _) in zip(ranges, srcs):
            copier.copy_in(work[lo:hi], src)
    return [n for _, n in srcs]


def write_from(home: Home, b: str, work: torch.Tensor, staging: Any, copier: Copier,
               ranges: list[tuple[int, int]] | None = None) -> int:
    """The master from the working copy (rounded to the store dtype in the copy); returns the tier's bytes.
    ``ranges``: only these element ranges changed (the home's ``commit`` may write only them).

    With zero copy an NVMe staging buffer *is* the working buffer: the kept part ``[lo, hi)`` and
    the destination ``[0, hi - lo)`` are then the same memory (lo = 0) or disjoint (a slice, lo >= hi - lo).
    """
    lo, hi = home.span(b)
    dst = home.target(b, staging)
    if ranges is not None and home.partial_target:
        for rlo, rhi in ranges:
            copier.copy_out(dst[rlo:rhi], work[rlo:rhi])
    else:
        copier.copy_out(dst[: hi - lo], work[lo:hi])
        dst[hi - lo:].zero_()  # a slice's padding past the block's end stays zero
    return home.commit(b, staging, ranges)


def read_master(home: Home, b: str, out: torch.Tensor, staging: Any) -> None:
    """Between passes: the master into CPU ``out`` (store dtype). Collective for a sliced home."""
    out.copy_(home.source(b, staging))


def esize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()

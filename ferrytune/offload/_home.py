"""A *home* is where the master copies of some blocks live; the streamer ferries working copies.

Every home has the same small interface, so the streamer never knows which tier it talks to,
and a home can be wrapped by another (sliced loading wraps the host and NVMe homes, see
``ferrytune/parallel/_sliced.py``):

* ``fill(b, values, staging)`` — at open: the whole block ``b`` (CPU, store dtype) becomes its master;
* ``read_into(b, work, staging, copier) -> bytes`` — fill the slot's working copy (device, compute
  dtype) from the master; returns the bytes this tier delivered;
* ``write_from(b, work, staging, copier) -> bytes`` — the working copy becomes the new master;
* ``read_master(b, out, staging)`` — between passes: the master into CPU ``out`` (store dtype);
* ``close()`` — release what the home holds (files, pinned memory); idempotent.

``staging`` is the slot's page-aligned host buffer (NVMe records are read into it) or None.
The three tiers' homes are ``DeviceHome``, ``HostArenaHome`` and ``NvmeHome``; each exposes
``source(b, staging)`` (its master as a tensor), ``target(b, staging)`` (where new master bytes
go) and ``commit(b, staging)`` (make them durable), from which the functions below build the
transfers.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from ferrytune.offload._copy import Copier
from ferrytune.offload._plan import Tier


class Home(Protocol):
    tier: Tier
    collective: bool  # read_into / read_master are collective (every rank calls them in the same order)
    host_bytes: int  # host memory the home holds (for the memory report)

    def fill(self, b: str, values: torch.Tensor, staging: Any) -> None: ...

    def read_into(self, b: str, work: torch.Tensor, staging: Any, copier: Copier) -> int: ...

    def write_from(self, b: str, work: torch.Tensor, staging: Any, copier: Copier) -> int: ...

    def read_master(self, b: str, out: torch.Tensor, staging: Any) -> None: ...

    def close(self) -> None: ...


def read_whole(home, b: str, work: torch.Tensor, staging: Any, copier: Copier) -> int:
    """``read_into`` for a home that holds whole blocks."""
    src = home.source(b, staging)
    copier.copy_in(work, src)
    return src.numel() * src.element_size()


def write_whole(home, b: str, work: torch.Tensor, staging: Any, copier: Copier) -> int:
    """``write_from`` for a home that holds whole blocks (rounds to the store dtype in the copy)."""
    dst = home.target(b, staging)
    copier.copy_out(dst, work)
    home.commit(b, staging)
    return dst.numel() * dst.element_size()


def read_master_whole(home, b: str, out: torch.Tensor, staging: Any) -> None:
    out.copy_(home.source(b, staging))


def esize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()

"""Masters on the compute device, in the store dtype. With store dtype == compute dtype the master
is the working copy itself (``resident``): nothing moves, updates are in place."""

from __future__ import annotations

from typing import Any

import torch

from ferrytune.offload._home import esize
from ferrytune.offload._plan import Tier


class DeviceHome:
    tier = Tier.DEVICE
    collective = False
    host_bytes = 0

    def __init__(self, device: torch.device, store_dtype: torch.dtype, compute_dtype: torch.dtype) -> None:
        self.device = torch.device(device)
        self.in_place = store_dtype == compute_dtype
        self._es = esize(store_dtype)
        self._masters: dict[str, torch.Tensor] = {}

    def fill(self, b: str, values: torch.Tensor, staging: Any = None) -> None:
        self._masters[b] = values.to(self.device, copy=True)

    def resident(self, b: str) -> torch.Tensor | None:
        """The master, if it is also the working copy (store dtype == compute dtype)."""
        return self._masters[b] if self.in_place else None

    def source(self, b: str, staging: Any = None) -> torch.Tensor:
        return self._masters[b]

    target = source

    def span(self, b: str) -> tuple[int, int]:
        return 0, self._masters[b].numel()

    partial_target = True  # the target is the master itself

    def commit(self, b: str, staging: Any = None, ranges: list[tuple[int, int]] | None = None) -> int:
        """Nothing to make durable; the bytes the write-back changed."""
        return self.nbytes(b) if ranges is None else sum(hi - lo for lo, hi in ranges) * self._es

    def nbytes(self, b: str) -> int:
        return self._masters[b].numel() * self._es

    def close(self) -> None:
        self._masters.clear()

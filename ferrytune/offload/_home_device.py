"""Masters on the compute device, in the store dtype. With store dtype == compute dtype the master
is the working copy itself (``resident``): nothing moves, updates are in place."""

from __future__ import annotations

from typing import Any

import torch

from ferrytune.offload._copy import Copier
from ferrytune.offload._home import read_master_whole, read_whole, write_whole
from ferrytune.offload._plan import Tier


class DeviceHome:
    tier = Tier.DEVICE
    collective = False
    host_bytes = 0

    def __init__(self, device: torch.device, store_dtype: torch.dtype, compute_dtype: torch.dtype) -> None:
        self.device = torch.device(device)
        self.store_dtype = store_dtype
        self.in_place = store_dtype == compute_dtype
        self._masters: dict[str, torch.Tensor] = {}

    def fill(self, b: str, values: torch.Tensor, staging: Any = None) -> None:
        self._masters[b] = values.to(self.device, copy=True)

    def resident(self, b: str) -> torch.Tensor | None:
        """The master, if it is also the working copy (store dtype == compute dtype)."""
        return self._masters[b] if self.in_place else None

    def source(self, b: str, staging: Any = None) -> torch.Tensor:
        return self._masters[b]

    target = source

    def commit(self, b: str, staging: Any = None) -> None:
        pass

    def read_into(self, b: str, work: torch.Tensor, staging: Any, copier: Copier) -> int:
        return read_whole(self, b, work, staging, copier)  # a cast, on the copy stream

    def write_from(self, b: str, work: torch.Tensor, staging: Any, copier: Copier) -> int:
        return write_whole(self, b, work, staging, copier)

    def read_master(self, b: str, out: torch.Tensor, staging: Any = None) -> None:
        read_master_whole(self, b, out, staging)

    def close(self) -> None:
        self._masters.clear()

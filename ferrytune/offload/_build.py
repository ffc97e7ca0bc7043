"""``build_streamer``: the one place a streamer is made — its homes chosen from the plan."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch

from ferrytune.offload._copy import Copier
from ferrytune.offload._ferry import BlockStreamer
from ferrytune.offload._home import Home
from ferrytune.offload._home_device import DeviceHome
from ferrytune.offload._home_host import HostArenaHome
from ferrytune.offload._home_nvme import NvmeHome
from ferrytune.offload._plan import Plan, Tier


class Slicing(Protocol):
    """How a home holds only a part of each block (sliced loading, ``ferrytune.parallel``)."""

    num_loaders: int  # loads that may run at once (collective loads: one)

    def home_numel(self, numel: int) -> int:
        """Elements this process's home keeps of a block of ``numel`` elements."""

    def wrap(self, inner: Home, numel: dict[str, int], copier: Copier) -> Home:
        """A home of whole blocks (``numel``) on top of ``inner``, which holds the parts."""


def build_streamer(plan: Plan, block_numel: dict[str, int], *, device: torch.device | str,
                   compute_dtype: torch.dtype, store_dtype: torch.dtype, nvme_dir: str | Path | None = None,
                   io_threads: int = 8, verify_checksums: bool = True, io_backend: str = "threads",
                   slicing: Slicing | None = None,
                   expert_ranges: dict[str, tuple[int, list[list[tuple[int, int]]]]] | None = None) -> BlockStreamer:
    """An unopened streamer for ``plan``: device masters on the device, host masters in one arena,
    NVMe masters in a block store in ``nvme_dir``; ``slicing`` wraps the host and NVMe homes.
    ``expert_ranges``: MoE layers' dense part and experts' ranges, for routed-only reads (not when sliced)."""
    device = torch.device(device)
    # On a CPU device the host arena is compute memory: its masters serve in place, as device masters do
    # (not when sliced: a slice must be gathered into a whole block first).
    in_place = frozenset({Tier.DEVICE} | ({Tier.HOST} if device.type == "cpu" and slicing is None else set()))

    def make_homes(copier: Copier) -> dict[Tier, Home]:
        blocks = {t: [b for b, h in plan.home.items() if h == t] for t in Tier}
        homes: dict[Tier, Home] = {}
        try:
            if blocks[Tier.DEVICE]:
                homes[Tier.DEVICE] = DeviceHome(device, store_dtype, compute_dtype)
            for tier in (Tier.HOST, Tier.NVME):
                if not blocks[tier]:
                    continue
                whole = {b: block_numel[b] for b in blocks[tier]}
                part = {b: slicing.home_numel(n) for b, n in whole.items()} if slicing else whole
                if tier == Tier.HOST:
                    inner = HostArenaHome(part, store_dtype, pin=copier.cuda)
                else:
                    inner = NvmeHome(nvme_dir, part, store_dtype, io_threads=io_threads, verify=verify_checksums,
                                     io_backend=io_backend)
                homes[tier] = inner
                if slicing:
                    homes[tier] = slicing.wrap(inner, whole, copier)
        except BaseException:
            for home in homes.values():
                home.close()
            raise
        return homes

    return BlockStreamer(plan, block_numel, device=device, compute_dtype=compute_dtype, store_dtype=store_dtype,
                         make_homes=make_homes, num_loaders=slicing.num_loaders if slicing else 2,
                         nvme_dir=nvme_dir, in_place_tiers=in_place,
                         expert_ranges=None if slicing else expert_ranges)

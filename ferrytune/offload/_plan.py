"""The planner: from block sizes and budgets, decide where each block lives.

A pure function (no IO, no allocation), so it is unit-testable and
``ferrytune plan`` can print it without touching the model. The working set is
what must be in memory at once whatever the model size:

* device: the ``outer`` block (embeddings, final norm, head: used at both ends of
  a step, so held for the whole step) plus a ring of ``prefetch_depth + 2`` layer
  buffers (the one computing, the ones prefetched, the one being written back);
* host: with the NVMe tier, staging buffers of the same count for the bytes in
  flight between disk and device.

Blocks are placed on the device while its budget has room beyond the working
set (only when a device budget is given; without one, ``host``/``nvme`` stream
every layer), and the rest go to ``offload.tier``.

For a backward (first-order LoRA) the planner also decides, per layer, whether the
activations autograd saves are **kept** until backward or **recomputed** there: layers keep
theirs, earliest first, while the estimate (``activation_bytes_per_layer``, one micro-batch)
fits the activation budget — ``offload.activation_budget_gib``, by default what the device
budget leaves after the blocks and the ring (no limit without a device budget); the rest
recompute.

With several micro-batches per step the planner also picks the step's **accumulation order**
(``accumulation``): ``micro_major`` runs each micro-batch's forward and backward in turn (the
base is read once per micro-batch); ``layer_major`` runs every micro-batch through a layer while
its block is on the device (read once per step). Layer-major holds the hidden states between
layers of all ``num_micro`` micro-batches (``boundary_bytes_per_layer`` each, per layer) and the
kept activations of all of them: it is chosen when the budget holds the hidden states, and then
layers keep theirs, earliest first, while ``num_micro`` micro-batches' worth fits what is left
(the rest recompute inside the layer); otherwise the step stays micro-major and ``accumulation_why`` says why.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from ferrytune.errors import PlanError

GIB = 1024**3
_PAGE = 4096


class Tier(str, enum.Enum):
    DEVICE = "device"
    HOST = "host"
    NVME = "nvme"


@dataclass(frozen=True)
class BlockSize:
    store_bytes: int  # the master copy (store dtype)
    compute_bytes: int  # the working copy on the device (compute dtype)


@dataclass
class Plan:
    tier: str  # offload.tier as configured
    home: dict[str, Tier]
    prefetch_depth: int
    ring_size: int  # layer working buffers on the device
    ring_buffer_bytes: int
    outer_block: str
    zero_copy: bool  # CPU device and store dtype == compute dtype: work in the staging/master bytes
    device_bytes: int
    host_bytes: int
    staging_buffers: int
    staging_buffer_bytes: int
    notes: list[str] = field(default_factory=list)
    # Backward: layers whose activations are kept (the rest recompute); None = every layer.
    keep: list[str] | None = None
    activation_bytes_per_layer: int | None = None  # the estimate for one micro-batch; None = not estimated
    activation_budget_bytes: int | None = None  # None = no limit
    accumulation: str = "micro_major"  # the order a step runs: micro_major or layer_major
    accumulation_why: str = ""  # why, when it differs from the one asked for (or how it fits)

    def count(self, tier: Tier) -> int:
        return sum(1 for t in self.home.values() if t == tier)

    def describe(self) -> str:
        lines = [
            f"offload.tier={self.tier}  blocks: device={self.count(Tier.DEVICE)} "
            f"host={self.count(Tier.HOST)} nvme={self.count(Tier.NVME)}",
            f"prefetch_depth={self.prefetch_depth}  device ring={self.ring_size} x "
            f"{self.ring_buffer_bytes / 2**20:.1f} MiB  zero_copy={self.zero_copy}",
            f"host staging={self.staging_buffers} x {self.staging_buffer_bytes / 2**20:.1f} MiB",
            f"estimated device memory {self.device_bytes / GIB:.3f} GiB, host memory {self.host_bytes / GIB:.3f} GiB "
            "(parameters and buffers; activations not included)",
        ]
        if self.keep is not None or self.activation_bytes_per_layer is not None:
            lines.append(self._describe_activations())
        return "\n".join(lines + [f"note: {n}" for n in self.notes])

    def _describe_activations(self) -> str:
        layers = [b for b in self.home if b != self.outer_block]
        keep = layers if self.keep is None else self.keep
        recompute = [b for b in layers if b not in keep]
        budget = "no limit" if self.activation_budget_bytes is None else f"{self.activation_budget_bytes / GIB:.3f} GiB"
        if self.activation_bytes_per_layer is None:
            est = "not estimated"
        else:
            est = (f"estimate {self.activation_bytes_per_layer / 2**20:.1f} MiB per layer per micro-batch, "
                   f"{len(keep) * self.activation_bytes_per_layer / GIB:.3f} GiB kept")
        which = f" (recompute: {', '.join(recompute)})" if recompute and len(recompute) < len(layers) else ""
        return (f"backward: keep activations of {len(keep)} layers, recompute {len(recompute)}{which}; "
                f"activations {est}; activation budget {budget}\n"
                f"accumulation: {self.accumulation}" + (f" ({self.accumulation_why})" if self.accumulation_why else ""))


def _page(n: int) -> int:
    return -(-n // _PAGE) * _PAGE


def make_plan(blocks: dict[str, BlockSize], *, outer_block: str, tier: str, prefetch_depth: int,
              device_budget_bytes: int | None, host_budget_bytes: int | None, zero_copy: bool,
              activation_bytes_per_layer: int | None = None, activation_budget_bytes: int | None = None,
              accumulation: str = "micro_major", num_micro: int = 1,
              boundary_bytes_per_layer: int | None = None) -> Plan:
    """Place blocks and choose, per layer, kept or recomputed activations; raise PlanError naming
    the budget that cannot hold the working set.

    ``activation_bytes_per_layer``: the activations one layer keeps for one micro-batch (None:
    not estimated, e.g. no backward; then every layer keeps when the budget has no limit, else
    layers the ring streams recompute). ``activation_budget_bytes``: None = what the device
    budget leaves (no limit without one)."""
    plan = _place(blocks, outer_block=outer_block, tier=tier, prefetch_depth=prefetch_depth,
                  device_budget_bytes=device_budget_bytes, host_budget_bytes=host_budget_bytes, zero_copy=zero_copy)
    budget = activation_budget_bytes
    if budget is None and device_budget_bytes is not None:
        budget = max(device_budget_bytes - plan.device_bytes, 0)
    layers = [b for b in blocks if b != outer_block]
    order, why = _accumulation(accumulation, num_micro, len(layers), budget, boundary_bytes_per_layer)
    if order == "layer_major" and budget is not None and activation_bytes_per_layer is not None:
        keep, room = [], budget - num_micro * len(layers) * (boundary_bytes_per_layer or 0)
        for b in layers:  # earliest first; a kept layer holds its activations for every micro-batch
            if num_micro * activation_bytes_per_layer <= room:
                keep.append(b)
                room -= num_micro * activation_bytes_per_layer
    elif budget is None:
        keep = list(layers)
    elif activation_bytes_per_layer is None:
        keep = [b for b in layers if plan.home[b] == Tier.DEVICE]
    else:
        keep, room = [], budget
        for b in layers:  # earliest first, as for device placement
            if activation_bytes_per_layer <= room:
                keep.append(b)
                room -= activation_bytes_per_layer
    plan.keep = keep
    plan.activation_bytes_per_layer = activation_bytes_per_layer
    plan.activation_budget_bytes = budget
    plan.accumulation, plan.accumulation_why = order, why
    return plan


def _accumulation(asked: str, num_micro: int, num_layers: int, budget: int | None,
                  boundary: int | None) -> tuple[str, str]:
    """(order, why) of a step: ``layer_major`` where it was asked for (or ``auto``), runs more than
    one micro-batch and the budget holds the hidden states between layers of all of them."""
    if asked not in ("micro_major", "layer_major", "auto"):
        raise PlanError(f"train.accumulation must be micro_major, layer_major or auto (got {asked!r})")
    if asked == "micro_major":
        return "micro_major", ""
    if num_micro <= 1:
        return "micro_major", f"train.accumulation={asked}: one micro-batch per step, both orders are the same"
    if budget is None:
        return "layer_major", f"{num_micro} micro-batches per layer visit: the base is read once per step"
    if boundary is None:
        return "micro_major", (f"train.accumulation={asked}: the hidden states between layers are not estimated "
                               "and the activation budget has a limit")
    need = num_micro * num_layers * boundary
    if need > budget:
        return "micro_major", (f"train.accumulation={asked}: the hidden states between layers of {num_micro} "
                               f"micro-batches need {need / GIB:.3f} GiB, more than the activation budget "
                               f"{budget / GIB:.3f} GiB (offload.activation_budget_gib)")
    return "layer_major", (f"{num_micro} micro-batches per layer visit: the base is read once per step; hidden "
                           f"states between layers {need / GIB:.3f} GiB of the activation budget")


def _place(blocks: dict[str, BlockSize], *, outer_block: str, tier: str, prefetch_depth: int,
           device_budget_bytes: int | None, host_budget_bytes: int | None, zero_copy: bool) -> Plan:
    if prefetch_depth < 1:
        raise PlanError(f"offload.prefetch_depth must be >= 1 (got {prefetch_depth})")
    layers = [b for b in blocks if b != outer_block]
    outer = blocks[outer_block]
    max_layer = max((blocks[b] for b in layers), key=lambda s: s.compute_bytes)
    ring = prefetch_depth + 2
    home: dict[str, Tier] = {}
    notes: list[str] = []

    if tier == "resident":
        home = {b: Tier.DEVICE for b in blocks}
        # Resident masters in store dtype; a working copy only when the dtypes differ.
        device = sum(s.store_bytes for s in blocks.values())
        if not zero_copy:
            device += outer.compute_bytes + ring * max_layer.compute_bytes
        if device_budget_bytes is not None and device > device_budget_bytes:
            raise PlanError(
                f"offload.device_budget_gib={device_budget_bytes / GIB:.2f} cannot hold the resident model: "
                f"needs {device / GIB:.2f} GiB; raise it or set offload.tier to host or nvme")
        return Plan(tier, home, prefetch_depth, 0 if zero_copy else ring, max_layer.compute_bytes, outer_block,
                    zero_copy, device, 0, 0, 0, notes)

    if tier not in ("host", "nvme"):
        raise PlanError(f"offload.tier must be resident, host or nvme (got {tier!r})")
    # Working set on the device: outer + ring. With zero copy (CPU, equal dtypes) the
    # NVMe staging buffers are the working buffers and live in host memory instead.
    nvme_zero_copy = zero_copy and tier == "nvme"
    working = 0 if nvme_zero_copy else outer.compute_bytes + ring * max_layer.compute_bytes
    device = working
    if device_budget_bytes is not None:
        if working > device_budget_bytes:
            raise PlanError(
                f"offload.device_budget_gib={device_budget_bytes / GIB:.2f} cannot hold one step's working set: "
                f"needs {working / GIB:.3f} GiB (outer block {outer.compute_bytes / 2**20:.1f} MiB + {ring} layer "
                f"buffers of {max_layer.compute_bytes / 2**20:.1f} MiB); raise it or lower offload.prefetch_depth")
        room = device_budget_bytes - working
        for b in layers:  # earliest layers first: they are needed first each step
            if blocks[b].store_bytes <= room:
                home[b] = Tier.DEVICE
                room -= blocks[b].store_bytes
                device += blocks[b].store_bytes
    rest = [b for b in blocks if b not in home]
    host = 0
    staging_n = staging_bytes = 0
    if tier == "host":
        for b in rest:
            home[b] = Tier.HOST
            host += _page(blocks[b].store_bytes)
        if host_budget_bytes is not None and host > host_budget_bytes:
            raise PlanError(
                f"offload.host_budget_gib={host_budget_bytes / GIB:.2f} cannot hold the {len(rest)} host blocks: "
                f"needs {host / GIB:.2f} GiB; raise it or set offload.tier: nvme")
    else:
        for b in rest:
            home[b] = Tier.NVME
        staging_n = ring
        staging_bytes = _page(max_layer.store_bytes if not nvme_zero_copy else max_layer.compute_bytes)
        outer_staging = _page(outer.store_bytes if not nvme_zero_copy else outer.compute_bytes)
        host = staging_n * staging_bytes + outer_staging
        if host_budget_bytes is not None and host > host_budget_bytes:
            raise PlanError(
                f"offload.host_budget_gib={host_budget_bytes / GIB:.3f} cannot hold the NVMe staging buffers: "
                f"needs {host / GIB:.3f} GiB ({staging_n} x {staging_bytes / 2**20:.1f} MiB + outer "
                f"{outer_staging / 2**20:.1f} MiB); raise it or lower offload.prefetch_depth")
        if nvme_zero_copy:
            notes.append("CPU device with equal store and compute dtypes: layers compute in the staging buffers")
    return Plan(tier, home, prefetch_depth, 0 if nvme_zero_copy else ring, max_layer.compute_bytes, outer_block,
                zero_copy, device, host, staging_n, staging_bytes, notes)

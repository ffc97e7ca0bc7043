"""Assemble the parts every trainer needs: layout, plan, streamer, weight source.

Order (fixed, as in torchtitan's parallelize): build the model on meta -> cut
blocks -> plan placement -> open the streamer, which fills every block's home
from the checkpoint one block at a time.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ferrytune.config import ModelConfig, OffloadConfig
from ferrytune.errors import ConfigError
from ferrytune.models import OUTER, ModelLayout, load_layout
from ferrytune.models import open_checkpoint
from ferrytune.offload import GIB, BlockSize, BlockStreamer, Plan, build_streamer, make_plan

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Runtime:
    layout: ModelLayout
    plan: Plan
    streamer: BlockStreamer
    device: torch.device
    compute_dtype: torch.dtype
    store_dtype: torch.dtype


def resolve_dtypes(model: ModelConfig, layout: ModelLayout) -> tuple[torch.dtype, torch.dtype]:
    """(compute, store) dtypes of ``model``; ``store_dtype: auto`` is the checkpoint's."""
    compute = _DTYPES[model.compute_dtype]
    store = layout.checkpoint_dtype if model.store_dtype == "auto" else _DTYPES[model.store_dtype]
    if store not in (torch.float32, torch.bfloat16, torch.float16):
        store = torch.float32
    return compute, store


def plan_for(off: OffloadConfig, layout: ModelLayout, *, compute: torch.dtype, store: torch.dtype,
             device: torch.device, tier: str | None = None, activation_bytes: int | None = None,
             accumulation: str = "micro_major", num_micro: int = 1, boundary_bytes: int | None = None) -> Plan:
    es, ec = _esize(store), _esize(compute)
    sizes = {b: BlockSize(s.numel * es, s.numel * ec) for b, s in layout.blocks.items()}
    return make_plan(
        sizes, outer_block=OUTER, tier=tier or off.tier, prefetch_depth=off.prefetch_depth,
        device_budget_bytes=None if off.device_budget_gib is None else int(off.device_budget_gib * GIB),
        host_budget_bytes=int(off.host_budget_gib * GIB),
        zero_copy=store == compute and (device.type == "cpu" or (tier or off.tier) == "resident"),
        activation_bytes_per_layer=activation_bytes,
        activation_budget_bytes=None if off.activation_budget_gib is None else int(off.activation_budget_gib * GIB),
        accumulation=accumulation, num_micro=num_micro, boundary_bytes_per_layer=boundary_bytes)


def build_base_runtime(model_path: str, offload: OffloadConfig, *, device: str = "cpu",
                       compute_dtype: str = "float32", store_dtype: str = "auto") -> Runtime:
    """A streamed read-only base without a full training config (the multi-LoRA workers use it)."""
    model = ModelConfig(path=model_path, compute_dtype=compute_dtype, store_dtype=store_dtype)
    return build_runtime(model, offload, device=device)


def build_runtime(model: ModelConfig, offload: OffloadConfig, *, device: str, nvme_subdir: str | None = None,
                  tier: str | None = None, store_dtype: torch.dtype | None = None, sliced_over=None,
                  activation_estimate: Callable[[ModelLayout, torch.dtype], int] | None = None,
                  accumulation: str = "micro_major", num_micro: int = 1,
                  boundary_estimate: Callable[[ModelLayout, torch.dtype], int] | None = None) -> Runtime:
    """Layout + plan + an unopened streamer for ``model`` placed by ``offload`` (no weights read yet).

    ``activation_estimate(layout, compute_dtype)``: bytes one layer keeps for backward per
    micro-batch (a backward's trainer passes it; the planner then keeps or recomputes per layer).
    ``accumulation`` / ``num_micro`` (micro-batches per step of one rank) / ``boundary_estimate``
    (bytes of one micro-batch's hidden state between two layers): the planner's choice of
    ``train.accumulation`` (``Plan.accumulation``).

    ``sliced_over``: a distributed ``Mesh`` whose ranks each keep 1/N of every host/NVMe block
    (``parallel.sliced_loading``); collective when given."""
    layout = load_layout(model.path, trust_remote_code=model.trust_remote_code)
    compute, store = resolve_dtypes(model, layout)
    store = store_dtype or store
    device = torch.device(device)
    act = None if activation_estimate is None else activation_estimate(layout, compute)
    boundary = None if boundary_estimate is None else boundary_estimate(layout, compute)
    plan = plan_for(offload, layout, compute=compute, store=store, device=device, tier=tier, activation_bytes=act,
                    accumulation=accumulation, num_micro=num_micro, boundary_bytes=boundary)
    nvme_dir = offload.nvme_dir
    if nvme_dir and nvme_subdir:
        nvme_dir = str(Path(nvme_dir) / nvme_subdir)
    slicing = None
    if sliced_over is not None:
        from ferrytune.parallel import sliced_loading

        slicing = sliced_loading(sliced_over, plan)
    streamer = build_streamer(plan, {b: s.numel for b, s in layout.blocks.items()}, device=device,
                              compute_dtype=compute, store_dtype=store, nvme_dir=nvme_dir,
                              io_threads=offload.io_threads, verify_checksums=offload.verify_checksums,
                              io_backend=offload.io_backend, slicing=slicing,
                              expert_ranges=expert_ranges(layout) if offload.routed_experts else None)
    return Runtime(layout, plan, streamer, device, compute, store)


def expert_ranges(layout: ModelLayout) -> dict[str, tuple[int, list[list[tuple[int, int]]]]]:
    """Per MoE layer block: its dense part's elements and each expert's element ranges (``ExpertLayout``)."""
    return {b: (s.experts.dense_numel, [s.experts.ranges(e) for e in range(s.experts.num_experts)])
            for b, s in layout.blocks.items() if s.experts is not None}


def weights_from(folder: str | Path, layout: ModelLayout) -> Callable[[str, torch.Tensor], None]:
    """An ``init(block_id, flat)`` that reads a block's tensors from an HF folder, through transformers'
    checkpoint-name mapping for the architecture (``ferrytune.models.open_checkpoint``)."""
    return open_checkpoint(folder, layout).read_block


def check_device(cfg) -> None:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda requested but CUDA is not available; set device: cpu")


def _esize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()

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

from ferrytune.errors import CheckpointError, ConfigError
from ferrytune.models._layout import OUTER, ModelLayout, load_layout
from ferrytune.models._safetensors import SafetensorsReader
from ferrytune.offload._plan import GIB, BlockSize, Plan, make_plan
from ferrytune.offload._stream import BlockStreamer

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


def resolve_dtypes(cfg, layout: ModelLayout) -> tuple[torch.dtype, torch.dtype]:
    compute = _DTYPES[cfg.model.compute_dtype]
    store = layout.checkpoint_dtype if cfg.model.store_dtype == "auto" else _DTYPES[cfg.model.store_dtype]
    if store not in (torch.float32, torch.bfloat16, torch.float16):
        store = torch.float32
    return compute, store


def plan_for(cfg, layout: ModelLayout, *, compute: torch.dtype, store: torch.dtype, device: torch.device,
             tier: str | None = None) -> Plan:
    es, ec = _esize(store), _esize(compute)
    sizes = {b: BlockSize(s.numel * es, s.numel * ec) for b, s in layout.blocks.items()}
    off = cfg.offload
    return make_plan(
        sizes, outer_block=OUTER, tier=tier or off.tier, prefetch_depth=max(off.prefetch_depth, 1),
        device_budget_bytes=None if off.device_budget_gib is None else int(off.device_budget_gib * GIB),
        host_budget_bytes=int(off.host_budget_gib * GIB),
        zero_copy=device.type == "cpu" and store == compute)


def build_base_runtime(model_path: str, offload, *, device: str = "cpu", compute_dtype: str = "float32",
                       store_dtype: str = "auto") -> Runtime:
    """A streamed read-only base without a full training config (the multi-LoRA workers use it)."""
    from types import SimpleNamespace

    model = SimpleNamespace(path=model_path, compute_dtype=compute_dtype, store_dtype=store_dtype,
                            trust_remote_code=False)
    return build_runtime(SimpleNamespace(model=model, offload=offload, device=device))


def build_runtime(cfg, *, nvme_subdir: str | None = None, tier: str | None = None,
                  store_dtype: torch.dtype | None = None) -> Runtime:
    """Layout + plan + an unopened streamer for ``cfg`` (no weights read yet)."""
    layout = load_layout(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
    compute, store = resolve_dtypes(cfg, layout)
    store = store_dtype or store
    device = torch.device(cfg.device)
    plan = plan_for(cfg, layout, compute=compute, store=store, device=device, tier=tier)
    nvme_dir = cfg.offload.nvme_dir
    if nvme_dir and nvme_subdir:
        nvme_dir = str(Path(nvme_dir) / nvme_subdir)
    streamer = BlockStreamer(plan, {b: s.numel for b, s in layout.blocks.items()}, device=device,
                             compute_dtype=compute, store_dtype=store, nvme_dir=nvme_dir,
                             io_threads=cfg.offload.io_threads, verify_checksums=cfg.offload.verify_checksums,
                             io_backend=cfg.offload.io_backend)
    return Runtime(layout, plan, streamer, device, compute, store)


def weights_from(folder: str | Path, layout: ModelLayout) -> Callable[[str, torch.Tensor], None]:
    """An ``init(block_id, flat)`` that reads a block's tensors from an HF folder."""
    reader = SafetensorsReader(folder)
    prefix = getattr(layout.model, "base_model_prefix", "") or ""

    def lookup(p) -> str:
        for name in [p.name, *p.aliases]:
            cands = [name]
            if prefix and name.startswith(prefix + "."):
                cands.append(name[len(prefix) + 1:])  # old checkpoints without the prefix
            for c in cands:
                if c in reader:
                    return c
        raise CheckpointError(f"{folder}: checkpoint has no tensor {p.name} (is model.path the right model?)")

    names = {p.param_id: lookup(p) for p in layout.params}

    def init(block_id: str, flat: torch.Tensor) -> None:
        for p in layout.blocks[block_id].params:
            reader.read(names[p.param_id], out=flat[p.offset: p.offset + p.numel].view(p.shape))

    return init


def check_device(cfg) -> None:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda requested but CUDA is not available; set device: cpu")


def _esize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()

"""Host-to-device copies and GPUDirect Storage on a real GPU (``pytest -m cuda``).

Skipped, with the reason, without CUDA (tests/conftest.py). benchmarks/gpu_check.sh runs these and
collects the figures each test writes to ``$FERRYTUNE_GPU_METRICS`` (one JSON file per test).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch

from ferrytune.offload._io import aligned_buffer, as_uint8_tensor, open_direct
from ferrytune.offload._pool import HostBufferPool
from ferrytune.offload._store import NvmeBlockStore

pytestmark = pytest.mark.cuda


def _record(name: str, figures: dict) -> None:
    out = os.environ.get("FERRYTUNE_GPU_METRICS")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / f"{name}.json").write_text(json.dumps(figures, indent=1))


def _h2d_gbs(src: torch.Tensor, dst: torch.Tensor, repeats: int = 5) -> float:
    dst.copy_(src, non_blocking=True)  # warm-up
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return src.numel() * src.element_size() / best / 1e9


def test_pool_pins_and_pinned_h2d_beats_pageable():
    nbytes = 512 << 20
    with HostBufferPool(1, nbytes, pin=True) as pool:
        assert pool.pinned, "HostBufferPool(pin=True) did not pin on a CUDA machine"
        buf = pool.acquire()
        pinned = buf.tensor(torch.uint8, nbytes)
        assert pinned.is_pinned()
        pinned.random_(0, 256)
        pageable = as_uint8_tensor(aligned_buffer(nbytes))
        pageable.copy_(pinned)
        assert not pageable.is_pinned()
        dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
        pinned_gbs = _h2d_gbs(pinned, dst)
        assert torch.equal(dst.cpu(), pinned)
        pageable_gbs = _h2d_gbs(pageable, dst)
        torch_pinned_gbs = _h2d_gbs(torch.empty(nbytes, dtype=torch.uint8).pin_memory(), dst)
        pool.release(buf)
    _record("h2d", {"bytes": nbytes, "pool_pinned_gbs": pinned_gbs, "pageable_gbs": pageable_gbs,
                    "torch_pin_memory_gbs": torch_pinned_gbs, "pinned_over_pageable": pinned_gbs / pageable_gbs})
    print(f"H2D GB/s: pool pinned {pinned_gbs:.1f}, torch pinned {torch_pinned_gbs:.1f}, pageable {pageable_gbs:.1f}")
    assert pinned_gbs > pageable_gbs, "a registered (pinned) buffer should copy faster than a pageable one"


def test_deepspeed_gds_reads_a_record_into_device_memory(tmp_path):
    from ferrytune.errors import FerrytuneError
    from ferrytune.offload._aio import DeepSpeedGDS

    try:
        gds = DeepSpeedGDS(num_threads=1)
    except FerrytuneError as exc:
        pytest.skip(f"GPUDirect Storage is not available here: {exc}")
    try:
        nbytes = 64 << 20
        with NvmeBlockStore.create(tmp_path / "s", {"w": nbytes}, backend=gds) as store:
            src = aligned_buffer(nbytes)
            as_uint8_tensor(src).random_(0, 256)
            store.write("w", src)  # host buffer: the same path as deepspeed_aio
            rec = store.record("w")
            fd = open_direct(store._paths[rec.file], write=False)
            try:
                dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
                start = time.perf_counter()
                gds.read_into_device(fd, rec.offset + 4096, dst)
                torch.cuda.synchronize()
                seconds = time.perf_counter() - start
            finally:
                os.close(fd)
            assert torch.equal(dst.cpu(), as_uint8_tensor(src)[:nbytes])
        _record("gds", {"bytes": nbytes, "read_gbs": nbytes / seconds / 1e9})
    finally:
        gds.close()

"""The streamer and the trainers on a real GPU (``pytest -m cuda``; benchmarks/gpu_check.sh runs them).

Skipped, saying why, without CUDA (tests/conftest.py): none of this is faked on the CPU. Figures go to
``$FERRYTUNE_GPU_METRICS`` (one JSON per test) for the check's report.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ferrytune.offload import BlockSize, Tier, build_streamer, make_plan

pytestmark = pytest.mark.cuda

LAYERS = [f"layers.{i}" for i in range(6)]
NUMEL = {"outer": 1 << 20, **{b: 4 << 20 for b in LAYERS}}  # 16 MiB layers: a copy takes real time


def _record(name: str, figures: dict) -> None:
    out = os.environ.get("FERRYTUNE_GPU_METRICS")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / f"{name}.json").write_text(json.dumps(figures, indent=1))


def _value(b: str) -> float:
    return float(1 + (["outer", *LAYERS].index(b)))


def _streamer(tier: str, tmp_path, store=torch.float32, prefetch_depth=1):
    es = torch.empty((), dtype=store).element_size()
    sizes = {b: BlockSize(n * es, n * 4) for b, n in NUMEL.items()}
    plan = make_plan(sizes, outer_block="outer", tier=tier, prefetch_depth=prefetch_depth, device_budget_bytes=None,
                     host_budget_bytes=None, zero_copy=False)
    s = build_streamer(plan, NUMEL, device="cuda", compute_dtype=torch.float32, store_dtype=store,
                       nvme_dir=str(tmp_path / "nvme"), io_threads=4)
    s.open(lambda b, flat: flat.fill_(_value(b)))
    return s


@pytest.mark.parametrize("tier", ["host", "nvme"])
def test_a_slot_is_not_refilled_while_queued_kernels_still_read_it(tmp_path, tier):
    """Clean releases (LoRA, evaluation): forward then reverse through a 3-slot ring for 6 layers, with a
    long kernel queued after each acquire and the check of the block's values queued behind it. Without
    the release event the next load into the slot overwrites the weights before the check reads them."""
    s = _streamer(tier, tmp_path)
    try:
        order = ["outer", *LAYERS, *LAYERS[::-1]]
        bad = torch.zeros((), dtype=torch.int64, device="cuda")
        for _ in range(2):
            s.start_pass(order)
            for b in order:
                t = s.acquire(b)
                torch.cuda._sleep(20_000_000)  # ~10 ms of spinning on the compute stream: the host runs ahead
                bad += (t != _value(b)).sum()
                s.release(b, dirty=False)
            s.finish_pass()
        torch.cuda.synchronize()
        assert bad.item() == 0, f"{bad.item()} elements were overwritten while queued kernels read them"
    finally:
        s.close()


@pytest.mark.parametrize("tier,store", [("host", torch.float32), ("nvme", torch.bfloat16)])
def test_dirty_release_writes_back_what_the_queued_kernels_computed(tmp_path, tier, store):
    s = _streamer(tier, tmp_path, store=store)
    try:
        order = ["outer", *LAYERS]
        for _ in range(3):  # a ZO step each: update in place on the compute stream, then write back
            s.start_pass(order)
            for b in order:
                t = s.acquire(b)
                torch.cuda._sleep(20_000_000)
                t.add_(1.0)
                s.release(b, dirty=True)
            s.finish_pass()
        for b in order:
            out = torch.empty(NUMEL[b], dtype=store)
            s.read_master(b, out)
            assert torch.equal(out, torch.full_like(out, _value(b) + 3)), b
    finally:
        s.close()


def test_host_arena_is_pinned_while_open_and_unpinned_after_close(tmp_path):
    s = _streamer("host", tmp_path)
    home = s._homes[Tier.HOST]
    master = home.source("layers.0")
    assert master.is_pinned(), "the host arena was not page-locked"
    ptr = home._pinned_ptr
    s.close()
    # registered memory unregisters with 0; memory that is not (any more) returns an error code
    assert int(torch.cuda.cudart().cudaHostUnregister(ptr)) != 0, "the arena was still pinned after close()"
    _record("pinning", {"host_arena_bytes": home.host_bytes, "pinned_while_open": True, "pinned_after_close": False})


def test_resident_tier_holds_only_the_masters(tmp_path):
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    es = 4
    sizes = {b: BlockSize(n * es, n * es) for b, n in NUMEL.items()}
    plan = make_plan(sizes, outer_block="outer", tier="resident", prefetch_depth=2, device_budget_bytes=None,
                     host_budget_bytes=None, zero_copy=True)
    s = build_streamer(plan, NUMEL, device="cuda", compute_dtype=torch.float32, store_dtype=torch.float32)
    s.open(lambda b, flat: flat.fill_(_value(b)))
    try:
        used = torch.cuda.memory_allocated() - before
        masters = sum(NUMEL.values()) * es
        _record("resident_memory", {"device_bytes": used, "master_bytes": masters, "ratio": used / masters})
        assert used <= masters * 1.01 + (2 << 20), (used, masters)  # no ring, no outer slot
    finally:
        s.close()


@pytest.fixture
def deterministic():
    """Deterministic CUDA kernels (cuBLAS workspace set by gpu_check.sh): runs compared bit for bit."""
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(False)


def _run(cfg):
    from ferrytune.launch import run

    return run(cfg, progress=False)


@pytest.mark.parametrize("method", ["zo", "lora"])
def test_tiers_are_bit_identical_on_cuda(tiny_models, cfg_factory, deterministic, method):
    path = tiny_models("llama", layers=3, hidden=64)
    extra = {"lora": {"rank": 4, "target_modules": ["q_proj", "v_proj"]}} if method == "lora" else {}
    finals = {}
    for tier in ("resident", "host", "nvme"):
        cfg = cfg_factory(path, method=method, device="cuda", offload={"tier": tier, "prefetch_depth": 1},
                          train={"steps": 3, "lr": 1e-2}, data={"eval": None}, **extra)
        _run(cfg)
        name = "adapter_model.safetensors" if method == "lora" else "model.safetensors"
        finals[tier] = load_file(f"{cfg.output_dir}/final/{name}")
    for tier in ("host", "nvme"):
        for k, v in finals["resident"].items():
            assert torch.equal(finals[tier][k], v), (method, tier, k)


def test_a_cpu_run_replayed_on_cuda_gives_the_cpu_weights(tiny_models, cfg_factory, deterministic):
    from ferrytune.engine import ZOTrainer

    path = tiny_models("llama", layers=2, hidden=32)
    cfg = cfg_factory(path, train={"steps": 3, "lr": 1e-2}, data={"eval": None})
    _run(cfg)
    trained = load_file(f"{cfg.output_dir}/final/model.safetensors")
    on_cuda = cfg.model_copy(update={"device": "cuda", "resume": "never"})
    trainer = ZOTrainer(on_cuda, read_only=True)
    trainer.setup()
    try:
        dest = trainer.replay(Path(cfg.output_dir) / "zo_log.jsonl")
    finally:
        trainer.close()
    replayed = load_file(f"{dest}/model.safetensors")
    assert replayed.keys() == trained.keys()
    for k in trained:
        assert torch.equal(replayed[k], trained[k]), k


def test_nvml_reports_the_gpu_this_process_uses():
    pynvml = pytest.importorskip("pynvml", reason="nvidia-ml-py is not installed")
    from ferrytune.engine._metrics import nvml_handle

    dev = torch.device("cuda", torch.cuda.current_device())
    handle = nvml_handle(dev)
    assert handle is not None
    uuid = pynvml.nvmlDeviceGetUUID(handle)
    uuid = uuid.decode() if isinstance(uuid, bytes) else uuid
    want = str(torch.cuda.get_device_properties(dev).uuid)
    assert uuid.removeprefix("GPU-") == want.removeprefix("GPU-"), (uuid, want)
    _record("nvml", {"torch_device": str(dev), "nvml_uuid": uuid, "visible": os.environ.get("CUDA_VISIBLE_DEVICES")})

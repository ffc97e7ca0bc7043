"""The DeepSpeed async-IO backend (offload.io_backend: deepspeed_aio).

The store's own suite (test_store.py) runs on this backend too; here: its traps become one
line instead of an abort, a missing build piece is named, and the ZO and LoRA tier runs are
bit for bit the same on both backends. Skipped, with DeepSpeed's reason, where its op cannot load.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import textwrap
from concurrent.futures import wait
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ferrytune.config import config_from_dict
from ferrytune.errors import ConfigError, FerrytuneError, StoreError
from ferrytune.launch.train import run
from ferrytune.offload import make_io_backend
from ferrytune.offload._io import GRANULE_BYTES, ThreadedDirectIO, aligned_buffer, as_uint8_tensor, open_direct
from ferrytune.offload._store import NvmeBlockStore

from aio_testlib import require_deepspeed_aio

REPO = Path(__file__).resolve().parents[2]


def _run_script(code: str, env_extra: dict | None = None, prefix: list[str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           **(env_extra or {})}
    return subprocess.run([*(prefix or []), sys.executable, "-c", textwrap.dedent(code)], env=env,
                          capture_output=True, text=True, timeout=300, check=False)


@pytest.fixture
def aio():
    require_deepspeed_aio()
    from ferrytune.offload._aio import DeepSpeedAIO

    backends = []

    def make(**kw):
        backends.append(DeepSpeedAIO(**kw))
        return backends[-1]

    yield make
    for b in backends:
        b.close()


def test_many_concurrent_requests_through_few_staging_buffers(tmp_path, aio):
    # 2 staging buffers of 128 KiB for 32 records in flight: ops queue for staging, pieces straddle ops
    backend = aio(num_threads=2, chunk_bytes=GRANULE_BYTES, op_bytes=2 * GRANULE_BYTES, num_staging=2)
    sizes = {f"layers.{i}": 50_000 + 4097 * i for i in range(32)}
    with NvmeBlockStore.create(tmp_path / "s", sizes, backend=backend) as store:
        srcs = {}
        for seed, (k, n) in enumerate(sizes.items()):
            srcs[k] = aligned_buffer(n)
            as_uint8_tensor(srcs[k]).copy_(torch.randint(0, 256, (len(srcs[k]),), dtype=torch.uint8,
                                                         generator=torch.Generator().manual_seed(seed)))
        done, _ = wait([store.submit_write(k, srcs[k]) for k in sizes])
        assert all(f.exception() is None for f in done)
        dsts = {k: aligned_buffer(n) for k, n in sizes.items()}
        futures = {k: store.submit_read(k, dsts[k]) for k in sizes}
        for k, fut in futures.items():
            assert fut.result(timeout=60) == sizes[k]
            assert dsts[k][:sizes[k]] == srcs[k][:sizes[k]]
        assert store.stats.bytes_read == store.stats.bytes_written == store.total_bytes


def test_locked_buffers_from_the_handle_need_no_staging(tmp_path, aio):
    backend = aio(num_threads=4, chunk_bytes=1 << 20, op_bytes=1 << 20, num_staging=1)
    buf = backend.new_buffer(3 << 20)
    as_uint8_tensor(buf).copy_(torch.arange(3 << 20, dtype=torch.int64).to(torch.uint8))
    assert backend._managed(buf) is not None  # the handle itself manages (has locked) this memory
    assert backend._managed(memoryview(aligned_buffer(1 << 20))) is None
    with NvmeBlockStore.create(tmp_path / "s", {"w": 3 << 20}, backend=backend) as store:
        store.write("w", buf)
        out = backend.new_buffer(3 << 20)
        assert store.read("w", out) == 3 << 20
        assert out == buf


def test_traps_are_one_line_not_an_abort(tmp_path, aio):
    """Each of these aborts the process when handed to DeepSpeed's handle as is."""
    backend = aio(num_threads=4)
    fd = open_direct(tmp_path / "f.bin", write=True)
    try:
        os.ftruncate(fd, 8192)
        with pytest.raises(StoreError, match="short read .* 8192 bytes missing; the store file is truncated"):
            backend.read_into(fd, 8192, memoryview(aligned_buffer(8192)))  # "file_offset + nbytes > file bytes"
        backend.write_from(fd, 0, memoryview(aligned_buffer(4096)))  # 4096 cannot split 4 ways: the tail handle
        backend.read_into(fd, 0, memoryview(aligned_buffer(8192)))
    finally:
        os.close(fd)
    with pytest.raises(FerrytuneError, match="io_threads=3 .* divisible by its intra_op_parallelism") as info:
        aio(num_threads=3)
    assert "\n" not in str(info.value)
    idle = aio(num_threads=2)
    idle.close()  # no op was ever submitted: close must not wait() (DeepSpeed asserts pending > 0)
    idle.close()
    with pytest.raises(StoreError, match="closed"):
        idle.read_into(0, 0, memoryview(aligned_buffer(4096)))


def test_mlock_refusal_is_one_line(tmp_path):
    require_deepspeed_aio()
    if shutil.which("setpriv") is None or os.geteuid() != 0:
        pytest.skip("needs root and setpriv (util-linux) to drop CAP_IPC_LOCK for the child")
    # Without CAP_IPC_LOCK and with `ulimit -l` at 1 MiB, DeepSpeed's mlock of its buffers fails (it aborts).
    out = _run_script("""
        import resource
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (1 << 20, 1 << 20))
        from ferrytune.errors import FerrytuneError
        from ferrytune.offload import make_io_backend
        try:
            make_io_backend("deepspeed_aio", num_threads=2)
        except FerrytuneError as exc:
            print("ERR", exc)
        else:
            print("NO ERROR")
    """, prefix=["setpriv", "--bounding-set", "-ipc_lock", "--inh-caps", "-ipc_lock"])
    assert out.returncode == 0, out.stderr[-2000:]
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("ERR")]
    assert line and "cannot lock" in line[0] and "ulimit -l" in line[0], out.stdout + out.stderr[-2000:]


def test_unbuildable_op_names_the_missing_piece_and_auto_falls_back(tmp_path):
    pytest.importorskip("deepspeed")
    from ferrytune.offload._aio import _prebuilt

    if _prebuilt("async_io"):
        pytest.skip("DeepSpeed was installed with the async_io op prebuilt (DS_BUILD_AIO=1): nothing to build")
    # a fresh extensions dir (nothing cached) and no C++ compiler
    out = _run_script("""
        from ferrytune.errors import FerrytuneError
        from ferrytune.offload import ThreadedDirectIO, make_io_backend
        try:
            make_io_backend("deepspeed_aio", num_threads=2)
        except FerrytuneError as exc:
            print("ERR", exc)
        b = make_io_backend("auto", num_threads=2)
        print("AUTO", type(b).__name__)
        b.close()
    """, env_extra={"CXX": "no-such-c++", "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")})
    assert out.returncode == 0, out.stderr[-2000:]
    err = [ln for ln in out.stdout.splitlines() if ln.startswith("ERR")]
    assert err and "a C++ compiler (no-such-c++ not on PATH" in err[0] and "threads" in err[0], out.stdout
    assert "AUTO ThreadedDirectIO" in out.stdout


def test_auto_picks_deepspeed_when_it_loads():
    require_deepspeed_aio()
    from ferrytune.offload._aio import DeepSpeedAIO

    backend = make_io_backend("auto", num_threads=2)
    try:
        assert isinstance(backend, DeepSpeedAIO)
    finally:
        backend.close()
    backend = make_io_backend("threads", num_threads=2)
    assert isinstance(backend, ThreadedDirectIO)
    backend.close()


def test_config_key_is_checked():
    with pytest.raises(ConfigError, match=r"offload\.io_backend") as info:
        config_from_dict({"model": {"path": "m"}, "data": {"train": "t"}, "train": {"steps": 1, "batch_size": 1},
                          "offload": {"io_backend": "libaio"}})
    assert "\n" not in str(info.value)
    with pytest.raises(FerrytuneError, match="offload.io_backend must be one of threads, deepspeed_aio, auto"):
        make_io_backend("libaio")


# -- the tier runs, bit for bit, on each backend ------------------------------------------------------
BACKENDS = ["threads", "deepspeed_aio"]


def _backend_used(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("offload IO backend: ")]


def _losses(cfg) -> list[float]:
    import json

    lines = open(f"{cfg.output_dir}/metrics.jsonl").read().splitlines()
    return [json.loads(ln)["loss"] for ln in lines if "loss" in json.loads(ln)]


@pytest.mark.parametrize("io_backend", BACKENDS)
def test_zo_tiers_equal_resident_on_each_backend(tiny_models, cfg_factory, caplog, io_backend):
    if io_backend == "deepspeed_aio":
        require_deepspeed_aio()
    caplog.set_level(logging.INFO, logger="ferrytune.offload._backends")
    path = tiny_models("llama", layers=3, hidden=32)
    results = {}
    for tier in ("resident", "host", "nvme"):
        cfg = cfg_factory(path, model={"store_dtype": "bfloat16"},
                          offload={"tier": tier, "prefetch_depth": 1, "io_backend": io_backend, "io_threads": 4},
                          zo={"momentum": 0.5}, train={"steps": 3, "lr": 1e-2}, data={"eval": None})
        run(cfg, progress=False)
        results[tier] = (load_file(f"{cfg.output_dir}/final/model.safetensors"), _losses(cfg))
    # the nvme run opened the backend the config names (weights, and the momentum streamer)
    assert _backend_used(caplog) and all(m.split(": ")[1].startswith(io_backend) for m in _backend_used(caplog))
    ref_w, ref_l = results["resident"]
    for tier in ("host", "nvme"):
        w, losses = results[tier]
        assert losses == ref_l, tier
        for name in ref_w:
            assert torch.equal(w[name], ref_w[name]), (tier, name)


@pytest.mark.parametrize("io_backend", BACKENDS)
def test_lora_tiers_equal_resident_on_each_backend(tiny_models, cfg_factory, caplog, io_backend):
    if io_backend == "deepspeed_aio":
        require_deepspeed_aio()
    caplog.set_level(logging.INFO, logger="ferrytune.offload._backends")
    path = tiny_models("llama", layers=3, hidden=32)
    lora = {"rank": 4, "alpha": 8, "dropout": 0.1, "target_modules": "all-linear"}
    out = {}
    for tier in ("resident", "host", "nvme"):
        cfg = cfg_factory(path, method="lora", lora=lora, model={"store_dtype": "bfloat16"}, data={"eval": None},
                          train={"steps": 3, "lr": 1e-2, "micro_batch_size": 2},
                          offload={"tier": tier, "prefetch_depth": 1, "io_backend": io_backend, "io_threads": 4})
        res = run(cfg, progress=False)
        out[tier] = (res.losses, load_file(f"{cfg.output_dir}/final/adapter_model.safetensors"))
    assert _backend_used(caplog) and all(m.split(": ")[1].startswith(io_backend) for m in _backend_used(caplog))
    ref_losses, ref_w = out["resident"]
    for tier in ("host", "nvme"):
        losses, w = out[tier]
        assert losses == ref_losses, tier
        assert all(torch.equal(w[k], ref_w[k]) for k in ref_w), tier


def test_impossible_backend_setting_fails_the_run_with_one_line(tiny_models, cfg_factory):
    require_deepspeed_aio()
    path = tiny_models("llama", layers=3, hidden=32)
    cfg = cfg_factory(path, offload={"tier": "nvme", "io_backend": "deepspeed_aio", "io_threads": 3},
                      train={"steps": 1}, data={"eval": None})
    with pytest.raises(FerrytuneError, match="offload.io_threads=3") as info:
        run(cfg, progress=False)
    assert "\n" not in str(info.value)

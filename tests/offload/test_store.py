"""NvmeBlockStore: round trips, corruption, reopen, free-space refusal, concurrency."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import threading
from concurrent.futures import wait

import pytest
import torch

from ferrytune.errors import CorruptRecordError, StoreError
from ferrytune.offload._io import PAGE_BYTES, ThreadedDirectIO, aligned_buffer, as_uint8_tensor
from ferrytune.offload._pool import HostBufferPool
from ferrytune.offload._store import GRANULE_BYTES, NvmeBlockStore

from aio_testlib import require_deepspeed_aio

SIZES = {"outer": 70_001, "layers.0": 3 * (1 << 20) + 5, "layers.1": 1, "layers.2": 12_288, "layers.3": 4095}


def _payload(nbytes: int, seed: int) -> bytes:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=gen).numpy().tobytes()


def _filled(nbytes: int, seed: int):
    buf = aligned_buffer(nbytes)
    buf[:nbytes] = _payload(nbytes, seed)
    return buf


@pytest.fixture(params=["threads", "deepspeed_aio"])
def backend(request):
    """Every store test runs on both IO backends. DeepSpeed's ops are cut at 1 MiB so that
    records span several ops and a tail (the parallelism-1 handle) and pieces straddle them."""
    if request.param == "threads":
        io = ThreadedDirectIO(num_threads=4, chunk_bytes=256 << 10)
    else:
        require_deepspeed_aio()
        from ferrytune.offload._aio import DeepSpeedAIO

        io = DeepSpeedAIO(num_threads=4, chunk_bytes=256 << 10, op_bytes=1 << 20)
    yield io
    io.close()


def _write_all(store: NvmeBlockStore) -> dict[str, bytes]:
    data = {}
    for seed, (block_id, nbytes) in enumerate(store.records.items()):
        store.write(block_id, _filled(nbytes, seed))
        data[block_id] = _payload(nbytes, seed)
    return data


def test_round_trip_of_records_of_odd_sizes(tmp_path, backend):
    with NvmeBlockStore.create(tmp_path / "s", SIZES, backend=backend) as store:
        data = _write_all(store)
        for block_id, nbytes in SIZES.items():
            buf = aligned_buffer(nbytes)
            assert store.read(block_id, buf) == nbytes
            assert buf[:nbytes] == data[block_id]
        # overwrite in place with new bytes, then read back
        store.write("layers.0", _filled(SIZES["layers.0"], 99))
        buf = aligned_buffer(SIZES["layers.0"])
        store.read("layers.0", buf)
        assert buf[:SIZES["layers.0"]] == _payload(SIZES["layers.0"], 99)


def test_exact_byte_counts(tmp_path, backend):
    with NvmeBlockStore.create(tmp_path / "s", SIZES, backend=backend) as store:
        _write_all(store)
        for block_id, nbytes in SIZES.items():
            store.read(block_id, aligned_buffer(nbytes))
        expected = sum(PAGE_BYTES + -(-n // PAGE_BYTES) * PAGE_BYTES for n in SIZES.values())
        assert store.total_bytes == expected
        stats = store.stats
        assert stats.bytes_written == expected and stats.bytes_read == expected
        assert stats.num_writes == 2 * len(SIZES) and stats.num_reads == 2 * len(SIZES)  # header + payload


def test_reads_into_pool_buffers_and_tensors(tmp_path, backend):
    with NvmeBlockStore.create(tmp_path / "s", {"w": 4096 * 3 + 8}, backend=backend) as store, \
            HostBufferPool(2, 4096 * 4, pin=False) as pool:
        src = pool.acquire()
        src.tensor(torch.float32, 3074).copy_(torch.arange(3074, dtype=torch.float32))
        store.write("w", src)
        dst = pool.acquire()
        store.read("w", dst)
        assert torch.equal(dst.tensor(torch.float32, 3074), torch.arange(3074, dtype=torch.float32))
        out = as_uint8_tensor(aligned_buffer(4096 * 4))
        store.read("w", out)
        assert torch.equal(out[:4096 * 3 + 8], dst.tensor(torch.uint8, 4096 * 3 + 8))
        pool.release(src)
        pool.release(dst)


def test_unaligned_and_short_buffers_are_rejected(tmp_path, backend):
    with NvmeBlockStore.create(tmp_path / "s", {"a": 8192}, backend=backend) as store:
        shifted = memoryview(aligned_buffer(3 * PAGE_BYTES))[8:8 + 2 * PAGE_BYTES]
        with pytest.raises(StoreError, match="aligned buffer"):
            store.write("a", shifted)
        with pytest.raises(StoreError, match="too small"):
            store.read("a", aligned_buffer(4096))
        with pytest.raises(StoreError, match="not in the store"):
            store.read("nope", aligned_buffer(8192))
        with pytest.raises(StoreError, match="exactly 8192 bytes"):
            store.write("a", aligned_buffer(8192), nbytes=100)


CHECKSUMS = ["crc32", pytest.param("xxh3_64", marks=pytest.mark.skipif(
    not importlib.util.find_spec("xxhash"), reason="xxhash not installed"))]


@pytest.mark.parametrize("checksum", CHECKSUMS)
def test_flipped_byte_on_disk_raises_corrupt_record(tmp_path, backend, checksum):
    directory = tmp_path / "s"
    with NvmeBlockStore.create(directory, SIZES, backend=backend, checksum=checksum) as store:
        _write_all(store)
        rec = store.record("layers.2")
    with open(directory / "store-000.bin", "r+b") as fh:  # plain buffered IO: only the test does this
        fh.seek(rec.offset + PAGE_BYTES + 5000)
        byte = fh.read(1)
        fh.seek(rec.offset + PAGE_BYTES + 5000)
        fh.write(bytes([byte[0] ^ 0x10]))
    with NvmeBlockStore.open(directory, backend=backend) as store:
        with pytest.raises(CorruptRecordError, match=r"record layers\.2 in .*store-000\.bin failed its "
                           r"checksum: the store is corrupt; delete .* to rebuild it from the checkpoint"):
            store.read("layers.2", aligned_buffer(SIZES["layers.2"]))
        store.read("layers.1", aligned_buffer(1))  # neighbours are intact
    with NvmeBlockStore.open(directory, backend=backend, verify=False) as store:
        store.read("layers.2", aligned_buffer(SIZES["layers.2"]))  # checksum off: no error


def test_damaged_header_and_never_written_record(tmp_path, backend):
    directory = tmp_path / "s"
    with NvmeBlockStore.create(directory, {"a": 100, "b": 100}, backend=backend) as store:
        store.write("a", _filled(100, 0))
        with pytest.raises(StoreError, match="b in .* was never written"):
            store.read("b", aligned_buffer(100))
        offset = store.record("a").offset
    with open(directory / "store-000.bin", "r+b") as fh:
        fh.seek(offset + 20)
        fh.write(b"\xff")
    with NvmeBlockStore.open(directory, backend=backend) as store:
        with pytest.raises(CorruptRecordError, match="record a in .* has bad header"):
            store.read("a", aligned_buffer(100))


def test_reopen_reads_what_was_written(tmp_path, backend):
    directory = tmp_path / "s"
    with NvmeBlockStore.create(directory, SIZES, backend=backend) as store:
        data = _write_all(store)
        store.flush()
    with NvmeBlockStore.open(directory, backend=backend) as store:
        assert store.records == SIZES
        for block_id, nbytes in SIZES.items():
            buf = aligned_buffer(nbytes)
            store.read(block_id, buf)
            assert buf[:nbytes] == data[block_id]
    with pytest.raises(StoreError, match="already holds a block store"):
        NvmeBlockStore.create(directory, SIZES, backend=backend)
    NvmeBlockStore.open(directory, backend=backend, records=SIZES).close()
    with pytest.raises(StoreError, match="built for other blocks or sizes"):
        NvmeBlockStore.open(directory, backend=backend, records={**SIZES, "outer": 70_000})


def test_open_reports_missing_or_corrupt_manifest(tmp_path, backend):
    with pytest.raises(StoreError, match="store.json missing"):
        NvmeBlockStore.open(tmp_path, backend=backend)
    directory = tmp_path / "s"
    NvmeBlockStore.create(directory, {"a": 10}, backend=backend).close()
    manifest = directory / "store.json"
    doc = json.loads(manifest.read_text())
    doc["records"]["a"]["offset"] = 1 << 30
    manifest.write_text(json.dumps(doc))
    with pytest.raises(StoreError, match="store.json is corrupt .*outside its file.*delete"):
        NvmeBlockStore.open(directory, backend=backend)
    manifest.write_text("{not json")
    with pytest.raises(StoreError, match="store.json is corrupt"):
        NvmeBlockStore.open(directory, backend=backend)
    (directory / "store-000.bin").unlink()
    manifest.write_text(json.dumps({**doc, "records": {"a": {"file": 0, "offset": 0, "nbytes": 10}}}))
    with pytest.raises(StoreError, match="missing or truncated"):
        NvmeBlockStore.open(directory, backend=backend)


def test_refuses_before_writing_when_free_space_is_short(tmp_path, backend):
    # A real check on the real filesystem: ask for more than statvfs says is free.
    free = shutil.disk_usage(tmp_path).free
    directory = tmp_path / "s"
    records = {"a": free // 2 + (1 << 30), "b": free // 2 + (1 << 30)}
    with pytest.raises(StoreError, match=r"offload.nvme_dir .* GiB free \(\d+ bytes\) but the block store "
                       r"needs .* GiB \(\d+ bytes\)"):
        NvmeBlockStore.create(directory, records, backend=backend)
    assert os.listdir(directory) == []
    assert backend.stats.bytes_written == 0


def test_records_split_across_files(tmp_path, backend):
    sizes = {f"l{i}": 40_000 for i in range(5)}
    with NvmeBlockStore.create(tmp_path / "s", sizes, backend=backend, max_file_bytes=100_000) as store:
        assert sorted(os.listdir(tmp_path / "s")) == ["store-000.bin", "store-001.bin", "store-002.bin", "store.json"]
        data = _write_all(store)
    with NvmeBlockStore.open(tmp_path / "s", backend=backend) as store:
        assert [store.record(k).file for k in sizes] == [0, 0, 1, 1, 2]
        for block_id, nbytes in sizes.items():
            buf = aligned_buffer(nbytes)
            store.read(block_id, buf)
            assert buf[:nbytes] == data[block_id]


def test_many_concurrent_async_reads_and_writes(tmp_path):
    sizes = {f"layers.{i}": 50_000 + 4097 * i for i in range(32)}
    backend = ThreadedDirectIO(num_threads=8, chunk_bytes=GRANULE_BYTES)  # many small pieces interleave
    try:
        with NvmeBlockStore.create(tmp_path / "s", sizes, backend=backend) as store:
            srcs = {k: _filled(n, seed) for seed, (k, n) in enumerate(sizes.items())}
            done, _ = wait([store.submit_write(k, srcs[k]) for k in sizes])
            assert all(f.exception() is None for f in done)
            dsts = {k: aligned_buffer(n) for k, n in sizes.items()}
            futures = {k: store.submit_read(k, dsts[k]) for k in sizes}
            for k, fut in futures.items():
                assert fut.result(timeout=60) == sizes[k]
                assert dsts[k][:sizes[k]] == srcs[k][:sizes[k]]
            # rewrite the even records while reading the odd ones
            new = {k: _filled(n, 1000 + i) for i, (k, n) in enumerate(sizes.items()) if i % 2 == 0}
            mixed = [store.submit_write(k, b) for k, b in new.items()]
            mixed += [store.submit_read(k, dsts[k]) for i, k in enumerate(sizes) if i % 2]
            wait(mixed)
            assert all(f.exception() is None for f in mixed)
            for k, buf in new.items():
                out = aligned_buffer(sizes[k])
                store.read(k, out)
                assert out[:sizes[k]] == buf[:sizes[k]]
            expected = sum(store.record(k).span_bytes for k in sizes)
            expected_written = expected + sum(store.record(k).span_bytes for k in new)
            assert store.stats.bytes_written == expected_written
    finally:
        backend.close()


def test_conflicting_io_on_one_record_is_refused(tmp_path, backend, monkeypatch):
    if not isinstance(backend, ThreadedDirectIO):
        pytest.skip("holds a write by patching os.pwritev, which only the threads backend calls")
    gate = threading.Event()
    real = os.pwritev
    monkeypatch.setattr(os, "pwritev", lambda *a: gate.wait(30) and real(*a))  # hold the first write
    with NvmeBlockStore.create(tmp_path / "s", {"a": 1 << 20}, backend=backend) as store:
        buf = _filled(1 << 20, 0)
        first = store.submit_write("a", buf)
        try:
            with pytest.raises(StoreError, match="already has IO in flight"):
                store.submit_write("a", buf)
            with pytest.raises(StoreError, match="being written"):
                store.submit_read("a", aligned_buffer(1 << 20))
        finally:
            gate.set()
            first.result()
        store.read("a", aligned_buffer(1 << 20))  # free again once the write is done


def test_lost_write_is_detected_by_the_counter(tmp_path, backend):
    directory = tmp_path / "s"
    with NvmeBlockStore.create(directory, {"a": 8192}, backend=backend) as store:
        store.write("a", _filled(8192, 0))
        with open(directory / "store-000.bin", "rb") as fh:
            old_record = fh.read(3 * PAGE_BYTES)
        store.write("a", _filled(8192, 1))
        with open(directory / "store-000.bin", "r+b") as fh:  # the disk "forgets" the second write
            fh.write(old_record)
            fh.flush()
            os.fsync(fh.fileno())
        os.posix_fadvise(store._fds[0], 0, 0, os.POSIX_FADV_DONTNEED)
        with pytest.raises(CorruptRecordError, match="holds write #1 but write #2 completed"):
            store.read("a", aligned_buffer(8192))


def test_verify_false_skips_the_checksum(tmp_path, backend):
    with NvmeBlockStore.create(tmp_path / "s", {"a": 10_000}, backend=backend, verify=False) as store:
        store.write("a", _filled(10_000, 0))
    with NvmeBlockStore.open(tmp_path / "s", backend=backend) as store:  # verify=True reader
        buf = aligned_buffer(10_000)
        assert store.read("a", buf) == 10_000
        assert buf[:10_000] == _payload(10_000, 0)


@pytest.mark.parametrize("writer, reader", [("crc32", "xxh3_64"), ("xxh3_64", "crc32")])
def test_records_verify_with_the_algorithm_their_header_names(tmp_path, backend, writer, reader):
    pytest.importorskip("xxhash")
    directory = tmp_path / "s"
    with NvmeBlockStore.create(directory, {"a": 200_000}, backend=backend, checksum=writer) as store:
        store.write("a", _filled(200_000, 0))
    doc = json.loads((directory / "store.json").read_text())
    (directory / "store.json").write_text(json.dumps({**doc, "checksum": reader}))
    with NvmeBlockStore.open(directory, backend=backend) as store:
        assert store.checksum == reader
        buf = aligned_buffer(200_000)
        assert store.read("a", buf) == 200_000
        assert buf[:200_000] == _payload(200_000, 0)
        offset = store.record("a").offset
    with open(directory / "store-000.bin", "r+b") as fh:
        fh.seek(offset + PAGE_BYTES + 150_000)
        fh.write(b"\x00\x01")
    with NvmeBlockStore.open(directory, backend=backend) as store:  # the serial path checks too
        with pytest.raises(CorruptRecordError, match="failed its checksum"):
            store.read("a", aligned_buffer(200_000))


def test_backend_chunks_must_align_to_the_checksum_granule(tmp_path):
    backend = ThreadedDirectIO(num_threads=2, chunk_bytes=GRANULE_BYTES + 4096)
    try:
        with pytest.raises(ValueError, match="multiple of 65536"):
            NvmeBlockStore.create(tmp_path / "s", {"a": 10}, backend=backend)
        assert not (tmp_path / "s").exists()
    finally:
        backend.close()


def test_missing_xxhash_is_a_clear_error(tmp_path, backend, monkeypatch):
    from ferrytune.offload import _io

    NvmeBlockStore.create(tmp_path / "s", {"a": 10}, backend=backend, checksum="crc32").close()
    doc = json.loads((tmp_path / "s" / "store.json").read_text())
    (tmp_path / "s" / "store.json").write_text(json.dumps({**doc, "checksum": "xxh3_64"}))
    monkeypatch.setitem(__import__("sys").modules, "xxhash", None)  # import xxhash -> ImportError
    _io.hash_fn.cache_clear()
    try:
        assert _io.default_checksum() == "crc32"
        with pytest.raises(StoreError, match="pip install xxhash"):
            NvmeBlockStore.open(tmp_path / "s", backend=backend)
    finally:
        _io.hash_fn.cache_clear()


@pytest.mark.parametrize("checksum", ["xxh3_64", "crc32"])
def test_write_ranges_writes_only_them_and_the_record_still_verifies(tmp_path, backend, checksum):
    """``write_ranges``: only the given pages of the payload (and the header) reach the disk, the
    checksum covers the whole payload as the buffer holds it, so a whole read verifies; bytes outside
    the ranges that the buffer changed but the call did not write stay as they were on disk, and the
    checksum then catches the mismatch."""
    n = 3 * GRANULE_BYTES + 5000  # several checksum granules and a partial last page
    with NvmeBlockStore.create(tmp_path / "s", {"b": n}, backend=backend, checksum=checksum) as store:
        buf = _filled(n, 1)
        store.write("b", buf)
        new = bytearray(_payload(n, 2))
        ranges = [(PAGE_BYTES, 3 * PAGE_BYTES), (2 * GRANULE_BYTES, 2 * GRANULE_BYTES + PAGE_BYTES),
                  (2 * GRANULE_BYTES + PAGE_BYTES, 2 * GRANULE_BYTES + 3 * PAGE_BYTES)]  # the last two merge
        for lo, hi in ranges:
            buf[lo:hi] = new[lo:hi]
        before = store.stats.bytes_written
        assert store.write_ranges("b", buf, ranges) == 5 * PAGE_BYTES
        assert store.stats.bytes_written - before == 5 * PAGE_BYTES + PAGE_BYTES  # + the header page
        out = aligned_buffer(n)
        assert store.read("b", out) == n  # verifies the whole record
        assert out[:n] == buf[:n]
        buf[0:10] = b"\0" * 10  # changed in the buffer, not in any range: the disk keeps the old bytes
        store.write_ranges("b", buf, [(PAGE_BYTES, 2 * PAGE_BYTES)])
        with pytest.raises(CorruptRecordError):
            store.read("b", aligned_buffer(n))
        for bad in ([(1, PAGE_BYTES)], [(0, 4 * GRANULE_BYTES)]):
            with pytest.raises(StoreError, match="not page-aligned inside"):
                store.write_ranges("b", buf, bad)

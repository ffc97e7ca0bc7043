"""ThreadedDirectIO and helpers: real files in tmp_path, exact byte counts."""

from __future__ import annotations

import errno
import os

import pytest
import torch

from ferrytune.errors import StoreError
from ferrytune.offload._io import (
    PAGE_BYTES, ThreadedDirectIO, aligned_buffer, as_uint8_tensor, is_direct, open_direct)


@pytest.fixture
def backend():
    io = ThreadedDirectIO(num_threads=4, chunk_bytes=64 << 10)  # small chunks: many pieces per request
    yield io
    io.close()


def _random_buffer(nbytes: int, seed: int):
    buf = aligned_buffer(nbytes)
    gen = torch.Generator().manual_seed(seed)
    as_uint8_tensor(buf).copy_(torch.randint(0, 256, (len(buf),), dtype=torch.uint8, generator=gen))
    return buf


def test_aligned_buffer_is_page_aligned_and_rounded():
    buf = aligned_buffer(5000)
    assert len(buf) == 2 * PAGE_BYTES
    assert as_uint8_tensor(buf).data_ptr() % PAGE_BYTES == 0


def test_round_trip_and_exact_stats(tmp_path, backend):
    fd = open_direct(tmp_path / "f.bin", write=True)
    try:
        assert is_direct(fd)
        src = _random_buffer(1 << 20 | PAGE_BYTES, seed=0)  # 257 pieces of 64 KiB + a partial one
        backend.write_from(fd, 3 * PAGE_BYTES, memoryview(src))
        dst = aligned_buffer(len(src))
        backend.read_into(fd, 3 * PAGE_BYTES, memoryview(dst))
        assert dst[:] == src[:]
    finally:
        os.close(fd)
    stats = backend.stats
    assert (stats.bytes_written, stats.bytes_read) == (len(src), len(src))
    assert (stats.num_writes, stats.num_reads) == (1, 1)
    assert stats.read_s > 0 and stats.write_s > 0


def test_chunk_fn_sees_every_piece_in_order(tmp_path, backend):
    fd = open_direct(tmp_path / "f.bin", write=True)
    try:
        src = _random_buffer(300 << 10, seed=1)
        got = backend.submit_write(fd, 0, memoryview(src), chunk_fn=lambda pos, v: (pos, v.nbytes)).result()
    finally:
        os.close(fd)
    assert got == [(0, 64 << 10), (64 << 10, 64 << 10), (128 << 10, 64 << 10),
                   (192 << 10, 64 << 10), (256 << 10, 44 << 10)]


@pytest.mark.parametrize("offset, nbytes, shift", [(100, PAGE_BYTES, 0), (0, 1000, 0), (0, PAGE_BYTES, 512)])
def test_unaligned_requests_raise_store_error(tmp_path, backend, offset, nbytes, shift):
    fd = open_direct(tmp_path / "f.bin", write=True)
    try:
        buf = memoryview(aligned_buffer(2 * PAGE_BYTES))[shift:shift + nbytes]
        with pytest.raises(StoreError, match="direct IO needs"):
            backend.write_from(fd, offset, buf)
        with pytest.raises(StoreError, match="direct IO needs"):
            backend.submit_read(fd, offset, buf)
    finally:
        os.close(fd)
    assert backend.stats.num_writes == 0


def test_read_past_end_of_file_is_a_short_read(tmp_path, backend):
    fd = open_direct(tmp_path / "f.bin", write=True)
    try:
        os.ftruncate(fd, PAGE_BYTES)
        with pytest.raises(StoreError, match="short read"):
            backend.read_into(fd, 0, memoryview(aligned_buffer(2 * PAGE_BYTES)))
    finally:
        os.close(fd)


def test_disk_full_is_reported_with_the_fix(tmp_path, backend, monkeypatch):
    def full(fd, bufs, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    fd = open_direct(tmp_path / "f.bin", write=True)
    monkeypatch.setattr(os, "pwritev", full)
    try:
        with pytest.raises(StoreError, match="disk full writing .*f.bin: free space or choose another "
                           "offload.nvme_dir"):
            backend.write_from(fd, 0, memoryview(aligned_buffer(PAGE_BYTES)))
    finally:
        os.close(fd)


def test_zero_byte_write_means_disk_full(tmp_path, backend, monkeypatch):
    fd = open_direct(tmp_path / "f.bin", write=True)
    monkeypatch.setattr(os, "pwritev", lambda fd, bufs, offset: 0)
    try:
        with pytest.raises(StoreError, match="disk full"):
            backend.write_from(fd, 0, memoryview(aligned_buffer(PAGE_BYTES)))
    finally:
        os.close(fd)


def test_short_writes_are_continued(tmp_path, backend, monkeypatch):
    real = os.pwritev
    monkeypatch.setattr(os, "pwritev", lambda fd, bufs, offset: real(fd, [bufs[0][:PAGE_BYTES]], offset))
    fd = open_direct(tmp_path / "f.bin", write=True)
    try:
        src = _random_buffer(5 * PAGE_BYTES, seed=2)
        backend.write_from(fd, 0, memoryview(src))
        monkeypatch.undo()
        dst = aligned_buffer(len(src))
        backend.read_into(fd, 0, memoryview(dst))
        assert dst[:] == src[:]
    finally:
        os.close(fd)


def test_buffered_fallback_when_o_direct_is_refused(tmp_path, backend, monkeypatch, caplog):
    real = os.open

    def no_direct(path, flags, *args):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(path, flags, *args)

    monkeypatch.setattr(os, "open", no_direct)
    fd = open_direct(tmp_path / "f.bin", write=True)
    monkeypatch.undo()
    try:
        assert not is_direct(fd)
        assert "refuses O_DIRECT" in caplog.text
        src = _random_buffer(4 * PAGE_BYTES, seed=3)
        backend.write_from(fd, 0, memoryview(src))
        dst = aligned_buffer(len(src))
        backend.read_into(fd, 0, memoryview(dst))
        assert dst[:] == src[:]
    finally:
        os.close(fd)


def test_open_missing_directory_raises_store_error(tmp_path):
    with pytest.raises(StoreError, match="cannot open"):
        open_direct(tmp_path / "missing" / "f.bin", write=True)

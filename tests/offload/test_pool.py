"""HostBufferPool: fixed allocation, blocking acquire, the buffer state machine."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from ferrytune.errors import FerrytuneError
from ferrytune.offload import _pool
from ferrytune.offload import HostBufferPool, PoolError


def test_buffers_are_aligned_rounded_and_counted():
    with HostBufferPool(3, 10_000, pin=False) as pool:
        assert pool.buffer_bytes == 12_288
        assert pool.total_bytes == 3 * 12_288
        bufs = [pool.acquire() for _ in range(3)]
        assert len({b.address for b in bufs}) == 3
        assert all(b.address % 4096 == 0 and b.nbytes == 12_288 for b in bufs)
        for b in bufs:
            pool.release(b)


def test_pool_never_allocates_after_construction(monkeypatch):
    calls = []
    real = _pool.aligned_buffer
    monkeypatch.setattr(_pool, "aligned_buffer", lambda n: calls.append(n) or real(n))
    with HostBufferPool(4, 8192, pin=False) as pool:
        assert len(calls) == 4
        for _ in range(50):
            bufs = [pool.acquire() for _ in range(4)]
            for b in bufs:
                pool.release(b)
        assert len(calls) == 4
        assert pool.stats.num_allocations == 4 and pool.stats.num_acquires == 200


def test_acquire_times_out_and_counts_the_wait():
    with HostBufferPool(1, 4096, pin=False) as pool:
        held = pool.acquire()
        with pytest.raises(FerrytuneError, match="no host buffer free after 0.05 s"):
            pool.acquire(timeout_s=0.05)
        stats = pool.stats
        assert stats.num_waits == 1 and stats.wait_s >= 0.04
        pool.release(held)


def test_acquire_blocks_until_release():
    with HostBufferPool(1, 4096, pin=False) as pool:
        held = pool.acquire()
        got = []
        waiter = threading.Thread(target=lambda: got.append(pool.acquire(timeout_s=10)))
        waiter.start()
        time.sleep(0.05)
        assert not got  # still blocked
        pool.release(held)
        waiter.join(timeout=10)
        assert got and got[0] is held and got[0].held
        assert pool.stats.num_waits == 1
        pool.release(got[0])


def test_double_release_raises():
    with HostBufferPool(1, 4096, pin=False) as pool:
        buf = pool.acquire()
        assert buf.held
        pool.release(buf)
        assert not buf.held
        with pytest.raises(PoolError, match="released twice"):
            pool.release(buf)
        assert pool.num_free == 1


def test_release_into_the_wrong_pool_raises():
    with HostBufferPool(1, 4096, pin=False) as a, HostBufferPool(1, 4096, pin=False) as b:
        buf = a.acquire()
        with pytest.raises(PoolError, match="does not belong"):
            b.release(buf)
        a.release(buf)


def test_tensor_views_share_memory_and_check_bounds():
    with HostBufferPool(1, 4096, pin=False) as pool:
        buf = pool.acquire()
        t = buf.tensor(torch.float32, 4, offset=8)
        t.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
        assert torch.equal(buf.tensor(torch.float32, 6), torch.tensor([0, 0, 1.0, 2, 3, 4]))
        assert bytes(buf.view[8:12]) == torch.tensor([1.0]).numpy().tobytes()
        with pytest.raises(ValueError, match="does not fit"):
            buf.tensor(torch.float32, 1025)
        with pytest.raises(ValueError, match="multiple of 2"):
            buf.tensor(torch.bfloat16, 1, offset=3)
        del t
        pool.release(buf)


def test_pin_without_cuda_is_a_noop(caplog):
    caplog.set_level("DEBUG", logger="ferrytune.offload._pool")
    if torch.cuda.is_available():
        pytest.skip("CUDA present: pinning is real here")
    with HostBufferPool(2, 4096, pin=True) as pool:
        assert not pool.pinned
    assert "CUDA is not available" in caplog.text


def test_failed_pin_warns_and_continues(monkeypatch, caplog):
    class FakeCudart:
        def cudaHostRegister(self, ptr, size, flags):
            return 2  # cudaErrorMemoryAllocation

        def cudaHostUnregister(self, ptr):
            return 0

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "cudart", lambda: FakeCudart())
    with HostBufferPool(2, 4096, pin=True) as pool:
        assert not pool.pinned
        pool.release(pool.acquire())
    assert "cudaHostRegister" in caplog.text and "pageable" in caplog.text


def test_close_wakes_waiters():
    pool = HostBufferPool(1, 4096, pin=False)
    pool.acquire()
    errors = []

    def wait():
        try:
            pool.acquire(timeout_s=10)
        except FerrytuneError as exc:
            errors.append(exc)

    waiter = threading.Thread(target=wait)
    waiter.start()
    time.sleep(0.05)
    pool.close()
    waiter.join(timeout=10)
    assert errors and "closed" in str(errors[0])


def test_successful_pin_registers_and_unregisters_every_buffer(monkeypatch):
    calls = []

    class FakeCudart:
        def cudaHostRegister(self, ptr, size, flags):
            calls.append(("register", ptr, size))
            return 0

        def cudaHostUnregister(self, ptr):
            calls.append(("unregister", ptr))
            return 0

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "cudart", lambda: FakeCudart())
    pool = HostBufferPool(2, 5000, pin=True)
    assert pool.pinned
    pool.close()
    addresses = [b.address for b in pool._buffers]
    assert calls == [("register", a, 8192) for a in addresses] + [("unregister", a) for a in addresses]

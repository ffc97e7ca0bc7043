"""The streamer's own machinery: the checked slot machine, the pure slot choice, and that close()
releases every thread, file and buffer it opened."""

from __future__ import annotations

import os
import threading

import pytest
import torch

from ferrytune.offload import (MOVES, BlockSize, SlotState, SlotView, StreamerError, build_streamer,
                               choose_slot, make_plan)
from ferrytune.offload._ferry import Slot, _move

NUMEL = {"outer": 300, "layers.0": 1000, "layers.1": 999, "layers.2": 1000}


def _plan(tier: str, store=torch.float32):
    es = torch.empty((), dtype=store).element_size()
    sizes = {b: BlockSize(n * es, n * 4) for b, n in NUMEL.items()}
    return make_plan(sizes, outer_block="outer", tier=tier, prefetch_depth=1, device_budget_bytes=None,
                     host_budget_bytes=None, zero_copy=store == torch.float32)


def _init(b, flat):
    flat.copy_(torch.arange(flat.numel(), dtype=torch.float32).to(flat.dtype) + len(b))


def test_every_transition_outside_the_table_is_refused():
    for old in SlotState:
        for new in SlotState:
            slot = Slot(0, torch.empty(1), None, state=old)
            if new in MOVES[old]:
                _move(slot, new)
                assert slot.state is new
            else:
                with pytest.raises(StreamerError, match=f"{old.name} to {new.name}"):
                    _move(slot, new)
                assert slot.state is old


def test_slot_choice_is_a_pure_function_of_holds_refs_and_release_order():
    slots = [SlotView(0, "a", 1, 5), SlotView(1, None, 0, 3), SlotView(2, "c", 0, 1)]
    assert choose_slot(slots, "a") == (True, 0)  # clean contents serve again, even while in use
    assert choose_slot(slots, "c") == (True, 2)
    assert choose_slot(slots, "z") == (False, 2)  # least recently released unclaimed slot
    assert choose_slot([SlotView(0, None, 0, 4), SlotView(1, None, 0, 2)], "z") == (False, 1)
    with pytest.raises(StreamerError, match="no free slot"):
        choose_slot([SlotView(0, "a", 1, 0)], "z")


def _open_fds_under(path) -> list[str]:
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(path)):
            out.append(target)
    return out


@pytest.mark.parametrize("tier,store", [("nvme", torch.float32), ("nvme", torch.bfloat16), ("host", torch.bfloat16)])
def test_a_pass_then_close_releases_threads_files_and_buffers(tmp_path, tier, store):
    threads_before = {t.ident for t in threading.enumerate()}
    s = build_streamer(_plan(tier, store), NUMEL, device="cpu", compute_dtype=torch.float32, store_dtype=store,
                       nvme_dir=str(tmp_path / "nvme"), io_threads=2)
    s.open(_init)
    order = list(NUMEL)
    s.start_pass(order)
    for b in order:
        s.acquire(b).add_(1.0)
        s.release(b, dirty=True)
    s.finish_pass()
    out = torch.empty(NUMEL["layers.1"], dtype=store)
    s.read_master("layers.1", out)
    start = (torch.arange(NUMEL["layers.1"], dtype=torch.float32) + len("layers.1")).to(store)  # the master
    assert torch.equal(out, (start.float() + 1.0).to(store))  # its working copy + 1, stored back
    if tier == "nvme":
        assert _open_fds_under(tmp_path / "nvme")  # the store's files are open while the streamer is
    s.close()
    assert _open_fds_under(tmp_path) == []
    assert {t.ident for t in threading.enumerate()} <= threads_before  # loaders and writer joined
    s.close()  # idempotent


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("VmRSS:"))


def test_close_gives_the_host_arena_back_while_the_streamer_is_still_referenced():
    # The arena must not wait for the garbage collector to break a trainer's reference cycles:
    # a benchmark running several trainers one after another held one arena too many (6 GiB).
    numel = {"outer": 1 << 20, **{f"layers.{i}": 16 << 20 for i in range(4)}}  # 130 MiB of bf16 masters
    sizes = {b: BlockSize(n * 2, n * 4) for b, n in numel.items()}
    plan = make_plan(sizes, outer_block="outer", tier="host", prefetch_depth=1, device_budget_bytes=None,
                     host_budget_bytes=None, zero_copy=False)
    s = build_streamer(plan, numel, device="cpu", compute_dtype=torch.float32, store_dtype=torch.bfloat16)
    s.open(lambda b, flat: flat.fill_(1.0))  # every page of the arena touched
    arena = s.host_bytes()
    before = _rss_bytes()
    s.close()
    assert before - _rss_bytes() > 0.8 * arena, (before, _rss_bytes(), arena)
    assert s.host_bytes() == 0


def test_close_after_a_failed_write_back_still_releases_everything(tmp_path):
    threads_before = {t.ident for t in threading.enumerate()}
    s = build_streamer(_plan("nvme"), NUMEL, device="cpu", compute_dtype=torch.float32, store_dtype=torch.float32,
                       nvme_dir=str(tmp_path / "nvme"), io_threads=2)
    s.open(_init)
    store = s.nvme_store

    def broken(*a, **k):
        raise OSError(28, "No space left on device")

    store.write = broken
    s.start_pass(["outer"])
    s.acquire("outer")
    s.release("outer", dirty=True)
    with pytest.raises(OSError, match="No space left"):
        s.close()  # the write's error surfaces here, after everything is released
    assert _open_fds_under(tmp_path) == []
    assert {t.ident for t in threading.enumerate()} <= threads_before  # loaders and writer joined


def test_out_of_order_acquire_is_refused(tmp_path):
    s = build_streamer(_plan("host"), NUMEL, device="cpu", compute_dtype=torch.float32, store_dtype=torch.float32)
    s.open(_init)
    try:
        s.start_pass(["outer", "layers.0"])
        with pytest.raises(StreamerError, match=r"acquire\(layers.0\) out of order, expected outer"):
            s.acquire("layers.0")
        s.abort_pass()
    finally:
        s.close()


def test_resident_tier_with_equal_dtypes_allocates_no_slot_on_any_device():
    """On CUDA too: the masters are the working copies, so the plan has no ring and no outer slot."""
    from types import SimpleNamespace

    from ferrytune.config import OffloadConfig
    from ferrytune.engine._runtime import plan_for
    from ferrytune.models import OUTER

    blocks = {OUTER: SimpleNamespace(numel=300), "layer.0": SimpleNamespace(numel=1000)}
    layout = SimpleNamespace(blocks=blocks)
    off = OffloadConfig(tier="resident")
    for dev in ("cpu", "cuda"):
        plan = plan_for(off, layout, compute=torch.float32, store=torch.float32, device=torch.device(dev))
        assert plan.ring_size == 0 and plan.zero_copy
        assert plan.device_bytes == 1300 * 4  # the masters, nothing more
    plan = plan_for(off, layout, compute=torch.float32, store=torch.bfloat16, device=torch.device("cuda"))
    assert plan.ring_size == off.prefetch_depth + 2 and not plan.zero_copy  # bf16 masters: fp32 working copies
    s = build_streamer(_plan("resident"), NUMEL, device="cpu", compute_dtype=torch.float32, store_dtype=torch.float32)
    s.open(_init)
    try:
        assert s._slots == [] and s._outer_slot is None and all(s.stays_resident(b) for b in NUMEL)
    finally:
        s.close()

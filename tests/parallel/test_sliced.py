"""Sliced block loading: the same blocks as whole loading, with ~1/N of the tier traffic per rank."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from dist_testlib import assert_same_weights, config_dict, free_port, metrics, run_single, torchrun, write_config

from ferrytune.data import demo_data_path
from ferrytune.offload import BlockSize, Tier, build_streamer, make_plan
from ferrytune.parallel import Mesh, SlicedLoading, new_side_group

# odd sizes: padding on the last rank, and a block smaller than the world (empty slices)
NUMEL = {"outer": 1001, "layers.0": 777, "layers.1": 3, "layers.2": 4099}


def _values(b: str, flat: torch.Tensor) -> None:
    g = torch.Generator().manual_seed(sum(map(ord, b)))
    flat.copy_(torch.randn(flat.numel(), generator=g).to(flat.dtype))


def _streamer(plan, store_dtype, nvme_dir, slicing=None):
    return build_streamer(plan, NUMEL, device=torch.device("cpu"), compute_dtype=torch.float32,
                          store_dtype=store_dtype, nvme_dir=str(nvme_dir), io_threads=2, slicing=slicing)


VARIANTS = [("nvme", "float32"), ("host", "bfloat16"), ("nvme", "bfloat16")]  # zero-copy NVMe, host, staged NVMe


def _same_blocks_worker(rank: int, world: int, port: int, tmp: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        for tier, store in VARIANTS:
            _check_variant(Mesh(world, rank, data=world, perturbation=1), tier, store, f"{tmp}/{tier}-{store}")
    finally:
        dist.destroy_process_group()


def _check_variant(mesh: Mesh, tier: str, store: str, tmp: str) -> None:
    rank, world = mesh.rank, mesh.world_size
    store_dtype = getattr(torch, store)
    es = torch.empty((), dtype=store_dtype).element_size()
    sizes = {b: BlockSize(n * es, n * 4) for b, n in NUMEL.items()}
    plan = make_plan(sizes, outer_block="outer", tier=tier, prefetch_depth=2, device_budget_bytes=None,
                     host_budget_bytes=None, zero_copy=store_dtype == torch.float32)
    whole = _streamer(plan, store_dtype, f"{tmp}/whole{rank}")
    sliced = _streamer(plan, store_dtype, f"{tmp}/sliced{rank}", slicing=SlicedLoading(mesh, new_side_group(mesh)))
    whole.open(_values)
    sliced.open(_values)
    order = list(NUMEL)
    for step in range(3):  # dirty passes (a ZO step), then a clean one (evaluation)
        dirty = step < 2
        whole.start_pass(order)
        sliced.start_pass(order)
        for b in order:
            a, c = whole.acquire(b), sliced.acquire(b)
            assert torch.equal(a, c), f"rank {rank} step {step}: block {b} differs"
            if dirty:
                for t in (a, c):
                    t.mul_(-2.0).add_(1.0)  # an "update"; both streamers round it to the store dtype alike
            whole.release(b, dirty=dirty)
            sliced.release(b, dirty=dirty)
        whole.finish_pass()
        sliced.finish_pass()
    for b in order:
        x = torch.empty(NUMEL[b], dtype=store_dtype)
        y = torch.empty(NUMEL[b], dtype=store_dtype)
        whole.read_master(b, x)
        sliced.read_master(b, y)  # collective: every rank calls it
        assert torch.equal(x, y), f"rank {rank}: master of {b} differs"
    home = Tier(plan.home["layers.2"]).value
    per_pass_whole = sum(n * es for b, n in NUMEL.items() if plan.home[b] == Tier(home))
    per_pass_sliced = sum(math.ceil(n / world) * es for b, n in NUMEL.items() if plan.home[b] == Tier(home))
    assert whole.stats.bytes_read[home] == 3 * per_pass_whole
    assert sliced.stats.bytes_read[home] == 3 * per_pass_sliced
    whole.close()
    sliced.close()


def test_sliced_streamer_gives_the_same_blocks_as_whole_loading(tmp_path):
    mp.spawn(_same_blocks_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)


def test_sliced_zo_run_resumed_on_two_ranks_equals_single_process(tiny_models, tmp_path):
    """1 process to a checkpoint at step 2, resumed by 2 sliced ranks to step 5 == 5 whole steps in 1 process.

    Also: each rank reads ceil(n / 2) of every NVMe block per step (half, plus padding).
    """
    model = tiny_models("llama", layers=2, hidden=32)
    # 5 eval chunks of 2: the ranks get 3 and 2 (the short rank runs a padding pass)
    job = {"model": {"path": model, "store_dtype": "bfloat16"},
           "data": {"eval": str(demo_data_path("dev")), "eval_samples": 10}}
    out = tmp_path / "run"
    nvme = {"tier": "nvme", "nvme_dir": str(tmp_path / "nvme")}
    first = config_dict(model, out, **job, offload=nvme, train={"steps": 3, "checkpoint_every_steps": 2})
    run_single(first)
    d = config_dict(model, out, **job, offload=nvme, resume="auto", train={"steps": 5},
                    parallel={"data": 2, "sliced_loading": True, "check_every_steps": 1})
    torchrun(write_config(d, tmp_path / "sliced.yaml"), 2)
    ref = config_dict(model, tmp_path / "ref", **job, offload={**nvme, "nvme_dir": str(tmp_path / "nvme-ref")},
                      train={"steps": 5})
    run_single(ref)
    assert_same_weights(tmp_path / "ref" / "final", out / "final")
    m_ref = {r["step"]: r for r in metrics(tmp_path / "ref") if "loss" in r}
    m_dist = {r["step"]: r for r in metrics(out) if "loss" in r}
    for step in (3, 4, 5):
        assert m_dist[step]["loss"] == m_ref[step]["loss"]
        whole, sliced = m_ref[step]["bytes_read_nvme"], m_dist[step]["bytes_read_nvme"]
        assert whole > 0 and 0.5 <= sliced / whole <= 0.5 + 1e-3, (sliced, whole)
    ev_ref = [r for r in metrics(tmp_path / "ref") if "eval_loss" in r][-1]
    ev_dist = [r for r in metrics(out) if "eval_loss" in r][-1]
    assert ev_dist["eval_samples"] == ev_ref["eval_samples"] == 10
    assert ev_dist["eval_loss"] == pytest.approx(ev_ref["eval_loss"], rel=1e-12)

"""The (data x perturbation) process mesh and the few collectives ferrytune needs.

DistZO2 (the paper; its code is not released) lays ranks out on two axes:
*perturbation parallel* ranks share one batch and split the ``+εz`` / ``-εz``
forwards between them; *data parallel* ranks split the batch. Rank
``r = dp_rank * perturbation + pp_rank``. Only scalars (the per-micro-batch
loss sums) cross the wire for ZO; parameters never do, because every rank
regenerates the same z from the counter-based generator.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from ferrytune.errors import ConfigError, DistributedError

logger = logging.getLogger(__name__)

COLLECTIVE_TIMEOUT_S = 300


@dataclass(frozen=True)
class Mesh:
    world_size: int = 1
    rank: int = 0
    data: int = 1
    perturbation: int = 1

    @property
    def dp_rank(self) -> int:
        return self.rank // self.perturbation

    @property
    def pp_rank(self) -> int:
        return self.rank % self.perturbation

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_mesh(parallel_cfg, *, device: str) -> Mesh:
    """Join the process group torchrun (or Ray) set up through the environment."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    want = parallel_cfg.data * parallel_cfg.perturbation
    if world != want:
        raise ConfigError(
            f"parallel.data x parallel.perturbation = {parallel_cfg.data} x {parallel_cfg.perturbation} = {want} "
            f"but {world} process(es) were started; launch with torchrun --nproc-per-node {want} or change parallel.*")
    if world > 1 and not dist.is_initialized():
        backend = parallel_cfg.backend
        if backend == "auto":
            backend = "nccl" if device == "cuda" else "gloo"
        if device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    return Mesh(world, rank, parallel_cfg.data, parallel_cfg.perturbation)


def all_reduce_sum_(t: torch.Tensor, mesh: Mesh) -> torch.Tensor:
    if mesh.distributed:
        try:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        except RuntimeError as e:
            raise DistributedError(f"rank {mesh.rank}: all_reduce failed ({str(e).splitlines()[0]}); "
                                   "another rank probably died — see its log") from e
    return t


def broadcast_object(obj, mesh: Mesh):
    if not mesh.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(mesh: Mesh) -> None:
    if mesh.distributed:
        dist.barrier()


def shutdown(mesh: Mesh) -> None:
    if mesh.distributed and dist.is_initialized():
        dist.destroy_process_group()

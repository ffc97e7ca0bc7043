"""The (data x perturbation) process mesh and the few collectives ferrytune needs.

DistZO2 (the paper; its code is not released) lays ranks out on two axes:
*perturbation parallel* ranks share one batch and split the ``+εz`` / ``-εz``
forwards between them; *data parallel* ranks split the batch. Rank
``r = dp_rank * perturbation + pp_rank``. Only scalars (the per-micro-batch
loss sums) cross the wire for ZO; parameters never do, because every rank
regenerates the same z from the counter-based generator.

The process group comes from the launcher: torchrun publishes ``RANK`` /
``WORLD_SIZE`` / ``MASTER_ADDR`` in the environment (the ``env://`` rendezvous),
Ray Train initialises ``torch.distributed`` itself before calling the training
function. :func:`init_mesh` accepts both; reading those launcher variables is
the rendezvous protocol, not a ferrytune setting.
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

COLLECTIVE_TIMEOUT_S = 300  # a rank that waits this long on a peer gives up (the default for init_mesh)


@dataclass(frozen=True)
class Mesh:
    world_size: int = 1
    rank: int = 0
    data: int = 1
    perturbation: int = 1
    owns_group: bool = False  # init_mesh created the process group (and shutdown destroys it)
    collective_timeout_s: float = COLLECTIVE_TIMEOUT_S  # also bounds the groups made later (new_side_group)
    comm_device: str = "cpu"  # where the backend's collectives take their tensors: "cpu" (gloo), "cuda:N" (nccl)

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


def launched_world_size() -> int:
    """How many processes this launch has: the adopted group's size (Ray Train), else torchrun's ``WORLD_SIZE``."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_mesh(parallel_cfg, *, device: str, timeout_s: float = COLLECTIVE_TIMEOUT_S) -> Mesh:
    """Join (or adopt) the process group of this launch and check it matches ``parallel.*``.

    An already initialised ``torch.distributed`` group (Ray Train, a test harness)
    is adopted as is: rank and world size are read from it. Otherwise the
    launcher's environment decides (torchrun); a plain ``python`` start is rank 0
    of 1. ``timeout_s`` bounds every collective, so the survivors of a dead rank
    fail instead of hanging.
    """
    want = parallel_cfg.data * parallel_cfg.perturbation
    if dist.is_available() and dist.is_initialized():
        world, rank, owns = dist.get_world_size(), dist.get_rank(), False
    else:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        owns = world > 1
    if world != want:
        raise ConfigError(
            f"parallel.data x parallel.perturbation = {parallel_cfg.data} x {parallel_cfg.perturbation} = {want} "
            f"but {world} process(es) were started; launch with torchrun --nproc-per-node {want} or change parallel.*")
    comm = "cpu"
    if owns:
        backend = parallel_cfg.backend
        if backend == "auto":
            backend = "nccl" if device == "cuda" else "gloo"
        if device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        if backend == "nccl":
            comm = f"cuda:{torch.cuda.current_device()}"
        _import_group_snapshotters()
        try:
            dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
        except (RuntimeError, ValueError) as e:
            raise DistributedError(f"rank {rank}: could not join the process group ({_first_line(e)}); "
                                   "check MASTER_ADDR/MASTER_PORT or the torchrun rendezvous") from e
    elif world > 1 and dist.get_backend() == "nccl":  # adopted (Ray Train): its device is the current one
        comm = f"cuda:{torch.cuda.current_device()}"
    return Mesh(world, rank, parallel_cfg.data, parallel_cfg.perturbation, owns, timeout_s, comm)


def _import_group_snapshotters() -> None:
    """Import, before the group exists, the modules that take a reference to it at import time.

    ``torch._dynamo`` (imported by ``transformers.modeling_utils``, so by every trainer) keeps
    references to the objects ``torch.distributed`` holds when it is first imported, the default
    process group among them, for the life of the process. A group created before that import is
    then never freed by ``destroy_process_group``: its gloo threads (``pt_gloo_runloop``,
    ``gloo_tcp_loop``) are still running when the interpreter exits, and the C++ runtime aborts
    the process (``terminate called without an active exception``, exit -6) although it trained.
    Imported first, dynamo sees no group, and ``shutdown`` frees the group and joins its threads.
    """
    import torch._dynamo  # noqa: F401


def new_side_group(mesh: Mesh):
    """A second group over all ranks, for collectives issued from a background thread.

    Collectives of one group must be issued in the same order on every rank;
    a thread of its own (the streamer's ferry thread) therefore needs a group of
    its own, so that its all-gathers never interleave with the main thread's
    all-reduces. Every rank must call this at the same point (it is collective).
    """
    if not mesh.distributed:
        return None
    return dist.new_group(ranks=list(range(mesh.world_size)), timeout=timedelta(seconds=mesh.collective_timeout_s))


def placed(t: torch.Tensor, mesh: Mesh) -> torch.Tensor:
    """``t`` where the backend's collectives take it: itself if it is there, else a copy (nccl
    refuses CPU tensors; the loss tables and digests are built on the CPU). Every collective
    below goes through this one function."""
    dev = torch.device(mesh.comm_device)
    return t if t.device == dev else t.to(dev)


def all_reduce_sum_(t: torch.Tensor, mesh: Mesh, *, group=None) -> torch.Tensor:
    """Sum ``t`` over all ranks in place (a no-op on one process)."""
    if mesh.distributed:
        buf = placed(t, mesh)
        _guard(mesh, "all_reduce", lambda: dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group))
        if buf is not t:
            t.copy_(buf)
    return t


def all_gather_tensor(t: torch.Tensor, mesh: Mesh, *, group=None) -> list[torch.Tensor]:
    """Every rank's ``t`` (same shape and dtype on all ranks), indexed by rank, on ``t``'s device."""
    if not mesh.distributed:
        return [t]
    buf = placed(t, mesh)
    out = [torch.empty_like(buf) for _ in range(mesh.world_size)]
    _guard(mesh, "all_gather", lambda: dist.all_gather(out, buf, group=group))
    return [o.to(t.device) for o in out]


def broadcast_object(obj, mesh: Mesh):
    if not mesh.distributed:
        return obj
    box = [obj]
    dev = torch.device(mesh.comm_device)
    _guard(mesh, "broadcast", lambda: dist.broadcast_object_list(box, src=0, device=dev))
    return box[0]


def barrier(mesh: Mesh) -> None:
    if mesh.distributed:
        _guard(mesh, "barrier", dist.barrier)


def shutdown(mesh: Mesh) -> None:
    """Leave the process group, if this process created it (Ray Train tears down its own)."""
    if mesh.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def _guard(mesh: Mesh, what: str, fn) -> None:
    # gloo reports a dead peer as a RuntimeError (connection reset, or the timeout);
    # turn it into one line that tells the user where to look.
    try:
        fn()
    except (RuntimeError, dist.DistBackendError) as e:
        raise DistributedError(f"rank {mesh.rank}: {what} failed ({_first_line(e)}); "
                               "another rank probably died or timed out — see its log") from e


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__

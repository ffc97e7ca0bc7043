"""Cheap rank-agreement checks: do all ranks still train one model?

Every rank of a ZO job must hold bit-identical weights: nothing but loss scalars
crosses the wire, so a rank that silently diverges (another config, another
library version, a nondeterministic kernel) would keep training a different
model and nobody would notice. Each rank therefore folds what it must agree on
into a running digest — the projected gradients and learning rate of every
step (LoRA: the reduced loss) — and every ``parallel.check_every_steps`` steps
and at the end adds a fingerprint of its state (a strided sample of a few
parameters, and the first values of this step's z) and all-gathers the 8-byte
digest. Any difference raises :class:`DistributedError` on every rank, naming
the step and the ranks. Cost per check: one all-gather of 16 bytes plus the
sample (ZO: reading two blocks' masters).

With sliced loading the ranks' homes hold disjoint slices, so a parameter
sample would compare nothing; the z sample and the gradient digest carry the
check there (a rank with another seed, eps, lr or kernel still shows).
"""

from __future__ import annotations

import hashlib
import logging
import struct

import torch

from ferrytune.errors import DistributedError
from ferrytune.parallel._mesh import Mesh, all_gather_tensor

logger = logging.getLogger(__name__)

SAMPLE_NUMEL = 1024  # parameter values per sampled block
Z_SAMPLE_NUMEL = 16


class AgreementCheck:
    """A running digest per rank, compared across ranks on :meth:`check`."""

    def __init__(self, mesh: Mesh, *, every_steps: int) -> None:
        self.mesh = mesh
        self.every_steps = every_steps
        self._h = hashlib.blake2b(digest_size=8)

    def update(self, *values: float) -> None:
        """Fold float scalars (exact bits) into the digest."""
        self._h.update(struct.pack(f"<{len(values)}d", *values))

    def due(self, step: int) -> bool:
        """Whether the check runs after ``step`` steps (a no-op on one process)."""
        return self.mesh.distributed and step % self.every_steps == 0

    def digest(self, *, sample: torch.Tensor | None = None) -> int:
        h = self._h.copy()
        if sample is not None:
            h.update(sample.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return int.from_bytes(h.digest(), "little", signed=True)

    def check(self, step: int, *, sample: torch.Tensor | None = None) -> None:
        """Collective: every rank calls it after the same step. Raises on disagreement."""
        if not self.mesh.distributed:
            return
        mine = torch.tensor([step, self.digest(sample=sample)], dtype=torch.int64)
        rows = [t.tolist() for t in all_gather_tensor(mine, self.mesh)]
        bad = disagreeing_ranks(rows)
        if bad:
            raise DistributedError(
                f"ranks disagree at step {step}: rank(s) {', '.join(map(str, bad))} differ from rank 0 "
                f"(digest of projected gradients, learning rates and a parameter sample; "
                f"checked every parallel.check_every_steps={self.every_steps}); make sure every rank runs the same "
                "config, ferrytune and torch versions")
        logger.debug("step %d: %d ranks agree (digest %016x)", step, self.mesh.world_size, rows[0][1] & (2**64 - 1))


def disagreeing_ranks(rows: list[list[int]]) -> list[int]:
    """Ranks whose ``[step, digest]`` row differs from rank 0's (pure; unit-testable)."""
    return [r for r, row in enumerate(rows) if row != rows[0]]


def zo_sample(engine, *, step: int, with_params: bool) -> torch.Tensor:
    """The ZO fingerprint: this step's first z values, and a strided sample of the first and last layer.

    Reads two blocks' masters between steps (the streamer must be idle): they
    are identical on all ranks even while an update is pending, since every
    rank holds the same pending update.
    """
    from ferrytune.kernels import PerturbKey, perturbation

    h = engine.h
    pid = engine.layout.params[0].param_id
    z = perturbation(PerturbKey(h.seed, step, 0, pid), (Z_SAMPLE_NUMEL,), dist=h.distribution,
                     device=engine.device).float().cpu()
    parts = [z]
    if with_params:
        streamer, layout = engine.streamer, engine.layout
        blocks = layout.layer_blocks or list(layout.blocks)
        for b in dict.fromkeys([blocks[0], blocks[-1]]):
            n = layout.blocks[b].numel
            flat = torch.empty(n, dtype=streamer.store_dtype)
            streamer.read_master(b, flat)
            parts.append(flat[:: max(n // SAMPLE_NUMEL, 1)].float())
    return torch.cat(parts)


def adapter_sample(params: list[torch.Tensor]) -> torch.Tensor:
    """A strided sample of every adapter tensor (resident, so this costs no IO)."""
    return torch.cat([p.detach().reshape(-1)[:: max(p.numel() // 64, 1)].float().cpu() for p in params])

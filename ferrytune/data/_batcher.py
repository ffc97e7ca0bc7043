"""Deterministic, resumable batching: a step's data is a pure function of (seed, step).

The examples form an endless stream, epoch after epoch; epoch ``e`` visits them in
the order ``torch.randperm(N, generator=torch.Generator().manual_seed(seed * 1_000_003 + e))``
(identity when ``shuffle=False``). Step ``s`` takes stream items
``[s * G, (s + 1) * G)`` for global batch size G, so an epoch's last partial batch
continues into the next epoch and every step is full. There is no cursor: resuming
at step N needs only N.

Each global batch is cut, in order, into ``G // micro_batch_size`` micro-batches.
Data-parallel rank r of W takes the micro-batches with ``index % W == r`` (round
robin), so W must divide the number of micro-batches and every rank runs the same
number of equally shaped forwards. All micro-batches of a step are padded to the
longest example of the *global* batch, so shapes also agree across ranks.
"""

from __future__ import annotations

from typing import Iterator, Sequence, TypeVar

import torch

from ferrytune.data._batch import Batch, collate
from ferrytune.data._encode import Example
from ferrytune.errors import ConfigError

T = TypeVar("T")
_SEED_STRIDE = 1_000_003  # prime: (seed, epoch) pairs map to distinct generator seeds
_CACHED_EPOCHS = 4


def shard(micro_batches: Sequence[T], rank: int, world_size: int) -> list[T]:
    """Rank ``rank``'s share: the items with ``index % world_size == rank``, in order."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} out of range for world_size {world_size}")
    if len(micro_batches) % world_size != 0:
        raise ConfigError(
            f"train.micro_batch_size: {len(micro_batches)} micro-batches per step cannot be shared evenly by"
            f" {world_size} data-parallel ranks; make batch_size / micro_batch_size a multiple of {world_size}"
        )
    return list(micro_batches[rank::world_size])


class Batcher:
    """Micro-batches for any step, identical on every rank and across restarts."""

    def __init__(
        self,
        examples: Sequence[Example],
        *,
        global_batch_size: int,
        micro_batch_size: int | None = None,
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        micro = global_batch_size if micro_batch_size is None else micro_batch_size
        if not examples:
            raise ValueError("Batcher needs at least one example")
        if global_batch_size <= 0 or micro <= 0:
            raise ConfigError(f"train.batch_size / train.micro_batch_size: must be > 0 (got {global_batch_size} / {micro})")
        if global_batch_size % micro != 0:
            raise ConfigError(f"train.micro_batch_size: must divide train.batch_size (got {micro}, batch_size {global_batch_size})")
        self.examples = list(examples)
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro
        self.num_micro_batches = global_batch_size // micro
        self.seed = seed
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size
        shard(range(self.num_micro_batches), rank, world_size)  # validates the split up front
        self._orders: dict[int, list[int]] = {}

    def __len__(self) -> int:
        return len(self.examples)

    def epoch_at(self, step: int) -> float:
        """Epochs completed before ``step`` (fractional), for logs."""
        return step * self.global_batch_size / len(self.examples)

    def indices_for_step(self, step: int) -> list[int]:
        """Example indices of the step's global batch, in stream order."""
        if step < 0:
            raise ValueError(f"step must be >= 0 (got {step})")
        n, g = len(self.examples), self.global_batch_size
        out = []
        for pos in range(step * g, (step + 1) * g):
            epoch, i = divmod(pos, n)
            out.append(self._order(epoch)[i])
        return out

    def batch_for_step(self, step: int) -> list[list[Example]]:
        """All micro-batches of the step's global batch (every rank's), in order."""
        batch = [self.examples[i] for i in self.indices_for_step(step)]
        m = self.micro_batch_size
        return [batch[k : k + m] for k in range(0, len(batch), m)]

    def local_batch_for_step(self, step: int) -> list[list[Example]]:
        """This rank's micro-batches of the step (see :func:`shard`)."""
        return shard(self.batch_for_step(step), self.rank, self.world_size)

    def batches_for_step(self, step: int, *, pad_id: int) -> list[Batch]:
        """This rank's micro-batches, collated and all padded to the global batch's longest."""
        micro_batches = self.batch_for_step(step)
        T = max(len(e.input_ids) for mb in micro_batches for e in mb)
        return [collate(mb, pad_id=pad_id, pad_to=T) for mb in shard(micro_batches, self.rank, self.world_size)]

    def _order(self, epoch: int) -> list[int]:
        order = self._orders.get(epoch)
        if order is None:
            n = len(self.examples)
            if self.shuffle:
                gen = torch.Generator().manual_seed(self.seed * _SEED_STRIDE + epoch)
                order = torch.randperm(n, generator=gen).tolist()
            else:
                order = list(range(n))
            if len(self._orders) >= _CACHED_EPOCHS:  # a step spans at most a few epochs
                self._orders.pop(min(self._orders))
            self._orders[epoch] = order
        return order


def eval_batches(examples: Sequence[Example], *, micro_batch_size: int, rank: int = 0, world_size: int = 1) -> Iterator[list[Example]]:
    """Evaluation micro-batches in file order, the last one possibly short.

    Rank r gets chunks ``r, r + W, ...``; ranks may get one chunk fewer than others,
    so sum per-sample results across ranks rather than averaging per rank.
    """
    chunks = range(0, len(examples), micro_batch_size)
    for k, start in enumerate(chunks):
        if k % world_size == rank:
            yield list(examples[start : start + micro_batch_size])

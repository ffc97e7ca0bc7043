"""Process groups and the distributed layouts of ferrytune.

* :func:`init_mesh` joins (or adopts) the ``data x perturbation`` process group;
* :func:`apply_sliced_loading` makes each rank's tier hold 1/N of every block;
* :class:`AgreementCheck` compares a digest of every rank's training state;

See ``docs/distributed.md``.
"""

from ferrytune.parallel._agreement import AgreementCheck, adapter_sample, disagreeing_ranks, zo_sample
from ferrytune.parallel._mesh import (
    COLLECTIVE_TIMEOUT_S,
    Mesh,
    all_gather_tensor,
    all_reduce_sum_,
    barrier,
    broadcast_object,
    init_mesh,
    new_side_group,
    shutdown,
)
from ferrytune.parallel._sliced import SlicedBlockStreamer, apply_sliced_loading


__all__ = [
    "COLLECTIVE_TIMEOUT_S", "AgreementCheck", "Mesh", "SlicedBlockStreamer", "adapter_sample", "all_gather_tensor",
    "all_reduce_sum_", "apply_sliced_loading", "barrier", "broadcast_object", "disagreeing_ranks", "init_mesh",
    "new_side_group", "shutdown", "zo_sample",
]

"""Process groups and the distributed layouts of ferrytune.

* :func:`launched_world_size`: the processes of this launch (torchrun's, or an adopted group's);
* :func:`init_mesh` joins (or adopts) the ``data x perturbation`` process group;
* :func:`sliced_loading` makes each rank's host/NVMe home hold 1/N of every block (a home
  wrapped around the tier's own, given to ``ferrytune.offload.build_streamer``);
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
    launched_world_size,
    new_side_group,
    placed,
    shutdown,
)
from ferrytune.parallel._sliced import SlicedHome, SlicedLoading, sliced_loading


__all__ = [
    "COLLECTIVE_TIMEOUT_S", "AgreementCheck", "Mesh", "SlicedHome", "SlicedLoading", "adapter_sample",
    "all_gather_tensor", "all_reduce_sum_", "sliced_loading", "barrier", "broadcast_object", "disagreeing_ranks", "init_mesh",
    "launched_world_size", "new_side_group", "placed", "shutdown", "zo_sample",
]

"""Where blocks live and how bytes move.

* ``make_plan`` (``_plan.py``, pure) gives every block a home tier and sizes the device ring;
* ``build_streamer`` (``_build.py``) is the one place a streamer is made: it picks each tier's
  home — ``DeviceHome``, ``HostArenaHome`` (one page-aligned host allocation), ``NvmeHome``
  (an O_DIRECT, checksummed ``NvmeBlockStore``) — and an optional ``Slicing`` that wraps them;
* ``BlockStreamer`` (``_ferry.py``) ferries working copies through device slots: slots, threads
  and events only, one checked slot machine (``MOVES``), slot reuse by a pure ``choose_slot``;
* ``Copier`` (``_copy.py``) moves every byte between host and device (streams and events on CUDA);
* ``make_io_backend`` (``_backends.py``): the IO backend of the NVMe home, ``ThreadedDirectIO`` (a thread
  pool of ``preadv``/``pwritev``) or DeepSpeed's libaio handle (``_aio.py``); ``HostBufferPool``
  (``_pool.py``) the fixed staging buffers.
"""

from ferrytune.offload._build import Slicing, build_streamer
from ferrytune.offload._copy import Copier
from ferrytune.offload._ferry import MOVES, BlockStreamer, SlotState, SlotView, StreamerError, StreamStats, choose_slot
from ferrytune.offload._home import Home
from ferrytune.offload._home_device import DeviceHome
from ferrytune.offload._home_host import HostArenaHome
from ferrytune.offload._home_nvme import NvmeHome
from ferrytune.offload._backends import IO_BACKENDS, make_io_backend
from ferrytune.offload._io import (PAGE_BYTES, IOBackend, IOStats, ThreadedDirectIO, aligned_buffer, as_uint8_tensor,
                                   default_checksum, is_direct, open_direct)
from ferrytune.offload._plan import GIB, BlockSize, Plan, Tier, make_plan
from ferrytune.offload._pool import HostBuffer, HostBufferPool, PoolError, PoolStats
from ferrytune.offload._store import NvmeBlockStore, RecordInfo

__all__ = [
    "GIB", "IO_BACKENDS", "MOVES", "PAGE_BYTES", "BlockSize", "BlockStreamer", "Copier", "DeviceHome", "Home", "HostArenaHome",
    "HostBuffer", "HostBufferPool", "IOBackend", "IOStats", "NvmeBlockStore", "NvmeHome", "Plan", "PoolError",
    "PoolStats", "RecordInfo", "Slicing", "SlotState", "SlotView", "StreamStats", "StreamerError",
    "ThreadedDirectIO", "Tier", "aligned_buffer", "as_uint8_tensor", "build_streamer", "choose_slot",
    "default_checksum", "is_direct", "make_io_backend", "make_plan", "open_direct",
]

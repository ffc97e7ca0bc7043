"""Where blocks live and how bytes move: IO backend, NVMe block store, host pool, planner, streamer."""

from ferrytune.offload._io import (IO_BACKENDS, PAGE_BYTES, IOBackend, IOStats, ThreadedDirectIO, aligned_buffer,
                                   as_uint8_tensor, default_checksum, is_direct, make_io_backend, open_direct)
from ferrytune.offload._plan import BlockSize, Plan, Tier, make_plan
from ferrytune.offload._pool import BufferState, BufferStateError, HostBuffer, HostBufferPool, PoolStats
from ferrytune.offload._store import NvmeBlockStore, RecordInfo
from ferrytune.offload._stream import BlockStreamer, SlotState, StreamStats

__all__ = [
    "IO_BACKENDS", "PAGE_BYTES", "BlockSize", "BlockStreamer", "BufferState", "BufferStateError", "HostBuffer",
    "HostBufferPool", "IOBackend", "IOStats", "NvmeBlockStore", "Plan", "PoolStats", "RecordInfo", "SlotState",
    "StreamStats", "ThreadedDirectIO", "Tier", "aligned_buffer", "as_uint8_tensor", "default_checksum", "is_direct",
    "make_io_backend", "make_plan", "open_direct",
]

"""``make_io_backend``: the IO backend ``offload.io_backend`` names (threads, DeepSpeed's libaio, auto).

Kept apart from both backends' modules (``_io.py``, ``_aio.py``), which it chooses between.
"""

from __future__ import annotations

import logging

from ferrytune.errors import FerrytuneError
from ferrytune.offload._io import IOBackend, ThreadedDirectIO

logger = logging.getLogger(__name__)

IO_BACKENDS = ("threads", "deepspeed_aio", "auto")
"""Values of ``offload.io_backend``."""


def make_io_backend(name: str = "threads", *, num_threads: int = 8) -> IOBackend:
    """The IO backend ``offload.io_backend`` names, with ``num_threads`` = ``offload.io_threads``.

    ``threads``: :class:`ThreadedDirectIO`. ``deepspeed_aio``: DeepSpeed's libaio handle
    (``ferrytune.offload._aio.DeepSpeedAIO``; its op is JIT-built on first use, minutes, then
    cached in ``TORCH_EXTENSIONS_DIR``); raises :class:`~ferrytune.errors.FerrytuneError`
    (one line naming the missing piece) when it cannot be built or loaded. ``auto``:
    ``deepspeed_aio`` when it loads, else ``threads`` (the reason is logged).
    """
    if name == "threads":
        logger.info("offload IO backend: threads (%d)", num_threads)
        return ThreadedDirectIO(num_threads=num_threads)
    if name not in IO_BACKENDS:
        raise FerrytuneError(f"offload.io_backend must be one of {', '.join(IO_BACKENDS)}, got {name!r}")
    from ferrytune.offload._aio import DeepSpeedAIO  # imports DeepSpeed only when asked for
    if name == "deepspeed_aio":
        backend = DeepSpeedAIO(num_threads=num_threads)
    else:
        try:
            backend = DeepSpeedAIO(num_threads=num_threads)
        except FerrytuneError as exc:
            logger.info("offload IO backend: threads (%d); auto did not pick deepspeed_aio: %s", num_threads, exc)
            return ThreadedDirectIO(num_threads=num_threads)
    logger.info("offload IO backend: deepspeed_aio (parallelism %d)", num_threads)
    return backend

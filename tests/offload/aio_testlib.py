"""Shared by the DeepSpeed-backend tests: skip, with DeepSpeed's reason, where its aio op cannot load."""

from __future__ import annotations

import os

import pytest


def require_deepspeed_aio() -> None:
    """Skip the calling test unless DeepSpeed's async_io op loads (it is JIT-built on first use)."""
    from ferrytune.offload._aio import aio_available

    err = aio_available()
    if err is not None:
        if os.environ.get("FERRYTUNE_REQUIRE_AIO") == "1":  # CI: these tests must run
            pytest.fail(f"FERRYTUNE_REQUIRE_AIO=1 but DeepSpeed's async_io op cannot load: {err}")
        pytest.skip(f"DeepSpeed's async_io op cannot load here: {err}")

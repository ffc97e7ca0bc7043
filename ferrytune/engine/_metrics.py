"""Per-step metrics: one JSON line per step in ``metrics.jsonl`` and one dense log line."""

from __future__ import annotations

import json
import logging
import os
import resource
import time
from pathlib import Path

logger = logging.getLogger(__name__)


def host_rss_gib() -> tuple[float, float]:
    """(current, peak) resident set size of this process in GiB."""
    cur = peak = 0.0
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    cur = int(line.split()[1]) / 2**20
                elif line.startswith("VmHWM:"):
                    peak = int(line.split()[1]) / 2**20
    except OSError:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return cur, peak


def device_metrics(device) -> dict:
    """Accelerator memory and utilisation (CUDA only; empty on CPU).

    Memory comes from torch's allocator; utilisation from NVML via ``nvidia-ml-py``
    (imported as ``pynvml``), when it is installed.
    """
    import torch

    if getattr(device, "type", str(device)) != "cuda":
        return {}
    out = {"device_mem_gib": round(torch.cuda.memory_allocated(device) / 2**30, 4),
           "device_peak_mem_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 4)}
    handle = nvml_handle(device)
    if handle is not None:
        try:
            import pynvml

            out["gpu_util_pct"] = pynvml.nvmlDeviceGetUtilizationRates(handle).gpu
        except Exception:  # telemetry is best effort: NVML never stops training
            pass
    return out


_NVML: dict = {}


def nvml_handle(device):
    """NVML's handle of the GPU ``device`` is, found by UUID: NVML numbers all GPUs of the machine,
    torch only the visible ones (``CUDA_VISIBLE_DEVICES``), so an index would name another GPU.
    NVML is initialised once per process. None without ``nvidia-ml-py`` or NVML."""
    import torch

    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _NVML:
        try:
            import pynvml

            if not _NVML:
                pynvml.nvmlInit()
            uuid = str(torch.cuda.get_device_properties(index).uuid)
            _NVML[index] = pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else "GPU-" + uuid)
        except Exception as e:  # noqa: BLE001 - no NVML library, an old driver, ...
            logger.debug("no NVML handle for cuda:%d (%s); gpu_util_pct is not reported", index, e)
            _NVML[index] = None
    return _NVML[index]


def stream_delta(before: dict, after: dict) -> dict:
    """Per-step IO figures from two ``StreamStats.snapshot()`` dicts."""
    out = {}
    for key in ("bytes_read", "bytes_written"):
        for tier, v in after[key].items():
            out[f"{key}_{tier}"] = v - before[key][tier]
    for key in ("read_s", "write_s", "stall_s"):
        out[key] = round(after[key] - before[key], 4)
    out["cache_hits"] = after["cache_hits"] - before["cache_hits"]
    experts = after.get("bytes_by_expert") or {}
    if experts:  # routed-only MoE reads: bytes per "layer.i/e" this step (experts read at all)
        prev = before.get("bytes_by_expert") or {}
        delta = {k: v - prev.get(k, 0) for k, v in experts.items() if v != prev.get(k, 0)}
        out["expert_bytes_read"] = dict(sorted(delta.items()))
    return out


class MetricsWriter:
    """Appends to ``OUTPUT_DIR/metrics.jsonl`` (rank 0 only); resumed runs keep earlier lines.

    Every line gets ``wall_s``: seconds of the run since its trainer was set up, continued across
    resumes (from the last kept line), so accuracy can be read against training time.
    """

    def __init__(self, output_dir: str | Path, *, enabled: bool = True, start_step: int = 0) -> None:
        self.path = Path(output_dir) / "metrics.jsonl"
        self.enabled = enabled
        self._t0 = time.perf_counter()
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if start_step == 0 and self.path.exists():
                self.path.unlink()
            elif self.path.exists():  # drop lines of steps after the checkpoint we resume from
                keep = [ln for ln in self.path.read_text().splitlines()
                        if ln.strip() and json.loads(ln).get("step", 0) <= start_step]
                self.path.write_text("".join(k + "\n" for k in keep))
                self._t0 -= max([json.loads(k).get("wall_s", 0.0) for k in keep], default=0.0)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        record = {**record, "wall_s": round(time.perf_counter() - self._t0, 3)}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()


def format_line(rec: dict) -> str:
    """The dense per-step log line."""
    parts = [f"step {rec['step']}", f"loss {rec['loss']:.4f}"]
    if "grad" in rec:
        parts.append(f"g {rec['grad']:+.3e}")
    parts.append(f"lr {rec['lr']:.2e}")
    parts.append(f"tok/s {rec['tokens_per_s']:.0f}")
    parts.append(f"step {rec['step_s']:.2f}s")
    read = sum(v for k, v in rec.items() if k.startswith("bytes_read_") and not k.endswith("_device"))
    if read:
        parts.append(f"io {read / 2**30:.2f}GiB@{read / 2**30 / max(rec.get('read_s', 0), 1e-9):.2f}GiB/s")
    parts.append(f"stall {rec.get('stall_s', 0) * 1000:.0f}ms")
    parts.append(f"rss {rec['host_rss_gib']:.2f}GiB")
    return " | ".join(parts)


def pid() -> int:
    return os.getpid()

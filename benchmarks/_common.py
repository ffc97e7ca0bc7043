"""Helpers shared by the zeroth-order benchmarks (issue 2): machine info, stats, data, configs,
a step-by-step driver of ``ZOTrainer``, raw O_DIRECT disk baselines with ``fio`` and peak RSS.

Conventions (see ``benchmarks/bench_store_io.py`` and ``../shared/BENCHMARKING.md``): every
script prints a table and writes one JSON file under ``bench-out/`` holding the machine
(``nproc``, torch version, threads), the settings, every round's raw numbers and the medians
(median, min, max). Ratios are taken within one round; only they are compared.
"""

from __future__ import annotations

import json
import os
import platform
import random
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch

SMOLLM2 = ROOT / "models" / "SmolLM2-135M-Instruct"
BENCH_OUT = ROOT / "bench-out"
GB = 1e9
GIB = 2**30


# ----------------------------------------------------------------------------- machine, stats
def set_threads(n: int) -> None:
    """Pin torch's intra-op threads (ferrytune's CPU kernels follow ``torch.get_num_threads()``)."""
    torch.set_num_threads(n)
    try:
        from ferrytune.kernels import set_num_threads

        set_num_threads(n)
    except ImportError:
        pass


def machine(threads: int | None = None) -> dict[str, Any]:
    mem = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(("MemTotal:", "MemAvailable:")):
                mem[line.split(":")[0]] = round(int(line.split()[1]) / 2**20, 2)
    except OSError:
        pass
    cpu = ""
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                   if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    git = {}
    try:
        def run(*args: str) -> str:
            return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=10,
                                  check=False).stdout.strip()

        git = {"commit": run("rev-parse", "--short", "HEAD"),
               "ferrytune_dirty": bool(run("status", "--porcelain", "--", "ferrytune"))}
    except (OSError, subprocess.SubprocessError):
        pass
    return {"nproc": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "git": git,
            "threads_requested": threads, "python": sys.version.split()[0], "platform": platform.platform(),
            "cpu": cpu, "mem_gib": mem, "loadavg_at_start": os.getloadavg()}


def summarize(values: Sequence[float]) -> dict[str, float]:
    vals = [v for v in values if v is not None]
    if not vals:
        return {"median": float("nan"), "min": float("nan"), "max": float("nan")}
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}


def medians_of(rounds: list[dict], keys: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    keys = keys or [k for k, v in rounds[0].items() if isinstance(v, (int, float))]
    return {k: summarize([r[k] for r in rounds if k in r]) for k in keys}


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], *, title: str | None = None) -> str:
    """Print (and return) a GitHub-markdown table."""
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)
    cells = [[fmt(v) for v in r] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(headers)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells]
    text = ("\n" + title + "\n" if title else "\n") + "\n".join(lines)
    print(text, flush=True)
    return text


def write_json(path: Path, obj: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    obj.setdefault("machine", {})["loadavg_at_end"] = os.getloadavg()
    path.write_text(json.dumps(obj, indent=1, default=str))
    print(f"wrote {path}", flush=True)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------- memory
def proc_status_gib(pid: int | str = "self") -> dict[str, float]:
    """VmRSS and VmHWM (peak RSS) of a process, GiB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            out[line.split(":")[0]] = int(line.split()[1]) / 2**20
    return out


def peak_rss_gib() -> float:
    try:
        return proc_status_gib()["VmHWM"]
    except (OSError, KeyError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def disk_free_gb(path: Path) -> float:
    p = Path(path)
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free / GB


# ----------------------------------------------------------------------------- data and configs
def make_data(path: Path, *, rows: int = 512, seed: int = 0) -> Path:
    """A classification JSONL (rt-polarity demo sentences) whose texts are long enough that
    ``data.max_length`` truncates every example to exactly ``max_length`` tokens."""
    from ferrytune.data import demo_data_path

    src = [json.loads(ln) for ln in demo_data_path("train").read_text().splitlines() if ln.strip()]
    rng = random.Random(seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for _ in range(rows):
            parts = rng.sample(src, 12)  # ~300 words: longer than any max_length used here
            f.write(json.dumps({"text": " ".join(p["text"] for p in parts), "label": parts[-1]["label"]}) + "\n")
    return path


def zo_config(model: Path | str, out: Path | str, tier: str, *, data: Path | str, batch: int = 8,
              max_length: int = 64, store_dtype: str = "float32", host_budget_gib: float = 4.0,
              prefetch_depth: int = 2, nvme_dir: Path | str | None = None, seed: int = 0, steps: int = 10**6,
              lr: float = 1e-6, eps: float = 1e-3, dist: str = "gaussian", io_threads: int = 8,
              verify_checksums: bool = True):
    from ferrytune.config import config_from_dict

    return config_from_dict({
        "method": "zo",
        "model": {"path": str(model), "compute_dtype": "float32", "store_dtype": store_dtype},
        "data": {"train": str(data), "eval": None, "max_length": max_length},
        "train": {"steps": steps, "batch_size": batch, "seed": seed, "lr": lr},
        "zo": {"eps": eps, "distribution": dist},
        "offload": {"tier": tier, "nvme_dir": None if nvme_dir is None else str(nvme_dir),
                    "host_budget_gib": host_budget_gib, "prefetch_depth": prefetch_depth,
                    "io_threads": io_threads, "verify_checksums": verify_checksums},
        "output_dir": str(out),
        "resume": "never", "overwrite": True,
    })


def with_zo(cfg, settings: dict):
    """``cfg`` with its ``zo`` section updated by ``settings`` (checked like a config file's)."""
    if not settings:
        return cfg
    from ferrytune.config import config_from_dict

    d = cfg.to_dict()
    d["zo"].update(settings)
    return config_from_dict(d, source="benchmark zo settings")


class KernelTimer:
    """Times the engine's calls of the perturbation and rounding kernels (wall seconds, cumulative).

    Wraps the names ``ferrytune.engine._zo`` imported (``add_perturbation_``, ``stochastic_round_``,
    and ``perturbation`` if an engine version uses it); behaviour is unchanged, the overhead is one
    ``perf_counter`` pair per call (~1 us, a few hundred calls per block)."""

    installed: KernelTimer | None = None

    def __init__(self) -> None:
        import ferrytune.engine._zo as zo

        self.seconds: dict[str, float] = {}
        for name in ("add_perturbation_", "stochastic_round_", "perturbation"):
            fn = getattr(zo, name, None)
            if fn is None or getattr(fn, "_bench_timed", False):
                continue
            self.seconds[name] = 0.0

            def timed(*args, _fn=fn, _name=name, **kwargs):
                t0 = time.perf_counter()
                try:
                    return _fn(*args, **kwargs)
                finally:
                    self.seconds[_name] += time.perf_counter() - t0
            timed._bench_timed = True
            setattr(zo, name, timed)

    @classmethod
    def install(cls) -> KernelTimer:
        if cls.installed is None:
            cls.installed = cls()
        return cls.installed

    def total(self) -> float:
        return sum(self.seconds.values())


class ZOSession:
    """A ``ZOTrainer`` set up once and stepped on demand.

    ``step()`` calls ``ZOTrainer.train_step`` (the body of the training loop: micro-batches
    of the step, ``zo_forward``, ``grads_from``, the pending update, the (seed, g) log line)
    without the metrics file, the progress bar, evaluation and checkpoints, so several tiers can be interleaved in one
    process and a big model is never written back as an HF checkpoint. Its record holds the
    same per-step figures as ``metrics.jsonl`` plus ``compute_s = step_s - stall_s`` and ``cpu_s``,
    the CPU seconds of the whole process during the step (all its threads: compute, loader,
    writer, IO), which a shared machine's load disturbs far less than wall time.
    """

    def __init__(self, cfg) -> None:
        from ferrytune.engine._zo_trainer import ZOTrainer, streams_for

        self.cfg = cfg
        self.trainer = ZOTrainer(cfg)
        t0 = time.perf_counter()
        self.trainer.setup()
        self.setup_s = time.perf_counter() - t0
        self.streams = streams_for(cfg.zo.num_perturbations, self.trainer.mesh, cfg.zo.estimator)
        self.next_step = 0
        self.records: list[dict] = []

    @property
    def plan(self):
        return self.trainer.rt.plan

    def step(self) -> dict:
        from ferrytune.engine._metrics import stream_delta
        from ferrytune.engine._schedule import lr_at
        from ferrytune.engine._zo import PendingUpdate
        from ferrytune.engine._zo_trainer import grads_from, zo_forward

        tr, cfg = self.trainer, self.cfg
        step = self.next_step
        M = tr.batcher.num_micro_batches
        c0 = time.process_time()
        t0 = time.perf_counter()
        before = tr.rt.streamer.stats.snapshot()
        kt = KernelTimer.installed
        k0 = dict(kt.seconds) if kt else {}
        if hasattr(tr, "train_step"):  # the loop body StepLoop.train runs (engine/_loop.py)
            res = tr.train_step(step)
            loss, tokens = res.loss, res.tokens
        else:  # older trainers: the same body, inlined
            micro = tr.batcher.batches_for_step(step, pad_id=tr.pad_id)
            table = zo_forward(tr.engine, step, micro, self.streams, micro_index=list(range(M)),
                               num_micro_global=M, q=cfg.zo.num_perturbations, mesh=tr.mesh)
            grads, loss = grads_from(table, eps=cfg.zo.eps, rows_total=cfg.train.batch_size)
            tr.engine.pending = PendingUpdate(step, grads, lr_at(step, cfg.train))
            tokens = sum(int(m.attention_mask.sum()) for m in micro) * len(self.streams)
        dt = time.perf_counter() - t0
        cpu = time.process_time() - c0
        after = tr.rt.streamer.stats.snapshot()
        rec = {"step": step + 1, "loss": loss, "step_s": dt, "cpu_s": cpu, "tokens_per_s": tokens / dt,
               "tokens_per_pass": tokens // len(self.streams)}
        rec.update(stream_delta(before, after))
        rec["stall_s"] = after["stall_s"] - before["stall_s"]  # unrounded
        rec["read_s"] = after["read_s"] - before["read_s"]
        rec["write_s"] = after["write_s"] - before["write_s"]
        rec["compute_s"] = dt - rec["stall_s"]
        if kt:  # time inside the z / rounding kernels on the compute thread
            rec.update({f"kernel_{k}_s": v - k0.get(k, 0.0) for k, v in kt.seconds.items()})
            rec["kernel_s"] = sum(v - k0.get(k, 0.0) for k, v in kt.seconds.items())
        st = proc_status_gib()
        rec["host_rss_gib"], rec["host_peak_rss_gib"] = st.get("VmRSS"), st.get("VmHWM")
        self.next_step += 1
        self.records.append(rec)
        return rec

    def close(self) -> None:
        self.trainer.close()


# ----------------------------------------------------------------------------- raw disk baseline
FIO_SETTINGS: tuple[tuple[int, int], ...] = ((1, 16), (4, 16), (8, 32), (16, 32))
"""(numjobs, iodepth) tried for the disk's ceiling: one job at depth 16 understates a parallel
disk 2-3x (../shared/BENCHMARKING.md); the best of these is the limit every disk bound divides by."""


def fio_pass(path: Path, kind: str, size_bytes: int, numjobs: int = 1, iodepth: int = 16) -> dict[str, float]:
    """One sequential O_DIRECT pass with fio (libaio, 4 MiB; writes end with fsync) over ``size_bytes``.

    ``numjobs`` jobs each cover their own ``size_bytes / numjobs`` slice of one file
    (``--offset_increment``), so every setting moves the same bytes. GB/s = all jobs' bytes over
    the slowest job's ``job_runtime`` (its IO and its end_fsync, without fio's start-up)."""
    per_job = size_bytes // numjobs // (4 << 20) * (4 << 20)
    cmd = ["fio", f"--name=raw-{kind}", f"--filename={path}", f"--rw={kind}", "--bs=4M", f"--size={per_job}",
           f"--offset_increment={per_job}", f"--numjobs={numjobs}", "--direct=1", "--ioengine=libaio",
           f"--iodepth={iodepth}", "--output-format=json"]
    if kind == "write":
        cmd.append("--end_fsync=1")
    t0 = time.perf_counter()
    res = subprocess.run(cmd, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    jobs = json.loads(res.stdout[res.stdout.index("{"):])["jobs"]
    nbytes = sum(job[kind]["io_bytes"] for job in jobs)
    seconds = max(job["job_runtime"] for job in jobs) / 1e3
    return {"gbs": nbytes / seconds / GB, "s": seconds, "wall_s": wall, "bytes": nbytes}


def disk_ceiling(directory: Path, size_bytes: int = 2 << 30,
                 settings: Sequence[tuple[int, int]] = FIO_SETTINGS) -> dict[str, Any]:
    """The disk's raw O_DIRECT ceiling on ``directory``: the best write (fsync'd) and read GB/s
    over the fio ``settings`` ((numjobs, iodepth) pairs), which setting won each, and every pass."""
    if shutil.which("fio") is None:
        raise SystemExit("fio is needed for the raw disk baseline (apt-get install fio)")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "fio-baseline.bin"
    passes = []
    for numjobs, iodepth in settings:
        for kind in ("write", "read"):  # write first: the read needs the file
            r = fio_pass(path, kind, size_bytes, numjobs, iodepth)
            passes.append({"kind": kind, "numjobs": numjobs, "iodepth": iodepth, **r})
    out: dict[str, Any] = {"fio_passes": passes}
    for kind in ("write", "read"):
        best = max((p for p in passes if p["kind"] == kind), key=lambda p: p["gbs"])
        out[f"fio_{kind}_gbs"] = best["gbs"]
        out[f"fio_{kind}_s"] = best["s"]
        out[f"fio_{kind}_setting"] = f"--numjobs={best['numjobs']} --iodepth={best['iodepth']}"
    return out


def disk_baseline(directory: Path, size_bytes: int = 2 << 30) -> dict[str, Any]:
    """Raw O_DIRECT write (fsync'd) and read GB/s on ``directory``: the disk's ceiling, the best of
    :data:`FIO_SETTINGS` (see :func:`disk_ceiling`); the file stays for the next call."""
    return disk_ceiling(directory, size_bytes)


def disk_bound_s(rec: dict, base: dict) -> float:
    """Seconds the disk needs for a step's NVMe traffic at the raw rates: reads and writes share one
    device, so the limit is bytes_read / read_bw + bytes_written / write_bw."""
    return (rec.get("bytes_read_nvme", 0) / (base["fio_read_gbs"] * GB)
            + rec.get("bytes_written_nvme", 0) / (base["fio_write_gbs"] * GB))

"""NvmeBlockStore throughput against a raw O_DIRECT baseline on the same directory.

    python benchmarks/bench_store_io.py --size-gib 2 --dir /work/bench-store-io
    python benchmarks/bench_store_io.py --size-gib 1 --record-mib 128 --rounds 5 --baseline dd

Per round, interleaved: store write (xxh3_64 checksum), baseline write, store
write (crc32 checksum), store write (no checksum), then the same four reads.
Writes are timed up to and including fsync. Ratios are taken within one round;
the table gives median, min, max over rounds. Needs ``xxhash`` (PyPI).
The machine is shared, so absolute GB/s swing; only the in-round ratios count.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import time
import zlib
from concurrent.futures import Future
from pathlib import Path

import torch
import xxhash

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ferrytune.offload._io import ThreadedDirectIO, aligned_buffer, as_uint8_tensor  # noqa: E402
from ferrytune.offload._store import NvmeBlockStore  # noqa: E402


def store_pass(store: NvmeBlockStore, bufs: list, kind: str) -> float:
    """Stream every record through ``len(bufs)`` buffers; returns seconds (writes incl. fsync)."""
    pending: list[Future | None] = [None] * len(bufs)
    start = time.perf_counter()
    for i, block_id in enumerate(store.records):
        slot = i % len(bufs)
        if pending[slot] is not None:
            pending[slot].result()  # the buffer is free again only when its IO is done
        submit = store.submit_write if kind == "write" else store.submit_read
        pending[slot] = submit(block_id, bufs[slot])
    for fut in pending:
        if fut is not None:
            fut.result()
    if kind == "write":
        store.flush()
    return time.perf_counter() - start


def baseline_pass(tool: str, path: Path, nbytes: int, kind: str) -> tuple[float, float]:
    """Raw sequential O_DIRECT pass with fio (libaio, depth 16) or dd.

    Returns (seconds the tool reports, wall seconds of the process incl. its start-up)."""
    count = nbytes // (4 << 20)
    if tool == "fio":
        cmd = ["fio", "--name=base", f"--filename={path}", f"--rw={kind}", "--bs=4M", f"--size={nbytes}",
               "--direct=1", "--ioengine=libaio", "--iodepth=16", "--output-format=json"]
        if kind == "write":
            cmd.append("--end_fsync=1")
        start = time.perf_counter()
        out = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
        wall = time.perf_counter() - start
        # job_runtime (ms): the job's IO time, without fio's start-up and file checks
        return out["jobs"][0]["job_runtime"] / 1e3, wall
    if kind == "write":
        cmd = ["dd", "if=/dev/zero", f"of={path}", "bs=4M", f"count={count}", "oflag=direct", "conv=fsync,notrunc"]
    else:
        cmd = ["dd", f"if={path}", "of=/dev/null", "bs=4M", f"count={count}", "iflag=direct"]
    start = time.perf_counter()
    err = subprocess.run(cmd, check=True, capture_output=True, text=True).stderr
    wall = time.perf_counter() - start
    match = re.search(r"copied, ([0-9.]+) s", err)
    return (float(match.group(1)) if match else wall), wall


def summarize(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gib", type=float, default=2.0, help="bytes streamed per pass")
    ap.add_argument("--record-mib", type=int, default=256, help="size of one block record")
    ap.add_argument("--rounds", type=int, default=3, help="measured rounds after one warm-up")
    ap.add_argument("--dir", type=Path, default=Path("bench-out/store-io-data"),
                    help="directory on the disk under test (deleted afterwards unless --keep)")
    ap.add_argument("--out", type=Path, default=Path("bench-out/store_io.json"))
    ap.add_argument("--io-threads", type=int, default=8)
    ap.add_argument("--chunk-mib", type=int, default=4)
    ap.add_argument("--inflight", type=int, default=2, help="host buffers (records in flight)")
    ap.add_argument("--torch-threads", type=int, default=1)
    ap.add_argument("--baseline", choices=["auto", "fio", "dd"], default="auto")
    ap.add_argument("--keep", action="store_true", help="keep the data files")
    args = ap.parse_args()

    torch.set_num_threads(args.torch_threads)
    tool = args.baseline if args.baseline != "auto" else ("fio" if shutil.which("fio") else "dd")
    record_bytes = args.record_mib << 20
    num_records = max(1, int(args.size_gib * 2**30) // record_bytes)
    nbytes = num_records * record_bytes
    args.dir.mkdir(parents=True, exist_ok=True)
    records = {f"layers.{i}": record_bytes for i in range(num_records)}
    backend = ThreadedDirectIO(num_threads=args.io_threads, chunk_bytes=args.chunk_mib << 20)
    stores = {}
    for name, checksum in (("store", "xxh3_64"), ("crc32", "crc32"), ("nosum", None)):
        shutil.rmtree(args.dir / f"store-{name}", ignore_errors=True)
        stores[name] = NvmeBlockStore.create(args.dir / f"store-{name}", records, backend=backend,
                                             verify=checksum is not None, checksum=checksum)
    bufs = [aligned_buffer(record_bytes) for _ in range(args.inflight)]
    for buf in bufs:
        as_uint8_tensor(buf).random_(0, 256)  # incompressible payload
    probe = memoryview(bufs[0])[: 64 << 20]
    hash_gbs = {}
    for name, fn in (("crc32", zlib.crc32), ("xxh3_64", xxhash.xxh3_64_intdigest)):
        t0 = time.perf_counter()
        fn(probe)
        hash_gbs[name] = len(probe) / (time.perf_counter() - t0) / 1e9
    del probe
    base_path = args.dir / "baseline.bin"

    def one_round() -> dict[str, float]:
        r = {}
        for kind in ("write", "read"):
            r[f"store_{kind}_s"] = store_pass(stores["store"], bufs, kind)
            r[f"base_{kind}_s"], r[f"base_{kind}_wall_s"] = baseline_pass(tool, base_path, nbytes, kind)
            r[f"crc32_{kind}_s"] = store_pass(stores["crc32"], bufs, kind)
            r[f"nosum_{kind}_s"] = store_pass(stores["nosum"], bufs, kind)
        return r

    print(f"warm-up: {nbytes / 2**30:.2f} GiB in {num_records} records of {args.record_mib} MiB; baseline {tool}")
    one_round()  # first write of every record allocates its extents; later writes overwrite in place
    rounds = []
    for i in range(args.rounds):
        r = one_round()
        for key in list(r):
            r[key.removesuffix("_s") + "_gbs"] = nbytes / r[key] / 1e9
        for kind in ("write", "read"):
            r[f"ratio_{kind}"] = r[f"store_{kind}_gbs"] / r[f"base_{kind}_gbs"]
            r[f"crc32_ratio_{kind}"] = r[f"crc32_{kind}_gbs"] / r[f"base_{kind}_gbs"]
            r[f"xxh3_vs_nosum_{kind}"] = r[f"store_{kind}_gbs"] / r[f"nosum_{kind}_gbs"]
            r[f"crc32_vs_nosum_{kind}"] = r[f"crc32_{kind}_gbs"] / r[f"nosum_{kind}_gbs"]
        rounds.append(r)
        print(f"round {i}: " + " ".join(f"{k}={v:.3f}" for k, v in r.items() if not k.endswith("_s")))

    medians = {k: summarize([r[k] for r in rounds]) for k in rounds[0] if not k.endswith("_s")}
    print(f"\n{'metric (GB/s or ratio)':<24}{'median':>10}{'min':>10}{'max':>10}")
    for kind in ("write", "read"):
        for key in ("store_{}_gbs", "base_{}_gbs", "ratio_{}", "crc32_{}_gbs", "crc32_ratio_{}",
                    "nosum_{}_gbs", "xxh3_vs_nosum_{}", "crc32_vs_nosum_{}"):
            m = medians[key.format(kind)]
            print(f"{key.format(kind):<24}{m['median']:>10.3f}{m['min']:>10.3f}{m['max']:>10.3f}")
    peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS {peak_rss_mib:.0f} MiB; one-thread hash GB/s: "
          + ", ".join(f"{k} {v:.2f}" for k, v in hash_gbs.items()))

    result = {
        "machine": {"nproc": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                    "python": sys.version.split()[0], "dir": str(args.dir.resolve())},
        "settings": {"size_bytes": nbytes, "record_bytes": record_bytes, "num_records": num_records,
                     "io_threads": args.io_threads, "chunk_bytes": args.chunk_mib << 20,
                     "inflight": args.inflight, "baseline": tool, "rounds": args.rounds},
        "hash_one_thread_gbs": hash_gbs, "peak_rss_mib": peak_rss_mib, "rounds": rounds, "medians": medians,
        "backend_stats": backend.stats.__dict__,
    }
    for store in stores.values():
        store.close()
    backend.close()
    if not args.keep:
        shutil.rmtree(args.dir, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

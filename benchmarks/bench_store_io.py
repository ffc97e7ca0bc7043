"""NvmeBlockStore throughput on each IO backend against the disk's ceiling on the same directory.

    python benchmarks/bench_store_io.py --size-gib 2 --dir /work/bench-store-io
    python benchmarks/bench_store_io.py --size-gib 1 --record-mib 128 --rounds 5 --baseline dd
    python benchmarks/bench_store_io.py --backends threads            # without DeepSpeed

Per round, interleaved, writes then reads: store on the thread backend (xxh3_64
checksum), store on DeepSpeed's libaio backend (``deepspeed_aio``, xxh3_64; host
buffers it must stage, as the streamer's are today), the same with buffers the
handle locked itself (``aio_locked``: no staging copy), the thread backend with
crc32 and with no checksum; then the baseline. The baseline is the disk's ceiling:
the best of several parallel fio settings (``_common.disk_ceiling``, the one every
disk bound in benchmarks/ uses; which setting won is reported), or one dd pass.
Writes are timed up to and including fsync. Ratios are taken within one round;
the table gives median, min, max over rounds. Needs ``xxhash`` (PyPI), ``fio``
(Debian) for the ceiling, and DeepSpeed's async_io op for the aio rows (skipped
with the reason when it cannot load). The machine is shared, so absolute GB/s
swing; only the in-round ratios count.
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import disk_ceiling  # noqa: E402

from ferrytune.errors import FerrytuneError  # noqa: E402
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


def dd_pass(path: Path, nbytes: int, kind: str) -> tuple[float, float]:
    """One raw sequential O_DIRECT pass with dd (one request at a time: a floor, not the ceiling).

    Returns (seconds dd reports, wall seconds of the process incl. its start-up)."""
    count = nbytes // (4 << 20)
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
    ap.add_argument("--io-threads", type=int, default=8, help="threads (threads) / intra_op_parallelism (aio)")
    ap.add_argument("--chunk-mib", type=int, default=4)
    ap.add_argument("--inflight", type=int, default=2, help="host buffers (records in flight)")
    ap.add_argument("--torch-threads", type=int, default=1)
    ap.add_argument("--backends", default="threads,deepspeed_aio", help="comma list of threads, deepspeed_aio")
    ap.add_argument("--baseline", choices=["auto", "fio", "dd"], default="auto",
                    help="fio: the disk's ceiling (best of parallel settings); dd: one sequential pass")
    ap.add_argument("--keep", action="store_true", help="keep the data files")
    args = ap.parse_args()

    torch.set_num_threads(args.torch_threads)
    tool = args.baseline if args.baseline != "auto" else ("fio" if shutil.which("fio") else "dd")
    record_bytes = args.record_mib << 20
    num_records = max(1, int(args.size_gib * 2**30) // record_bytes)
    nbytes = num_records * record_bytes
    args.dir.mkdir(parents=True, exist_ok=True)
    records = {f"layers.{i}": record_bytes for i in range(num_records)}
    wanted = [b.strip() for b in args.backends.split(",") if b.strip()]
    backends: dict[str, object] = {}
    skipped: dict[str, str] = {}
    if "threads" in wanted:
        backends["threads"] = ThreadedDirectIO(num_threads=args.io_threads, chunk_bytes=args.chunk_mib << 20)
    if "deepspeed_aio" in wanted:
        try:
            from ferrytune.offload._aio import DeepSpeedAIO

            backends["deepspeed_aio"] = DeepSpeedAIO(num_threads=args.io_threads, chunk_bytes=args.chunk_mib << 20)
        except FerrytuneError as exc:
            skipped["deepspeed_aio"] = str(exc)
            print(f"deepspeed_aio skipped: {exc}")
    # name -> (backend, checksum, buffers)
    variants: dict[str, tuple[object, str | None, str]] = {}
    if "threads" in backends:
        variants.update({"store": (backends["threads"], "xxh3_64", "mmap"),
                         "crc32": (backends["threads"], "crc32", "mmap"),
                         "nosum": (backends["threads"], None, "mmap")})
    if "deepspeed_aio" in backends:
        variants.update({"aio": (backends["deepspeed_aio"], "xxh3_64", "mmap"),
                         "aio_locked": (backends["deepspeed_aio"], "xxh3_64", "locked")})
    if not variants:
        raise SystemExit("no backend to measure")
    stores = {}
    for name, (backend, checksum, _) in variants.items():
        shutil.rmtree(args.dir / f"store-{name}", ignore_errors=True)
        stores[name] = NvmeBlockStore.create(args.dir / f"store-{name}", records, backend=backend,
                                             verify=checksum is not None, checksum=checksum)
    bufs = {"mmap": [aligned_buffer(record_bytes) for _ in range(args.inflight)]}
    if "deepspeed_aio" in backends:
        bufs["locked"] = [backends["deepspeed_aio"].new_buffer(record_bytes) for _ in range(args.inflight)]
    for kind_bufs in bufs.values():
        for buf in kind_bufs:
            as_uint8_tensor(buf).random_(0, 256)  # incompressible payload
    probe = memoryview(bufs["mmap"][0])[: 64 << 20]
    hash_gbs = {}
    for name, fn in (("crc32", zlib.crc32), ("xxh3_64", xxhash.xxh3_64_intdigest)):
        t0 = time.perf_counter()
        fn(probe)
        hash_gbs[name] = len(probe) / (time.perf_counter() - t0) / 1e9
    del probe
    base_dir = args.dir / "baseline"
    base_dir.mkdir(parents=True, exist_ok=True)

    def one_round() -> dict:
        r: dict = {}
        for kind in ("write", "read"):
            for name, (_, _, buf_kind) in variants.items():
                r[f"{name}_{kind}_s"] = store_pass(stores[name], bufs[buf_kind], kind)
        if tool == "fio":
            c = disk_ceiling(base_dir, nbytes)
            for kind in ("write", "read"):
                r[f"base_{kind}_s"] = nbytes / (c[f"fio_{kind}_gbs"] * 1e9)
                r[f"base_{kind}_setting"] = c[f"fio_{kind}_setting"]
            r["fio_passes"] = [{k: v for k, v in p.items()} for p in c["fio_passes"]]
        else:
            for kind in ("write", "read"):
                r[f"base_{kind}_s"], r[f"base_{kind}_wall_s"] = dd_pass(base_dir / "dd.bin", nbytes, kind)
        return r

    names = list(variants)
    print(f"warm-up: {nbytes / 2**30:.2f} GiB in {num_records} records of {args.record_mib} MiB; backends "
          f"{', '.join(backends)}; baseline {'fio ceiling' if tool == 'fio' else 'dd'}")
    one_round()  # first write of every record allocates its extents; later writes overwrite in place
    rounds = []
    for i in range(args.rounds):
        r = one_round()
        for key in [k for k in r if k.endswith("_s") and not k.endswith("_wall_s")]:
            r[key.removesuffix("_s") + "_gbs"] = nbytes / r[key] / 1e9
        for kind in ("write", "read"):
            for name in names:
                r[f"{name}_vs_base_{kind}"] = r[f"{name}_{kind}_gbs"] / r[f"base_{kind}_gbs"]
            if "store" in variants:
                r[f"xxh3_vs_nosum_{kind}"] = r[f"store_{kind}_gbs"] / r[f"nosum_{kind}_gbs"]
                r[f"crc32_vs_nosum_{kind}"] = r[f"crc32_{kind}_gbs"] / r[f"nosum_{kind}_gbs"]
            if "store" in variants and "aio" in variants:
                r[f"aio_vs_threads_{kind}"] = r[f"aio_{kind}_gbs"] / r[f"store_{kind}_gbs"]
                r[f"aio_locked_vs_threads_{kind}"] = r[f"aio_locked_{kind}_gbs"] / r[f"store_{kind}_gbs"]
        rounds.append(r)
        print(f"round {i}: " + " ".join(f"{k}={v:.3f}" for k, v in r.items()
                                        if isinstance(v, float) and not k.endswith("_s")))
        if tool == "fio":
            print(f"  fio ceiling: write {r['base_write_setting']}, read {r['base_read_setting']}")

    numeric = [k for k, v in rounds[0].items() if isinstance(v, float) and not k.endswith("_s")]
    medians = {k: summarize([r[k] for r in rounds]) for k in numeric}
    print(f"\n{'metric (GB/s or ratio)':<28}{'median':>10}{'min':>10}{'max':>10}")
    for kind in ("write", "read"):
        keys = [f"base_{kind}_gbs"] + [f"{n}_{kind}_gbs" for n in names] + [f"{n}_vs_base_{kind}" for n in names]
        keys += [k for k in (f"aio_vs_threads_{kind}", f"aio_locked_vs_threads_{kind}", f"xxh3_vs_nosum_{kind}",
                             f"crc32_vs_nosum_{kind}") if k in medians]
        for key in keys:
            m = medians[key]
            print(f"{key:<28}{m['median']:>10.3f}{m['min']:>10.3f}{m['max']:>10.3f}")
    if tool == "fio":
        for kind in ("write", "read"):
            won = [r[f"base_{kind}_setting"] for r in rounds]
            print(f"fio ceiling {kind}: won by " + ", ".join(f"{w} ({won.count(w)}x)" for w in sorted(set(won))))
    peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS {peak_rss_mib:.0f} MiB; one-thread hash GB/s: "
          + ", ".join(f"{k} {v:.2f}" for k, v in hash_gbs.items()))

    result = {
        "machine": {"nproc": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                    "python": sys.version.split()[0], "dir": str(args.dir.resolve())},
        "settings": {"size_bytes": nbytes, "record_bytes": record_bytes, "num_records": num_records,
                     "io_threads": args.io_threads, "chunk_bytes": args.chunk_mib << 20,
                     "inflight": args.inflight, "baseline": "fio ceiling" if tool == "fio" else "dd",
                     "rounds": args.rounds, "backends": list(backends), "skipped": skipped,
                     "variants": {n: {"backend": type(b).__name__, "checksum": c, "buffers": k}
                                  for n, (b, c, k) in variants.items()}},
        "hash_one_thread_gbs": hash_gbs, "peak_rss_mib": peak_rss_mib, "rounds": rounds, "medians": medians,
        "backend_stats": {n: b.stats.__dict__ for n, b in backends.items()},
    }
    for store in stores.values():
        store.close()
    for kind_bufs in bufs.values():
        kind_bufs.clear()
    for backend in backends.values():
        backend.close()
    if not args.keep:
        shutil.rmtree(args.dir, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

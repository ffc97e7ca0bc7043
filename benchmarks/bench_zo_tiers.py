"""ZO step time of the host and NVMe tiers relative to resident, with the raw disk bound.

    python benchmarks/bench_zo_tiers.py --model smollm2                     # SmolLM2-135M, fp32 masters
    python benchmarks/bench_zo_tiers.py --model synthetic --batch 2 --seq 32  # 1.02 B params, 2.05 GB bf16

One process sets up the three tiers (``offload.tier`` resident, host, nvme; same config
and seed otherwise) and then runs rounds ``resident host nvme`` of ``--steps`` ZO steps
each, followed by a raw ``fio`` O_DIRECT write (fsync'd) and read of 2 GiB in the NVMe
directory; the first round is a warm-up. Per round: the median step time of each tier,
the ratios host/resident and nvme/max(resident, disk bound) where the disk bound is the
step's NVMe bytes over that round's fio rates (``bytes_read / read_bw + bytes_written /
write_bw``). The table gives median, min, max over rounds of each ratio, and per tier the
compute, IO and stall seconds of a step (``compute = step - stall``; ``read_s``/``write_s``
are the loader/writer threads' busy time, overlapped with compute), the time inside the z
kernels, and the process CPU seconds of the step (all threads; ``*_cpu`` ratios use them).

``--model synthetic`` builds (once, then reuses; ``--cleanup`` deletes it) a 16-layer LLaMA
of hidden 2048 / intermediate 5632 / vocab 49152, untied: 1.02 B parameters, 2.05 GB of
bf16 safetensors, with ``benchmarks/make_synthetic.py``.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    BENCH_OUT,
    GB,
    SMOLLM2,
    KernelTimer,
    ZOSession,
    disk_baseline,
    disk_bound_s,
    disk_free_gb,
    log,
    machine,
    make_data,
    medians_of,
    peak_rss_gib,
    print_table,
    set_threads,
    write_json,
    zo_config,
)

TIERS = ("resident", "host", "nvme")
SYNTH = {"hidden": 2048, "intermediate": 5632, "layers": 16, "vocab": 49152}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", help="smollm2, synthetic, or a model folder")
    ap.add_argument("--synthetic-dir", type=Path, default=BENCH_OUT / "synth-1b")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64, help="tokens per example (data.max_length)")
    ap.add_argument("--store-dtype", default=None, help="model.store_dtype (default: float32 for smollm2, "
                    "bfloat16 otherwise)")
    ap.add_argument("--dist", default="gaussian", choices=["gaussian", "rademacher"])
    ap.add_argument("--steps", type=int, default=2, help="ZO steps per tier per round")
    ap.add_argument("--rounds", type=int, default=3, help="measured rounds after one warm-up round")
    ap.add_argument("--threads", type=int, default=1, help="torch and kernel threads (1: the 2 cores are shared)")
    ap.add_argument("--prefetch-depth", type=int, default=2)
    ap.add_argument("--host-budget-gib", type=float, default=8.0)
    ap.add_argument("--nvme-dir", type=Path, default=BENCH_OUT / "zo-tiers-nvme")
    ap.add_argument("--fio-gib", type=float, default=2.0)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--cleanup", action="store_true", help="delete the synthetic model at the end")
    a = ap.parse_args()

    set_threads(a.threads)
    minfo = machine(a.threads)  # at the start: the code this run loaded
    KernelTimer.install()
    if a.model == "smollm2":
        model, name, store = SMOLLM2, "smollm2-135m", a.store_dtype or "float32"
    elif a.model == "synthetic":
        model, name, store = a.synthetic_dir, "synthetic-1b", a.store_dtype or "bfloat16"
        if not (model / "config.json").exists():
            from make_synthetic import build
            build(model, **SYNTH)
    else:
        model, name, store = Path(a.model), Path(a.model).name, a.store_dtype or "bfloat16"
    out = a.out or BENCH_OUT / f"zo_tiers_{name}.json"
    work = BENCH_OUT / f"zo-tiers-{name}"
    data = make_data(work / "data.jsonl")
    log(f"model {model}; disk free {disk_free_gb(a.nvme_dir):.1f} GB")

    sessions = {}
    for tier in TIERS:
        cfg = zo_config(model, work / f"run-{tier}", tier, data=data, batch=a.batch, max_length=a.seq,
                        store_dtype=store, host_budget_gib=a.host_budget_gib, prefetch_depth=a.prefetch_depth,
                        nvme_dir=a.nvme_dir / "store" if tier == "nvme" else None, dist=a.dist)
        sessions[tier] = ZOSession(cfg)
        log(f"set up {tier} in {sessions[tier].setup_s:.1f}s\n{sessions[tier].plan.describe()}")

    rounds = []
    for r in range(a.rounds + 1):
        raw = {}
        for tier in TIERS:
            raw[tier] = [sessions[tier].step() for _ in range(a.steps)]
            log(f"round {r} {tier}: " + ", ".join(f"{x['step_s']:.2f}s (stall {x['stall_s']:.2f})"
                                                  for x in raw[tier]))
        base = disk_baseline(a.nvme_dir / "fio", int(a.fio_gib * 2**30))
        log(f"round {r} fio: read {base['fio_read_gbs']:.2f} GB/s, write {base['fio_write_gbs']:.2f} GB/s")
        rec = {"round": r, "warmup": r == 0, **base, "steps": raw}
        for tier in TIERS:
            for key in ("step_s", "cpu_s", "compute_s", "read_s", "write_s", "stall_s", "kernel_s"):
                rec[f"{tier}_{key}"] = statistics.median(x[key] for x in raw[tier])
            for key in ("bytes_read_nvme", "bytes_written_nvme", "bytes_read_host", "bytes_written_host"):
                rec[f"{tier}_{key}"] = statistics.median(x[key] for x in raw[tier])
        rec["disk_bound_s"] = statistics.median(disk_bound_s(x, base) for x in raw["nvme"])
        rec["host_vs_resident"] = rec["host_step_s"] / rec["resident_step_s"]
        rec["nvme_vs_resident"] = rec["nvme_step_s"] / rec["resident_step_s"]
        rec["host_vs_resident_cpu"] = rec["host_cpu_s"] / rec["resident_cpu_s"]
        rec["nvme_vs_resident_cpu"] = rec["nvme_cpu_s"] / rec["resident_cpu_s"]
        rec["nvme_limit_s"] = max(rec["resident_step_s"], rec["disk_bound_s"])
        rec["nvme_vs_limit"] = rec["nvme_step_s"] / rec["nvme_limit_s"]
        rec["nvme_vs_disk_bound"] = rec["nvme_step_s"] / rec["disk_bound_s"]
        rounds.append(rec)
    for s in sessions.values():
        s.close()

    measured = [r for r in rounds if not r["warmup"]]
    keys = [k for k, v in measured[0].items() if isinstance(v, (int, float)) and k not in ("round", "warmup")]
    med = medians_of(measured, keys)
    first = sessions["nvme"].records[-1]
    setting = (f"{name}, batch {a.batch} x {a.seq} tokens, store {store}, compute float32, {a.dist} z, "
               f"{a.threads} threads, {a.steps} steps/tier/round, {a.rounds} rounds + warm-up")
    rows = []
    for tier in TIERS:
        def m(k: str, tier: str = tier) -> float:
            return med[f"{tier}_{k}"]["median"]

        rows.append([tier, m("step_s"), m("cpu_s"), m("compute_s"), m("kernel_s"), m("read_s"), m("write_s"), m("stall_s"),
                     (m("bytes_read_nvme") + m("bytes_read_host")) / GB,
                     (m("bytes_written_nvme") + m("bytes_written_host")) / GB])
    print_table(["tier", "step s", "CPU s (all threads)", "compute s", "of which z kernels s", "read s", "write s", "stall s", "GB read", "GB written"], rows,
                title=f"per-step medians over rounds ({setting})")
    rows = []
    for key, target in (("host_vs_resident", "<= 1.10"), ("nvme_vs_resident", ""),
                        ("nvme_vs_limit", "<= 1.10"), ("nvme_vs_disk_bound", ""),
                        ("host_vs_resident_cpu", ""), ("nvme_vs_resident_cpu", "")):
        s = med[key]
        rows.append([key, s["median"], s["min"], s["max"], target])
    s = med["disk_bound_s"]
    rows.append(["disk bound s (nvme bytes / fio)", s["median"], s["min"], s["max"], ""])
    rows.append(["fio read GB/s", med["fio_read_gbs"]["median"], med["fio_read_gbs"]["min"],
                 med["fio_read_gbs"]["max"], ""])
    rows.append(["fio write GB/s", med["fio_write_gbs"]["median"], med["fio_write_gbs"]["min"],
                 med["fio_write_gbs"]["max"], ""])
    print_table(["ratio (in-round)", "median", "min", "max", "target"], rows)
    print(f"peak RSS of this process (all three tiers alive): {peak_rss_gib():.2f} GiB", flush=True)

    write_json(out, {
        "benchmark": "zo_tiers", "machine": minfo,
        "settings": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()}, "model_path": str(model),
                     "store_dtype": store, "plans": {t: s.plan.describe() for t, s in sessions.items()},
                     "setup_s": {t: s.setup_s for t, s in sessions.items()},
                     "tokens_per_pass": first["tokens_per_pass"]},
        "rounds": rounds, "medians": med, "peak_rss_gib": peak_rss_gib(),
    })
    shutil.rmtree(a.nvme_dir, ignore_errors=True)
    if a.cleanup and a.model == "synthetic":
        shutil.rmtree(model, ignore_errors=True)


if __name__ == "__main__":
    main()

"""The headline, this machine's version of "100B on one GPU": ZO steps of a 15 B-parameter model
(30 GB of bf16 weights) on a 2-core box with 24 GiB of RAM, streamed from NVMe.

    nohup python benchmarks/bench_headline.py --cleanup > bench-out/logs/headline.log 2>&1 &
    tail -f bench-out/logs/headline.log            # progress; per-step lines in bench-out/headline/steps.jsonl

What it does, in one process:

1. checks the free disk (model + store + 4 GB), then builds the synthetic model with
   ``make_synthetic.py`` unless it exists: LLaMA, hidden 2048, intermediate 5632, 16 heads,
   vocab 49152 (SmolLM2's tokenizer), untied, 288 layers = 15.0 B parameters, 30.0 GB bf16;
2. raw disk baseline: ``fio`` O_DIRECT write (fsync'd) and read of 2 GiB in the store's directory;
3. sets up ``ZOTrainer`` with ``offload.tier: nvme``, ``offload.host_budget_gib: 2``,
   ``model.store_dtype: bfloat16`` (fp32 compute), ``offload.prefetch_depth: 1``, batch 1 x 16
   tokens: the store (30 GB) is built from the checkpoint one block at a time;
4. resets the peak RSS, runs ``--steps`` ZO steps, and after each step measures the disk's
   ceiling again and probes the CPU in a child process (fused Gaussian generate-and-add,
   stochastic rounding and the bf16<->fp32 casts on one layer-sized buffer, and an fp32 matmul);
   closes the trainer and deletes the store;
5. repeats 3-4 for every ``--variant`` (default: plain MeZO, then LeZO with Rademacher z at
   ``block_fraction: 0.5``), so the estimators run side by side on the same model and disk;
6. prints the table and writes ``bench-out/headline.json`` (and with ``--cleanup`` deletes the
   model).

Per step it reports the compute thread's seconds per parameter (``compute_s / params``: the
step minus the compute thread's waits for blocks) and ``step / max(disk bound, compute)``: 1.0
when the disk and the compute overlap perfectly. The steady state is steps 2.. (step 1 has no
pending update to apply).

The disk-bound limit of a step is ``bytes_read_nvme / read_ceiling + bytes_written_nvme /
write_ceiling`` (one device serves both); the ceilings are the best of several parallel fio
settings (``_common.disk_ceiling``, ``../shared/BENCHMARKING.md``), measured next to that step. Why this shape and not
LLaMA-13B's (40 layers of hidden 5120): on a CPU "device" the fp32 working copies of the
outer block (embeddings + head) and of the layers in flight are host memory too; at hidden
5120 they alone exceed 4 GiB. See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    BENCH_OUT,
    GB,
    GIB,
    ZOSession,
    disk_baseline,
    disk_bound_s,
    disk_free_gb,
    log,
    machine,
    make_data,
    print_table,
    proc_status_gib,
    reset_peak_rss,
    set_threads,
    summarize,
    with_zo,
    write_json,
    zo_config,
)


def cpu_probe_subprocess(numel: int, threads: int) -> dict[str, float]:
    """``cpu_probe`` in a child process: its buffers (and whatever MKL and glibc keep of them)
    must not count in the training process's RSS (run in-process, it added 0.33 GiB per call)."""
    out = subprocess.run([sys.executable, __file__, "--probe", str(numel), "--threads", str(threads)],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def cpu_probe(numel: int) -> dict[str, float]:
    """Per-element seconds of the ZO step's elementwise work and fp32 matmul GFLOP/s, right now."""
    from ferrytune.kernels import PerturbKey, add_perturbation_, stochastic_round_

    v = torch.randn(numel)
    lo = torch.empty(numel, dtype=torch.bfloat16)
    key = PerturbKey(0, 0, 0, 0)
    out = {}

    def t(name, fn):
        fn()
        t0 = time.perf_counter()
        fn()
        out[name] = (time.perf_counter() - t0) / numel

    z = torch.empty_like(v)
    t("gen_add_s_per_elem", lambda: add_perturbation_(v, key, alpha=1e-3))
    t("zero_s_per_elem", lambda: z.zero_())
    t("add_s_per_elem", lambda: v.add_(z, alpha=-2))
    t("sr_s_per_elem", lambda: stochastic_round_(v, lo, key))
    t("to_bf16_s_per_elem", lambda: lo.copy_(v))
    t("to_fp32_s_per_elem", lambda: v.copy_(lo))
    a, b = torch.randn(16, 2048), torch.randn(5632, 2048)
    t0 = time.perf_counter()
    for _ in range(10):
        a @ b.T
    out["matmul_gflops"] = 10 * 2 * 16 * 2048 * 5632 / (time.perf_counter() - t0) / 1e9
    return out


DEFAULT_VARIANTS = ["mezo", "lezo:distribution=rademacher,block_fraction=0.5"]


def parse_variants(items: list[str]) -> dict[str, dict]:
    """``NAME[:KEY=VALUE,...]`` -> {name: {zo key: value}} (values parsed as YAML scalars)."""
    import yaml

    out = {}
    for item in items:
        name, _, rest = item.partition(":")
        out[name] = {k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in rest.split(",") if kv)}
    return out


def run_variant(a, name: str, zo: dict, model: Path, store_dir: Path, data: Path, fio: list, P: int) -> dict:
    """Set up a ZOTrainer with ``zo`` (its store built anew), run ``a.steps`` steps with the disk's
    ceiling and a CPU probe after each, close it and delete the store."""
    cfg = with_zo(zo_config(model, a.dir / "run", a.tier, data=data, batch=a.batch, max_length=a.seq,
                            store_dtype="bfloat16", host_budget_gib=a.budget_gib,
                            prefetch_depth=a.prefetch_depth, nvme_dir=store_dir), zo)
    log(f"[{name}] zo settings: {cfg.zo.model_dump()}")
    s = ZOSession(cfg)
    setup_rss = proc_status_gib()
    log(f"[{name}] set up in {s.setup_s:.0f}s (store built), RSS {setup_rss['VmRSS']:.2f} GiB, setup peak "
        f"{setup_rss['VmHWM']:.2f} GiB\n{s.plan.describe()}")
    reset_peak_rss()
    steps_log = a.dir / f"steps-{name}.jsonl"
    steps_log.write_text("")
    steps, probes = [], []
    layer_numel = max(b.numel for k, b in s.trainer.rt.layout.blocks.items() if k != "outer")
    try:
        for i in range(a.steps):
            rec = s.step()
            if a.tier == "nvme":
                fio.append(disk_baseline(a.dir / "fio", int(a.fio_gib * 2**30)))
                base = {k: statistics.mean(f[k] for f in fio[-2:]) for k in ("fio_read_gbs", "fio_write_gbs")}
            else:  # --tier host: no disk in the step; the compute measure alone
                base = {"fio_read_gbs": float("nan"), "fio_write_gbs": float("nan")}
            rec["fio_read_gbs"], rec["fio_write_gbs"] = base["fio_read_gbs"], base["fio_write_gbs"]
            rec["disk_bound_s"] = disk_bound_s(rec, base) if a.tier == "nvme" else 0.0
            rec["step_vs_disk_bound"] = rec["step_s"] / rec["disk_bound_s"] if rec["disk_bound_s"] else float("nan")
            # the two measures: the compute thread's work per parameter, and how well the disk
            # and that work overlap (1.0: the step takes exactly the longer of the two)
            rec["compute_ns_per_param"] = rec["compute_s"] / P * 1e9
            rec["overlap"] = rec["step_s"] / max(rec["disk_bound_s"], rec["compute_s"])
            probe = cpu_probe_subprocess(layer_numel, a.threads)
            probes.append(probe)
            rec["matmul_estimate_s"] = 2 * 2 * P * rec["tokens_per_pass"] / (probe["matmul_gflops"] * 1e9)
            steps.append(rec)
            with open(steps_log, "a") as f:
                f.write(json.dumps({**rec, "probe": probe}) + "\n")
            log(f"[{name}] step {i + 1}: {rec['step_s']:.0f}s (compute {rec['compute_s']:.0f}s = "
                f"{rec['compute_ns_per_param']:.2f} ns/param, stall {rec['stall_s']:.1f}s, read {rec['read_s']:.0f}s, "
                f"write {rec['write_s']:.0f}s), {rec['bytes_read_nvme'] / GB:.1f} GB read + "
                f"{rec['bytes_written_nvme'] / GB:.1f} GB written, disk bound {rec['disk_bound_s']:.0f}s -> "
                f"{rec['step_vs_disk_bound']:.2f}x, step / max(disk, compute) {rec['overlap']:.2f}; RSS "
                f"{rec['host_rss_gib']:.2f} GiB, peak {rec['host_peak_rss_gib']:.2f} GiB; matmul estimate "
                f"{rec['matmul_estimate_s']:.0f}s")
        train_rss = proc_status_gib()
    finally:
        s.close()
        shutil.rmtree(store_dir, ignore_errors=True)
        shutil.rmtree(a.dir / "run", ignore_errors=True)
    steady = steps[1:] or steps
    keys = ("step_s", "compute_s", "stall_s", "read_s", "write_s", "disk_bound_s", "compute_ns_per_param",
            "step_vs_disk_bound", "overlap")
    return {"zo": zo, "zo_settings": cfg.zo.model_dump(), "plan": s.plan.describe(), "setup_s": s.setup_s,
            "setup_rss_gib": setup_rss, "train_rss_gib": train_rss, "steps": steps, "probes": probes,
            "steady": {k: summarize([r[k] for r in steady]) for k in keys}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=BENCH_OUT / "headline", help="model, store and logs go here")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--layers", type=int, default=288)
    ap.add_argument("--budget-gib", type=float, default=2.0, help="offload.host_budget_gib")
    ap.add_argument("--tier", choices=["nvme", "host"], default="nvme",
                    help="host: the masters in a host arena (a model that fits in RAM: lower --layers), no disk: "
                         "measures the compute per parameter of each variant without the disk's variance")
    ap.add_argument("--prefetch-depth", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--variant", action="append", default=None, metavar="NAME[:KEY=VALUE,...]",
                    help="a ZO setting to run, repeatable, run one after another on the same model (each builds "
                         "its own store); zo.* keys, e.g. lezo:distribution=rademacher,block_fraction=0.5. "
                         "Default: plain MeZO and LeZO with Rademacher z at block_fraction 0.5")
    ap.add_argument("--fio-gib", type=float, default=2.0)
    ap.add_argument("--out", type=Path, default=BENCH_OUT / "headline.json")
    ap.add_argument("--cleanup", action="store_true", help="delete the synthetic model at the end")
    ap.add_argument("--probe", type=int, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.probe:
        set_threads(a.threads)
        print(json.dumps(cpu_probe(a.probe)))
        return

    from make_synthetic import build

    set_threads(a.threads)
    minfo = machine(a.threads)  # at the start: the code this run loaded
    a.dir.mkdir(parents=True, exist_ok=True)
    model, store_dir = a.dir / "model", a.dir / "nvme"
    shape = {"hidden": a.hidden, "intermediate": a.intermediate, "layers": a.layers, "vocab": 49152}
    info = build(model, dry_run=True, **shape)
    need = info["bytes_bf16"] * ((0 if (model / "config.json").exists() else 1) + (a.tier == "nvme")) + 4e9
    free = disk_free_gb(a.dir) * GB
    log(f"disk: {free / GB:.1f} GB free, {need / GB:.1f} GB needed")
    if free < need:
        raise SystemExit(f"not enough free disk in {a.dir}: {free / GB:.1f} GB free, {need / GB:.1f} GB needed; "
                         "lower --layers")
    t0 = time.perf_counter()
    if not (model / "config.json").exists():
        info = build(model, **shape)
    build_s = time.perf_counter() - t0
    mem_total = machine()["mem_gib"].get("MemTotal", 0)
    log(f"model: {info['params'] / 1e9:.2f} B params, {info['bytes_bf16'] / GIB:.1f} GiB on disk "
        f"(RAM {mem_total:.1f} GiB), built in {build_s:.0f}s")

    data = make_data(a.dir / "data.jsonl")
    fio = []
    if a.tier == "nvme":
        fio.append(disk_baseline(a.dir / "fio", int(a.fio_gib * 2**30)))
        log(f"fio: read {fio[0]['fio_read_gbs']:.2f} GB/s, write {fio[0]['fio_write_gbs']:.2f} GB/s")
    variants = parse_variants(a.variant or DEFAULT_VARIANTS)
    P = info["params"]
    results = {}
    for name, zo in variants.items():
        results[name] = run_variant(a, name, zo, model, store_dir, data, fio, P)

    rows, summary = [], []
    for name, res in results.items():
        for r in res["steps"]:
            rows.append([name, r["step"], r["step_s"], r["compute_s"], r["stall_s"], r["read_s"], r["write_s"],
                         r["bytes_read_nvme"] / GB, r["bytes_written_nvme"] / GB, r["fio_read_gbs"],
                         r["fio_write_gbs"], r["disk_bound_s"], r["compute_ns_per_param"], r["step_vs_disk_bound"],
                         r["overlap"], r["host_peak_rss_gib"]])
        m = res["steady"]
        summary.append([name, ",".join(f"{k}={v}" for k, v in res["zo"].items()) or "-", m["step_s"]["median"], m["compute_ns_per_param"]["median"],
                        m["disk_bound_s"]["median"], m["step_vs_disk_bound"]["median"], m["overlap"]["median"],
                        res["train_rss_gib"]["VmHWM"]])
    print_table(["variant", "step", "step s", "compute s", "stall s", "read s", "write s", "GB read", "GB written",
                 "ceiling read GB/s", "ceiling write GB/s", "disk bound s", "compute ns/param",
                 "step / disk bound", "step / max(disk, compute)", "peak RSS GiB"], rows,
                title=f"headline: {P / 1e9:.2f} B params, {info['bytes_bf16'] / GIB:.1f} GiB bf16 on "
                      f"disk, RAM {mem_total:.1f} GiB, host budget {a.budget_gib} GiB, batch {a.batch} x {a.seq}, "
                      f"{a.threads} thread(s); disk ceiling = best of parallel fio settings, next to each step")
    print_table(["variant", "zo", "step s", "compute ns/param (target <= 1.85)", "disk bound s",
                 "step / disk bound", "step / max(disk, compute) (target <= 1.1)", "training peak RSS GiB (< 4)"],
                summary, title="steady state: medians of steps 2.. (step 1 applies no pending update)")
    write_json(a.out, {
        "benchmark": "headline", "machine": minfo,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()},
        "model": info, "build_s": build_s, "fio": fio, "variants": results,
    })
    shutil.rmtree(store_dir, ignore_errors=True)
    shutil.rmtree(a.dir / "fio", ignore_errors=True)
    shutil.rmtree(a.dir / "run", ignore_errors=True)
    if a.cleanup:
        shutil.rmtree(model, ignore_errors=True)


if __name__ == "__main__":
    main()

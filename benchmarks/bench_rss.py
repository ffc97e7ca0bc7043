"""Peak host RSS while training (NVMe tier) models whose weights exceed the host budget 4-15x.

    python benchmarks/bench_rss.py                                   # 28, 56, 112 layers; budget 0.75 GiB
    python benchmarks/bench_rss.py --layers 28,56 --budget-gib 0.75 --steps 2 --cleanup

Each case runs in its own process (``--child``, started by this script), which sets up a
``ZOTrainer`` on a synthetic LLaMA (``make_synthetic.py``: hidden 2048, intermediate 5632,
vocab 49152, untied, bf16; the depth varies, the block shape does not) with
``offload.tier: nvme``, ``offload.host_budget_gib: --budget-gib``, bf16 masters and fp32
compute, then resets its peak RSS (``/proc/self/clear_refs``) and runs ``--steps`` ZO steps.
Reported per case: VmRSS after the imports, VmHWM of the set-up (store built from the
checkpoint), VmHWM of the training steps alone, and ``ru_maxrss`` of the whole process from
``wait4``; beside them the planner's estimate (host staging = the budgeted buffers; device
working set, which on a CPU "device" is host memory too). The NVMe store and page cache
are excluded by design (O_DIRECT); checkpoints are streamed with pread + FADV_DONTNEED.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import BENCH_OUT, GB, GIB, disk_free_gb, log, machine, print_table, write_json

SHAPE = {"hidden": 2048, "intermediate": 5632, "vocab": 49152}


def child(a) -> None:
    import transformers  # noqa: F401
    from _common import ZOSession, make_data, proc_status_gib, reset_peak_rss, set_threads, zo_config

    import ferrytune.engine._zo_trainer  # noqa: F401  the heavy imports, before the baseline

    set_threads(a.threads)
    res = {"after_imports": proc_status_gib()}
    work = Path(a.work)
    data = make_data(work / "data.jsonl")
    cfg = zo_config(a.model, work / "run", "nvme", data=data, batch=a.batch, max_length=a.seq,
                    store_dtype="bfloat16", host_budget_gib=a.budget_gib, prefetch_depth=a.prefetch_depth,
                    nvme_dir=work / "nvme")
    s = ZOSession(cfg)
    res["after_setup"] = proc_status_gib()
    res["setup_s"] = s.setup_s
    plan = s.plan
    res["plan"] = {"describe": plan.describe(), "host_bytes": plan.host_bytes, "device_bytes": plan.device_bytes,
                   "staging_buffers": plan.staging_buffers, "staging_buffer_bytes": plan.staging_buffer_bytes}
    res["streamer_host_bytes"] = s.trainer.rt.streamer.host_bytes()
    res["clear_refs_ok"] = reset_peak_rss()
    res["steps"] = []
    for _ in range(a.steps):
        res["steps"].append(s.step())
    res["after_steps"] = proc_status_gib()
    s.close()
    print("RESULT " + json.dumps(res), flush=True)


def run_case(a, layers: int) -> dict:
    from make_synthetic import build

    shape = {**SHAPE, "hidden": a.hidden, "intermediate": a.intermediate}
    model = a.models_dir / f"synth-h{a.hidden}-l{layers}"
    if not (model / "config.json").exists():
        log(f"building {model} (disk free {disk_free_gb(a.models_dir):.1f} GB)")
        info = build(model, layers=layers, **shape)
    else:
        info = json.loads((model / "synthetic.json").read_text())
    work = a.models_dir / f"rss-work-l{layers}"
    cmd = [sys.executable, __file__, "--child", "--model", str(model), "--work", str(work), "--threads",
           str(a.threads), "--budget-gib", str(a.budget_gib), "--steps", str(a.steps), "--batch", str(a.batch),
           "--seq", str(a.seq), "--prefetch-depth", str(a.prefetch_depth)]
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in p.stdout:
        lines.append(line)
        if line.startswith("RESULT") or "Error" in line:
            print("   ", line[:200].rstrip(), flush=True)
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise SystemExit("child failed:\n" + "".join(lines[-40:]))
    res = json.loads(next(ln for ln in lines if ln.startswith("RESULT"))[len("RESULT "):])
    res["wall_s"] = time.perf_counter() - t0
    res["wait4_maxrss_gib"] = usage.ru_maxrss / 2**20
    res["model"] = info
    res["layers"] = layers
    shutil.rmtree(work, ignore_errors=True)
    if a.cleanup:
        shutil.rmtree(model, ignore_errors=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", default="28,56,112", help="model depths (comma separated)")
    ap.add_argument("--budget-gib", type=float, default=0.75, help="offload.host_budget_gib")
    ap.add_argument("--prefetch-depth", type=int, default=1)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--hidden", type=int, default=SHAPE["hidden"])
    ap.add_argument("--intermediate", type=int, default=SHAPE["intermediate"])
    ap.add_argument("--models-dir", type=Path, default=BENCH_OUT / "rss-models")
    ap.add_argument("--cleanup", action="store_true", help="delete each synthetic model after its case")
    ap.add_argument("--out", type=Path, default=BENCH_OUT / "rss.json")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(a)
    minfo = machine(a.threads)  # at the start: the code this run loaded

    cases = []
    for layers in [int(x) for x in a.layers.split(",")]:
        log(f"case: {layers} layers")
        cases.append(run_case(a, layers))
        c = cases[-1]
        log(f"  weights {c['model']['bytes_bf16'] / GB:.2f} GB, train VmHWM {c['after_steps']['VmHWM']:.2f} GiB, "
            f"process maxrss {c['wait4_maxrss_gib']:.2f} GiB")
    rows = []
    for c in cases:
        st = c["steps"][-1]
        rows.append([c["layers"], c["model"]["params"] / 1e9, c["model"]["bytes_bf16"] / GIB,
                     c["model"]["bytes_bf16"] / GIB / a.budget_gib, c["after_imports"]["VmRSS"],
                     c["after_setup"]["VmHWM"], c["after_steps"]["VmHWM"], c["wait4_maxrss_gib"],
                     c["plan"]["host_bytes"] / GIB, c["plan"]["device_bytes"] / GIB,
                     st["step_s"], st["bytes_read_nvme"] / GB])
    print_table(["layers", "B params", "weights GiB", "x budget", "RSS after imports", "HWM setup",
                 "HWM training", "maxrss process", "plan host GiB", "plan device GiB",
                 "step s", "GB read/step"], rows,
                title=f"peak RSS (GiB), NVMe tier, host budget {a.budget_gib} GiB, prefetch_depth {a.prefetch_depth},"
                      f" batch {a.batch} x {a.seq}, {a.threads} thread(s)")
    write_json(a.out, {"benchmark": "rss", "machine": minfo,
                       "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()},
                       "shape": {**SHAPE, "hidden": a.hidden, "intermediate": a.intermediate}, "cases": cases})


if __name__ == "__main__":
    main()

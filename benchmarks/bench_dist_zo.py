"""Distributed ZO on one machine: step time of PertP and DP on 2 ranks against 1 rank, and the
per-rank bytes read with and without sliced loading (issue 4).

    python benchmarks/bench_dist_zo.py                       # a tiny-ish LLaMA (4 x 256), 3 rounds
    python benchmarks/bench_dist_zo.py --model models/SmolLM2-135M-Instruct --rounds 3 --steps 6

Every job is a real launch (``torchrun --nproc-per-node 2 -m ferrytune.launch.train`` for 2 ranks,
``python -m ferrytune.launch.train`` for 1), each rank with one thread. Per round the jobs run one
after the other (interleaved, so load drift on the shared machine hits all of them alike); a job's
step time is the median of rank 0's ``step_s`` after the warm-up steps (rank 0 waits for the
all-reduce, so it is the job's step time). Ratios are taken within a round; the table shows their
median (min-max) over rounds. Bytes are exact counts from the metrics, not timings.

Jobs (same global batch, same micro-batch shape, same data and seed):

* ``1 rank``     host tier; the whole batch, both perturbation signs, on one process
* ``1 rank half batch``  half the batch on one process: half the forward work but all of the work
  that no layout splits (z generation for +eps/-2eps/+eps and the update, block transfers), i.e.
  what a 2-rank step would cost with free communication
* ``PertP x2``   host tier; rank 0 runs the +eps forwards, rank 1 the -eps forwards
* ``DP x2``      host tier; each rank half of the micro-batches, both signs
* ``DP x2 nvme`` / ``DP x2 nvme sliced`` / ``1 rank nvme``: the NVMe tier, for the bytes read per rank
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import yaml
from _common import BENCH_OUT, ROOT, log, machine, make_data, medians_of, print_table, summarize, write_json, zo_config

JOBS = {  # name: (ranks, parallel section, tier)
    "1 rank": (1, {}, "host"),
    "1 rank half batch": (1, {}, "host"),  # the ideal 2-rank step: half the forwards, all the per-step z work
    "PertP x2": (2, {"perturbation": 2}, "host"),
    "DP x2": (2, {"data": 2}, "host"),
    "1 rank nvme": (1, {}, "nvme"),
    "DP x2 nvme": (2, {"data": 2}, "nvme"),
    "DP x2 nvme sliced": (2, {"data": 2, "sliced_loading": True}, "nvme"),
}


def job_config(args, name: str, work: Path, data: Path) -> Path:
    _, parallel, tier = JOBS[name]
    slug = name.replace(" ", "_")
    out = work / slug
    for old in (out, work / f"{slug}-nvme"):  # a fresh run and block store every round
        shutil.rmtree(old, ignore_errors=True)
    d = zo_config(args.model, out, tier, data=data, batch=args.batch, max_length=args.max_length,
                  nvme_dir=work / f"{slug}-nvme" if tier == "nvme" else None, steps=args.steps,
                  host_budget_gib=8.0, store_dtype=args.store_dtype).to_dict()
    d["train"]["micro_batch_size"] = args.micro_batch
    if name == "1 rank half batch":
        d["train"]["batch_size"] = args.batch // 2
    d["parallel"] = {**d["parallel"], "check_every_steps": 10**6, **parallel}
    path = work / f"{slug}.yaml"
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    return path


def launch(cfg: Path, ranks: int, port: int) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    if ranks == 1:
        cmd = [sys.executable, "-m", "ferrytune.launch.train", str(cfg)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks),
               "--master-addr", "127.0.0.1", "--master-port", str(port), "-m", "ferrytune.launch.train", str(cfg)]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stderr[-4000:]}")


def read_job(out: Path, warmup: int) -> dict:
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    recs = [r for r in recs if "step_s" in r and r["step"] > warmup]
    return {"step_s": summarize([r["step_s"] for r in recs])["median"],
            "steps_s_raw": [r["step_s"] for r in recs],
            "read_s": summarize([r["read_s"] for r in recs])["median"],
            "bytes_read_per_step": recs[-1]["bytes_read_host"] + recs[-1]["bytes_read_nvme"],
            "losses": [r["loss"] for r in recs]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="HF folder (default: build a tiny-ish LLaMA)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=8, help="steps per job (the first --warmup are not timed)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--store-dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--jobs", nargs="*", default=list(JOBS), choices=list(JOBS))
    p.add_argument("--out", default=str(BENCH_OUT / "dist_zo.json"))
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-dist-zo-", dir=ROOT / "bench-out" if (ROOT / "bench-out").is_dir() else None))
    if args.model is None:
        from ferrytune.launch._demo import build_tiny_model
        args.model = str(build_tiny_model(work / "tiny-model", layers=4, hidden=256, vocab_size=512))
    data = make_data(work / "train.jsonl", rows=256)
    settings = {k: v for k, v in vars(args).items()}
    settings["threads_per_rank"] = 1
    log(f"model {args.model}; jobs {args.jobs}; {args.rounds} rounds of {args.steps} steps")
    rounds = []
    port = 29500 + os.getpid() % 1000
    for r in range(args.rounds):
        res = {}
        for name in args.jobs:
            cfg = job_config(args, name, work, data)
            launch(cfg, JOBS[name][0], port)
            res[name] = read_job(work / name.replace(" ", "_"), args.warmup)
            log(f"round {r + 1} {name}: step {res[name]['step_s']:.3f}s, read {res[name]['bytes_read_per_step'] / 2**20:.2f} MiB/step")
        ratios = {}
        if "1 rank" in res:
            for name in ("1 rank half batch", "PertP x2", "DP x2"):
                if name in res:
                    ratios[f"{name} / 1 rank step time"] = res[name]["step_s"] / res["1 rank"]["step_s"]
        if "1 rank nvme" in res:
            for name in ("DP x2 nvme", "DP x2 nvme sliced"):
                if name in res:
                    ratios[f"{name} / 1 rank nvme bytes"] = (res[name]["bytes_read_per_step"]
                                                             / res["1 rank nvme"]["bytes_read_per_step"])
                    ratios[f"{name} / 1 rank nvme step time"] = res[name]["step_s"] / res["1 rank nvme"]["step_s"]
        rounds.append({"jobs": res, "ratios": ratios})
    meds = {name: medians_of([rd["jobs"][name] for rd in rounds], ["step_s", "read_s", "bytes_read_per_step"])
            for name in args.jobs}
    ratio_meds = medians_of([rd["ratios"] for rd in rounds]) if rounds and rounds[0]["ratios"] else {}
    rows = [[name, JOBS[name][0], meds[name]["step_s"]["median"],
             f"{meds[name]['bytes_read_per_step']['median'] / 2**20:.2f}"] for name in args.jobs]
    print_table(["job", "ranks", "step s (median)", "MiB read per rank per step"], rows,
                title=f"distributed ZO, {Path(args.model).name}, batch {args.batch} x {args.max_length} tokens, "
                      f"micro-batch {args.micro_batch}, 1 thread per rank")
    print_table(["ratio", "median", "min", "max"],
                [[k, v["median"], v["min"], v["max"]] for k, v in ratio_meds.items()], title="ratios within a round")
    write_json(Path(args.out), {"machine": machine(threads=1), "settings": settings, "rounds": rounds,
                                "medians": meds, "ratio_medians": ratio_meds})
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

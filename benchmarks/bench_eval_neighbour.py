"""How long one job's evaluation delays a neighbour's training step on the same service worker.

    python benchmarks/bench_eval_neighbour.py
    python benchmarks/bench_eval_neighbour.py --slices 0,0.05,0.2,inf --eval-rows 512 --out bench-out/eval_neighbour.json

One ``TrainWorker`` (the class the service runs as its Ray actor, here in-process, 1 torch
thread) on a tiny-ish random LLaMA (hidden 256, 4 layers; ``bench_multi_lora``'s builder).
Job B trains (classification, batch 8); once B has made ``--warm-steps`` steps, job A joins
with ``--eval-rows`` eval rows (chunks of A's batch size, 8), so its step-0 eval starts. For
each ``--slices`` value (the worker's ``eval_slice_s``; ``inf`` = the whole eval at once, as
an unsliced eval would run) it reports B's step interval before A joined (median), the
intervals that overlap A's eval (median and max) and the delay = interval - median interval
before (median and max), plus one eval forward's time and the eval's wall time (from A's
joining, its data load on the loader thread included).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_multi_lora import build_tiny_base

from ferrytune.data import demo_data_path
from ferrytune.service._worker import TrainWorker, add_command


def job_config(base: Path, train: Path, *, steps: int, eval_file: Path | None = None) -> dict:
    cfg = {"method": "lora", "model": {"path": str(base)},
           "data": {"train": str(train), "max_length": 64},
           "train": {"steps": steps, "batch_size": 8, "lr": 1e-3, "seed": 0},
           "lora": {"rank": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]}}
    if eval_file is not None:
        cfg["data"]["eval"] = str(eval_file)
    return cfg


def run_one(base: Path, train: Path, ev: Path, work: Path, slice_s: float, warm_steps: int) -> dict:
    worker = TrainWorker("w0", str(base), dtype="float32", token_capacity=4096, checkpoint_every_steps=10**6,
                         num_threads=1, eval_slice_s=slice_s)

    def add(job_id, cfg):
        return add_command(job_id, config=cfg, train_path=cfg["data"]["train"], work_dir=str(work / job_id),
                           adapter_dir=str(work / f"{job_id}-adapter"), base_name="tiny")

    worker.tick([add("b", job_config(base, train, steps=10**5))], slice_s=0.0)
    b_times: list[float] = []
    while len(b_times) < warm_steps:
        b_times += [m["time"] for m in worker.tick([], slice_s=0.5)["jobs"]["b"]["metrics"]]
    trainer = worker._trainer
    forwards: list[float] = []
    real = trainer._eval_forward

    def timed(chunks, index):
        t0 = time.perf_counter()
        try:
            return real(chunks, index)
        finally:
            forwards.append(time.perf_counter() - t0)

    trainer._eval_forward = timed
    joined_at = b_times[-1]
    commands, a_eval = [add("a", job_config(base, train, steps=1, eval_file=ev))], None
    while a_eval is None:
        report = worker.tick(commands, slice_s=0.5)
        commands = []
        b_times += [m["time"] for m in report["jobs"]["b"]["metrics"]]
        evals = report["jobs"].get("a", {}).get("evals")
        a_eval = evals[0] if evals else None
    done_at = a_eval["time"]
    while b_times[-1] <= done_at:  # B's first step after the eval closes the last interval
        b_times += [m["time"] for m in worker.tick([], slice_s=0.5)["jobs"]["b"]["metrics"]]
    worker.close()
    before = [y - x for x, y in zip(b_times, b_times[1:]) if y <= joined_at]
    # B's step intervals that overlap A's eval (A's data loads first, on the loader thread)
    during = [y - x for x, y in zip(b_times, b_times[1:]) if y > joined_at and x < done_at]
    base_s = statistics.median(before[1:])  # the first interval includes the first tick's set-up
    return {"eval_slice_s": slice_s, "b_step_before_s": base_s, "b_steps_during_eval": len(during),
            "b_interval_during_median_s": statistics.median(during),
            "b_interval_during_max_s": max(during),
            "delay_median_s": statistics.median(during) - base_s, "delay_max_s": max(during) - base_s,
            "eval_forwards": len(forwards), "eval_forward_median_s": statistics.median(forwards),
            "eval_wall_s": a_eval["time"] - joined_at, "eval_samples": a_eval["eval_samples"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--slices", default="0,0.05,0.2,inf", help="eval_slice_s values (inf: the whole eval at once)")
    p.add_argument("--eval-rows", type=int, default=512)
    p.add_argument("--warm-steps", type=int, default=12)
    p.add_argument("--out", default="bench-out/eval_neighbour.json")
    args = p.parse_args()
    rows = [json.loads(x) for x in demo_data_path("train").read_text().splitlines() if x.strip()]
    results = []
    with tempfile.TemporaryDirectory(prefix="ft-eval-bench-") as tmp:
        tmp = Path(tmp)
        base = build_tiny_base(tmp / "base")
        train, ev = tmp / "train.jsonl", tmp / "eval.jsonl"
        train.write_text("".join(json.dumps(r) + "\n" for r in rows[:256]))
        ev.write_text("".join(json.dumps(r) + "\n" for r in (rows * 8)[:args.eval_rows]))
        for k, value in enumerate(args.slices.split(",")):
            slice_s = math.inf if value.strip() == "inf" else float(value)
            results.append(run_one(base, train, ev, tmp / f"run{k}", slice_s, args.warm_steps))
    print(f"{'eval_slice_s':>12} {'B step':>8} {'B interval in eval (median / max)':>34} "
          f"{'delay (median / max)':>22} {'B steps in eval':>16} {'fwd':>7} {'eval wall':>10}")
    for r in results:
        ms = lambda v: f"{v * 1e3:.0f}"
        print(f"{r['eval_slice_s']:>12} {ms(r['b_step_before_s']) + ' ms':>8} "
              f"{ms(r['b_interval_during_median_s']) + ' / ' + ms(r['b_interval_during_max_s']) + ' ms':>34} "
              f"{ms(r['delay_median_s']) + ' / ' + ms(r['delay_max_s']) + ' ms':>22} {r['b_steps_during_eval']:>16} "
              f"{ms(r['eval_forward_median_s']) + ' ms':>7} {r['eval_wall_s']:>9.2f}s")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"eval_rows": args.eval_rows, "results": results}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

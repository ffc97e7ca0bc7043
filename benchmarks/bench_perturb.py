"""Perturbation throughput: ferrytune's counter-based kernels against MeZO's randn + add_.

    python benchmarks/bench_perturb.py
    python benchmarks/bench_perturb.py --numel 64M,134.5M --threads 1,2 --rounds 5 --out bench-out/perturb.json

For each tensor size and thread count, per round and interleaved (A B C D E F A B ...):

* ``randn+add_``  MeZO's way: ``z = torch.randn(n, generator=g); t.add_(z, alpha=eps)``
* ``ft-gauss``    ``add_perturbation_(t, key, alpha=eps)`` (Gaussian)
* ``ft-rade``     ``add_perturbation_(t, key, alpha=eps, dist="rademacher")``
* ``add_(z)``     ``t.add_(z, alpha=eps)`` with z already in memory: the memory-bound floor of
                  applying a stored z (reads 2 streams, writes 1)
* ``add_(s)``     ``t.add_(eps)``: reads 1 stream and writes 1, the same traffic as ft-*
* ``ft-round``    ``stochastic_round_(t, t_bf16, key)`` next to ``copy_bf16`` (``t_bf16.copy_(t)``, nearest)

Ratios are taken within a round and summarised as median [min, max] over rounds
(the machine is shared; only in-round ratios count). Process CPU seconds are
recorded too, and their in-round ratio printed, as a check against descheduling. ``torch.set_num_threads``
and ``ferrytune.kernels.set_num_threads`` are set to the same value. Rounds
follow one warm-up round, which also triggers numba's compile (or cache load).
134.5M is SmolLM2-135M's parameter count (134,515,008).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ferrytune import kernels
from ferrytune.kernels import PerturbKey, add_perturbation_, stochastic_round_

EPS = 1e-3
BASELINE = "randn+add_"
FLOOR = "add_(z)"


def parse_numel(text: str) -> int:
    """'64M' -> 67108864 (binary M), '134.5M' -> 134515008 (SmolLM2-135M), or a plain integer."""
    if text == "134.5M":
        return 134_515_008
    if text.endswith("M"):
        return int(float(text[:-1]) * (1 << 20))
    return int(text)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def make_ops(n: int, step: list[int]) -> dict[str, Callable[[], None]]:
    """The timed operations on one shared set of buffers (allocated once, outside the timing)."""
    t = torch.randn(n)
    z = torch.randn(n)
    t_bf16 = torch.empty(n, dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(0)

    def key() -> PerturbKey:
        step[0] += 1  # a fresh key per call, as a training run would use
        return PerturbKey(seed=0, step=step[0], index=0, param_id=1)

    return {
        BASELINE: lambda: t.add_(torch.randn(n, generator=gen), alpha=EPS),
        "ft-gauss": lambda: add_perturbation_(t, key(), alpha=EPS),
        "ft-rade": lambda: add_perturbation_(t, key(), alpha=EPS, dist="rademacher"),
        FLOOR: lambda: t.add_(z, alpha=EPS),
        "add_(s)": lambda: t.add_(EPS),
        "ft-round": lambda: stochastic_round_(t, t_bf16, key()),
        "copy_bf16": lambda: t_bf16.copy_(t),
    }


def run_case(n: int, threads: int, rounds: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall and process-CPU seconds per op per round, ops interleaved; round 0 (warm-up) dropped.

    CPU seconds (all threads of the process) are recorded beside wall seconds because other
    jobs share the cores: a descheduled op loses wall time but not CPU time.
    """
    torch.set_num_threads(threads)
    kernels.set_num_threads(threads)
    ops = make_ops(n, [0])
    wall: dict[str, list[float]] = {name: [] for name in ops}
    cpu: dict[str, list[float]] = {name: [] for name in ops}
    for r in range(rounds + 1):
        for name, op in ops.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            op()
            elapsed, elapsed_cpu = time.perf_counter() - start, time.process_time() - start_cpu
            if r > 0:
                wall[name].append(elapsed)
                cpu[name].append(elapsed_cpu)
    del ops
    return wall, cpu


def summarise(n: int, seconds: dict[str, list[float]], cpu: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    """Median G elements/s and in-round ratios (median, min, max) to randn+add_ and to add_(z)."""
    out = {}
    for name, secs in seconds.items():
        to_base = [b / s for b, s in zip(seconds[BASELINE], secs)]
        to_floor = [f / s for f, s in zip(seconds[FLOOR], secs)]
        out[name] = {
            "gelem_per_s": n / statistics.median(secs) / 1e9,
            "x_randn_add_cpu_time_median": statistics.median([b / s for b, s in zip(cpu[BASELINE], cpu[name])]),
            "x_randn_add_median": statistics.median(to_base),
            "x_randn_add_min": min(to_base),
            "x_randn_add_max": max(to_base),
            "of_add_median": statistics.median(to_floor),
            "of_add_min": min(to_floor),
            "of_add_max": max(to_floor),
        }
    return out


def print_table(n: int, threads: int, summary: dict[str, dict[str, float]]) -> None:
    print(f"\nnumel={n:,}  threads={threads}")
    print(
        f"| {'op':<10} | {'G elem/s':>8} | {'x randn+add_ med [min, max]':>28} | {'/ add_(z) med [min, max]':>25} "
        f"| {'x randn+add_ CPU-time':>21} |"
    )
    print(f"|{'-' * 12}|{'-' * 10}|{'-' * 30}|{'-' * 27}|{'-' * 23}|")
    for name, s in summary.items():
        base = f"{s['x_randn_add_median']:.2f} [{s['x_randn_add_min']:.2f}, {s['x_randn_add_max']:.2f}]"
        floor = f"{s['of_add_median']:.2f} [{s['of_add_min']:.2f}, {s['of_add_max']:.2f}]"
        print(
            f"| {name:<10} | {s['gelem_per_s']:>8.3f} | {base:>28} | {floor:>25} "
            f"| {s['x_randn_add_cpu_time_median']:>21.2f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--numel", default="64M", help="comma-separated sizes: 64M, 134.5M or integers")
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds after one warm-up round (>= 3)")
    parser.add_argument("--out", type=Path, default=Path("bench-out/perturb.json"))
    args = parser.parse_args()
    if args.rounds < 3:
        parser.error("--rounds must be at least 3")
    sizes = [parse_numel(s) for s in args.numel.split(",")]
    thread_counts = [int(x) for x in args.threads.split(",")]

    load_at_start = os.getloadavg()
    results = []
    for n in sizes:
        for threads in thread_counts:
            wall, cpu = run_case(n, threads, args.rounds)
            summary = summarise(n, wall, cpu)
            print_table(n, threads, summary)
            results.append({"numel": n, "threads": threads, "seconds": wall, "cpu_seconds": cpu, "summary": summary})

    import numba

    report = {
        "machine": {
            "nproc": os.cpu_count(),
            "cpu": cpu_model(),
            "torch": torch.__version__,
            "numba": numba.__version__,
            "python": platform.python_version(),
            "cpu_backend": kernels.cpu_backend(),
            "load_avg_at_start": load_at_start,
            "load_avg_at_end": os.getloadavg(),
        },
        "settings": {"numel": sizes, "threads": thread_counts, "rounds": args.rounds, "warmup_rounds": 1, "eps": EPS},
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()

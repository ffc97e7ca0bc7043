"""Three short ratios on a CUDA machine, for benchmarks/gpu_check.sh (~2 min on one H200).

    python benchmarks/gpu_ratios.py --scratch DIR --out FILE.json

* ZO host-tier step / resident step (same model, batch, arithmetic: the cost of streaming over PCIe);
* ZO NVMe-tier step / its disk bound (bytes the step reads and writes at the disk's ceiling, the best
  of the parallel fio settings of ``_common.disk_ceiling``; skipped, with the reason, without fio);
* LoRA host-tier step / resident step.

Model: a random 12-layer LLaMA, hidden 1024 (~180M parameters, fp32), built in DIR. Each figure is
the median step time of steps 2..N (the first step warms kernels and caches), measured one after
another in this run. Prints a table and writes the JSON.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import disk_bound_s, disk_ceiling, make_data, print_table, write_json  # noqa: E402


def _median_step(out: Path) -> tuple[float, dict]:
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in ln]
    recs = [r for r in recs if "step_s" in r][1:]
    return statistics.median(r["step_s"] for r in recs), recs[len(recs) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scratch", type=Path, required=True, help="model, data, runs and the NVMe store go here")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run of this script (with --small)")
    ap.add_argument("--small", action="store_true", help="a 2-layer, hidden-64 model (smoke runs)")
    a = ap.parse_args()
    import torch

    from ferrytune.config import config_from_dict
    from ferrytune.launch import run
    from ferrytune.launch._demo import build_tiny_model

    if a.device == "cuda" and not torch.cuda.is_available():
        print("gpu_ratios: no CUDA device here; nothing run")
        return
    scratch = a.scratch
    size = {"hidden": 64, "layers": 2} if a.small else {"hidden": 1024, "layers": 12}
    model = build_tiny_model(scratch / "model", vocab_size=2048, tie=False, **size)
    data = make_data(scratch / "data.jsonl", rows=256)
    times, sample = {}, {}
    for method in ("zo", "lora"):
        for tier in ("resident", "host", "nvme") if method == "zo" else ("resident", "host"):
            out = scratch / f"{method}-{tier}"
            shutil.rmtree(out, ignore_errors=True)
            d = {"method": method, "device": a.device, "model": {"path": str(model)},
                 "data": {"train": str(data), "max_length": 128},
                 "train": {"steps": a.steps, "batch_size": 8, "lr": 1e-6 if method == "zo" else 1e-4},
                 "offload": {"tier": tier, "nvme_dir": str(scratch / "nvme")}, "output_dir": str(out),
                 "resume": "never", "overwrite": True}
            if method == "lora":
                d["lora"] = {"rank": 8, "target_modules": ["q_proj", "v_proj"]}
            run(config_from_dict(d), progress=False)
            times[(method, tier)], sample[(method, tier)] = _median_step(out)
    res = {"device": torch.cuda.get_device_name(0) if a.device == "cuda" else "cpu (smoke run)", "step_s": {f"{m}-{t}": v for (m, t), v in times.items()},
           "zo_host_over_resident": times[("zo", "host")] / times[("zo", "resident")],
           "lora_host_over_resident": times[("lora", "host")] / times[("lora", "resident")]}
    if shutil.which("fio"):
        base = disk_ceiling(scratch / "fio", size_bytes=1 << 30)
        bound = disk_bound_s(sample[("zo", "nvme")], base)
        res.update(disk=base, zo_nvme_disk_bound_s=bound, zo_nvme_over_disk_bound=times[("zo", "nvme")] / bound)
    else:
        res["zo_nvme_over_disk_bound"] = None
        res["skipped"] = "fio is not installed here: no disk ceiling to divide by"
    rows = [["ZO host / resident", f"{res['zo_host_over_resident']:.2f}"],
            ["ZO NVMe / disk bound", "-" if res["zo_nvme_over_disk_bound"] is None
             else f"{res['zo_nvme_over_disk_bound']:.2f}"],
            ["LoRA host / resident", f"{res['lora_host_over_resident']:.2f}"]]
    print_table(["ratio", "value"], rows, title=f"gpu_ratios on {res['device']}")
    write_json(a.out, res)


if __name__ == "__main__":
    main()

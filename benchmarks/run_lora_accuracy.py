"""LoRA accuracy on rt-polarity with ferrytune's own trainer: dev accuracy before and after, wall time.

    nohup python benchmarks/run_lora_accuracy.py > /tmp/lora_acc.log 2>&1 &     # 90 x 8, lr 5e-4, 300 dev rows
    python benchmarks/run_lora_accuracy.py --steps 150 --batch-size 16 --lr 4e-4 --eval-samples 500

SmolLM2-135M-Instruct, prompt ``"{text} It was"``, verbalizer ``[" terrible", " great"]``
(the defaults of ``data.template`` / ``data.verbalizer``), ``method: lora`` on q_proj/v_proj.
The run is ``LoraTrainer.setup()`` -> ``evaluate()`` (the fresh adapter has B = 0, so this is
the zero-shot base) -> ``train()`` (what ``ferrytune train`` / ``run(cfg)`` does, ending with
its own evaluation on the same dev rows) -> ``close()``. The defaults are picked to stay under
one hour of two busy CPU cores. Writes ``bench-out/lora_accuracy.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(REPO / "models/SmolLM2-135M-Instruct"))
    p.add_argument("--data", default=str(REPO.parent / "shared/data/rt-polarity"))
    p.add_argument("--steps", type=int, default=90)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup-steps", type=int, default=10)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--eval-samples", type=int, default=300)
    p.add_argument("--tier", default="host", choices=["resident", "host", "nvme"])
    p.add_argument("--nvme-dir", default="/work/bench-tmp/lora_acc_store")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-dir", default="/work/bench-tmp/lora_acc_run")
    p.add_argument("--out", default=str(REPO / "bench-out/lora_accuracy.json"))
    args = p.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from ferrytune.config import config_from_dict
    from ferrytune.engine._lora_trainer import LoraTrainer

    cfg_dict = {
        "method": "lora",
        "model": {"path": args.model, "compute_dtype": "float32", "store_dtype": "auto"},
        "data": {"train": f"{args.data}/train.jsonl", "eval": f"{args.data}/dev.jsonl",
                 "max_length": args.max_length, "eval_samples": args.eval_samples},
        "train": {"steps": args.steps, "batch_size": args.batch_size, "seed": args.seed, "lr": args.lr,
                  "lr_schedule": "linear", "warmup_steps": args.warmup_steps, "grad_clip": 1.0,
                  "log_every_steps": 1},
        "lora": {"rank": args.rank, "alpha": args.alpha, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        "offload": {"tier": args.tier, **({"nvme_dir": args.nvme_dir} if args.tier == "nvme" else {})},
        "output_dir": args.output_dir,
        "resume": "never", "overwrite": True,
        "device": "cpu",
    }
    cfg = config_from_dict(cfg_dict)
    t_all = time.perf_counter()
    tr = LoraTrainer(cfg)
    t0 = time.perf_counter()
    tr.setup()
    setup_s = time.perf_counter() - t0
    dev_labels = [e.label for e in tr.eval_examples]
    majority = max(dev_labels.count(c) for c in set(dev_labels)) / len(dev_labels)
    try:
        t0 = time.perf_counter()
        before = tr.evaluate()
        eval_before_s = time.perf_counter() - t0
        print(f"before: {before} ({eval_before_s:.0f} s)", flush=True)
        t0 = time.perf_counter()
        res = tr.train(progress=False)  # ends with its own evaluation on the same rows
        train_and_eval_s = time.perf_counter() - t0
    finally:
        tr.close()
    total_s = time.perf_counter() - t_all
    recs = [json.loads(x) for x in (Path(args.output_dir) / "metrics.jsonl").read_text().splitlines() if x.strip()]
    steps = [r for r in recs if "loss" in r and "step_s" in r]
    step_s = sorted(r["step_s"] for r in steps)
    after = res.eval or {}
    out = {
        "benchmark": "lora_accuracy",
        "machine": {"nproc": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "python": platform.python_version(), "load_avg_at_end": os.getloadavg()},
        "settings": {**vars(args), "config": cfg.to_dict()},
        "dev_rows": len(dev_labels), "dev_majority_class": majority,
        "accuracy_before": before.get("accuracy"), "loss_before": before.get("loss"),
        "accuracy_after": after.get("eval_accuracy"), "loss_after": after.get("eval_loss"),
        "wall_s": {"setup": setup_s, "eval_before": eval_before_s, "train_plus_final_eval": train_and_eval_s,
                   "total": total_s, "train_steps_sum": sum(step_s)},
        "step_s_median": step_s[len(step_s) // 2] if step_s else None,
        "train_loss_first10_mean": sum(r["loss"] for r in steps[:10]) / max(len(steps[:10]), 1),
        "train_loss_last10_mean": sum(r["loss"] for r in steps[-10:]) / max(len(steps[-10:]), 1),
        "host_peak_rss_gib": max((r.get("host_peak_rss_gib", 0) for r in steps), default=None),
        "adapter": str(res.final_dir) if hasattr(res, "final_dir") else None,
        "losses": [r["loss"] for r in steps],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print("| dev rows | majority | acc before | acc after | train steps x batch | lr | wall (total) |")
    print(f"| {len(dev_labels)} | {majority:.3f} | {out['accuracy_before']:.3f} | {out['accuracy_after']:.3f} | "
          f"{args.steps} x {args.batch_size} | {args.lr:g} | {total_s / 60:.1f} min |")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""LoRA optimizer state and step time per ``train.optimizer`` (adamw, adam_mini, sgd_sai).

    python benchmarks/bench_lora_optimizers.py                          # tiny random LLaMA, ~1 min
    python benchmarks/bench_lora_optimizers.py --model /path/to/SmolLM2-135M --steps 6

One process, ``method: lora`` on the resident base (``LoraTrainer``, fp32), LoRA r=8 alpha=16 on
``--targets`` (default ``all-linear``), the demo classification data, batch 8, grad clip 1.0.
For each optimizer it reports, from the real optimizer after the timed steps:

* ``state_bytes``: every tensor in the optimizer's state (``optimizer.state``), and the
  estimate ``engine.optimizer_state_bytes`` gives the service (they must agree: checked);
* ``state_per_param``: state bytes / adapter parameters (AdamW: 8 = two fp32 moments);
* ``step_s``: a whole training step (streamed forward, backward, clip, optimizer), and
  ``optim_step_s``: ``optimizer.step()`` alone; medians over the timed steps (the optimizers take
  turns step by step, each from the same adapter init on the same batches); ``optim_step_alone_s``:
  ``optimizer.step()`` repeated ``--optim-repeats`` times after training on the last gradient;
* ``loss_last``: the training loss of the last timed step (a sanity figure, not a quality claim:
  a few steps, and SGD-SaI runs at ``--sgd-sai-lr``, Adam's at ``--lr``).

Writes ``bench-out/lora_optimizers.json``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from _common import log, machine, print_table, set_threads, write_json  # noqa: E402

OPTIMIZERS = ("adamw", "adam_mini", "sgd_sai")


def _config(model: str, out: Path, optimizer: str, args):
    from ferrytune.config import config_from_dict
    from ferrytune.data import demo_data_path

    lr = args.sgd_sai_lr if optimizer == "sgd_sai" else args.lr
    targets = args.targets if args.targets == "all-linear" else args.targets.split(",")
    return config_from_dict({
        "method": "lora", "model": {"path": model}, "offload": {"tier": "resident"}, "output_dir": str(out),
        "resume": "never", "data": {"train": str(demo_data_path("train")), "eval": None, "max_length": args.max_length},
        "train": {"steps": args.steps + 1, "batch_size": args.batch_size, "lr": lr, "seed": 0, "optimizer": optimizer,
                  "grad_clip": 1.0},
        "lora": {"rank": args.rank, "alpha": 2 * args.rank, "dropout": 0.0, "target_modules": targets},
    })


def _state_bytes(optim) -> int:
    import torch

    return sum(v.numel() * v.element_size() for s in optim.state.values() for v in s.values()
               if isinstance(v, torch.Tensor))


def bench(model: str, args) -> dict:
    from ferrytune.engine import LoraTrainer, optimizer_state_bytes

    work = Path(tempfile.mkdtemp(prefix="bench-lora-optim-"))
    trainers = {}
    for name in OPTIMIZERS:
        tr = LoraTrainer(_config(model, work / name, name, args))
        tr.setup()
        trainers[name] = tr
    timing = {name: {"step_s": [], "optim_step_s": []} for name in OPTIMIZERS}
    losses = {}
    try:
        for tr in trainers.values():  # step 0: state allocated (SGD-SaI's A tensors at step 1)
            tr.train_step(0)
        for step in range(1, args.steps + 1):
            for name, tr in trainers.items():
                real_step, spent = tr.optim.step, []

                def timed(real_step=real_step, spent=spent):
                    t0 = time.perf_counter()
                    real_step()
                    spent.append(time.perf_counter() - t0)

                tr.optim.step = timed
                t0 = time.perf_counter()
                res = tr.train_step(step)
                timing[name]["step_s"].append(time.perf_counter() - t0)
                timing[name]["optim_step_s"].append(spent[0])
                tr.optim.step = real_step
                losses[name] = res.loss
        # optimizer.step() alone, repeated on the last real gradient: steadier than one per step
        optim_alone = {}
        for name, tr in trainers.items():
            spent = []
            for _ in range(args.optim_repeats):
                t0 = time.perf_counter()
                tr.optim.step()
                spent.append(time.perf_counter() - t0)
            optim_alone[name] = statistics.median(spent)
        out = {}
        for name, tr in trainers.items():
            params = sum(p.numel() for p in tr.params)
            measured = _state_bytes(tr.optim)
            estimate = optimizer_state_bytes(name, [p.shape for p in tr.params])
            if measured != estimate:
                raise RuntimeError(f"{name}: state {measured} bytes, optimizer_state_bytes says {estimate}")
            out[name] = {"adapter_params": params, "adapter_tensors": len(tr.params), "state_bytes": measured,
                         "state_per_param": measured / params, "estimate_bytes": estimate,
                         "step_s": statistics.median(timing[name]["step_s"]),
                         "optim_step_s": statistics.median(timing[name]["optim_step_s"]),
                         "optim_step_alone_s": optim_alone[name],
                         "step_s_all": timing[name]["step_s"], "optim_step_s_all": timing[name]["optim_step_s"],
                         "loss_last": losses[name], "lr": tr.cfg.train.lr}
        return out
    finally:
        for tr in trainers.values():
            tr.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="HF model folder (default: a tiny random LLaMA, built here)")
    ap.add_argument("--targets", default="all-linear", help="all-linear or comma-separated module names")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--steps", type=int, default=4, help="timed steps (after one untimed)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-4, help="adamw / adam_mini")
    ap.add_argument("--sgd-sai-lr", type=float, default=1e-5, help="sgd_sai (its steps are ~sqrt(numel) larger)")
    ap.add_argument("--optim-repeats", type=int, default=20, help="optimizer.step() alone, repeated (after training)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench-out/lora_optimizers.json")
    args = ap.parse_args()
    set_threads(args.threads)
    model = args.model
    if model is None:
        from ferrytune.launch._demo import build_tiny_model

        model = str(build_tiny_model(Path(tempfile.mkdtemp(prefix="bench-tiny-")) / "llama", hidden=64, layers=4))
    log(f"model {model}")
    res = bench(model, args)
    adamw = res["adamw"]["state_bytes"]
    rows = [[name, r["adapter_params"], r["state_bytes"], round(r["state_per_param"], 3),
             round(r["state_bytes"] / adamw, 3), round(r["step_s"] * 1e3, 1), round(r["optim_step_s"] * 1e3, 2),
             round(r["optim_step_alone_s"] * 1e3, 2), round(r["loss_last"], 4)] for name, r in res.items()]
    print_table(["optimizer", "adapter params", "state bytes", "bytes/param", "vs adamw", "step ms",
                 "optimizer.step ms (in step)", f"optimizer.step ms (alone, x{args.optim_repeats})", "loss (last)"], rows,
                title=f"LoRA r={args.rank} {args.targets}, batch {args.batch_size} x <= {args.max_length} tokens, "
                      f"median of {args.steps} steps")
    write_json(REPO / args.out, {"args": vars(args), "model": model, "machine": machine(args.threads),
                                 "results": res})


if __name__ == "__main__":
    main()

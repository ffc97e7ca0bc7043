"""NVMe-streamed ferrytune LoRA against DeepSpeed ZeRO-Infinity (ZeRO-3, offload_param to NVMe).

    python benchmarks/bench_lora_zero_infinity.py                     # 5 rounds, 2 timed steps each, ~12 min
    python benchmarks/bench_lora_zero_infinity.py --rounds 4 --steps 3 --threads 2 --dir /work/bench-tmp/zi
    python benchmarks/bench_lora_zero_infinity.py --micro-batches 4   # 4 micro-batches of 8 x 64 per step

With ``--micro-batches M`` a step accumulates M micro-batches of ``--batch-size`` rows: ferrytune with
``train.accumulation: layer_major`` (``--ft-accumulation``), DeepSpeed with
``gradient_accumulation_steps: M`` (``engine.backward`` + ``engine.step`` per micro-batch, as its docs
say; it steps the optimizer at the boundary and scales each micro-batch's loss by 1/M, the same mean
ferrytune takes).

Same model (SmolLM2-135M-Instruct), LoRA r=8 alpha=16 on q_proj/v_proj (PEFT on the DeepSpeed
side, its adapter initialised with ferrytune's seed-0 init, so both sides' losses must agree
step by step), fp32 compute, AdamW lr 1e-4, grad clip 1.0, the same batches of 8 x 64 tokens, the same
disk directory. Each side runs in its own subprocess (DeepSpeed needs its own process group and
environment), one at a time, interleaved ``ft ds`` / ``ds ft`` for ``--rounds`` rounds; each
child does its setup, ``--warmup-steps`` untimed steps, then ``--steps`` timed steps, and reports:

* step seconds (median of its timed steps), and CPU seconds of the whole process per step
  (``time.process_time``: all threads, DeepSpeed's aio threads and ferrytune's IO threads included);
* disk bytes read per step: the delta of ``read_bytes`` in ``/proc/self/io`` over the timed
  steps (counts O_DIRECT reads, libaio's included; page-cache hits are not disk reads), and for
  ferrytune also its own ``bytes_read_nvme`` counter;
* peak RSS: ``VmHWM`` of the child (the working process, setup included), and ``VmRSS`` after
  the steps.

DeepSpeed settings are ANCHORS.md's ("DeepSpeed ZeRO-Infinity as a peer on this CPU machine"):
``DS_ACCELERATOR=cpu``, gloo, ``HfDeepSpeedConfig`` alive before ``from_pretrained``,
``offload_param: {device: nvme, pin_memory: false, buffer_count: 8, buffer_size: 3e7,
max_in_cpu: 0}``, ``stage3_prefetch_bucket_size: 0``, ``stage3_max_reuse_distance: 0``,
``stage3_max_live_parameters: 3e7``, ``aio: {block_size: 1 MiB, queue_depth: 8,
intra_op_parallelism: 1, overlap_events: true}``. The aio op is JIT-built on first use
(needs ``apt-get install libaio-dev``; ~15 min on two cores): ``TORCH_EXTENSIONS_DIR`` defaults
to ``/work/bench-tmp/torch_ext`` so a build is reused. The DeepSpeed side computes the loss from
``logits_to_keep=1`` (only the scored position through the head, as ferrytune does) unless
``--ds-full-logits``. Writes ``bench-out/lora_zero_infinity.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))


def step_loss(res) -> float:
    """``LoraTrainer.train_step`` returns a float or a ``StepResult`` (with ``.loss``), by version."""
    return float(getattr(res, "loss", res))


def proc_io() -> dict:
    with open("/proc/self/io") as f:
        return {k.strip(): int(v) for k, v in (line.split(":") for line in f)}


def proc_status() -> dict:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmHWM", "VmRSS", "RssAnon", "RssFile")):
                k, v = line.split(":")
                out[k] = int(v.split()[0]) * 1024
    return out


def batches_for(args, tokenizer_path: str):
    """The benchmark's batches: ferrytune's pipeline over the long-row data (every row = seq_len tokens)."""
    from bench_lora import make_bench_data

    from ferrytune.data import Batcher, encode, load_jsonl, load_tokenizer, pad_id_for
    from ferrytune.data import pad_positions

    total = args.warmup_steps + args.steps
    rows = args.batch_size * args.micro_batches
    data = make_bench_data(Path(args.src_data), Path(args.dir) / f"data_{os.getpid()}", rows=rows * (total + 2),
                           model=tokenizer_path, seq_len=args.seq_len)
    tok = load_tokenizer(tokenizer_path)
    ex = encode(load_jsonl(data), tok, max_length=args.seq_len)
    b = Batcher(ex, global_batch_size=rows, micro_batch_size=args.batch_size, seed=0, shuffle=False)
    out = [pad_positions(b.batches_for_step(s, pad_id=pad_id_for(tok))) for s in range(total)]
    for mbs in out:
        assert len(mbs) == args.micro_batches
        assert all(tuple(m.input_ids.shape) == (args.batch_size, args.seq_len) for m in mbs)
    return out, data


# ---------------------------------------------------------------------------------- children
def child_ft(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from ferrytune.config import config_from_dict
    from ferrytune.engine._lora_trainer import LoraTrainer
    from ferrytune.engine._metrics import stream_delta

    t_setup = time.perf_counter()
    batches, data = batches_for(args, args.model)
    store_dir = Path(args.dir) / "ft_store"
    cfg = config_from_dict({
        "method": "lora",
        "model": {"path": args.model, "compute_dtype": "float32", "store_dtype": args.ft_store},
        "data": {"train": str(data), "max_length": args.seq_len, "shuffle": False},
        "train": {"steps": len(batches), "batch_size": args.batch_size * args.micro_batches,
                  "micro_batch_size": args.batch_size, "accumulation": args.ft_accumulation,
                  "seed": 0, "lr": 1e-4, "grad_clip": 1.0},
        "lora": {"rank": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        "offload": {"tier": "nvme", "nvme_dir": str(store_dir), "prefetch_depth": args.prefetch_depth,
                    "io_threads": args.io_threads},
        "output_dir": str(Path(args.dir) / "ft_run"), "resume": "never", "overwrite": True, "device": "cpu"})
    tr = LoraTrainer(cfg)
    tr.setup()
    setup_s = time.perf_counter() - t_setup
    steps = []
    try:
        for s in range(len(batches)):
            io0, st0 = proc_io(), tr.rt.streamer.stats.snapshot()
            t0, c0 = time.perf_counter(), time.process_time()
            loss = step_loss(tr.train_step(s))
            dt, cpu = time.perf_counter() - t0, time.process_time() - c0
            io1 = proc_io()
            rec = {"step": s, "loss": loss, "step_s": dt, "cpu_s": cpu, "timed": s >= args.warmup_steps,
                   "proc_read_bytes": io1["read_bytes"] - io0["read_bytes"],
                   **stream_delta(st0, tr.rt.streamer.stats.snapshot())}
            steps.append(rec)
    finally:
        tr.close()
    return {"side": "ferrytune", "setup_s": setup_s, "steps": steps, "status": proc_status(),
            "plan": tr.rt.plan.describe()}


def ds_config(args, nvme_dir: str) -> dict:
    return {
        "train_micro_batch_size_per_gpu": args.batch_size,
        "gradient_accumulation_steps": args.micro_batches,
        "gradient_clipping": 1.0,
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {
            "stage": 3,
            "offload_param": {"device": "nvme", "nvme_path": nvme_dir, "pin_memory": False, "buffer_count": 8,
                              "buffer_size": int(3e7), "max_in_cpu": 0},
            "stage3_prefetch_bucket_size": 0,
            "stage3_max_reuse_distance": 0,
            "stage3_max_live_parameters": int(3e7),
        },
        "aio": {"block_size": 1048576, "queue_depth": 8, "intra_op_parallelism": 1, "overlap_events": True},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def child_ds(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    t_setup = time.perf_counter()
    batches, _ = batches_for(args, args.model)
    import deepspeed
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    from ferrytune.data import gather_positions, loss_per_sample
    from ferrytune.lora import Adapter, LoraSpec, find_targets, peft_key
    from ferrytune.models._layout import load_layout

    # ferrytune's adapter init (seed 0), built on a meta model before ZeRO-3 is switched on,
    # so that both sides train the same adapter from the same start on the same batches.
    spec = LoraSpec(rank=8, alpha=16, dropout=0.0, target_modules=["q_proj", "v_proj"])
    init_adapter = Adapter.create(find_targets(load_layout(args.model).model, spec), spec, seed=0)
    torch.manual_seed(0)
    deepspeed.init_distributed(dist_backend="gloo")
    torch.set_num_threads(args.threads)  # init may reset it
    nvme_dir = str(Path(args.dir) / "ds_nvme")
    Path(nvme_dir).mkdir(parents=True, exist_ok=True)
    config = ds_config(args, nvme_dir)
    dschf = HfDeepSpeedConfig(config)  # noqa: F841 - must stay alive: from_pretrained builds ZeRO-3 partitions
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]))
    named = dict(model.named_parameters())
    with torch.no_grad():  # LoRA tensors are created outside zero.Init: plain tensors until initialize()
        for path in init_adapter.paths:
            for which, t in (("lora_A", init_adapter.a(path)), ("lora_B", init_adapter.b(path))):
                named[peft_key(path, which).replace(".weight", ".default.weight")].copy_(t)
    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optim, config=config)
    engine.train()
    setup_s = time.perf_counter() - t_setup
    steps = []
    for s, mbs in enumerate(batches):
        io0 = proc_io()
        t0, c0 = time.perf_counter(), time.process_time()
        losses = []
        for b in mbs:
            if args.ds_full_logits:
                out = engine(input_ids=b.input_ids, attention_mask=b.attention_mask)
                logits = gather_positions(out.logits, b.loss_positions)
            else:
                logits = engine(input_ids=b.input_ids, attention_mask=b.attention_mask, logits_to_keep=1).logits
            loss = loss_per_sample(logits, b).mean()
            losses.append(float(loss))
            engine.backward(loss)  # scales by 1/gradient_accumulation_steps
            engine.step()  # at the boundary: clips (gradient_clipping 1.0) and steps AdamW
        loss = sum(losses) / len(losses)
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        io1 = proc_io()
        steps.append({"step": s, "loss": float(loss), "step_s": dt, "cpu_s": cpu, "timed": s >= args.warmup_steps,
                      "proc_read_bytes": io1["read_bytes"] - io0["read_bytes"],
                      "proc_write_bytes": io1["write_bytes"] - io0["write_bytes"]})
    return {"side": "deepspeed", "deepspeed": deepspeed.__version__, "setup_s": setup_s, "steps": steps,
            "status": proc_status(), "config": config}


# ---------------------------------------------------------------------------------- parent
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_child(args, side: str, out_json: Path, log: Path) -> dict:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
                "PYTHONPATH": str(REPO) + os.pathsep + env.get("PYTHONPATH", "")})
    if side == "ds":
        env.update({"DS_ACCELERATOR": "cpu", "TORCH_EXTENSIONS_DIR": args.torch_ext, "RANK": "0",
                    "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                    "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())})
    cmd = [sys.executable, __file__, "--child", side, "--child-out", str(out_json)] + args.passthrough
    t0 = time.perf_counter()
    with open(log, "w") as lf:
        p = subprocess.run(cmd, env=env, stdout=lf, stderr=subprocess.STDOUT, timeout=args.child_timeout, check=False)
    wall = time.perf_counter() - t0
    if p.returncode != 0 or not out_json.exists():
        tail = log.read_text()[-3000:]
        return {"side": side, "failed": True, "returncode": p.returncode, "log_tail": tail, "wall_s": wall}
    res = json.loads(out_json.read_text())
    res["wall_s"] = wall
    return res


def summarize(res: dict) -> dict:
    timed = [s for s in res["steps"] if s["timed"]]
    out = {"step_s": statistics.median(s["step_s"] for s in timed),
           "cpu_s": statistics.median(s["cpu_s"] for s in timed),
           "proc_read_bytes_per_step": statistics.median(s["proc_read_bytes"] for s in timed),
           "peak_rss_bytes": res["status"].get("VmHWM"), "rss_after_bytes": res["status"].get("VmRSS"),
           "rss_anon_after_bytes": res["status"].get("RssAnon"), "setup_s": res["setup_s"],
           "losses": [s["loss"] for s in res["steps"]]}
    if res["side"] == "ferrytune":
        for k in ("bytes_read_nvme", "read_s", "stall_s", "cache_hits"):
            out[k] = statistics.median(s[k] for s in timed)
        out["compute_s"] = statistics.median(s["step_s"] - s["stall_s"] for s in timed)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(REPO / "models/SmolLM2-135M-Instruct"))
    p.add_argument("--src-data", default=str(REPO.parent / "shared/data/rt-polarity/train.jsonl"))
    p.add_argument("--dir", default="/work/bench-tmp/zero_inf", help="scratch dir on the disk under test")
    p.add_argument("--torch-ext", default=os.environ.get("TORCH_EXTENSIONS_DIR", "/work/bench-tmp/torch_ext"))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--warmup-steps", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--micro-batches", type=int, default=1, help="micro-batches of --batch-size rows per step")
    p.add_argument("--ft-accumulation", default="layer_major", choices=["layer_major", "micro_major"])
    p.add_argument("--ft-store", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--prefetch-depth", type=int, default=2)
    p.add_argument("--io-threads", type=int, default=8)
    p.add_argument("--ds-full-logits", action="store_true")
    p.add_argument("--sides", default="ft,ds")
    p.add_argument("--child-timeout", type=int, default=3000)
    p.add_argument("--keep", action="store_true", help="keep --dir (children's logs) at the end")
    p.add_argument("--out", default=str(REPO / "bench-out/lora_zero_infinity.json"))
    p.add_argument("--child", choices=["ft", "ds"], help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.child:
        res = child_ft(args) if args.child == "ft" else child_ds(args)
        Path(args.child_out).write_text(json.dumps(res))
        return 0

    import shutil

    import torch

    shared_flags = ["--model", args.model, "--src-data", args.src_data, "--dir", args.dir, "--steps", str(args.steps),
                    "--warmup-steps", str(args.warmup_steps), "--threads", str(args.threads),
                    "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len), "--ft-store", args.ft_store,
                    "--micro-batches", str(args.micro_batches), "--ft-accumulation", args.ft_accumulation,
                    "--prefetch-depth", str(args.prefetch_depth), "--io-threads", str(args.io_threads)]
    args.passthrough = shared_flags + (["--ds-full-logits"] if args.ds_full_logits else [])
    work = Path(args.dir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    sides = [s for s in args.sides.split(",") if s]
    rounds = []
    for r in range(args.rounds):
        order = sides if r % 2 == 0 else sides[::-1]
        rd = {"round": r, "order": order, "results": {}}
        for side in order:
            res = run_child(args, side, work / f"{side}_{r}.json", work / f"{side}_{r}.log")
            rd["results"][side] = res
            if res.get("failed"):
                print(f"round {r} {side}: FAILED (rc {res['returncode']})\n{res['log_tail']}", flush=True)
            else:
                s = summarize(res)
                rd.setdefault("summary", {})[side] = s
                print(f"round {r} {side}: step {s['step_s']:.2f} s, read/step {s['proc_read_bytes_per_step'] / 1e6:.0f} MB,"
                      f" peak RSS {s['peak_rss_bytes'] / 2**30:.2f} GiB, setup {s['setup_s']:.0f} s", flush=True)
        rounds.append(rd)
        if all(rd["results"].get(sd, {}).get("failed") for sd in sides if sd == "ds") and "ds" in sides and r == 0:
            print("DeepSpeed failed in round 0; continuing with ferrytune only", flush=True)
            sides = [s for s in sides if s != "ds"]

    def mmm(xs):
        return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)} if xs else None

    ok = [rd for rd in rounds if all(sd in rd.get("summary", {}) for sd in ("ft", "ds"))]
    ratios = {}
    if ok:
        ratios = {
            "step_time_ft_over_ds": mmm([rd["summary"]["ft"]["step_s"] / rd["summary"]["ds"]["step_s"] for rd in ok]),
            "cpu_time_ft_over_ds": mmm([rd["summary"]["ft"]["cpu_s"] / rd["summary"]["ds"]["cpu_s"] for rd in ok]),
            "read_bytes_ft_over_ds": mmm([rd["summary"]["ft"]["proc_read_bytes_per_step"]
                                          / max(rd["summary"]["ds"]["proc_read_bytes_per_step"], 1) for rd in ok]),
            "peak_rss_ft_over_ds": mmm([rd["summary"]["ft"]["peak_rss_bytes"] / rd["summary"]["ds"]["peak_rss_bytes"]
                                        for rd in ok]),
        }
    loss_diff = [max(abs(a - b) for a, b in zip(rd["summary"]["ft"]["losses"], rd["summary"]["ds"]["losses"]))
                 for rd in ok]
    per_side = {}
    for side in ("ft", "ds"):
        ss = [rd["summary"][side] for rd in rounds if side in rd.get("summary", {})]
        if ss:
            per_side[side] = {k: mmm([s[k] for s in ss]) for k in ss[0] if k != "losses" and ss[0][k] is not None}
    print()
    print(f"SmolLM2-135M LoRA r=8 q,v, fp32 compute, {args.micro_batches} micro-batch(es) of {args.batch_size} x "
          f"{args.seq_len} per step (ferrytune {args.ft_accumulation}), threads {args.threads}, "
          f"{len(rounds)} rounds x {args.steps} timed steps (median [min-max] over rounds)")
    print("| side | step s | CPU s / step | disk read / step (/proc/PID/io) | peak RSS (VmHWM) | RSS after steps |")
    print("|---|---|---|---|---|---|")
    names = {"ft": f"ferrytune nvme ({args.ft_store} store)", "ds": "DeepSpeed ZeRO-Infinity (ZeRO-3 + offload_param nvme)"}
    for side, s in per_side.items():
        print(f"| {names[side]} | {s['step_s']['median']:.2f} [{s['step_s']['min']:.2f}-{s['step_s']['max']:.2f}] | "
              f"{s['cpu_s']['median']:.2f} [{s['cpu_s']['min']:.2f}-{s['cpu_s']['max']:.2f}] | "
              f"{s['proc_read_bytes_per_step']['median'] / 1e6:.0f} MB | {s['peak_rss_bytes']['median'] / 2**30:.2f} GiB | "
              f"{s['rss_after_bytes']['median'] / 2**30:.2f} GiB |")
    for k, v in ratios.items():
        print(f"{k}: {v['median']:.3f} [{v['min']:.3f}-{v['max']:.3f}]")
    if loss_diff:
        print("max |loss ferrytune - loss DeepSpeed| per round (same init, same batches): "
              + ", ".join(f"{x:.1e}" for x in loss_diff))
    if "ft" in per_side:
        f = per_side["ft"]
        print(f"ferrytune per step: compute {f['compute_s']['median']:.2f} s, IO (background) {f['read_s']['median']:.2f} s, "
              f"stall {f['stall_s']['median']:.2f} s, own counter {f['bytes_read_nvme']['median'] / 1e6:.0f} MB, "
              f"cache hits {f['cache_hits']['median']:.0f}")
    out = {"benchmark": "lora_zero_infinity",
           "machine": {"nproc": os.cpu_count(), "torch": torch.__version__, "threads": args.threads,
                       "python": platform.python_version(), "load_avg_at_end": os.getloadavg()},
           "settings": {k: v for k, v in vars(args).items() if k != "passthrough"},
           "rounds": rounds, "per_side": per_side, "ratios": ratios, "max_loss_diff_per_round": loss_diff}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2, default=str))
    print(f"wrote {args.out}")
    if args.keep:  # keep the children's logs and data; the stores are scratch either way
        for d in ("ft_store", "ds_nvme"):
            shutil.rmtree(work / d, ignore_errors=True)
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

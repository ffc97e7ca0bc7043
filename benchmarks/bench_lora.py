"""LoRA tokens/s: ferrytune (base resident, host-streamed, NVMe-streamed) against PEFT + a plain loop.

    python benchmarks/bench_lora.py                       # 4 rounds x 2 steps, 2 threads, ~12 min
    python benchmarks/bench_lora.py --rounds 5 --steps 3 --threads 2 --variants peft,ft_resident,ft_nvme_bf16
    python benchmarks/bench_lora.py --accumulate 4      # a step = 4 micro-batches of 8 x 64 (ferrytune layer-major)

One process, one model (SmolLM2-135M-Instruct), LoRA r=8 alpha=16 on q_proj/v_proj, fp32
compute, AdamW lr 1e-4, grad clip 1.0, batch 8 x 64 tokens (every row exactly 64 tokens:
rt-polarity reviews concatenated and cut from the left, scored with the classification loss at
the last position). Every variant starts from the same adapter init and sees the same batches in
the same order, so their losses must agree step by step (checked and written to the JSON).

Variants (all alive at once, run in turn: one round = each variant for ``--steps`` steps):

* ``peft``           PEFT ``get_peft_model`` + plain loop: ``model(...).logits`` (all 64 positions
                     through the head, as a user writes it), gather, loss, backward, clip, AdamW.
* ``peft_keep1``     the same with ``logits_to_keep=1`` (only the scored position through the head:
                     the best a user can do; ferrytune gathers before the head too).
* ``ft_resident``    ferrytune, ``offload.tier: resident``, store fp32 (= compute: zero copy).
* ``ft_host_bf16``   ``offload.tier: host``, bf16 master in host memory, cast to fp32 per block.
* ``ft_host_fp32``   ``offload.tier: host``, fp32 master (a memcpy per block).
* ``ft_nvme_bf16``   ``offload.tier: nvme``, bf16 records read with O_DIRECT, cast per block.
* ``ft_nvme_fp32``   ``offload.tier: nvme``, fp32 records read straight into the working buffers.
* ``ft_resident_nockpt``  ``ft_resident`` with the unit handler replaced by this script's
                     ``no_recompute_handler`` (plain autograd, no recompute). It measured the cost of
                     the recompute before the engine skipped it for resident blocks (commit 37f020e);
                     since then it is a control that must equal ``ft_resident``.

``--accumulation`` runs the gradient-accumulation benchmark instead (``train.accumulation``):
NVMe tier, fp32 store, micro-batches of ``--batch-size`` x ``--seq-len`` (8 x 64), for M = 1, 2, 4
micro-batches per step in both orders: the base bytes read per step (the streamer's NVMe
counter, steps after the first, which also reads the outer block) against M — flat for
``layer_major``, M times one pass for ``micro_major`` (M = 1, 2: one measured step) — and the
step time of layer-major vs micro-major at M = 4, ``--rounds`` rounds of ``--steps`` steps each,
in alternating turns within each round (ratio per round: the machine's load moves both). Writes ``bench-out/lora_accumulation.json``::

    python benchmarks/bench_lora.py --accumulation --model /path/SmolLM2-135M --work /scratch/bench

Per round the raw disk read bandwidth of the same directory is measured with
the best of parallel ``fio`` settings (``_common.disk_ceiling``; ``dd iflag=direct`` without fio)
(the disk-bound limit of a step = NVMe bytes per step / that bandwidth).
Ratios are taken within a round (speed of ft_x relative to peft, streamed relative to resident:
>1 = faster); the table gives the median and the min-max over rounds, for wall time and for the
process's CPU time (``time.process_time``, all threads, IO threads included), which other jobs
on the machine disturb less than wall time. Writes ``bench-out/lora.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from _common import disk_ceiling  # noqa: E402

FT_VARIANTS = {  # name -> (tier, store dtype)
    "ft_resident": ("resident", "float32"),
    "ft_host_bf16": ("host", "bfloat16"),
    "ft_host_fp32": ("host", "float32"),
    "ft_nvme_bf16": ("nvme", "bfloat16"),
    "ft_nvme_fp32": ("nvme", "float32"),
    "ft_resident_nockpt": ("resident", "float32"),  # experiment: see no_recompute_handler
}
ALL = ["peft", "peft_keep1", "ft_resident", "ft_host_bf16", "ft_host_fp32", "ft_nvme_bf16", "ft_nvme_fp32",
       "ft_resident_nockpt"]
DEFAULT = "peft,peft_keep1,ft_resident,ft_resident_nockpt,ft_host_bf16,ft_nvme_bf16,ft_nvme_fp32"


def step_loss(res) -> float:
    """``LoraTrainer.train_step`` returns a float or a ``StepResult`` (with ``.loss``), by version."""
    return float(getattr(res, "loss", res))


def proc_io() -> dict:
    """This process's /proc/self/io counters (read_bytes counts O_DIRECT disk reads, not the page cache)."""
    out = {}
    with open("/proc/self/io") as f:
        for line in f:
            k, v = line.split(":")
            out[k.strip()] = int(v)
    return out


def make_bench_data(src: Path, dest: Path, rows: int, *, model: str, seq_len: int, per_row: int = 5) -> Path:
    """Classification rows whose prompt is exactly ``seq_len`` tokens after ferrytune's encoding.

    Reviews are concatenated (``per_row`` each) so every prompt is longer than ``seq_len`` and cut
    from the left; the cut moves to a word start, which can leave a token or two fewer, so only
    rows that encode to exactly ``seq_len`` tokens are kept: every batch is B x seq_len, no padding.
    """
    from ferrytune.data import encode, load_jsonl, load_tokenizer

    dest.mkdir(parents=True, exist_ok=True)
    src_rows = [json.loads(x) for x in src.read_text().splitlines() if x.strip()]
    cand = dest / "candidates.jsonl"
    with open(cand, "w") as f:
        for i in range(rows * 2):
            chunk = [src_rows[(i * per_row + j) % len(src_rows)] for j in range(per_row)]
            f.write(json.dumps({"text": " ".join(r["text"] for r in chunk), "label": chunk[-1]["label"]}) + "\n")
    lines = cand.read_text().splitlines()
    ex = encode(load_jsonl(cand), load_tokenizer(model), max_length=seq_len)
    keep = [ln for ln, e in zip(lines, ex) if len(e.input_ids) == seq_len][:rows]
    if len(keep) < rows:
        raise RuntimeError(f"only {len(keep)} of {rows} rows encode to {seq_len} tokens")
    (dest / "train.jsonl").write_text("".join(k + "\n" for k in keep))
    cand.unlink()
    return dest / "train.jsonl"


def raw_read_gbs(path: Path, nbytes: int) -> float | None:
    """The disk's raw O_DIRECT read ceiling on ``path``'s directory: the best of parallel fio settings
    (_common.disk_ceiling, the limit every disk bound in benchmarks/ uses); dd on ``path`` without fio."""
    if shutil.which("fio") is not None:
        return disk_ceiling(path.parent / "fio", nbytes)["fio_read_gbs"]
    count = max(nbytes // (4 << 20), 1)
    try:
        r = subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=4M", f"count={count}", "iflag=direct"],
                           capture_output=True, text=True, timeout=120, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"(\d+) bytes .* copied, ([\d.]+) s", r.stderr)
    return int(m.group(1)) / float(m.group(2)) / 1e9 if m else None


def no_recompute_handler(engine):
    """A unit handler for a *resident* base that runs each layer with autograd on and keeps its graph.

    The engine's ``_call_unit`` always checkpoints a layer (forward without autograd, recompute in
    backward), which a streamed base needs but a resident one does not. This prototype of a fix
    binds the resident master, calls the layer and unbinds it (autograd holds the weight tensors
    it saved), so backward does not run the layer again. Only valid for zero-copy resident blocks.
    """
    import torch

    from ferrytune.engine._fo import _bind_block
    from ferrytune.models._layout import OUTER

    orig_handler = engine._call_unit

    def handler(unit, orig, *args, **kwargs):
        if unit.block_id == OUTER or not torch.is_grad_enabled():
            return orig_handler(unit, orig, *args, **kwargs)
        flat = engine.streamer.acquire(unit.block_id)
        _bind_block(engine.layout, unit.block_id, flat)
        try:
            return orig(*args, **kwargs)
        finally:
            _bind_block(engine.layout, unit.block_id, None)
            engine.streamer.release(unit.block_id, dirty=False)

    return handler


class PeftRunner:
    """PEFT's LoraModel on the same base + the plain training loop a user writes."""

    def __init__(self, model_path: str, ref_trainer, *, lr: float, grad_clip: float, keep1: bool, shared=None):
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        from ferrytune.lora import peft_key

        self.keep1, self.grad_clip = keep1, grad_clip
        if shared is None:
            base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
            base.config.use_cache = False
            spec = ref_trainer.spec
            cfg = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=0.0,
                             target_modules=sorted({p.rsplit(".", 1)[-1] for p in ref_trainer.adapter.paths}))
            self.model = get_peft_model(base, cfg)
            state = self.model.state_dict()
            with torch.no_grad():  # the same init as ferrytune's adapter (A from its seed, B = 0)
                for path in ref_trainer.adapter.paths:
                    for which, t in (("lora_A", ref_trainer.adapter.a(path)), ("lora_B", ref_trainer.adapter.b(path))):
                        state[peft_key(path, which).replace(".weight", ".default.weight")].copy_(t)
            self.init_state = {k: v.detach().clone() for k, v in self.model.named_parameters() if v.requires_grad}
        else:  # a second loop over the same model object: reset to the same init
            self.model, self.init_state = shared.model, shared.init_state
        self.lr = lr
        self.model.train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self._opt_state = None

    def activate(self):
        """Swap this runner's adapter weights and optimizer in (two runners may share one model)."""
        import torch

        named = dict(self.model.named_parameters())
        if self._opt_state is None:
            with torch.no_grad():
                for k, v in self.init_state.items():
                    named[k].copy_(v)
            self.optim = torch.optim.AdamW(self.params, lr=self.lr, weight_decay=0.0)
            self._opt_state = "live"
        else:
            with torch.no_grad():
                for k, v in self._weights.items():
                    named[k].copy_(v)

    def deactivate(self):
        self._weights = {k: v.detach().clone() for k, v in self.model.named_parameters() if v.requires_grad}

    def step(self, batches) -> float:
        import torch

        from ferrytune.data import gather_positions, loss_per_sample

        self.optim.zero_grad(set_to_none=True)
        total = 0.0
        n = sum(b.batch_size for b in batches)
        for b in batches:
            if self.keep1:
                assert bool((b.loss_positions[:, 0] == b.input_ids.shape[1] - 1).all())
                logits = self.model(input_ids=b.input_ids, attention_mask=b.attention_mask, logits_to_keep=1).logits
            else:
                out = self.model(input_ids=b.input_ids, attention_mask=b.attention_mask)
                logits = gather_positions(out.logits, b.loss_positions)
            per = loss_per_sample(logits, b)
            (per.sum() / n).backward()
            total += float(per.detach().sum())
        torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.optim.step()
        return total / n


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(REPO / "models/SmolLM2-135M-Instruct"))
    p.add_argument("--src-data", default=str(REPO.parent / "shared/data/rt-polarity/train.jsonl"))
    p.add_argument("--work", default="/work/bench-tmp/bench_lora", help="scratch dir (NVMe stores, runs, data)")
    p.add_argument("--variants", default=DEFAULT, help=f"comma list of {ALL}")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--steps", type=int, default=2, help="timed steps per variant per round")
    p.add_argument("--warmup-steps", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--prefetch-depth", type=int, default=2)
    p.add_argument("--io-threads", type=int, default=8)
    p.add_argument("--out", default=str(REPO / "bench-out/lora.json"))
    p.add_argument("--keep", action="store_true", help="keep the scratch dir")
    p.add_argument("--accumulation", action="store_true",
                   help="the train.accumulation benchmark (bytes per step against M, layer- vs micro-major time)")
    p.add_argument("--accumulate", type=int, default=1,
                   help="micro-batches of --batch-size rows per step (ferrytune: train.accumulation layer_major)")
    p.add_argument("--micro-batches", default="1,2,4", help="with --accumulation: the M to run (the largest is timed)")
    args = p.parse_args()
    if args.accumulation:
        return accumulation_bench(args)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in ALL]
    if bad:
        p.error(f"unknown variants {bad}; choose from {ALL}")

    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from ferrytune.config import config_from_dict
    from ferrytune.data import pad_id_for
    from ferrytune.engine._lora_trainer import LoraTrainer
    from ferrytune.engine._metrics import host_rss_gib, stream_delta
    from ferrytune.data import pad_positions

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    total_steps = args.warmup_steps + args.rounds * args.steps
    rows = args.batch_size * args.accumulate  # one step's rows: --accumulate micro-batches of --batch-size
    data = make_bench_data(Path(args.src_data), work / "data", rows=rows * (total_steps + 2),
                           model=args.model, seq_len=args.seq_len)

    def ft_cfg(name: str):
        tier, store = FT_VARIANTS[name]
        return config_from_dict({
            "method": "lora",
            "model": {"path": args.model, "compute_dtype": "float32", "store_dtype": store},
            "data": {"train": str(data), "max_length": args.seq_len, "shuffle": False},
            "train": {"steps": total_steps, "batch_size": rows, "micro_batch_size": args.batch_size,
                      "accumulation": "layer_major", "seed": 0, "lr": args.lr, "grad_clip": 1.0, "weight_decay": 0.0},
            "lora": {"rank": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
            "offload": {"tier": tier, "prefetch_depth": args.prefetch_depth, "io_threads": args.io_threads,
                        "host_budget_gib": 4.0, **({"nvme_dir": str(work / f"store_{name}")} if tier == "nvme" else {})},
            "output_dir": str(work / f"run_{name}"), "resume": "never", "overwrite": True, "device": "cpu"})

    print(f"threads={torch.get_num_threads()} nproc={os.cpu_count()} torch={torch.__version__}; setting up {variants}",
          flush=True)
    trainers: dict[str, LoraTrainer] = {}
    setup_s = {}
    # A reference trainer gives the batches and the adapter init (the first ft variant, or a resident one).
    ref_name = next((v for v in variants if v in FT_VARIANTS), "ft_resident")
    for name in [ref_name] + [v for v in variants if v in FT_VARIANTS and v != ref_name]:
        t0 = time.perf_counter()
        tr = LoraTrainer(ft_cfg(name))
        tr.setup()
        if name == "ft_resident_nockpt":
            tr.engine.interceptor.handler = no_recompute_handler(tr.engine)
        trainers[name] = tr
        setup_s[name] = time.perf_counter() - t0
        print(f"  {name}: set up in {setup_s[name]:.1f} s; plan: {tr.rt.plan.describe().splitlines()[0]}", flush=True)
    ref = trainers[ref_name]
    pad_id = pad_id_for(ref.tokenizer)
    batches = {s: pad_positions(ref.batcher.batches_for_step(s, pad_id=pad_id)) for s in range(total_steps)}
    for s, mbs in batches.items():
        assert len(mbs) == args.accumulate, f"step {s}: {len(mbs)} micro-batches, not {args.accumulate}"
        assert all(tuple(b.input_ids.shape) == (args.batch_size, args.seq_len) and bool(b.attention_mask.all())
                   for b in mbs), f"step {s}: batch is not {args.batch_size} x {args.seq_len} full tokens"
    peft_runners = {}
    shared = None
    for name in [v for v in variants if v.startswith("peft")]:
        t0 = time.perf_counter()
        peft_runners[name] = shared = PeftRunner(args.model, ref, lr=args.lr, grad_clip=1.0,
                                                 keep1=name == "peft_keep1", shared=shared)
        setup_s[name] = time.perf_counter() - t0
    if ref_name not in variants:
        trainers.pop(ref_name).close()

    # a file for the raw O_DIRECT read baseline, on the same directory as the stores
    raw_file = work / "dd_baseline.bin"
    raw_bytes = 512 << 20
    subprocess.run(["dd", "if=/dev/urandom", f"of={raw_file}", "bs=4M", f"count={raw_bytes >> 22}", "oflag=direct"],
                   capture_output=True, check=True)

    cursor = {v: 0 for v in variants}  # next step index of each variant
    rounds: list[dict] = []

    def run_variant(name: str, nsteps: int) -> list[dict]:
        recs = []
        if name in peft_runners:
            peft_runners[name].activate()
        for _ in range(nsteps):
            s = cursor[name]
            io0 = proc_io()
            c0 = time.process_time()  # CPU seconds of the whole process (all threads): less exposed to other jobs
            if name in peft_runners:
                t0 = time.perf_counter()
                loss = peft_runners[name].step(batches[s])
                dt = time.perf_counter() - t0
                rec = {}
            else:
                tr = trainers[name]
                before = tr.rt.streamer.stats.snapshot()
                t0 = time.perf_counter()
                loss = step_loss(tr.train_step(s))
                dt = time.perf_counter() - t0
                rec = stream_delta(before, tr.rt.streamer.stats.snapshot())
            cpu = time.process_time() - c0
            io1 = proc_io()
            tokens = sum(int(b.attention_mask.sum()) for b in batches[s])
            rec.update({"step": s, "loss": loss, "step_s": dt, "cpu_s": cpu, "tokens_per_s": tokens / dt,
                        "proc_read_bytes": io1["read_bytes"] - io0["read_bytes"],
                        "host_rss_gib": host_rss_gib()[0]})
            recs.append(rec)
            cursor[name] += 1
        if name in peft_runners:
            peft_runners[name].deactivate()
        return recs

    print(f"warm-up: {args.warmup_steps} step(s) each", flush=True)
    warm = {v: run_variant(v, args.warmup_steps) for v in variants}
    for r in range(args.rounds):
        order = variants if r % 2 == 0 else variants[::-1]  # alternate the order: no variant always goes first
        rd = {"round": r, "order": order, "dd_read_gbs": raw_read_gbs(raw_file, raw_bytes), "variants": {}}
        for v in order:
            rd["variants"][v] = run_variant(v, args.steps)
            med = statistics.median(x["step_s"] for x in rd["variants"][v])
            print(f"round {r} {v:14s} step {med:6.2f} s  {args.batch_size * args.seq_len / med:6.1f} tok/s"
                  f"  loss {rd['variants'][v][-1]['loss']:.5f}", flush=True)
        rounds.append(rd)

    # ---------------------------------------------------------------- summary
    def per_round(v: str, key: str) -> list[float]:
        return [statistics.median(x[key] for x in rd["variants"][v]) for rd in rounds]

    def mmm(xs: list[float]) -> dict:
        return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)} if xs else {}

    base_peft = "peft" if "peft" in variants else ("peft_keep1" if "peft_keep1" in variants else None)
    summary = {}
    for v in variants:
        s = {"step_s": mmm(per_round(v, "step_s")), "cpu_s": mmm(per_round(v, "cpu_s")),
             "tokens_per_s": mmm(per_round(v, "tokens_per_s"))}
        for ref_v in ("peft", "peft_keep1", "ft_resident"):
            if ref_v in variants and ref_v != v:
                s[f"speed_vs_{ref_v}"] = mmm([a / b for a, b in zip(per_round(ref_v, "step_s"), per_round(v, "step_s"))])
                s[f"cpu_speed_vs_{ref_v}"] = mmm([a / b for a, b in zip(per_round(ref_v, "cpu_s"), per_round(v, "cpu_s"))])
        if v in FT_VARIANTS:
            for key in ("bytes_read_device", "bytes_read_host", "bytes_read_nvme", "bytes_written_nvme",
                        "read_s", "stall_s", "cache_hits", "proc_read_bytes"):
                s[key] = mmm(per_round(v, key))
            s["compute_s"] = mmm([a - b for a, b in zip(per_round(v, "step_s"), per_round(v, "stall_s"))])
            nv = per_round(v, "bytes_read_nvme")
            bw = [rd["dd_read_gbs"] for rd in rounds]
            if any(nv) and all(bw):
                s["disk_bound_s"] = mmm([b / (g * 1e9) for b, g in zip(nv, bw)])
        summary[v] = s
    # loss agreement: every variant saw the same batches from the same init
    losses = {v: [x["loss"] for x in warm[v]] + [x["loss"] for rd in rounds for x in rd["variants"][v]] for v in variants}
    ref_losses = losses[variants[0]]
    loss_dev = {v: max(abs(a - b) for a, b in zip(ref_losses, ls)) for v, ls in losses.items()}

    print()
    print(f"SmolLM2-135M, LoRA r=8 q,v, fp32 compute, {args.accumulate} micro-batch(es) of {args.batch_size} x {args.seq_len}"
          f" per step, "
          f"threads {torch.get_num_threads()}, {args.rounds} rounds x {args.steps} steps (median [min-max] over rounds)")
    hdr = ("| variant | step s | tokens/s | vs peft | vs peft_keep1 | vs ft_resident | CPU s/step | CPU vs peft | "
           "CPU vs ft_resident | read/step | stall s | IO s |")
    print(hdr)
    print("|---" * (hdr.count("|") - 1) + "|")

    def f(d: dict, fmt: str = "{:.2f}") -> str:
        return "-" if not d else (fmt.format(d["median"]) + " [" + fmt.format(d["min"]) + "-" + fmt.format(d["max"]) + "]")

    for v in variants:
        s = summary[v]
        rb = "-"
        if v in FT_VARIANTS:
            tier = FT_VARIANTS[v][0]
            key = {"resident": "bytes_read_device", "host": "bytes_read_host", "nvme": "bytes_read_nvme"}[tier]
            rb = f"{s[key]['median'] / 1e6:.0f} MB ({tier})"
        print(f"| {v} | {f(s['step_s'])} | {f(s['tokens_per_s'], '{:.0f}')} | {f(s.get('speed_vs_peft', {}))} | "
              f"{f(s.get('speed_vs_peft_keep1', {}))} | {f(s.get('speed_vs_ft_resident', {}))} | {f(s['cpu_s'])} | "
              f"{f(s.get('cpu_speed_vs_peft', {}))} | {f(s.get('cpu_speed_vs_ft_resident', {}))} | {rb} | "
              f"{f(s.get('stall_s', {}))} | {f(s.get('read_s', {}))} |")
    print(f"raw O_DIRECT read ceiling (fio best setting, else dd; per round): {[round(rd['dd_read_gbs'] or 0, 2) for rd in rounds]} GB/s")
    print(f"max |loss - {variants[0]} loss| over all steps: " + ", ".join(f"{v} {d:.2e}" for v, d in loss_dev.items()))

    out = {
        "benchmark": "lora_tokens_per_s",
        "machine": {"nproc": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "python": platform.python_version(), "load_avg_at_end": os.getloadavg(),
                    "peak_rss_gib_whole_process": host_rss_gib()[1]},
        "settings": vars(args) | {"variants": variants, "lora": {"r": 8, "alpha": 16, "targets": ["q_proj", "v_proj"]},
                                  "tokens_per_step": args.batch_size * args.seq_len, "base_peft": base_peft},
        "setup_s": setup_s,
        "warmup": warm,
        "rounds": rounds,
        "summary": summary,
        "losses": losses,
        "max_loss_deviation_from_first_variant": loss_dev,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")
    for tr in trainers.values():
        tr.close()
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def accumulation_bench(args) -> int:
    """``--accumulation``: see the module docstring."""
    import torch

    torch.set_num_threads(args.threads)
    from ferrytune.config import config_from_dict
    from ferrytune.engine import LoraTrainer

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    ms = tuple(int(x) for x in args.micro_batches.split(","))
    steps = args.warmup_steps + args.rounds * args.steps
    data = make_bench_data(Path(args.src_data), work / "data", rows=args.batch_size * max(ms) * (steps + 2),
                           model=args.model, seq_len=args.seq_len)

    def cfg(acc: str, m: int):
        name = f"{acc}_M{m}"
        return name, config_from_dict({
            "method": "lora",
            "model": {"path": args.model, "compute_dtype": "float32", "store_dtype": "float32"},
            "data": {"train": str(data), "max_length": args.seq_len, "shuffle": False},
            "train": {"steps": steps, "batch_size": args.batch_size * m, "micro_batch_size": args.batch_size,
                      "seed": 0, "lr": args.lr, "grad_clip": 1.0, "accumulation": acc},
            "lora": {"rank": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
            "offload": {"tier": "nvme", "prefetch_depth": args.prefetch_depth, "io_threads": args.io_threads,
                        "host_budget_gib": 4.0, "nvme_dir": str(work / f"store_{name}")},
            "output_dir": str(work / f"run_{name}"), "resume": "never", "overwrite": True, "device": "cpu"})

    trainers = {}
    for acc in ("layer_major", "micro_major"):
        for m in ms:
            name, c = cfg(acc, m)
            tr = LoraTrainer(c)
            tr.setup()
            assert tr.rt.plan.accumulation == (acc if m > 1 else "micro_major"), tr.rt.plan.describe()
            trainers[name] = tr
            acc_line = next(x for x in tr.rt.plan.describe().splitlines() if x.startswith("accumulation:"))
            print(f"  {name}: {acc_line}", flush=True)
    cursor = {n: 0 for n in trainers}
    recs: dict[str, list[dict]] = {n: [] for n in trainers}

    def one_step(name: str) -> dict:
        tr = trainers[name]
        before = tr.rt.streamer.stats.snapshot()
        t0, c0 = time.perf_counter(), time.process_time()
        loss = step_loss(tr.train_step(cursor[name]))
        rec = {"step": cursor[name], "loss": loss, "step_s": time.perf_counter() - t0,
               "cpu_s": time.process_time() - c0,
               "bytes_read_nvme": tr.rt.streamer.stats.snapshot()["bytes_read"]["nvme"] - before["bytes_read"]["nvme"]}
        cursor[name] += 1
        recs[name].append(rec)
        return rec

    for _ in range(args.warmup_steps):  # the first step also reads the outer block
        for name in trainers:
            one_step(name)
    for name in trainers:  # M = 1, 2: one measured step each (the bytes; M = 4 is timed in rounds)
        if not name.endswith(f"M{max(ms)}"):
            one_step(name)
    rounds = []
    timed = [f"layer_major_M{max(ms)}", f"micro_major_M{max(ms)}"]
    for r in range(args.rounds):
        rd = {}
        for name in (timed if r % 2 == 0 else timed[::-1]):
            rd[name] = [one_step(name) for _ in range(args.steps)]
        rounds.append(rd)
        lm, mm = (statistics.median(x["step_s"] for x in rd[n]) for n in timed)
        print(f"round {r}: step layer_major {lm:.2f} s, micro_major {mm:.2f} s, micro/layer {mm / lm:.2f}", flush=True)

    def med(name: str, key: str, rows=None) -> float:
        return statistics.median(x[key] for x in (rows if rows is not None else recs[name][args.warmup_steps:]))

    print()
    print(f"SmolLM2-135M, LoRA r=8 q,v, NVMe fp32, micro-batch {args.batch_size} x {args.seq_len}, "
          f"threads {torch.get_num_threads()}, {args.rounds} rounds x {args.steps} steps")
    print("| M | layer_major read/step | micro_major read/step | layer_major step s | micro_major step s |")
    print("|---|---|---|---|---|")
    table = {}
    for m in ms:
        lm, mm = f"layer_major_M{m}", f"micro_major_M{m}"
        table[m] = {k: med(n, key) for k, n, key in (("layer_major_bytes", lm, "bytes_read_nvme"),
                                                     ("micro_major_bytes", mm, "bytes_read_nvme"),
                                                     ("layer_major_step_s", lm, "step_s"),
                                                     ("micro_major_step_s", mm, "step_s"))}
        t = table[m]
        print(f"| {m} | {t['layer_major_bytes'] / 1e6:.0f} MB | {t['micro_major_bytes'] / 1e6:.0f} MB | "
              f"{t['layer_major_step_s']:.2f} | {t['micro_major_step_s']:.2f} |")
    ratios = [statistics.median(x["step_s"] for x in rd[timed[1]]) / statistics.median(x["step_s"] for x in rd[timed[0]])
              for rd in rounds]
    cpu = [statistics.median(x["cpu_s"] for x in rd[timed[1]]) / statistics.median(x["cpu_s"] for x in rd[timed[0]])
           for rd in rounds]
    print(f"M=4 speed of layer_major over micro_major (micro step s / layer step s, per round): "
          f"{[round(x, 2) for x in ratios]}, CPU time: {[round(x, 2) for x in cpu]}")
    losses = {n: [x["loss"] for x in recs[n]] for n in trainers}
    same = {m: losses[f"layer_major_M{m}"] == losses[f"micro_major_M{m}"] for m in ms}
    print(f"losses layer_major == micro_major, step by step: {same}")
    out = {"benchmark": "lora_accumulation", "settings": vars(args),
           "machine": {"nproc": os.cpu_count(), "torch": torch.__version__, "load_avg_at_end": os.getloadavg()},
           "table": table, "speed_layer_over_micro_M4": ratios, "cpu_speed_layer_over_micro_M4": cpu,
           "losses": losses, "losses_equal": same, "records": recs}
    dest = Path(args.out).with_name("lora_accumulation.json") if args.out.endswith("lora.json") else Path(args.out)
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(out, indent=2))
    print(f"wrote {dest}")
    for tr in trainers.values():
        tr.close()
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

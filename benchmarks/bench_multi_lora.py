"""Packed multi-LoRA training against the same jobs one after another: tokens/s, and base
bytes read per trained token with the base streamed from NVMe.

    python benchmarks/bench_multi_lora.py
    python benchmarks/bench_multi_lora.py --jobs 1,2,4,8 --batch-sizes 1,8 --max-length 64 --rounds 3
    python benchmarks/bench_multi_lora.py --model models/SmolLM2-135M-Instruct \\
        --modes packed,packed-stream,solo-stream --batch-sizes 1 --steps 2 --out bench-out/multi_lora_smollm2.json

For each per-job batch size in ``--batch-sizes`` and each K in ``--jobs``, K LoRA jobs (rank 8 on q_proj/v_proj, each with its own data
order) train ``--steps`` optimizer steps on one shared frozen base, up to five ways (``--modes``):

* ``packed``  one ``MultiLoraTrainer`` with all K jobs on a resident base: one base forward/backward
              per microbatch over the rows of all K jobs, samples packed first-fit-decreasing into
              microbatches of ``--token-capacity`` padded tokens (the service's worker);
* ``nopad``   as ``packed``, but packing without padding (``MultiLoraTrainer(packing=True)``): a
              microbatch's sequences end to end in one row, position ids restarting per sequence,
              each job's token range routed to its adapter; the packer bounds real tokens
              (``pack_microbatches(..., packed=True)``). Padded/real tokens is 1.00 by construction;
* ``solo``    the same trainer code, the K jobs one after another (base loaded once);
* ``peft``    PEFT ``get_peft_model`` + AdamW, the K jobs one after another, full logits
              as a PEFT user computes them;
* ``packed-stream`` / ``nopad-stream`` / ``solo-stream``  as ``packed`` / ``nopad`` / ``solo`` but the base is *streamed*:
              ``MultiLoraTrainer(offload=OffloadConfig(tier="nvme", ...), store_dtype="bfloat16")``,
              every block an O_DIRECT record in a temp dir under ``--nvme-root`` (a real disk,
              deleted at the end). Both use the same FFD packer, as the service's worker does, and
              each microbatch is one streamed pass (every layer read for the forward and again, in
              reverse, for the recomputing backward, less the blocks still in a ring slot).
              Reported: base bytes read from NVMe per trained token (``StreamStats.bytes_read``,
              exact counts), and per step the step / compute (= step - stall) / read / stall
              seconds and the disk-bound time (bytes read / raw O_DIRECT read GB/s, measured with
              ``fio`` in the same directory at the start and the end of the run).

Per round the modes run interleaved (for every K all modes, the order rotating per round)
after one warm-up step each; tokens/s counts the real (unpadded) tokens of all K jobs'
batches over the timed steps. Ratios are taken within a round and reported as median
[min, max]. Without ``--model`` a tiny-ish random LLaMA (hidden 256, ``--tiny-layers`` 4
layers) and a BPE tokenizer are built in a temp dir from the packaged demo data.

The streamer's ring (``prefetch_depth + 2`` layer slots) keeps clean blocks across passes,
so a base whose layers fit the ring is read once and then never again: with the 4-layer
tiny base ``--prefetch-depth 2`` (ring 4) reads 0 bytes per step. The default
``--prefetch-depth 1`` (ring 3) keeps the tiny base streaming (2 of its 4 layers read per
pass); SmolLM2-135M (30 layers) re-reads ~54 of its 60 layer visits per pass. The outer
block (embeddings, norm, head) has its own slot and is read once per trainer.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import disk_ceiling, machine, peak_rss_gib, set_threads

from ferrytune.data import demo_data_path
from ferrytune.engine._multi_lora import MultiLoraTrainer

ALL_MODES = ("packed", "nopad", "solo", "peft", "packed-stream", "nopad-stream", "solo-stream")
PACKED_MODES = ("packed", "nopad", "packed-stream", "nopad-stream")
GB = 1e9


def build_tiny_base(out: Path, layers: int = 4) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=2000, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    lines = [json.loads(x)["text"] for x in demo_data_path("train").read_text().splitlines() if x.strip()]
    bpe.train_from_iterator(lines + [" It was terrible. It was great."] * 20, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=len(tok), max_position_embeddings=512,
                         eos_token_id=0, bos_token_id=None, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def job_config(base: str, k: int, args) -> dict:
    return {"method": "lora", "model": {"path": base},
            "data": {"train": str(demo_data_path("train")), "max_length": args.max_length},
            "train": {"steps": 10_000, "batch_size": args.batch_size, "lr": 1e-4, "seed": k},
            "lora": {"rank": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]}}


class _Meter:
    """Timed steps of one mode: real and padded tokens, seconds, and (streamed base) the IO counters."""

    def __init__(self) -> None:
        self.tokens = self.padded = self.steps = self.microbatches = 0
        self.seconds = 0.0
        self.io = {"bytes_read": 0, "read_s": 0.0, "stall_s": 0.0, "num_loads": 0, "cache_hits": 0}

    def step(self, trainer: MultiLoraTrainer, job_ids: list[str]) -> None:
        streamer = trainer.runtime.streamer if trainer.engine is not None else None
        before = streamer.stats.snapshot() if streamer else None
        t0 = time.perf_counter()
        metrics = trainer.step()
        self.seconds += time.perf_counter() - t0
        if streamer:
            after = streamer.stats.snapshot()
            self.io["bytes_read"] += sum(after["bytes_read"].values()) - sum(before["bytes_read"].values())
            for key in ("read_s", "stall_s", "num_loads", "cache_hits"):
                self.io[key] += after[key] - before[key]
            written = sum(after["bytes_written"].values()) - sum(before["bytes_written"].values())
            assert written == 0, f"the frozen base was written back ({written} bytes)"
        self.tokens += sum(int(metrics[j]["tokens"]) for j in job_ids)
        first = metrics[job_ids[0]]
        self.padded += int(first["padded_tokens"])
        self.microbatches += int(first["num_microbatches"])
        self.steps += 1

    def result(self, streamed: bool, disk_read_gbs: float | None) -> dict:
        out = {"tokens": self.tokens, "padded_tokens": self.padded, "seconds": self.seconds,
               "tokens_per_s": self.tokens / self.seconds, "steps": self.steps, "microbatches": self.microbatches}
        if streamed:
            n = self.steps
            io = dict(self.io)
            out.update(io)
            out["bytes_read_per_token"] = io["bytes_read"] / self.tokens
            out["per_step"] = {"step_s": self.seconds / n, "compute_s": (self.seconds - io["stall_s"]) / n,
                               "read_s": io["read_s"] / n, "stall_s": io["stall_s"] / n,
                               "bytes_read": io["bytes_read"] / n, "microbatches": self.microbatches / n,
                               "disk_bound_s": (io["bytes_read"] / n / (disk_read_gbs * GB)
                                                if disk_read_gbs else None)}
        return out


def run_packed(trainer: MultiLoraTrainer, K: int, args, work: Path, tag: str = "p") -> _Meter:
    ids = [f"{tag}{K}-{k}" for k in range(K)]
    for k, job_id in enumerate(ids):
        trainer.add_job(job_id, job_config(trainer.base_path, k, args), work_dir=work / job_id)
    trainer.step()  # warm-up
    meter = _Meter()
    for _ in range(args.steps):
        meter.step(trainer, ids)
    for job_id in ids:
        trainer.remove_job(job_id)
    return meter


def run_solo(trainer: MultiLoraTrainer, K: int, args, work: Path, tag: str = "s") -> _Meter:
    meter = _Meter()
    for k in range(K):
        job_id = f"{tag}{K}-{k}"
        trainer.add_job(job_id, job_config(trainer.base_path, k, args), work_dir=work / job_id)
        trainer.step()  # warm-up
        for _ in range(args.steps):
            meter.step(trainer, [job_id])
        trainer.remove_job(job_id)
    return meter


def run_peft(base_model, trainer: MultiLoraTrainer, K: int, args, work: Path) -> tuple[int, float, object]:
    from peft import LoraConfig, get_peft_model

    from ferrytune.data import collate, gather_positions, loss_per_sample

    tokens, elapsed = 0, 0.0
    for k in range(K):
        # the same examples the ferrytune modes see: borrow a trainer's batcher for job k's data order
        job_id = f"b{K}-{k}"
        trainer.add_job(job_id, job_config(trainer.base_path, k, args), work_dir=work / job_id)
        batcher = trainer._jobs[job_id].batcher
        trainer.remove_job(job_id)
        model = get_peft_model(base_model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                      lora_dropout=0.0, task_type="CAUSAL_LM"))
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        for step in range(args.steps + 1):
            examples = [e for mb in batcher.batch_for_step(step) for e in mb]
            batch = collate(examples, pad_id=trainer.pad_id)
            t0 = time.perf_counter()
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits  # (B, T, V)
            loss = loss_per_sample(gather_positions(logits, batch.loss_positions), batch).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
            opt.step()
            if step > 0:  # step 0 is the warm-up
                elapsed += time.perf_counter() - t0
                tokens += sum(len(e.input_ids) for e in examples)
        base_model = model.unload()
    return tokens, elapsed, base_model


def one_round(r: int, B: int, Ks: list[int], modes: list[str], trainers: dict, peft_base, args, tmp: Path,
              disk_read_gbs: float | None):
    row = {}
    args.batch_size = B
    for K in Ks:
        order = modes[r % len(modes):] + modes[:r % len(modes)]  # rotate the order per round
        res = {}
        for mode in order:
            work = tmp / "jobs" / f"r{r}-b{B}-{mode}"
            if mode in PACKED_MODES:
                res[mode] = run_packed(trainers[mode], K, args, work).result(mode.endswith("stream"), disk_read_gbs)
            elif mode in ("solo", "solo-stream"):
                res[mode] = run_solo(trainers[mode], K, args, work).result(mode.endswith("stream"), disk_read_gbs)
            else:
                tokens, sec, peft_base = run_peft(peft_base, trainers["borrow"], K, args, work)
                res[mode] = {"tokens": tokens, "padded_tokens": None, "seconds": sec, "tokens_per_s": tokens / sec}
            shutil.rmtree(work, ignore_errors=True)  # adapters' work dirs: nothing is checkpointed here
        res = {m: res[m] for m in modes}
        row[str(K)] = res
        print(f"round {r} B={B} K={K}: " + "  ".join(
            f"{m} {res[m]['tokens_per_s']:.0f} tok/s"
            + (f" {res[m]['bytes_read_per_token'] / 1e6:.2f} MB/tok" if "bytes_read_per_token" in res[m] else "")
            for m in res), flush=True)
    return row, peft_base


def _stat(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _ratio(cells: list[dict], a: str, b: str) -> dict:
    """Within-round tokens/s ratio of mode a over mode b: median [min, max] over rounds."""
    return _stat([c[a]["tokens_per_s"] / c[b]["tokens_per_s"] for c in cells])


def _fmt(x: dict | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x['median']:.{digits}f} [{x['min']:.{digits}f}, {x['max']:.{digits}f}]"


def summarize(rounds: list[dict], Ks: list[int], B: int, modes: list[str]) -> dict:
    summary = {}
    resident = [m for m in ("packed", "nopad", "solo", "peft") if m in modes]
    streamed = "packed-stream" in modes and "solo-stream" in modes
    nopad_st = streamed and "nopad-stream" in modes
    for K in Ks:
        cells = [rd[str(K)] for rd in rounds]
        s: dict = {"median_tokens_per_s": {m: statistics.median(c[m]["tokens_per_s"] for c in cells) for m in modes}}
        ratio = functools.partial(_ratio, cells)
        s["packed_over"] = {o: ratio("packed", o) for o in ("solo", "peft") if "packed" in modes and o in modes}
        s["nopad_over"] = {o: ratio("nopad", o) for o in ("solo", "peft", "packed") if "nopad" in modes and o in modes}
        s["padded_per_real_token"] = {m: cells[0][m]["padded_tokens"] / cells[0][m]["tokens"]
                                      for m in modes if m != "peft"}
        if streamed:
            st = {"packed_over_solo_tokens_per_s": ratio("packed-stream", "solo-stream")}
            if "nopad-stream" in modes:
                st["nopad_over_solo_tokens_per_s"] = ratio("nopad-stream", "solo-stream")
                st["nopad_over_packed_tokens_per_s"] = ratio("nopad-stream", "packed-stream")
            if "packed" in modes:
                st["packed_stream_over_packed_resident"] = ratio("packed-stream", "packed")
            for m in ("packed-stream", "nopad-stream", "solo-stream"):
                if m not in modes:
                    continue
                st[m] = {"bytes_read_per_token": _stat([c[m]["bytes_read_per_token"] for c in cells]),
                         "per_step": {k: (_stat([c[m]["per_step"][k] for c in cells])
                                          if cells[0][m]["per_step"][k] is not None else None)
                                      for k in cells[0][m]["per_step"]}}
            st["solo_over_packed_bytes_per_token"] = _stat(
                [c["solo-stream"]["bytes_read_per_token"] / c["packed-stream"]["bytes_read_per_token"]
                 for c in cells])
            s["streamed"] = st
        summary[str(K)] = s
    if resident:
        print(f"\nresident base, per-job batch {B}:\n{'K':>3} " + " ".join(f"{m + ' tok/s':>12}" for m in resident)
              + (f"  {'packed/solo':>22}" if "solo" in s["packed_over"] else "")
              + (f"  {'packed/peft':>22}" if "peft" in s["packed_over"] else "")
              + (f"  {'nopad/solo':>22}  {'nopad/packed':>22}" if {"nopad", "solo", "packed"} <= set(modes) else "")
              + (f"  {'pad packed/solo':>15}" if {"packed", "solo"} <= set(modes) else ""))
        for K in Ks:
            s = summary[str(K)]
            line = f"{K:>3} " + " ".join(f"{s['median_tokens_per_s'][m]:>12.0f}" for m in resident)
            for o in ("solo", "peft"):
                if o in s["packed_over"]:
                    line += f"  {_fmt(s['packed_over'][o]):>22}"
            if {"nopad", "solo", "packed"} <= set(modes):
                line += f"  {_fmt(s['nopad_over']['solo']):>22}  {_fmt(s['nopad_over']['packed']):>22}"
            if {"packed", "solo"} <= set(modes):
                pad = s["padded_per_real_token"]
                line += f"  {pad['packed']:>6.2f} / {pad['solo']:.2f}"
            print(line)
    if streamed:
        print(f"\nstreamed base (nvme, bf16 store), per-job batch {B}:\n"
              f"{'K':>3} {'packed tok/s':>12} {'solo tok/s':>11} {'packed/solo tok/s':>22} "
              f"{'KB read/tok packed':>18} {'solo':>8} {'solo/packed bytes':>17} {'mb/step':>7} "
              f"{'pad p/s':>11}" + (f" {'packed str/res':>22}" if "packed" in modes else ""))
        for K in Ks:
            s, st = summary[str(K)], summary[str(K)]["streamed"]
            pad = s["padded_per_real_token"]
            line = (f"{K:>3} {s['median_tokens_per_s']['packed-stream']:>12.0f} "
                    f"{s['median_tokens_per_s']['solo-stream']:>11.0f} "
                    f"{_fmt(st['packed_over_solo_tokens_per_s']):>22} "
                    f"{st['packed-stream']['bytes_read_per_token']['median'] / 1e3:>18.1f} "
                    f"{st['solo-stream']['bytes_read_per_token']['median'] / 1e3:>8.1f} "
                    f"{st['solo_over_packed_bytes_per_token']['median']:>17.2f} "
                    f"{st['packed-stream']['per_step']['microbatches']['median']:>7.1f} "
                    f"{pad['packed-stream']:>5.2f}/{pad['solo-stream']:.2f}")
            if "packed" in modes:
                line += f" {_fmt(st['packed_stream_over_packed_resident']):>22}"
            print(line)
        if nopad_st:
            print(f"\nstreamed base, packing without padding (nopad) beside padded packing, per-job batch {B}:\n"
                  f"{'K':>3} {'nopad tok/s':>11} {'nopad/solo tok/s':>22} {'nopad/packed tok/s':>22} "
                  f"{'padded/real nopad':>17} {'packed':>6} {'mb/step nopad':>13}")
            for K in Ks:
                s, st = summary[str(K)], summary[str(K)]["streamed"]
                pad = s["padded_per_real_token"]
                print(f"{K:>3} {s['median_tokens_per_s']['nopad-stream']:>11.0f} "
                      f"{_fmt(st['nopad_over_solo_tokens_per_s']):>22} {_fmt(st['nopad_over_packed_tokens_per_s']):>22} "
                      f"{pad['nopad-stream']:>17.2f} {pad['packed-stream']:>6.2f} "
                      f"{st['nopad-stream']['per_step']['microbatches']['median']:>13.1f}")
        print(f"\nwhere a streamed step's time goes, per-job batch {B} (medians; one packed step trains all K jobs, "
              f"one solo step one job):\n{'K':>3} {'mode':>13} {'MB read':>8} {'step s':>8} {'compute s':>9} "
              f"{'read s':>7} {'stall s':>8} {'disk-bound s':>12}")
        for K in Ks:
            for m in ("packed-stream", "nopad-stream", "solo-stream"):
                if m not in modes:
                    continue
                ps = summary[str(K)]["streamed"][m]["per_step"]
                db = ps["disk_bound_s"]
                print(f"{K:>3} {m:>13} {ps['bytes_read']['median'] / 1e6:>8.1f} {ps['step_s']['median']:>8.3f} "
                      f"{ps['compute_s']['median']:>9.3f} {ps['read_s']['median']:>7.3f} "
                      f"{ps['stall_s']['median']:>8.3f} {'-' if db is None else format(db['median'], '>12.3f')}")
    return summary


def disk_baseline(directory: Path, size_mib: int) -> dict:
    """The disk's raw O_DIRECT ceiling on ``directory`` (best of parallel fio settings, _common.disk_ceiling)."""
    if size_mib <= 0 or shutil.which("fio") is None:
        return {"fio_read_gbs": None, "note": "fio not run" if size_mib <= 0 else "fio not installed"}
    try:
        c = disk_ceiling(directory, size_mib << 20)
    finally:
        (directory / "fio-baseline.bin").unlink(missing_ok=True)
    return {"fio_read_gbs": c["fio_read_gbs"], "fio_write_gbs": c["fio_write_gbs"], "size_mib": size_mib,
            "fio_read_setting": c["fio_read_setting"], "fio_write_setting": c["fio_write_setting"]}


def filesystem_of(path: Path) -> str:
    try:
        out = subprocess.run(["df", "--output=fstype,source", str(path)], capture_output=True, text=True, check=True)
        return " ".join(out.stdout.split()[2:])
    except (OSError, subprocess.CalledProcessError):
        return "?"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="HF model folder (default: a tiny-ish random LLaMA)")
    ap.add_argument("--tiny-layers", type=int, default=4, help="layers of the tiny default base")
    ap.add_argument("--modes", default=",".join(ALL_MODES), help=f"comma-separated, of {','.join(ALL_MODES)}")
    ap.add_argument("--jobs", default="1,2,4,8", help="comma-separated K values")
    ap.add_argument("--batch-sizes", default="1,8", help="examples per job per step, comma-separated")
    ap.add_argument("--token-capacity", type=int, default=2048, help="padded tokens per packed microbatch")
    ap.add_argument("--max-length", type=int, default=64, help="tokens per example at most")
    ap.add_argument("--steps", type=int, default=4, help="timed steps per job and mode")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (2 processes share these 2 cores)")
    ap.add_argument("--nvme-root", default=tempfile.gettempdir(),
                    help="directory on the real disk for the streamed base's block store (a temp dir inside, deleted)")
    ap.add_argument("--store-dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--prefetch-depth", type=int, default=1, help="streamed base: blocks fetched ahead (ring = +2)")
    ap.add_argument("--host-budget-gib", type=float, default=1.0)
    ap.add_argument("--fio-mib", type=int, default=1024, help="size of the raw O_DIRECT read baseline (0: skip)")
    ap.add_argument("--out", default="bench-out/multi_lora.json")
    args = ap.parse_args()
    set_threads(args.threads)
    import transformers

    from ferrytune.config import OffloadConfig
    from ferrytune.service._policy import pack_microbatches

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    Ks = [int(k) for k in args.jobs.split(",")]
    Bs = [int(b) for b in args.batch_sizes.split(",")]
    modes = [m for m in ALL_MODES if m in args.modes.split(",")]
    if not modes or set(args.modes.split(",")) - set(ALL_MODES):
        ap.error(f"--modes: choose from {','.join(ALL_MODES)} (got {args.modes!r})")
    streamed = [m for m in modes if m.endswith("stream")]
    t_start = time.perf_counter()
    machine_info = machine(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="bench-multi-lora-"))
    nvme = Path(tempfile.mkdtemp(prefix="bench-multi-lora-nvme-", dir=args.nvme_root)) if streamed else None
    try:
        fs = filesystem_of(nvme) if nvme else None
        if fs and fs.split()[0] in ("tmpfs", "ramfs", "overlay"):
            print(f"warning: --nvme-root {args.nvme_root} is on {fs}, not a real disk", flush=True)
        disk = {"start": disk_baseline(nvme, args.fio_mib)} if nvme else {}
        model_path = args.model or str(build_tiny_base(tmp / "base", args.tiny_layers))
        packer = functools.partial(pack_microbatches, capacity_tokens=args.token_capacity)
        flat_packer = functools.partial(pack_microbatches, capacity_tokens=args.token_capacity, packed=True)
        trainers: dict = {}
        setup_s: dict = {}
        for mode in modes:
            t0 = time.perf_counter()
            if mode == "peft":
                continue
            if mode == "packed":
                trainers[mode] = MultiLoraTrainer(model_path, packer=packer)
            elif mode == "nopad":
                trainers[mode] = MultiLoraTrainer(model_path, packer=flat_packer, packing=True)
            elif mode == "solo":
                trainers[mode] = MultiLoraTrainer(model_path)
            elif mode in streamed:
                # one block store per trainer: the two never share a slot or a cached block
                offload = OffloadConfig(tier="nvme", nvme_dir=str(nvme / mode), host_budget_gib=args.host_budget_gib,
                                        prefetch_depth=args.prefetch_depth)
                nopad = mode == "nopad-stream"
                trainers[mode] = MultiLoraTrainer(model_path, packer=flat_packer if nopad else packer, offload=offload,
                                                  store_dtype=args.store_dtype, packing=nopad)
            setup_s[mode] = time.perf_counter() - t0
        peft_base = None
        if "peft" in modes:
            trainers["borrow"] = trainers.get("solo") or MultiLoraTrainer(model_path)
            peft_base = transformers.AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
            peft_base.requires_grad_(False)
        plan = None
        if streamed:
            rt = trainers[streamed[0]].runtime
            base_bytes = {b: n * rt.store_dtype.itemsize for b, n in rt.streamer.numel.items()}
            plan = {"describe": rt.plan.describe(), "blocks": len(base_bytes), "ring_slots": rt.plan.ring_size,
                    "base_store_bytes": sum(base_bytes.values()), "outer_block_bytes": base_bytes[rt.plan.outer_block],
                    "layer_block_bytes": max(v for b, v in base_bytes.items() if b != rt.plan.outer_block)}
            print(plan["describe"], flush=True)
        disk_gbs = disk.get("start", {}).get("fio_read_gbs")
        if nvme:
            print(f"nvme dir {nvme} ({fs}); raw O_DIRECT read {disk_gbs and round(disk_gbs, 2)} GB/s", flush=True)
        rounds: dict[str, list] = {str(B): [] for B in Bs}
        for r in range(args.rounds):
            for B in Bs:
                row, peft_base = one_round(r, B, Ks, modes, trainers, peft_base, args, tmp, disk_gbs)
                rounds[str(B)].append(row)
        if nvme:
            disk["end"] = disk_baseline(nvme, args.fio_mib)
        summary = {str(B): summarize(rounds[str(B)], Ks, B, modes) for B in Bs}
        for mode in streamed:
            trainers[mode].runtime.streamer.close()
            trainers[mode].engine.close()
        result = {
            "machine": {**machine_info, "peak_rss_gib": peak_rss_gib(),
                        "nvme_dir_filesystem": fs, "loadavg_at_end": os.getloadavg()},
            "settings": {"model": args.model or f"tiny random LLaMA (hidden 256, {args.tiny_layers} layers)",
                         "modes": modes, "jobs": Ks, "batch_sizes": Bs, "max_length": args.max_length,
                         "steps": args.steps, "token_capacity": args.token_capacity, "rounds": args.rounds,
                         "lora": "r=8 alpha=16 q_proj,v_proj", "dtype": "float32 compute",
                         "streamed": {"tier": "nvme", "store_dtype": args.store_dtype,
                                      "prefetch_depth": args.prefetch_depth, "host_budget_gib": args.host_budget_gib,
                                      "nvme_root": args.nvme_root} if streamed else None},
            "plan": plan, "disk_baseline": disk, "setup_s": setup_s,
            "rounds": rounds, "medians": summary, "total_s": time.perf_counter() - t_start,
        }
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
        print(f"wrote {out} ({result['total_s']:.0f} s)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if nvme:
            shutil.rmtree(nvme, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Packed multi-LoRA training against the same jobs one after another: tokens/s.

    python benchmarks/bench_multi_lora.py
    python benchmarks/bench_multi_lora.py --jobs 1,2,4,8 --batch-sizes 1,8 --max-length 64 --rounds 3
    python /work/shared/tools/get_smollm2.py /tmp/smollm2 && \\
        python benchmarks/bench_multi_lora.py --model /tmp/smollm2 --jobs 1,2,4 --rounds 3

For each per-job batch size in ``--batch-sizes`` and each K in ``--jobs``, K LoRA jobs (rank 8 on q_proj/v_proj, each with its own data
order) train ``--steps`` optimizer steps on one shared frozen base, three ways:

* ``packed``  one ``MultiLoraTrainer`` with all K jobs: one base forward/backward per
              microbatch over the rows of all K jobs, samples packed first-fit-decreasing into
              microbatches of ``--token-capacity`` padded tokens (the service's worker);
* ``solo``    the same trainer code, the K jobs one after another (base loaded once);
* ``peft``    PEFT ``get_peft_model`` + AdamW, the K jobs one after another, full logits
              as a PEFT user computes them.

Per round the modes run interleaved (packed, solo, peft for every K, the order rotating
per round) after one warm-up step each; tokens/s counts the real (unpadded) tokens of all
K jobs' batches over the timed steps. Ratios are taken within a round and reported as
median [min, max]. Without ``--model`` a tiny-ish random LLaMA (hidden 256, 4 layers) and a
BPE tokenizer are built in a temp dir from the packaged demo data.

Base bytes read per trained token with the base *streamed* from NVMe is not measured:
the streamed base plugs into ``MultiLoraTrainer._forward_hidden`` later (see the printed TODO).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ferrytune.data import demo_data_path
from ferrytune.engine._multi_lora import MultiLoraTrainer

STREAMED_TODO = ("TODO streamed base: base bytes read per trained token (packed reads the base once per "
                 "step for all K jobs, solo once per job) needs the streamed engine behind "
                 "MultiLoraTrainer._forward_hidden; not measured here.")


def build_tiny_base(out: Path) -> Path:
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
    config = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
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


def run_packed(trainer: MultiLoraTrainer, K: int, args, work: Path) -> tuple[int, float, int]:
    ids = [f"p{K}-{k}" for k in range(K)]
    for k, job_id in enumerate(ids):
        trainer.add_job(job_id, job_config(trainer.base_path, k, args), work_dir=work / job_id)
    trainer.step()  # warm-up
    tokens, padded, t0 = 0, 0, time.perf_counter()
    for _ in range(args.steps):
        metrics = trainer.step()
        tokens += sum(int(m["tokens"]) for m in metrics.values())
        padded += int(next(iter(metrics.values()))["padded_tokens"])
    elapsed = time.perf_counter() - t0
    for job_id in ids:
        trainer.remove_job(job_id)
    return tokens, elapsed, padded


def run_solo(trainer: MultiLoraTrainer, K: int, args, work: Path) -> tuple[int, float, int]:
    tokens, padded, elapsed = 0, 0, 0.0
    for k in range(K):
        job_id = f"s{K}-{k}"
        trainer.add_job(job_id, job_config(trainer.base_path, k, args), work_dir=work / job_id)
        trainer.step()  # warm-up
        t0 = time.perf_counter()
        for _ in range(args.steps):
            m = trainer.step()[job_id]
            tokens += int(m["tokens"])
            padded += int(m["padded_tokens"])
        elapsed += time.perf_counter() - t0
        trainer.remove_job(job_id)
    return tokens, elapsed, padded


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


def one_round(r: int, B: int, Ks: list[int], packer_trainer, solo_trainer, peft_base, args, tmp: Path):
    row = {}
    args.batch_size = B
    for K in Ks:
        modes = ["packed", "solo", "peft"]
        modes = modes[r % 3:] + modes[:r % 3]  # rotate the order per round
        res = {}
        for mode in modes:
            work = tmp / f"r{r}-b{B}-{mode}"
            padded = None
            if mode == "packed":
                tokens, sec, padded = run_packed(packer_trainer, K, args, work)
            elif mode == "solo":
                tokens, sec, padded = run_solo(solo_trainer, K, args, work)
            else:
                tokens, sec, peft_base = run_peft(peft_base, solo_trainer, K, args, work)
            res[mode] = {"tokens": tokens, "padded_tokens": padded, "seconds": sec, "tokens_per_s": tokens / sec}
        row[str(K)] = res
        print(f"round {r} B={B} K={K}: " + "  ".join(f"{m} {res[m]['tokens_per_s']:.0f} tok/s" for m in res),
              flush=True)
    return row, peft_base


def summarize(rounds: list[dict], Ks: list[int], B: int) -> dict:
    summary = {}
    fmt = lambda x: f"{x['median']:.2f} [{x['min']:.2f}, {x['max']:.2f}]"
    print(f"\nper-job batch {B}:\n{'K':>3} {'packed tok/s':>13} {'solo tok/s':>11} {'peft tok/s':>11}  "
          f"{'packed/solo':>22}  {'packed/peft':>22}  {'pad packed/solo':>15}")
    for K in Ks:
        cells = [rd[str(K)] for rd in rounds]
        tps = {m: statistics.median(c[m]["tokens_per_s"] for c in cells) for m in ("packed", "solo", "peft")}
        ratios = {}
        for other in ("solo", "peft"):
            rs = [c["packed"]["tokens_per_s"] / c[other]["tokens_per_s"] for c in cells]
            ratios[other] = {"median": statistics.median(rs), "min": min(rs), "max": max(rs)}
        pad = {m: cells[0][m]["padded_tokens"] / cells[0][m]["tokens"] for m in ("packed", "solo")}
        summary[str(K)] = {"median_tokens_per_s": tps, "packed_over": ratios, "padded_per_real_token": pad}
        print(f"{K:>3} {tps['packed']:>13.0f} {tps['solo']:>11.0f} {tps['peft']:>11.0f}  "
              f"{fmt(ratios['solo']):>22}  {fmt(ratios['peft']):>22}  {pad['packed']:>6.2f} / {pad['solo']:.2f}")
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="HF model folder (default: a tiny-ish random LLaMA)")
    ap.add_argument("--jobs", default="1,2,4,8", help="comma-separated K values")
    ap.add_argument("--batch-sizes", default="1,8", help="examples per job per step, comma-separated")
    ap.add_argument("--token-capacity", type=int, default=2048, help="padded tokens per packed microbatch")
    ap.add_argument("--max-length", type=int, default=64, help="tokens per example at most")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per job and mode")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (2 processes share these 2 cores)")
    ap.add_argument("--out", default="bench-out/multi_lora.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import functools

    import transformers

    from ferrytune.service._policy import pack_microbatches

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    Ks = [int(k) for k in args.jobs.split(",")]
    Bs = [int(b) for b in args.batch_sizes.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="bench-multi-lora-"))
    model_path = args.model or str(build_tiny_base(tmp / "base"))
    packer = functools.partial(pack_microbatches, capacity_tokens=args.token_capacity)
    packed_trainer = MultiLoraTrainer(model_path, packer=packer)
    solo_trainer = MultiLoraTrainer(model_path)
    peft_base = transformers.AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    peft_base.requires_grad_(False)
    rounds: dict[str, list] = {str(B): [] for B in Bs}
    for r in range(args.rounds):
        for B in Bs:
            row, peft_base = one_round(r, B, Ks, packed_trainer, solo_trainer, peft_base, args, tmp)
            rounds[str(B)].append(row)
    summary = {str(B): summarize(rounds[str(B)], Ks, B) for B in Bs}
    print(f"\n{STREAMED_TODO}")
    result = {
        "machine": {"nproc": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "loadavg": os.getloadavg()},
        "settings": {"model": args.model or "tiny random LLaMA (hidden 256, 4 layers)", "jobs": Ks,
                     "batch_sizes": Bs, "max_length": args.max_length, "steps": args.steps,
                     "token_capacity": args.token_capacity, "rounds": args.rounds,
                     "lora": "r=8 alpha=16 q_proj,v_proj", "dtype": "float32"},
        "rounds": rounds, "medians": summary,
        "streamed_base_bytes_per_token": None, "todo": STREAMED_TODO,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

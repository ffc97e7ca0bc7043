"""Capacity probe for the LoRA recipe: full fine-tuning of the same model on the same task.

    python benchmarks/probe_full_finetune.py --model DIR --data ../shared/data/rt-polarity \
        --steps 400 --lr 3e-5 --eval-rows 200:700 --out bench-out/full_finetune.json      # ~20 min

Every parameter of the HF model trains (plain ``AutoModelForCausalLM`` + ``torch.optim.AdamW``,
no ferrytune engine) on the LoRA recipe's task, read from ``examples/lora_smollm2_rt_polarity.yaml``:
its ``data`` section (prompt, verbalizer, ``max_length``: ``ferrytune.data.load_examples``), the
classification loss over the verbalizer's logits at the last prompt position
(``ferrytune.data.loss_per_sample``), and its batch size, grad clip, warm-up and lr schedule
(``ferrytune.engine.lr_at``); ``--lr`` and ``--steps`` replace the recipe's, since full fine-tuning
wants a far smaller lr than an adapter. Dev rows ``--eval-rows`` are evaluated every
``--eval-every`` steps (the selection rows of the recipe's sweep, docs/benchmarks.md; never the
held-out ones). Full fine-tuning can fit whatever a LoRA adapter on this model can, so its dev
accuracy bounds from above what any adapter recipe reaches with the same data and budget.
Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

RECIPE = Path(__file__).resolve().parents[1] / "examples/lora_smollm2_rt_polarity.yaml"

from _common import log, machine, print_table, write_json  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, help="folder with train.jsonl and dev.jsonl")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--lr", type=float, default=3e-5)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-rows", default="200:700", help="LO:HI, the dev rows evaluated")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="bench-out/full_finetune.json")
    args = p.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    from ferrytune.config import load_config
    from ferrytune.data import (collate, correct_per_sample, eval_batches, gather_positions, load_examples,
                                load_tokenizer, loss_per_sample, pad_id_for)
    from ferrytune.engine import lr_at

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = load_config(RECIPE, [f"model.path={args.model}", f"data.train={args.data}/train.jsonl",
                               f"data.eval={args.data}/dev.jsonl", "data.eval_samples=null",
                               f"train.lr={args.lr}", f"train.steps={args.steps}"])
    t = cfg.train
    lo, hi = (int(x) for x in args.eval_rows.split(":"))
    tok = load_tokenizer(args.model)
    train, dev = load_examples(cfg.data, tok)
    dev = dev[lo:hi]
    pad = pad_id_for(tok)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    order = list(range(len(train)))
    random.Random(t.seed).shuffle(order)

    def logits(b):
        h = model.model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False).last_hidden_state
        return model.lm_head(gather_positions(h, b.loss_positions))

    def evaluate() -> tuple[float, float]:
        model.eval()
        n = correct = 0
        total = 0.0
        with torch.no_grad():
            for chunk in eval_batches(dev, micro_batch_size=16):
                b = collate(chunk, pad_id=pad)
                lg = logits(b)
                total += float(loss_per_sample(lg, b).sum())
                correct += int(correct_per_sample(lg, b).sum())
                n += len(chunk)
        model.train()
        return correct / n, total / n

    t0 = time.perf_counter()
    evals = []

    def record(step: int) -> None:
        acc, loss = evaluate()
        evals.append({"step": step, "accuracy": acc, "loss": loss, "wall_s": time.perf_counter() - t0})
        log(f"eval step {step}: accuracy {acc:.4f} loss {loss:.4f}")

    record(0)
    model.train()
    train_loss = []
    for s in range(1, t.steps + 1):
        lr = lr_at(s - 1, t)  # lr_at counts steps from 0
        for g in opt.param_groups:
            g["lr"] = lr
        idx = [order[((s - 1) * t.batch_size + k) % len(order)] for k in range(t.batch_size)]
        b = collate([train[i] for i in idx], pad_id=pad)
        loss = loss_per_sample(logits(b), b).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if t.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        train_loss.append(float(loss.detach()))
        if s % 20 == 0:
            log(f"step {s} loss {sum(train_loss[-20:]) / 20:.4f} lr {lr:.2e} wall {time.perf_counter() - t0:.0f} s")
        if s % args.eval_every == 0 or s == t.steps:
            record(s)
    print_table(["step", "dev accuracy", "dev loss", "wall s"],
                [[e["step"], e["accuracy"], e["loss"], e["wall_s"]] for e in evals],
                title=f"full fine-tuning, dev rows {lo}-{hi - 1}, lr {t.lr} {t.lr_schedule}, batch {t.batch_size}")
    write_json(Path(args.out), {"machine": machine(args.threads), "settings": vars(args), "evals": evals,
                                "train_loss": train_loss})
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

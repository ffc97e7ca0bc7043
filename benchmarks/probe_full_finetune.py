"""Capacity probe for the LoRA recipe: full fine-tuning of the same model on the same task.

    python benchmarks/probe_full_finetune.py --model DIR --data ../shared/data/rt-polarity \
        --steps 400 --lr 3e-5 --eval-rows 200:700 --out bench-out/full_finetune.json      # ~25 min

Every parameter of the HF model trains (plain ``AutoModelForCausalLM`` + ``torch.optim.AdamW``,
no ferrytune engine), on the LoRA recipe's data pipeline: the same prompt ``"{text} It was"``,
verbalizer `` terrible`` / `` great``, ``max_length`` 64, the classification loss over the
verbalizer's logits at the last prompt position (``ferrytune.data.loss_per_sample``), batch 8, grad
clip 1.0, linear warm-up then linear decay. Dev rows ``--eval-rows`` are evaluated every
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

from _common import log, machine, print_table, write_json  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, help="folder with train.jsonl and dev.jsonl")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-5)
    p.add_argument("--warmup-steps", type=int, default=10)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-rows", default="200:700", help="LO:HI, the dev rows evaluated")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="bench-out/full_finetune.json")
    args = p.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    from ferrytune.data import collate, correct_per_sample, encode, load_jsonl, load_tokenizer, loss_per_sample, pad_id_for

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    lo, hi = (int(x) for x in args.eval_rows.split(":"))
    tok = load_tokenizer(args.model)
    kw = dict(template="{text} It was", verbalizer=[" terrible", " great"], max_length=64)
    train = encode(load_jsonl(f"{args.data}/train.jsonl", num_labels=2), tok, **kw)
    dev = encode(load_jsonl(f"{args.data}/dev.jsonl", num_labels=2), tok, **kw)[lo:hi]
    pad = pad_id_for(tok)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    order = list(range(len(train)))
    random.Random(0).shuffle(order)

    def logits(b):
        h = model.model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False).last_hidden_state
        return model.lm_head(torch.gather(h, 1, b.loss_positions.unsqueeze(-1).expand(-1, -1, h.shape[-1])))

    def evaluate() -> tuple[float, float]:
        model.eval()
        n = correct = 0
        total = 0.0
        with torch.no_grad():
            for i in range(0, len(dev), 16):
                b = collate(dev[i:i + 16], pad_id=pad)
                lg = logits(b)
                total += float(loss_per_sample(lg, b).sum())
                correct += int(correct_per_sample(lg, b).sum())
                n += b.input_ids.shape[0]
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
    for s in range(1, args.steps + 1):
        w = args.warmup_steps
        lr = args.lr * (s / w if s <= w else max(0.0, (args.steps - s) / max(1, args.steps - w)))
        for g in opt.param_groups:
            g["lr"] = lr
        idx = [order[((s - 1) * args.batch_size + k) % len(order)] for k in range(args.batch_size)]
        b = collate([train[i] for i in idx], pad_id=pad)
        loss = loss_per_sample(logits(b), b).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        train_loss.append(float(loss.detach()))
        if s % 20 == 0:
            log(f"step {s} loss {sum(train_loss[-20:]) / 20:.4f} lr {lr:.2e} wall {time.perf_counter() - t0:.0f} s")
        if s % args.eval_every == 0 or s == args.steps:
            record(s)
    print_table(["step", "dev accuracy", "dev loss", "wall s"],
                [[e["step"], e["accuracy"], e["loss"], e["wall_s"]] for e in evals],
                title=f"full fine-tuning, dev rows {lo}-{hi - 1}, lr {args.lr}, batch {args.batch_size}")
    write_json(Path(args.out), {"machine": machine(args.threads), "settings": vars(args), "evals": evals,
                                "train_loss": train_loss})
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

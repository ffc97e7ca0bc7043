"""ferrytune's resident ZO step against a plain MeZO loop on SmolLM2-135M (fp32, batch 8 x 64).

    python benchmarks/bench_zo_vs_mezo.py                 # 5 rounds + warm-up, 1 thread
    python benchmarks/bench_zo_vs_mezo.py --rounds 9 --steps 2 --threads 2

In one process, same threads, same batches (ferrytune's batcher), interleaved per round:

* ``ferrytune``: ``offload.tier: resident``, fp32 masters (zero copy), one ZO step through
  ``ZOTrainer``'s step body (``benchmarks/_common.py: ZOSession``). Its "z passes" column is
  the time spent inside the perturbation and rounding kernels (``_common.KernelTimer``); the
  rest is the two forwards plus the engine's own work;
* ``plain``: MeZO's Algorithm 1 written out on the HF model (``from_pretrained``, fp32):
  ``torch.manual_seed(seed)`` then ``p.add_(torch.randn(p.shape), alpha=s * eps)`` per parameter
  for s = +1, -2, +1, and the update ``p.add_(torch.randn(p.shape), alpha=-lr * g)``: four
  passes regenerating z with ``torch.randn``. Its loss is computed as ferrytune computes it
  (last hidden states gathered at the scored positions, then the head), so both run the
  same forward FLOPs;
* ``plain_full``: the same loop with the HF forward as MeZO calls it (``model(...).logits``
  for every position, then the scored positions picked): the head runs on all 512 tokens.

Each step is timed in wall seconds and in process CPU seconds (``time.process_time``; with one
thread both loops run on the calling thread only): on the shared 2-core machine the CPU-time
ratio is the steadier of the two.

Forward hooks (``ModuleCPU``) split each step's CPU time into the decoder layers' modules
(attention, MLP, norms: identical work in both loops), the embedding + head units, and the
rest (z passes, the engine's own work).

Then the perturbation part alone, one pass over all 134.5 M parameters (tied weight once):
ferrytune's fused ``add_perturbation_`` (generate z and add in place: what the engine runs
four times per step), ``perturbation()`` + ``add_`` (z materialised in a fresh tensor, then
added), ``torch.randn`` + ``add_`` (the plain loop's pass), and a plain ``add_`` of a stored z
(the memory-bound limit). The kernel alone at other sizes: ``benchmarks/bench_perturb.py``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    BENCH_OUT,
    SMOLLM2,
    KernelTimer,
    ZOSession,
    log,
    machine,
    make_data,
    medians_of,
    peak_rss_gib,
    print_table,
    set_threads,
    write_json,
    zo_config,
)


class PlainMeZO:
    """MeZO's loop on a resident HF model; z regenerated with torch.randn in every pass."""

    def __init__(self, model_path: Path, *, eps: float, lr: float, seed: int, full_logits: bool) -> None:
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
        self.params = [p for _, p in self.model.named_parameters()]  # a tied weight once
        self.eps, self.lr, self.seed, self.full = eps, lr, seed, full_logits

    def loss(self, batch) -> float:
        from ferrytune.data import loss_per_sample

        m = self.model
        if self.full:
            logits = m(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
            idx = batch.loss_positions.unsqueeze(-1).expand(-1, -1, logits.shape[-1])
            logits = torch.gather(logits, 1, idx)
        else:
            h = m.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                             use_cache=False).last_hidden_state
            idx = batch.loss_positions.unsqueeze(-1).expand(-1, -1, h.shape[-1])
            logits = m.get_output_embeddings()(torch.gather(h, 1, idx))
        return float(loss_per_sample(logits, batch).sum()) / batch.batch_size

    def perturb(self, step: int, scale: float) -> None:
        torch.manual_seed(self.seed * 1_000_003 + step)
        for p in self.params:
            p.add_(torch.randn(p.shape), alpha=scale)

    @torch.no_grad()
    def step(self, step: int, batch) -> dict:
        c0 = time.process_time()
        t0 = time.perf_counter()
        times = {"z_s": 0.0, "fwd_s": 0.0}

        def timed(key, fn, *args):
            t = time.perf_counter()
            out = fn(*args)
            times[key] += time.perf_counter() - t
            return out

        timed("z_s", self.perturb, step, self.eps)  # theta + eps z
        lp = timed("fwd_s", self.loss, batch)
        timed("z_s", self.perturb, step, -2 * self.eps)  # theta - eps z
        lm = timed("fwd_s", self.loss, batch)
        timed("z_s", self.perturb, step, self.eps)  # back to theta
        g = (lp - lm) / (2 * self.eps)
        timed("z_s", self.perturb, step, -self.lr * g)  # theta - lr g z
        return {"step_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0, **times,
                "loss": (lp + lm) / 2}


def perturbation_pass(params: list[torch.Tensor], zs: list[torch.Tensor], kind: str, step: int) -> float:
    from ferrytune.kernels import PerturbKey, add_perturbation_, perturbation

    t0 = time.perf_counter()
    if kind == "ferrytune_fused":
        for i, p in enumerate(params):
            add_perturbation_(p, PerturbKey(0, step, 0, i), alpha=1e-3)
    elif kind == "ferrytune_materialised":
        for i, p in enumerate(params):
            p.add_(perturbation(PerturbKey(0, step, 0, i), p.shape), alpha=1e-3)
    elif kind == "randn_add":
        torch.manual_seed(step)
        for p in params:
            p.add_(torch.randn(p.shape), alpha=1e-3)
    elif kind == "add_only":
        for p, z in zip(params, zs):
            p.add_(z, alpha=1e-3)
    return time.perf_counter() - t0


class ModuleCPU:
    """CPU seconds (``time.thread_time``) spent inside the model's compute modules, per class.

    Forward hooks on every attention, MLP, RMSNorm and embedding module and on the head:
    the same modules in both loops. In ferrytune the embedding and the head are engine
    *units* whose intercepted forward also does the unit's perturbation work (for the
    tied embedding: three clones and their z passes), so they are reported apart."""

    CLASSES = ("LlamaAttention", "LlamaMLP", "LlamaRMSNorm", "Embedding")

    def __init__(self, model) -> None:
        self.seconds: dict[str, float] = {}
        for name, m in model.named_modules():
            cls = type(m).__name__
            if cls not in self.CLASSES and not name.endswith("lm_head"):
                continue
            key = "head" if name.endswith("lm_head") else cls
            start: dict = {}
            m.register_forward_pre_hook(lambda mod, args, start=start: start.__setitem__("t", time.thread_time()))
            m.register_forward_hook(lambda mod, args, out, start=start, key=key: self._add(key, start["t"]))

    def _add(self, key: str, t0: float) -> None:
        self.seconds[key] = self.seconds.get(key, 0.0) + time.thread_time() - t0

    def take(self) -> dict[str, float]:
        out, self.seconds = self.seconds, {}
        return out


PERTURB_KINDS = ("ferrytune_fused", "ferrytune_materialised", "randn_add", "add_only")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=SMOLLM2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--steps", type=int, default=1, help="steps of each loop per round")
    ap.add_argument("--rounds", type=int, default=5, help="measured rounds after one warm-up round")
    ap.add_argument("--threads", type=int, default=1, help="torch and kernel threads (1: the 2 cores are shared)")
    ap.add_argument("--no-full", action="store_true", help="skip the plain loop with full-sequence logits")
    ap.add_argument("--out", type=Path, default=BENCH_OUT / "zo_vs_mezo.json")
    ap.add_argument("--zo", action="append", default=[], metavar="KEY=VALUE",
                    help="a zo setting of ferrytune's side (repeatable), e.g. block_fraction=0.5, "
                         "distribution=rademacher; the plain loop stays MeZO")
    a = ap.parse_args()

    set_threads(a.threads)
    minfo = machine(a.threads)  # at the start: the code this run loaded
    KernelTimer.install()
    work = BENCH_OUT / "zo-vs-mezo"
    data = make_data(work / "data.jsonl")
    cfg = zo_config(a.model, work / "run", "resident", data=data, batch=a.batch, max_length=a.seq,
                    store_dtype="float32")
    if a.zo:
        import yaml

        from ferrytune.config import config_from_dict

        d = cfg.to_dict()
        d["zo"].update({k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in a.zo)})
        cfg = config_from_dict(d, source="--zo")
    log(f"ferrytune zo settings: {cfg.zo.model_dump()}")
    ft = ZOSession(cfg)
    log(f"ferrytune set up in {ft.setup_s:.1f}s\n{ft.plan.describe()}")
    plains = {"plain": PlainMeZO(a.model, eps=cfg.zo.eps, lr=cfg.train.lr, seed=0, full_logits=False)}
    if not a.no_full:
        plains["plain_full"] = PlainMeZO(a.model, eps=cfg.zo.eps, lr=cfg.train.lr, seed=0, full_logits=True)
    from ferrytune.data import pad_positions

    tr = ft.trainer
    mods = {"ferrytune": ModuleCPU(tr.rt.layout.model),
            **{n: ModuleCPU(pl.model) for n, pl in plains.items()}}
    pparams = [p.detach().clone() for p in plains["plain"].params]
    pz = [torch.randn(p.shape) for p in pparams]
    numel = sum(p.numel() for p in pparams)

    rounds = []
    step = 0
    for r in range(a.rounds + 1):
        raw = {"ferrytune": [], **{k: [] for k in plains}}
        for _ in range(a.steps):
            (batch,) = pad_positions(tr.batcher.batches_for_step(ft.next_step, pad_id=tr.pad_id))
            for m in mods.values():
                m.take()
            raw["ferrytune"].append({**ft.step(), "modules": mods["ferrytune"].take()})
            for name, pl in plains.items():
                raw[name].append({**pl.step(step, batch), "modules": mods[name].take()})
            step += 1
        pert = {k: perturbation_pass(pparams, pz, k, step) for k in PERTURB_KINDS}
        rec = {"round": r, "warmup": r == 0, "steps": raw}
        for name, xs in raw.items():
            rec[f"{name}_step_s"] = statistics.median(x["step_s"] for x in xs)
            rec[f"{name}_cpu_s"] = statistics.median(x["cpu_s"] for x in xs)
            body = ("LlamaAttention", "LlamaMLP", "LlamaRMSNorm")
            rec[f"{name}_layers_cpu_s"] = statistics.median(sum(x["modules"].get(c, 0.0) for c in body) for x in xs)
            rec[f"{name}_outer_cpu_s"] = statistics.median(
                x["modules"].get("Embedding", 0.0) + x["modules"].get("head", 0.0) for x in xs)
            if name == "ferrytune":
                rec["ferrytune_z_s"] = statistics.median(x["kernel_s"] for x in xs)
                rec["ferrytune_fwd_s"] = statistics.median(x["step_s"] - x["kernel_s"] for x in xs)
            else:
                rec[f"{name}_z_s"] = statistics.median(x["z_s"] for x in xs)
                rec[f"{name}_fwd_s"] = statistics.median(x["fwd_s"] for x in xs)
        for name in plains:
            rec[f"ferrytune_vs_{name}"] = rec["ferrytune_step_s"] / rec[f"{name}_step_s"]
            rec[f"ferrytune_vs_{name}_cpu"] = rec["ferrytune_cpu_s"] / rec[f"{name}_cpu_s"]
        for k, s in pert.items():
            rec[f"pert_{k}_s"] = s
            rec[f"pert_{k}_gels"] = numel / s / 1e9
        for k in ("ferrytune_fused", "ferrytune_materialised"):
            rec[f"pert_{k}_vs_randn_add"] = pert[k] / pert["randn_add"]
            rec[f"pert_{k}_vs_add_only"] = pert[k] / pert["add_only"]
        rounds.append(rec)
        log(f"round {r}: ferrytune {rec['ferrytune_step_s']:.2f}s (z {rec['ferrytune_z_s']:.2f}s), " + ", ".join(
            f"{n} {rec[n + '_step_s']:.2f}s (z {rec[n + '_z_s']:.2f}s, fwd {rec[n + '_fwd_s']:.2f}s)"
            for n in plains) + "; perturb pass: " + ", ".join(f"{k} {v:.2f}s" for k, v in pert.items()))
    ft.close()

    measured = [r for r in rounds if not r["warmup"]]
    keys = [k for k, v in measured[0].items() if isinstance(v, (int, float)) and k not in ("round", "warmup")]
    med = medians_of(measured, keys)
    setting = (f"SmolLM2-135M fp32, batch {a.batch} x {a.seq}, {a.threads} threads, "
               f"{a.steps} step(s)/loop/round, {a.rounds} rounds + warm-up")
    rows = [["ferrytune (resident)", med["ferrytune_step_s"]["median"], med["ferrytune_cpu_s"]["median"],
             med["ferrytune_z_s"]["median"], med["ferrytune_fwd_s"]["median"], "", "", ""]]
    mm = lambda s: f"{s['median']:.3f} [{s['min']:.3f}, {s['max']:.3f}]"
    for n in plains:
        rows.append([f"{n} MeZO loop", med[f"{n}_step_s"]["median"], med[f"{n}_cpu_s"]["median"],
                     med[f"{n}_z_s"]["median"], med[f"{n}_fwd_s"]["median"], mm(med[f"ferrytune_vs_{n}"]),
                     mm(med[f"ferrytune_vs_{n}_cpu"]), "<= 0.6" if n == "plain" else ""])
    print_table(["loop", "step s", "CPU s", "z passes s", "2 forwards (+ rest) s",
                 "ferrytune / loop, wall: median [min, max]", "same, CPU time", "target"], rows,
                title=f"ZO step ({setting})")
    rows = []
    for n in ("ferrytune", *plains):
        layers, outer, cpu = (med[f"{n}_{k}"]["median"] for k in ("layers_cpu_s", "outer_cpu_s", "cpu_s"))
        rows.append([n, cpu, layers, outer, cpu - layers - outer])
    print_table(["loop", "CPU s / step", "decoder layers' modules", "embedding + head units", "everything else"],
                rows, title="where the CPU time goes (thread_time in forward hooks; medians over rounds)")
    rows = []
    for k in PERTURB_KINDS:
        rows.append([k, med[f"pert_{k}_s"]["median"], med[f"pert_{k}_gels"]["median"],
                     med.get(f"pert_{k}_vs_randn_add", {}).get("median", ""),
                     med.get(f"pert_{k}_vs_add_only", {}).get("median", "")])
    print_table(["one pass over 134.5M params", "s", "G elem/s", "time vs randn+add_", "time vs add_"], rows,
                title="perturbation pass alone (in-round ratios; kernel sweep: benchmarks/bench_perturb.py)")

    write_json(a.out, {"benchmark": "zo_vs_mezo", "machine": minfo, "zo": cfg.zo.model_dump(),
                       "settings": {**{k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()},
                                    "numel": numel, "eps": cfg.zo.eps, "lr": cfg.train.lr,
                                    "tokens_per_pass": ft.records[-1]["tokens_per_pass"]},
                       "rounds": rounds, "medians": med, "peak_rss_gib": peak_rss_gib()})


if __name__ == "__main__":
    main()

"""MoE LoRA from NVMe: routed-only expert reads (``offload.routed_experts``) against whole-block reads.

    python benchmarks/bench_moe.py --model-dir /tmp/moe-model --work /tmp/moe-work            # small: ~2 min
    python benchmarks/bench_moe.py --model-dir /big/moe --work /big/work --size 26 --hidden 1024 --intermediate 2048 \
        --variants routed --rounds 1 --steps 2 --activation-budget-gib 0      # 26 GB bf16: larger than 24 GiB of RAM, ~6 min

A synthetic Mixtral-style model (hidden 512, 8 experts, top-2, 8 layers by default; ``--size GB`` picks
the layer count for a ~GB bf16 checkpoint instead). Small models are built with random weights by
``AutoModelForCausalLM.from_config(...).save_pretrained``; with ``--size`` the checkpoint is written one
tensor at a time in chunks under transformers' Mixtral checkpoint names (one tensor per expert), so
RAM never holds it (``make_synthetic.write_shard``).

Routing: ``--skew`` (default on) gives every token a large constant feature (embedding column 0) that the
routers weigh +1 for the first ``--hot`` experts and -1 for the others, so the others are never routed
to, as in a domain that uses a few experts; ``--no-skew`` keeps random routers (with 8 experts and a few
hundred tokens per micro-batch every expert is then routed to, and routed-only reads save nothing).

Both variants run in one invocation, in turn, each in its own spawned process, on the same batches (LoRA r=8 on q_proj/v_proj, bf16
store on NVMe, fp32 compute, checksums off for both unless ``--verify``: range reads are not verified,
so hashing only the whole records would bias the comparison): ``routed`` and ``all`` (every expert
streamed). Per variant: the median
over the timed steps (after ``--warmup``) of NVMe bytes read per step and step time (then the median
over ``--rounds`` rounds that alternate the variants), the bytes read
per (layer, expert), and the peak RSS of the variant (each runs in a fresh spawned process). Losses must agree
(checked: routed-only reads change no arithmetic). Prints a table and writes ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import shutil
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import torch  # noqa: E402

from _common import disk_ceiling, log, machine, peak_rss_gib, print_table, reset_peak_rss, write_json  # noqa: E402


def mixtral_config(tok_dir: Path, *, hidden: int, intermediate: int, layers: int, experts: int, top_k: int):
    from transformers import AutoConfig, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    return AutoConfig.for_model(
        "mixtral", vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=max(hidden // 64, 1), num_key_value_heads=max(hidden // 256, 1),
        num_local_experts=experts, num_experts_per_tok=top_k, max_position_embeddings=512, dtype="bfloat16")


def layer_params(hidden: int, intermediate: int, experts: int, heads: int, kv: int) -> int:
    hd = hidden // heads
    return (2 * hidden + hidden * heads * hd * 2 + 2 * hidden * kv * hd + experts * hidden
            + experts * 3 * hidden * intermediate)


def copy_tokenizer(src: Path, dest: Path) -> None:
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "chat_template")):
            shutil.copyfile(f, dest / f.name)


def build_small(dest: Path, cfg, tok_dir: Path, *, skew: bool, hot: int) -> None:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02) if p.dim() > 1 else p.fill_(1.0)
        if skew:
            model.model.embed_tokens.weight[:, 0] = 3.0
            for layer in model.model.layers:
                layer.mlp.gate.weight[:hot, 0] = 1.0
                layer.mlp.gate.weight[hot:, 0] = -1.0
    model.to(torch.bfloat16).save_pretrained(dest)
    copy_tokenizer(tok_dir, dest)


def build_streamed(dest: Path, cfg, tok_dir: Path, *, skew: bool, hot: int) -> None:
    """The checkpoint tensor by tensor (Mixtral's file names), never whole in RAM."""
    from make_synthetic import ValueSource, numel, write_shard

    h, i, e, n = cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts, cfg.num_hidden_layers
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = h // heads
    specs = [("model.embed_tokens.weight", (cfg.vocab_size, h))]
    for layer in range(n):
        p = f"model.layers.{layer}."
        specs += [(p + "input_layernorm.weight", (h,)), (p + "self_attn.q_proj.weight", (heads * hd, h)),
                  (p + "self_attn.k_proj.weight", (kv * hd, h)), (p + "self_attn.v_proj.weight", (kv * hd, h)),
                  (p + "self_attn.o_proj.weight", (h, heads * hd)), (p + "post_attention_layernorm.weight", (h,)),
                  (p + "block_sparse_moe.gate.weight", (e, h))]
        for x in range(e):
            q = p + f"block_sparse_moe.experts.{x}."
            specs += [(q + "w1.weight", (i, h)), (q + "w2.weight", (h, i)), (q + "w3.weight", (i, h))]
    specs += [("model.norm.weight", (h,)), ("lm_head.weight", (cfg.vocab_size, h))]

    class Skewed(ValueSource):
        def chunks(self, name, count):
            pos = 0
            for c in super().chunks(name, count):
                if skew and (name.endswith("embed_tokens.weight") or name.endswith("gate.weight")):
                    c = c.clone()
                    idx = torch.arange(pos, pos + c.numel())
                    col0 = idx % h == 0
                    if name.endswith("embed_tokens.weight"):
                        c[col0] = 3.0
                    else:
                        c[col0 & (idx // h < hot)] = 1.0
                        c[col0 & (idx // h >= hot)] = -1.0
                pos += c.numel()
                yield c

    dest.mkdir(parents=True, exist_ok=True)
    shards, size, limit = [[]], 0, 4 << 30
    for name, shape in specs:
        if shards[-1] and size + numel(shape) * 2 > limit:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += numel(shape) * 2
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))])
    values, weight_map = Skewed(0, False), {}
    for fname, shard in zip(names, shards):
        write_shard(dest / fname, shard, values)
        weight_map.update({nm: fname for nm, _ in shard})
        log(f"  wrote {fname}")
    if len(shards) > 1:
        (dest / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": sum(numel(s) for _, s in specs) * 2}, "weight_map": weight_map}))
    cfg.save_pretrained(dest)
    copy_tokenizer(tok_dir, dest)


def make_data(path: Path, rows: int) -> Path:
    from ferrytune.data import demo_data_path

    src = [json.loads(ln) for ln in demo_data_path("train").read_text().splitlines() if ln.strip()]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for k in range(rows):
            parts = [src[(k * 7 + j) % len(src)] for j in range(8)]
            f.write(json.dumps({"text": " ".join(p["text"] for p in parts), "label": parts[-1]["label"]}) + "\n")
    return path


def run_variant(name: str, routed: bool, args, model: Path, data: Path, work: Path) -> dict:
    from ferrytune.config import config_from_dict
    from ferrytune.engine import LoraTrainer

    steps = args.warmup + args.steps
    cfg = config_from_dict({
        "method": "lora",
        "model": {"path": str(model), "compute_dtype": "float32", "store_dtype": "bfloat16"},
        "data": {"train": str(data), "eval": None, "max_length": args.max_length, "shuffle": False},
        "train": {"steps": steps, "batch_size": args.batch, "seed": 0, "lr": 1e-4},
        "lora": {"rank": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        "offload": {"tier": "nvme", "nvme_dir": str(Path(args.nvme_dir or work) / f"store_{name}"),
                    "prefetch_depth": args.prefetch_depth, "routed_experts": routed,
                    "activation_budget_gib": args.activation_budget_gib,
                    "verify_checksums": args.verify},
        "output_dir": str(work / f"run_{name}"), "resume": "never", "overwrite": True, "device": "cpu"})
    torch.set_num_threads(args.threads)
    reset_peak_rss()
    t0 = time.perf_counter()
    tr = LoraTrainer(cfg)
    tr.setup()
    setup_s = time.perf_counter() - t0
    try:
        tr.train(progress=False)
    finally:
        tr.close()
    recs = [json.loads(ln) for ln in open(work / f"run_{name}" / "metrics.jsonl")]
    recs = [r for r in recs if "loss" in r]
    timed = recs[args.warmup:]
    by_expert: dict[str, int] = {}
    for r in timed:
        for k, v in (r.get("expert_bytes_read") or {}).items():
            by_expert[k] = by_expert.get(k, 0) + v
    shutil.rmtree(Path(args.nvme_dir or work) / f"store_{name}", ignore_errors=True)
    return {"losses": [r["loss"] for r in recs], "setup_s": setup_s,
            "bytes_read_per_step": statistics.median(r["bytes_read_nvme"] for r in timed),
            "step_s": statistics.median(r["step_s"] for r in timed), "peak_rss_gib": peak_rss_gib(),
            "expert_bytes_read_timed_steps": dict(sorted(by_expert.items())),
            "experts_read": len(by_expert)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", type=Path, required=True, help="where the synthetic model is (built if absent)")
    ap.add_argument("--work", type=Path, required=True, help="scratch: runs, data (and stores unless --nvme-dir)")
    ap.add_argument("--nvme-dir", type=Path, default=None, help="scratch for the NVMe block stores (default: --work)")
    ap.add_argument("--out", type=Path, default=REPO / "bench-out" / "moe.json")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--intermediate", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--size", type=float, default=None, help="GB of bf16 checkpoint: sets --layers, writes streamed")
    ap.add_argument("--skew", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--hot", type=int, default=4, help="with --skew: the experts the routers can pick")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--verify", action=argparse.BooleanOptionalAction, default=False,
                    help="offload.verify_checksums for both variants (default off: range reads are never "
                    "verified, and hashing whole records on the IO threads would be a cost only 'all' pays)")
    ap.add_argument("--rounds", type=int, default=3, help="each round runs every variant once, in turn")
    ap.add_argument("--variants", default="routed,all", help="run order (both are needed for the table)")
    ap.add_argument("--activation-budget-gib", type=float, default=None,
                    help="offload.activation_budget_gib (0: every layer recomputes in backward, only its input kept)")
    ap.add_argument("--disk-ceiling", action=argparse.BooleanOptionalAction, default=True,
                    help="measure the disk's O_DIRECT read ceiling (fio, best of parallel settings) in the stores' "
                    "directory first: each variant's step against its disk-bound time (bytes read / ceiling)")
    ap.add_argument("--prefetch-depth", type=int, default=1, help="ring = depth + 2 slots: fewer than the layers, "
                    "so every step reads (a ring that holds every layer reads nothing after the first step)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from ferrytune.launch._demo import build_tiny_model

    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    tok = build_tiny_model(work / "tokenizer", layers=1, hidden=16)
    if args.size is not None:
        heads, kv = max(args.hidden // 64, 1), max(args.hidden // 256, 1)
        per = layer_params(args.hidden, args.intermediate, args.experts, heads, kv) * 2
        args.layers = max(1, int(args.size * 1e9 // per))
    cfg = mixtral_config(tok, hidden=args.hidden, intermediate=args.intermediate, layers=args.layers,
                         experts=args.experts, top_k=args.top_k)
    if not (args.model_dir / "config.json").exists():
        t0 = time.perf_counter()
        args.model_dir.mkdir(parents=True, exist_ok=True)
        (build_streamed if args.size is not None else build_small)(args.model_dir, cfg, tok, skew=args.skew,
                                                                   hot=args.hot)
        log(f"built {args.model_dir} ({args.layers} layers) in {time.perf_counter() - t0:.1f} s")
    data = make_data(work / "data.jsonl", rows=args.batch * (args.warmup + args.steps + 2))
    from ferrytune.models import load_layout

    layout = load_layout(args.model_dir)
    ex = layout.blocks["layer.0"].experts
    block_b = layout.blocks["layer.0"].numel * 2
    expert_b = sum(hi - lo for lo, hi in ex.ranges(0)) * 2
    ceiling = None
    if args.disk_ceiling:
        ceiling = disk_ceiling(Path(args.nvme_dir or work) / "fio")
        log(f"disk read ceiling {ceiling['fio_read_gbs']:.2f} GB/s (fio best setting)")
    runs: dict[str, list[dict]] = {n: [] for n in args.variants.split(",")}
    for k in range(args.rounds):  # variants alternate, so load on a shared machine hits both alike
        for name in runs:
            routed = {"routed": True, "all": False}[name]
            log(f"round {k + 1}/{args.rounds}: variant {name}")
            # One fresh process per variant (spawned), so its peak RSS is its own.
            with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
                runs[name].append(pool.submit(run_variant, name, routed, args, args.model_dir, data, work).result())
    results = {}
    for name, rs in runs.items():
        results[name] = {**rs[0], "step_s": statistics.median(r["step_s"] for r in rs),
                         "step_s_rounds": [r["step_s"] for r in rs],
                         "peak_rss_gib": max(r["peak_rss_gib"] for r in rs),
                         "losses_same_every_round": all(r["losses"] == rs[0]["losses"] for r in rs)}
    both = "routed" in results and "all" in results
    same = results["routed"]["losses"] == results["all"]["losses"] if both else None
    for v in results.values():
        v["disk_bound_s"] = v["bytes_read_per_step"] / (ceiling["fio_read_gbs"] * 1e9) if ceiling else None
    rows = [[n, f"{v['bytes_read_per_step'] / 1e6:.1f}", f"{v['step_s']:.2f}",
             f"{min(v['step_s_rounds']):.2f}-{max(v['step_s_rounds']):.2f}", f"{v['peak_rss_gib']:.2f}",
             str(v["experts_read"]),
             "-" if v["disk_bound_s"] is None else f"{v['disk_bound_s']:.2f} ({v['step_s'] / v['disk_bound_s']:.2f}x)"]
            for n, v in results.items()]
    print_table(["variant", "NVMe MB read / step", "step s (median of rounds)", "rounds min-max", "peak RSS GiB",
                 "(layer, expert) read", "disk-bound s (step / it)"], rows,
                title=f"MoE LoRA, {args.layers} layers x {args.experts} experts (top-{args.top_k}), hidden "
                      f"{args.hidden}, batch {args.batch}x{args.max_length}; block {block_b / 1e6:.1f} MB, "
                      f"expert {expert_b / 1e6:.2f} MB; losses equal: {same}")
    if both:
        r, a = results["routed"], results["all"]
        print(f"bytes read routed/all: {r['bytes_read_per_step'] / max(a['bytes_read_per_step'], 1):.3f}; "
              f"step time routed/all: {r['step_s'] / a['step_s']:.3f}")
    write_json(args.out, {"args": {k: str(v) for k, v in vars(args).items()}, "machine": machine(args.threads),
                          "block_bytes": block_b, "expert_bytes": expert_b, "dense_bytes": ex.dense_numel * 2,
                          "checkpoint_bytes": sum(b.numel for b in layout.blocks.values()) * 2,
                          "disk_ceiling": ceiling, "losses_equal": same, "results": results})
    if both and not same:
        raise SystemExit("routed-only and whole-block losses differ")


if __name__ == "__main__":
    main()

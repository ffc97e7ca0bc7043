"""Write a synthetic LLaMA-architecture HF model folder of a chosen size, never materialising it.

    python benchmarks/make_synthetic.py bench-out/synth-1b --hidden 2048 --intermediate 5632 --layers 16
    python benchmarks/make_synthetic.py /work/synth-15b --hidden 2048 --intermediate 5632 --layers 290 --dry-run

The folder holds ``config.json`` (SmolLM2-135M's LLaMA config with the chosen hidden size,
intermediate size, layer count, heads and vocabulary), SmolLM2's tokenizer files, and the
weights as bf16 safetensors shards (``model-0000i-of-0000n.safetensors`` + index; one
``model.safetensors`` when it fits one shard). Tensors are generated and written one at a
time in chunks, so RAM stays at a few tens of MiB whatever the model size, and the page
cache is dropped behind the writer (fdatasync + POSIX_FADV_DONTNEED every 256 MiB).

Values: norms are 1; every matrix is N(0, 0.02) (HF's LLaMA init). By default each 8 MiB
chunk is a slice, at a random offset, of a pool of 32 Mi fresh N(0, 0.02) values (generating
15 G fresh normals costs minutes on two cores and a benchmark of IO and ZO steps does not
care); ``--fresh`` draws every value with ``torch.randn`` instead.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SMOLLM2, log

CHUNK = 4 << 20  # elements per write (8 MiB of bf16)
POOL = 32 << 20  # elements in the random pool
STD = 0.02
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def tensor_specs(hidden: int, intermediate: int, layers: int, vocab: int, heads: int, kv_heads: int,
                 tie: bool) -> list[tuple[str, tuple[int, ...]]]:
    """HF LLaMA checkpoint names and shapes, in checkpoint order."""
    hd = hidden // heads
    specs = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        specs += [
            (p + "input_layernorm.weight", (hidden,)),
            (p + "self_attn.q_proj.weight", (heads * hd, hidden)),
            (p + "self_attn.k_proj.weight", (kv_heads * hd, hidden)),
            (p + "self_attn.v_proj.weight", (kv_heads * hd, hidden)),
            (p + "self_attn.o_proj.weight", (hidden, heads * hd)),
            (p + "post_attention_layernorm.weight", (hidden,)),
            (p + "mlp.gate_proj.weight", (intermediate, hidden)),
            (p + "mlp.up_proj.weight", (intermediate, hidden)),
            (p + "mlp.down_proj.weight", (hidden, intermediate)),
        ]
    specs.append(("model.norm.weight", (hidden,)))
    if not tie:
        specs.append(("lm_head.weight", (vocab, hidden)))
    return specs


def numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


class ValueSource:
    """Chunks of bf16 values for one tensor: ones for norms, N(0, STD) otherwise."""

    def __init__(self, seed: int, fresh: bool) -> None:
        self.gen = torch.Generator().manual_seed(seed)
        self.fresh = fresh
        self.pool = None if fresh else (torch.randn(POOL, generator=self.gen) * STD).to(torch.bfloat16)
        self.ones = torch.ones(CHUNK, dtype=torch.bfloat16)

    def chunks(self, name: str, n: int):
        pos = 0
        while pos < n:
            k = min(CHUNK, n - pos)
            if name.endswith("norm.weight"):
                yield self.ones[:k]
            elif self.fresh:
                yield (torch.randn(k, generator=self.gen) * STD).to(torch.bfloat16)
            else:
                start = int(torch.randint(0, POOL - k + 1, (1,), generator=self.gen))
                yield self.pool[start:start + k]
            pos += k


def write_shard(path: Path, specs: list[tuple[str, tuple[int, ...]]], values: ValueSource) -> int:
    offsets, pos = {}, 0
    for name, shape in specs:
        nbytes = numel(shape) * 2
        offsets[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
        pos += nbytes
    header = json.dumps({"__metadata__": {"format": "pt"}, **offsets}, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    with open(path, "wb") as f:
        fd = f.fileno()
        f.write(struct.pack("<Q", len(header)))
        f.write(header)
        since_sync = 0
        for name, shape in specs:
            for chunk in values.chunks(name, numel(shape)):
                f.write(memoryview(chunk.view(torch.int16).numpy()))
                since_sync += chunk.numel() * 2
                if since_sync >= 256 << 20:  # keep the page cache from filling with our writes
                    f.flush()
                    os.fdatasync(fd)
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                    since_sync = 0
        f.flush()
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    return 8 + len(header) + pos


def build(dest: Path, *, hidden: int, intermediate: int, layers: int, vocab: int = 49152, heads: int | None = None,
          kv_heads: int | None = None, tie: bool = False, shard_gib: float = 4.0, seed: int = 0,
          fresh: bool = False, dry_run: bool = False) -> dict:
    heads = heads or max(hidden // 128, 1)
    kv_heads = kv_heads or heads
    if hidden % heads or heads % kv_heads:
        raise SystemExit(f"hidden {hidden} must divide by heads {heads}, and heads by kv_heads {kv_heads}")
    specs = tensor_specs(hidden, intermediate, layers, vocab, heads, kv_heads, tie)
    total = sum(numel(s) for _, s in specs)
    layer = sum(numel(s) for n, s in specs if n.startswith("model.layers.0."))
    info = {"params": total, "bytes_bf16": total * 2, "params_per_layer": layer, "outer_params": total - layers * layer,
            "hidden": hidden, "intermediate": intermediate, "layers": layers, "vocab": vocab, "heads": heads,
            "kv_heads": kv_heads, "tie_word_embeddings": tie}
    log(f"synthetic LLaMA: {total / 1e9:.3f} B params, {total * 2 / 1e9:.2f} GB bf16 "
        f"({layer / 1e6:.1f} M per layer x {layers}, outer {info['outer_params'] / 1e6:.1f} M)")
    if dry_run:
        return info
    free = shutil.disk_usage(dest.parent if dest.parent.exists() else Path("/")).free
    if total * 2 > free - (2 << 30):
        raise SystemExit(f"not enough disk: need {total * 2 / 1e9:.1f} GB, {free / 1e9:.1f} GB free")
    dest.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((SMOLLM2 / "config.json").read_text())
    cfg.update({"_model_name_or_path": f"ferrytune synthetic {total / 1e9:.2f}B", "hidden_size": hidden,
                "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": heads,
                "num_key_value_heads": kv_heads, "head_dim": hidden // heads, "vocab_size": vocab,
                "tie_word_embeddings": tie, "max_position_embeddings": 2048, "dtype": "bfloat16"})
    (dest / "config.json").write_text(json.dumps(cfg, indent=2))
    for f in TOKENIZER_FILES:
        if (SMOLLM2 / f).exists():
            shutil.copy(SMOLLM2 / f, dest / f)
    # shards: consecutive tensors up to shard_gib each
    limit = int(shard_gib * 2**30)
    shards: list[list] = [[]]
    size = 0
    for name, shape in specs:
        nb = numel(shape) * 2
        if shards[-1] and size + nb > limit:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nb
    values = ValueSource(seed, fresh)
    t0 = time.perf_counter()
    written = 0
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map = {}
    for fname, shard in zip(names, shards):
        written += write_shard(dest / fname, shard, values)
        weight_map.update({n: fname for n, _ in shard})
        log(f"  {fname}: {written / 1e9:.2f} GB written, {written / 1e9 / (time.perf_counter() - t0):.2f} GB/s")
    if len(shards) > 1:
        (dest / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total * 2}, "weight_map": weight_map}, indent=1))
    info["write_s"] = time.perf_counter() - t0
    info["files"] = names
    (dest / "synthetic.json").write_text(json.dumps(info, indent=1))
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dest", type=Path)
    ap.add_argument("--hidden", type=int, required=True)
    ap.add_argument("--intermediate", type=int, required=True)
    ap.add_argument("--layers", type=int, required=True)
    ap.add_argument("--vocab", type=int, default=49152, help="at least SmolLM2's tokenizer size (49152)")
    ap.add_argument("--heads", type=int, default=None, help="default hidden / 128")
    ap.add_argument("--kv-heads", type=int, default=None, help="default = heads (no GQA)")
    ap.add_argument("--tie", action="store_true", help="tie lm_head to the embedding")
    ap.add_argument("--shard-gib", type=float, default=4.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fresh", action="store_true", help="draw every value with torch.randn (slow)")
    ap.add_argument("--dry-run", action="store_true", help="print the size and exit")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if (a.dest / "config.json").exists() and not a.dry_run:
        raise SystemExit(f"{a.dest} already holds a model; delete it first")
    info = build(a.dest, hidden=a.hidden, intermediate=a.intermediate, layers=a.layers, vocab=a.vocab,
                 heads=a.heads, kv_heads=a.kv_heads, tie=a.tie, shard_gib=a.shard_gib, seed=a.seed,
                 fresh=a.fresh, dry_run=a.dry_run)
    print(json.dumps(info, indent=1))


if __name__ == "__main__":
    main()

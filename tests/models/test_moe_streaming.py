"""Routed-only MoE streaming (``offload.routed_experts``): on the NVMe tier a MoE layer's block is read
as its dense part, and only the experts the router picks are read after the router has run.

Tiny Mixtral and Qwen3-MoE (8 experts, top-2, 4 layers, hidden 32), saved by ``save_pretrained``.
Routing is made concentrated: every token carries a large constant feature (embedding column 0), and
the routers weigh it +1 for experts 0-3 and -1 for experts 4-7, so experts 4-7 are never routed to and
routed-only reads are strictly fewer than whole blocks. The per-expert slices of the test's shapes are
multiples of 4 KiB, so the expected bytes are exact sums of the layout's ranges (no rounding).

* evaluation-style forward on a freshly opened streamer: bytes read = the outer block + per layer its
  dense part (rounded up to a page) + the records of the experts a plain resident transformers forward
  routes to; per-(layer, expert) counters hold exactly those experts; logits = resident, bit for bit;
* LoRA training (kept activations, and recomputed ones with dropout): losses and adapter = resident, bit
  for bit; per step, ``expert_bytes_read`` in ``metrics.jsonl`` names only experts the resident run
  routed to in that step (recorded by hooks on its experts modules) — in step 0, whose slots start
  empty, exactly those, once per load of their layer — each a whole number of times its record, and
  the NVMe bytes = those expert bytes + the dense parts of the loads a whole-block run of the same
  config makes (the slot choices are the same) + the outer block.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ferrytune.engine import LoraTrainer
from ferrytune.models import OUTER, load_layout, load_resident_model
from ferrytune.offload import PAGE_BYTES

LAYERS, H = 4, 32
LORA = {"rank": 2, "alpha": 4, "dropout": 0.0, "target_modules": "all-linear"}
ROUTED = (0, 1, 2, 3)  # the experts the routers can pick (see the module doc)


def _moe_kwargs(arch: str) -> dict:
    base = dict(hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=128)
    if arch == "mixtral":  # per expert: gate_up 2*64*32 fp32 = 16 KiB, down 32*64 = 8 KiB
        return {**base, "intermediate_size": 64, "num_local_experts": 8, "num_experts_per_tok": 2}
    return {**base, "intermediate_size": 64, "head_dim": 8, "num_experts": 8, "num_experts_per_tok": 2,
            "moe_intermediate_size": 32, "decoder_sparse_step": 1, "mlp_only_layers": []}


def build_moe(dest: Path, arch: str, tokenizer_dir: str) -> str:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if (dest / "config.json").exists():
        return str(dest)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = AutoConfig.for_model(arch, vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                               pad_token_id=tok.pad_token_id, **_moe_kwargs(arch))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
        model.model.embed_tokens.weight[:, 0] = 3.0  # a large constant feature in every token
        for layer in model.model.layers:
            w = layer.mlp.gate.weight
            w[: len(ROUTED), 0] = 1.0
            w[len(ROUTED):, 0] = -1.0
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest)
    for f in Path(tokenizer_dir).iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "chat_template")):
            shutil.copyfile(f, dest / f.name)
    return str(dest)


@pytest.fixture(scope="module")
def moe_path(tmp_path_factory):
    from ferrytune.launch._demo import build_tiny_model

    root = tmp_path_factory.mktemp("moe")
    tok = str(build_tiny_model(root / "tok", arch="llama", layers=1, hidden=16))
    return lambda arch: build_moe(root / arch, arch, tok)


def _experts_modules(layout):
    return {b: s.experts.module for b, s in layout.blocks.items() if s.experts is not None}


def _record_routing(modules: dict) -> tuple[dict, list]:
    """Forward pre-hooks that collect, per block, the experts each call routes to (``top_k_index``)."""
    seen: dict[str, set[int]] = {b: set() for b in modules}
    handles = []
    for b, mod in modules.items():
        def hook(module, args, kwargs, b=b):
            seen[b].update(torch.unique(args[1] if len(args) > 1 else kwargs["top_k_index"]).tolist())
        handles.append(mod.register_forward_pre_hook(hook, with_kwargs=True))
    return seen, handles


def _sizes(layout, es: int) -> tuple[int, dict[str, int], list[int]]:
    """(outer bytes, dense bytes per layer block as read, bytes of each expert's record)."""
    outer = layout.blocks[OUTER].numel * es
    dense, expert = {}, None
    for b in layout.layer_blocks:
        ex = layout.blocks[b].experts
        assert ex is not None and ex.num_experts == 8
        dense[b] = -(-ex.dense_numel * es // PAGE_BYTES) * PAGE_BYTES
        per = []
        for e in range(8):
            rs = ex.ranges(e)
            assert all(lo * es % PAGE_BYTES == 0 and hi * es % PAGE_BYTES == 0 for lo, hi in rs)  # exact, unrounded
            per.append(sum((hi - lo) * es for lo, hi in rs))
        expert = per
    return outer, dense, expert


def _ids():
    ids = torch.randint(4, 200, (3, 11), generator=torch.Generator().manual_seed(1))
    return ids, torch.ones_like(ids)


def _eval_logits(cfg):
    tr = LoraTrainer(cfg)
    tr.setup()
    try:
        ids, mask = _ids()
        st = tr.rt.streamer
        before = st.stats.snapshot()
        with torch.no_grad():
            tr.engine.begin_step(1, backward=False)
            logits = tr.engine.forward(ids, mask, torch.arange(ids.shape[1]).expand(ids.shape[0], -1))
            tr.engine.end_step()
        after = st.stats.snapshot()
        read = {t: after["bytes_read"][t] - before["bytes_read"][t] for t in after["bytes_read"]}
        by_expert = {k: v - before["bytes_by_expert"].get(k, 0) for k, v in after["bytes_by_expert"].items()}
        return logits, read, {k: v for k, v in by_expert.items() if v}
    finally:
        tr.close()


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_eval_forward_reads_only_routed_experts(moe_path, cfg_factory, arch):
    path = moe_path(arch)
    layout = load_layout(path)
    # The routed sets of a plain resident transformers forward.
    plain = load_resident_model(path).eval()
    mods = {f"layer.{i}": layer.mlp.experts for i, layer in enumerate(plain.model.layers)}
    routed, handles = _record_routing(mods)
    ids, mask = _ids()
    with torch.no_grad():
        plain(input_ids=ids, attention_mask=mask)
    for h in handles:
        h.remove()
    assert all(routed[b] and routed[b] <= set(ROUTED) for b in routed)  # concentrated: experts 4-7 unrouted

    sections = dict(method="lora", lora=LORA, data={"eval": None})
    resident, _, _ = _eval_logits(cfg_factory(path, offload={"tier": "resident"}, **sections))
    whole, read_whole, _ = _eval_logits(cfg_factory(path, offload={"tier": "nvme", "prefetch_depth": 1}, **sections))
    logits, read, by_expert = _eval_logits(cfg_factory(path, offload={"tier": "nvme", "prefetch_depth": 1,
                                                                      "routed_experts": True}, **sections))
    assert torch.equal(logits, resident) and torch.equal(whole, resident)

    outer, dense, expert = _sizes(layout, 4)
    assert by_expert == {f"{b}/{e}": expert[e] for b in layout.layer_blocks for e in routed[b]}
    expected = outer + sum(dense[b] + sum(expert[e] for e in routed[b]) for b in layout.layer_blocks)
    assert read["nvme"] == expected
    assert read_whole["nvme"] == outer + sum(layout.blocks[b].numel * 4 for b in layout.layer_blocks)
    assert read["nvme"] < read_whole["nvme"]


def _train(cfg, record: bool = False):
    tr = LoraTrainer(cfg)
    tr.setup()
    handles, steps = [], []
    try:
        if record:  # per step, the experts each layer routes to (the engine runs one forward per layer)
            mods = _experts_modules(tr.rt.layout)
            for b, mod in mods.items():
                def hook(module, args, kwargs, b=b):
                    if b == "layer.0":  # one micro-batch per step: layer.0 starts a step's forward
                        steps.append({})
                    steps[-1].setdefault(b, set()).update(torch.unique(args[1]).tolist())
                handles.append(mod.register_forward_pre_hook(hook, with_kwargs=True))
        tr.train(progress=False)
    finally:
        for h in handles:
            h.remove()
        tr.close()
    recs = [json.loads(ln) for ln in open(f"{cfg.output_dir}/metrics.jsonl")]
    recs = [r for r in recs if "loss" in r]
    adapter = load_file(f"{cfg.output_dir}/final/adapter_model.safetensors")
    return recs, adapter, steps


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_lora_routed_reads_and_equals_resident(moe_path, cfg_factory, arch):
    path = moe_path(arch)
    sections = dict(method="lora", lora=LORA, data={"eval": None, "max_length": 16},
                    train={"steps": 3, "batch_size": 2, "seed": 3, "lr": 5e-2})
    ref, ref_adapter, routed = _train(cfg_factory(path, offload={"tier": "resident"}, **sections), record=True)
    whole, _, _ = _train(cfg_factory(path, offload={"tier": "nvme", "prefetch_depth": 1}, **sections))
    got, adapter, _ = _train(cfg_factory(path, offload={"tier": "nvme", "prefetch_depth": 1, "routed_experts": True},
                                         **sections))
    assert [r["loss"] for r in got] == [r["loss"] for r in ref] == [r["loss"] for r in whole]
    assert adapter.keys() == ref_adapter.keys() and all(torch.equal(adapter[k], ref_adapter[k]) for k in adapter)
    assert any(t.abs().sum() > 0 for k, t in adapter.items() if "lora_B" in k)

    layout = load_layout(path)
    outer, dense, expert = _sizes(layout, 4)
    block = layout.blocks["layer.0"].numel * 4
    assert len(routed) == len(got) == 3
    for i, (step, rec, full) in enumerate(zip(routed, got, whole)):
        assert all(step[b] <= set(ROUTED) for b in step)
        by_expert = rec["expert_bytes_read"]
        keys = {f"{b}/{e}" for b in step for e in step[b]}
        # Never an expert this step does not route to. Step 0 starts with empty slots: every routed
        # expert is read; later steps find some in slots kept from the step before (no IO).
        assert set(by_expert) == keys if i == 0 else set(by_expert) <= keys
        loads = {}
        for key, n in by_expert.items():  # whole records only
            b, e = key.split("/")
            assert n % expert[int(e)] == 0 and n > 0
            loads.setdefault(b, set()).add(n // expert[int(e)])
        # A whole-block run makes the same slot choices: its bytes give the step's loads (the outer
        # block is read again only where its slot does not still hold it).
        n = full["bytes_read_nvme"]
        fits = [o for o in (0, outer) if n >= o and (n - o) % block == 0]
        assert len(fits) == 1 and (i > 0 or fits == [outer])
        outer_read = fits[0]
        layer_loads = (n - outer_read) // block
        if i == 0:  # each routed expert read once per load of its layer
            assert all(len(v) == 1 for v in loads.values())
            assert sum(next(iter(v)) for v in loads.values()) == layer_loads
        assert rec["bytes_read_nvme"] == outer_read + layer_loads * dense["layer.0"] + sum(by_expert.values())
        assert rec["bytes_read_nvme"] < full["bytes_read_nvme"]


@pytest.mark.parametrize("arch", ["mixtral"])
def test_lora_routed_recompute_and_micro_batches_equal_resident(moe_path, cfg_factory, arch):
    """Recomputed layers (activation budget 0) route again in backward; two micro-batches route
    differently; dropout on: the adapter is the resident one, bit for bit. With a bf16 store the experts
    are cast into the slot: read before the recompute, else the cast bumps the version of tensors the
    recompute's autograd saved (a 26 GB run hit it)."""
    path = moe_path(arch)
    sections = dict(method="lora", lora={**LORA, "dropout": 0.1}, data={"eval": None, "max_length": 16},
                    train={"steps": 2, "batch_size": 4, "micro_batch_size": 2, "seed": 5, "lr": 5e-2})
    ref, ref_adapter, _ = _train(cfg_factory(path, offload={"tier": "resident"}, **sections))
    for extra in ({"activation_budget_gib": 0}, {}):
        got, adapter, _ = _train(cfg_factory(path, offload={"tier": "nvme", "prefetch_depth": 1,
                                                            "routed_experts": True, **extra}, **sections))
        assert [r["loss"] for r in got] == [r["loss"] for r in ref]
        assert all(torch.equal(adapter[k], ref_adapter[k]) for k in adapter)
    bf16 = {**sections, "model": {"store_dtype": "bfloat16"}}
    ref16, ref16_adapter, _ = _train(cfg_factory(path, offload={"tier": "host"}, **bf16))
    got, adapter, _ = _train(cfg_factory(path, offload={"tier": "nvme", "prefetch_depth": 1, "routed_experts": True,
                                                        "activation_budget_gib": 0}, **bf16))
    assert [r["loss"] for r in got] == [r["loss"] for r in ref16]
    assert all(torch.equal(adapter[k], ref16_adapter[k]) for k in adapter)


@pytest.mark.parametrize("tier", ["host", "nvme"])
def test_eval_bf16_store_routed_equals_whole_blocks(moe_path, cfg_factory, tier):
    """A bf16 store goes through slots on both tiers (the cast path, staging != working copy): routed-only
    reads give the whole-block logits bit for bit and read the dense part plus the routed experts only."""
    path = moe_path("mixtral")
    sections = dict(method="lora", lora=LORA, data={"eval": None}, model={"store_dtype": "bfloat16"})
    whole, read_whole, none = _eval_logits(cfg_factory(path, offload={"tier": tier, "prefetch_depth": 1}, **sections))
    logits, read, by_expert = _eval_logits(cfg_factory(path, offload={"tier": tier, "prefetch_depth": 1,
                                                                      "routed_experts": True}, **sections))
    assert torch.equal(logits, whole) and not none
    layout = load_layout(path)
    outer, _, expert = _sizes(layout, 2)
    routed = {}
    for key in by_expert:
        b, e = key.split("/")
        routed.setdefault(b, set()).add(int(e))
        assert by_expert[key] == expert[int(e)]
    assert set(routed) == set(layout.layer_blocks) and all(r <= set(ROUTED) for r in routed.values())
    dense = {b: layout.blocks[b].experts.dense_numel * 2 for b in layout.layer_blocks}
    if tier == "nvme":
        dense = {b: -(-n // PAGE_BYTES) * PAGE_BYTES for b, n in dense.items()}
    assert read[tier] == outer + sum(dense.values()) + sum(by_expert.values())
    assert read[tier] < read_whole[tier]


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_layer_major_with_routed_reads_equals_micro_major(moe_path, cfg_factory, arch):
    """Layer-major accumulation (2 micro-batches per step) with routed-only reads: each micro-batch's
    experts are read as the layer runs on it, the union again for the backward; the adapter equals
    micro-batch-major order and the resident run bit for bit, with fewer NVMe bytes than micro-major."""
    path = moe_path(arch)
    sections = dict(method="lora", lora=LORA, data={"eval": None, "max_length": 16})
    train = {"steps": 3, "batch_size": 4, "micro_batch_size": 2, "seed": 3, "lr": 5e-2}
    off = {"tier": "nvme", "prefetch_depth": 1, "routed_experts": True}
    ref, ref_adapter, _ = _train(cfg_factory(path, offload={"tier": "resident"},
                                             train={**train, "accumulation": "micro_major"}, **sections))
    micro, micro_adapter, _ = _train(cfg_factory(path, offload=dict(off), train={**train, "accumulation": "micro_major"},
                                                 **sections))
    lm, lm_adapter, _ = _train(cfg_factory(path, offload=dict(off), train={**train, "accumulation": "layer_major"},
                                           **sections))
    assert [r["loss"] for r in lm] == [r["loss"] for r in micro] == [r["loss"] for r in ref]
    for key, value in ref_adapter.items():
        assert torch.equal(lm_adapter[key], value) and torch.equal(micro_adapter[key], value), key
    assert any(v.abs().sum() > 0 for k, v in ref_adapter.items() if "lora_B" in k)  # it trained
    lm_read = [r["bytes_read_nvme"] for r in lm][1:]
    micro_read = [r["bytes_read_nvme"] for r in micro][1:]
    assert all(a < b for a, b in zip(lm_read, micro_read)), (lm_read, micro_read)
    by_expert = [r.get("expert_bytes_read", {}) for r in lm]
    assert all(by_expert) and all(k.split("/")[1] in {str(e) for e in ROUTED} for d in by_expert for k in d)


# ----------------------------------------------------------------- ZO: zo.routed_experts
def _fused(name: str) -> bool:
    return ".mlp.experts." in name


def _reference_routed_zo(cfg) -> tuple[dict[str, torch.Tensor], list[float], list[dict[str, set[int]]]]:
    """MeZO's loop where a fused expert tensor's experts get z only if some forward of the step routes to
    them: every expert is perturbed (z of expert e: its own key) so the forwards see what the engine's
    lazily perturbed ones see (an unrouted expert changes no output), then the unrouted ones get their
    bits back and only the routed ones are updated. Returns (weights, losses, routed sets per step)."""
    from mezo_testlib import PlainSetup

    from ferrytune.engine._zo import expert_key
    from ferrytune.kernels import PerturbKey, add_perturbation_

    ref = PlainSetup(cfg)
    t, zc = cfg.train, cfg.zo
    experts = {f"layer.{i}": layer.mlp.experts for i, layer in enumerate(ref.model.model.layers)}
    E = 8

    def layer_of(name):
        return "layer." + name.split(".layers.")[1].split(".")[0]

    def add(i, n, p, step, alpha, only=None):
        if not _fused(n):
            add_perturbation_(p, PerturbKey(t.seed, step, 0, i), alpha=alpha, dist=zc.distribution)
            return
        per = p.numel() // E
        for e in range(E) if only is None else sorted(only):
            add_perturbation_(p.view(-1)[e * per:(e + 1) * per], expert_key(t.seed, step, 0, i, e), alpha=alpha,
                              dist=zc.distribution)

    losses, history = [], []
    with torch.no_grad():
        for step in range(t.steps):
            batch = ref.batch(step)
            before = {n: p.clone() for n, p in ref.params if _fused(n)}
            seen, handles = _record_routing(experts)
            for i, (n, p) in enumerate(ref.params):
                add(i, n, p, step, zc.eps)
            lp = ref.loss(batch)
            for i, (n, p) in enumerate(ref.params):
                add(i, n, p, step, -2 * zc.eps)
            lm = ref.loss(batch)
            for i, (n, p) in enumerate(ref.params):
                add(i, n, p, step, zc.eps)
            for h in handles:
                h.remove()
            for n, p in ref.params:  # the unrouted experts keep their bits
                if _fused(n):
                    per = p.numel() // E
                    for e in set(range(E)) - seen[layer_of(n)]:
                        p.view(-1)[e * per:(e + 1) * per].copy_(before[n].view(-1)[e * per:(e + 1) * per])
            g = (lp - lm) / (2 * zc.eps)
            losses.append((lp + lm) / 2)
            for i, (n, p) in enumerate(ref.params):
                only = seen[layer_of(n)] if _fused(n) else None
                if t.weight_decay:
                    if not _fused(n) and p.dim() >= 2:
                        p.mul_(1.0 - t.lr * t.weight_decay)
                    elif _fused(n):  # each updated expert's matrix
                        per = p.numel() // E
                        for e in sorted(only):
                            p.view(-1)[e * per:(e + 1) * per].mul_(1.0 - t.lr * t.weight_decay)
                add(i, n, p, step, -t.lr * g, only)
            history.append({b: set(s) for b, s in seen.items()})
    return ref.weights(), losses, history


def _zo_routed_cfg(cfg_factory, path, **kw):
    sections = {"data": {"eval": None, "max_length": 16}, "zo": {"routed_experts": True, "eps": 1e-2},
                "train": {"steps": 3, "batch_size": 4, "lr": 1e-2, "weight_decay": 0.1}}
    for k, v in kw.items():
        sections[k] = {**sections.get(k, {}), **v}
    return cfg_factory(path, **sections)


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_zo_routed_experts_equals_plain_loop(moe_path, cfg_factory, arch):
    from ferrytune.launch.train import run

    path = moe_path(arch)
    cfg = _zo_routed_cfg(cfg_factory, path)
    ref_w, ref_l, routed = _reference_routed_zo(cfg)
    run(cfg, progress=False)
    got = _model_weights(f"{cfg.output_dir}/final")  # saved under the checkpoint's names: loaded back
    assert [json.loads(x)["loss"] for x in open(f"{cfg.output_dir}/metrics.jsonl") if '"loss"' in x] == ref_l
    for name, w in ref_w.items():
        assert torch.equal(got[name], w), name
    logged = [json.loads(x)["experts"] for x in open(f"{cfg.output_dir}/zo_log.jsonl")]
    assert [{b: set(ks["0"]) for b, ks in e.items()} for e in logged] == routed
    base = _model_weights(path)
    fused = [n for n in got if _fused(n)]
    assert fused
    for name in fused:
        per = got[name].numel() // 8
        for e in range(8):  # experts 4-7 are never routed to: their bits are the checkpoint's
            moved = not torch.equal(got[name].view(-1)[e * per:(e + 1) * per], base[name].view(-1)[e * per:(e + 1) * per])
            assert moved == (e in ROUTED), (name, e)


def _model_weights(folder) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in load_resident_model(str(folder)).named_parameters()}


def test_zo_routed_experts_tiers_block_sparsity_resume_and_replay(moe_path, cfg_factory):
    from mezo_testlib import resumed_and_replayed

    from ferrytune.launch.train import run

    path = moe_path("mixtral")
    out = {}
    for tier in ("resident", "host", "nvme"):
        cfg = _zo_routed_cfg(cfg_factory, path, zo={"block_fraction": 0.6}, offload={"tier": tier, "prefetch_depth": 1},
                             model={"store_dtype": "float32"})
        run(cfg, progress=False)
        out[tier] = _model_weights(f"{cfg.output_dir}/final")
    assert all(torch.equal(out[t][k], out["resident"][k]) for t in ("host", "nvme") for k in out["resident"])
    # a bf16 store: updates are rounded stochastically per tensor; the unrouted experts still keep their bits
    bf16 = _zo_routed_cfg(cfg_factory, path, offload={"tier": "nvme", "prefetch_depth": 1},
                          model={"store_dtype": "bfloat16"})
    run(bf16, progress=False)
    got, base = _model_weights(f"{bf16.output_dir}/final"), _model_weights(path)
    for name in (n for n in got if _fused(n)):
        per = got[name].numel() // 8
        for e in range(8):
            start = base[name].view(-1)[e * per:(e + 1) * per].bfloat16().float()  # the store's rounding of it
            same = torch.equal(got[name].view(-1)[e * per:(e + 1) * per], start)
            assert same == (e not in ROUTED), (name, e)
    cfg = _zo_routed_cfg(cfg_factory, path, train={"steps": 5, "checkpoint_every_steps": 2})
    resumed, replayed = resumed_and_replayed(cfg)
    straight = _zo_routed_cfg(cfg_factory, path, train={"steps": 5})
    run(straight, progress=False)
    want = load_file(f"{straight.output_dir}/final/model.safetensors")
    assert all(torch.equal(resumed[k], want[k]) and torch.equal(replayed[k], want[k]) for k in want)


def test_zo_routed_experts_refuses_what_it_does_not_run(moe_path, tiny_models, cfg_factory):
    from ferrytune.errors import ConfigError
    from ferrytune.launch.train import run

    path = moe_path("mixtral")
    with pytest.raises(ConfigError, match=r"zo.routed_experts: runs with zo.estimator: mezo only"):
        _zo_routed_cfg(cfg_factory, path, zo={"estimator": "fzoo", "distribution": "rademacher",
                                              "num_perturbations": 2})
    with pytest.raises(ConfigError, match=r"zo.routed_experts: runs in one process"):
        _zo_routed_cfg(cfg_factory, path, parallel={"data": 2})
    dense = _zo_routed_cfg(cfg_factory, tiny_models("llama", layers=2, hidden=32))
    with pytest.raises(ConfigError, match=r"zo.routed_experts: .* has no MoE layers"):
        run(dense, progress=False)


@pytest.mark.parametrize("store", ["float32", "bfloat16"])
def test_zo_routed_experts_write_back_only_what_changed(moe_path, cfg_factory, store):
    """On NVMe a MoE block is written back as its dense part and the experts that changed in the step (the
    pending update's S_{t-1} and the chain's S_t), each widened to whole pages, counted by the streamer;
    the record's checksum still covers the whole block (every later whole read verifies it), and the run
    equals resident."""
    from ferrytune.launch.train import run

    path = moe_path("mixtral")
    es = 4 if store == "float32" else 2
    cfgs = {tier: _zo_routed_cfg(cfg_factory, path, train={"steps": 4}, model={"store_dtype": store},
                                 offload={"tier": tier, "prefetch_depth": 1, "verify_checksums": True})
            for tier in ("resident", "nvme")}
    for cfg in cfgs.values():
        run(cfg, progress=False)
    nv = cfgs["nvme"]
    want, got = _model_weights(f"{cfgs['resident'].output_dir}/final"), _model_weights(f"{nv.output_dir}/final")
    assert all(torch.equal(got[k], want[k]) for k in want)
    layout = load_layout(path)
    outer = layout.blocks[OUTER].numel * es  # the outer block (no experts) is written whole
    logged = [{b: set().union(*map(set, ks.values())) for b, ks in json.loads(x)["experts"].items()}
              for x in open(f"{nv.output_dir}/zo_log.jsonl")]
    lines = [json.loads(x) for x in open(f"{nv.output_dir}/metrics.jsonl") if '"loss"' in x]

    def pages(lo, hi):
        return -(-hi * es // PAGE_BYTES) * PAGE_BYTES - lo * es // PAGE_BYTES * PAGE_BYTES

    whole = outer + sum(layout.blocks[b].numel * es for b in layout.layer_blocks)
    for step, line in enumerate(lines):
        expected = outer
        for b in layout.layer_blocks:
            ex = layout.blocks[b].experts
            changed = logged[step][b] | (logged[step - 1][b] if step else set())
            expected += pages(0, ex.dense_numel) + sum(pages(lo, hi) for e in changed for lo, hi in ex.ranges(e))
        assert line["bytes_written_nvme"] == expected, step
        assert expected < whole

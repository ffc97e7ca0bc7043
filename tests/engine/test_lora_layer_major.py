"""Layer-major gradient accumulation (``train.accumulation: layer_major``) for streamed LoRA.

* the base is read once per step (forward + backward re-fetch) whatever the number of
  micro-batches M, on the NVMe tier, counted by the NVMe block store's IO counters and the
  streamer's; micro-batch-major order reads it M times;
* the adapters after a few steps equal micro-batch-major ones and resident LoRA bit for bit
  (host and NVMe tiers, fp32 store, dropout on, kept and recomputed layers): each (layer,
  micro-batch) runs the same arithmetic with the same dropout masks, and every adapter gradient
  accumulates over micro-batches in the same order; also with a bf16 store and on qwen2, OPT and
  GPT-2 (base dropout on);
* an activation budget that cannot hold the hidden states between layers of all micro-batches
  falls back to micro-batch-major order (the plan says why), one that holds them but not every
  layer's kept activations recomputes inside those layers; both still equal resident.
"""

from __future__ import annotations

import logging

import pytest
import torch

from ferrytune.engine import LoraTrainer

LORA = {"rank": 4, "alpha": 8, "dropout": 0.1, "target_modules": "all-linear"}
STEPS = 2
LAYERS = 4


def _cfg(cfg_factory, path, offload, *, micro=4, acc="layer_major", **kw):
    sections = {"train": {"steps": STEPS, "lr": 1e-2, "batch_size": 8, "micro_batch_size": 8 // micro,
                          "accumulation": acc},
                "lora": LORA, "data": {"eval": None}, "offload": offload}
    for k, v in kw.items():
        sections[k] = {**sections.get(k, {}), **v}
    return cfg_factory(path, method="lora", **sections)


def _train(cfg):
    """(losses, adapter tensors, per-step streamer bytes read from NVMe, per-step store IO bytes, plan, forwards)."""
    tr = LoraTrainer(cfg)
    tr.setup()
    try:
        losses, stream_reads, store_reads = [], [], []
        store = tr.rt.streamer.nvme_store
        f0 = sum(tr.engine.layer_forwards.values())
        for step in range(STEPS):
            before = tr.rt.streamer.stats.snapshot()["bytes_read"]["nvme"]
            io0 = store.stats.bytes_read if store is not None else 0
            losses.append(tr.train_step(step).loss)
            stream_reads.append(tr.rt.streamer.stats.snapshot()["bytes_read"]["nvme"] - before)
            store_reads.append((store.stats.bytes_read if store is not None else 0) - io0)
        state = {k: v.detach().clone() for k, v in tr.adapter.state_dict().items()}
        forwards = sum(tr.engine.layer_forwards.values()) - f0
        return losses, state, stream_reads, store_reads, tr.rt.plan, forwards
    finally:
        tr.close()


def _assert_same(got, ref):
    assert got[0] == ref[0]
    assert got[1].keys() == ref[1].keys()
    bad = [k for k in ref[1] if not torch.equal(got[1][k], ref[1][k])]
    assert not bad, bad[:3]


def test_base_is_read_once_per_step_whatever_the_micro_batches(tiny_models, cfg_factory):
    path = tiny_models("llama", layers=5, hidden=32)
    # prefetch_depth 1: a ring of 3 slots, fewer than the layers, so a pass cannot keep the base in memory
    off = {"tier": "nvme", "prefetch_depth": 1}
    reads = {}
    for acc in ("layer_major", "micro_major"):
        for m in (1, 2, 4):
            got = _train(_cfg(cfg_factory, path, dict(off), micro=m, acc=acc))
            assert got[4].accumulation == ("layer_major" if acc == "layer_major" and m > 1 else "micro_major")
            reads[acc, m] = got[2], got[3]  # per step: the streamer's NVMe bytes, the block store's IO bytes
    one = reads["layer_major", 1]  # one micro-batch: forward + backward re-fetch (the orders are the same)
    assert reads["micro_major", 1] == one and all(x > 0 for x in one[0] + one[1])
    for m in (2, 4):
        assert reads["layer_major", m] == one, f"layer-major reads the base once per step, M={m}"
        # micro-major: the pass once per micro-batch. Step 1 on (the first also reads the outer
        # block, then held between steps in its slot) reads exactly M times one pass.
        for counter in (0, 1):
            assert reads["micro_major", m][counter][1:] == [m * x for x in one[counter][1:]], f"M={m}"


@pytest.mark.parametrize("tier", ["host", "nvme"])
def test_layer_major_equals_micro_major_and_resident(tiny_models, cfg_factory, tier):
    path = tiny_models("llama", layers=LAYERS, hidden=32)
    store = {"store_dtype": "float32"}
    ref = _train(_cfg(cfg_factory, path, {"tier": "resident"}, acc="micro_major", model=store))
    micro = _train(_cfg(cfg_factory, path, {"tier": tier, "prefetch_depth": 1}, acc="micro_major", model=store))
    lm = _train(_cfg(cfg_factory, path, {"tier": tier, "prefetch_depth": 1}, model=store))
    assert lm[4].accumulation == "layer_major" and micro[4].accumulation == "micro_major"
    assert lm[5] == micro[5] == 4 * LAYERS * STEPS, "one forward per layer per micro-batch"
    _assert_same(micro, ref)
    _assert_same(lm, micro)
    assert ref[1]["lora_B.model-layers-0-self_attn-q_proj"].abs().sum() > 0  # it trained


def test_auto_picks_layer_major_with_several_micro_batches(tiny_models, cfg_factory):
    path = tiny_models("llama", layers=LAYERS, hidden=32)
    off = {"tier": "nvme", "prefetch_depth": 1}
    assert _train(_cfg(cfg_factory, path, dict(off), acc="auto"))[4].accumulation == "layer_major"
    assert _train(_cfg(cfg_factory, path, dict(off), micro=1, acc="auto"))[4].accumulation == "micro_major"


def test_small_activation_budget_recomputes_or_falls_back(tiny_models, cfg_factory, caplog):
    path = tiny_models("llama", layers=LAYERS, hidden=32)
    ref = _train(_cfg(cfg_factory, path, {"tier": "resident"}, acc="micro_major"))
    probe = _train(_cfg(cfg_factory, path, {"tier": "nvme"}))[4]
    act, gib, m = probe.activation_bytes_per_layer, 2**30, 4
    from ferrytune.engine._activations import boundary_activation_bytes  # the planner's own estimate

    tr = LoraTrainer(_cfg(cfg_factory, path, {"tier": "nvme"}))
    tr.setup()
    hb = boundary_activation_bytes(tr.rt.layout, rows=2, tokens=tr.cfg.data.max_length, dtype=torch.float32)
    tr.close()
    boundary = m * LAYERS * hb
    # holds the hidden states and the kept activations of 2 layers for all 4 micro-batches
    budget = (boundary + 2.5 * m * act) / gib
    got = _train(_cfg(cfg_factory, path, {"tier": "nvme", "prefetch_depth": 1, "activation_budget_gib": budget}))
    assert got[4].accumulation == "layer_major"
    assert got[4].keep == ["layer.0", "layer.1"]
    assert got[5] == m * (LAYERS + 2) * STEPS, "the 2 recomputed layers run twice per micro-batch"
    _assert_same(got, ref)
    # cannot hold the hidden states between layers: micro-batch-major, logged with the reason
    caplog.set_level(logging.WARNING, logger="ferrytune.engine._lora_trainer")
    small = 0.5 * boundary / gib
    got = _train(_cfg(cfg_factory, path, {"tier": "nvme", "prefetch_depth": 1, "activation_budget_gib": small}))
    assert got[4].accumulation == "micro_major"
    assert "hidden states between layers" in got[4].accumulation_why
    assert "accumulation: micro_major (train.accumulation=layer_major" in got[4].describe()
    assert any("running micro_major" in r.getMessage() for r in caplog.records)
    _assert_same(got, ref)


@pytest.mark.parametrize("arch", ["qwen2", "opt", "gpt2"])
def test_layer_major_equals_micro_major_on_other_architectures(tiny_models, cfg_factory, arch):
    """Each architecture's own forward builds the layers' arguments (GPT-2 also drops out its
    embeddings and residuals: base dropout draws from the same RNG as the adapters')."""
    path = tiny_models(arch, layers=2, hidden=32)
    lora = {**LORA, "target_modules": ["c_attn"] if arch == "gpt2" else "all-linear"}
    off = {"tier": "nvme", "prefetch_depth": 1}
    micro = _train(_cfg(cfg_factory, path, dict(off), micro=2, acc="micro_major", lora=lora))
    lm = _train(_cfg(cfg_factory, path, dict(off), micro=2, lora=lora))
    assert lm[4].accumulation == "layer_major"
    _assert_same(lm, micro)
    assert lm[2][1:] == [x // 2 for x in micro[2][1:]], "half the reads of micro-major with 2 micro-batches"


def test_layer_major_equals_micro_major_with_a_bf16_store(tiny_models, cfg_factory):
    path = tiny_models("llama", layers=3, hidden=32)
    off, store = {"tier": "nvme", "prefetch_depth": 1}, {"store_dtype": "bfloat16"}
    micro = _train(_cfg(cfg_factory, path, dict(off), micro=2, acc="micro_major", model=store))
    lm = _train(_cfg(cfg_factory, path, dict(off), micro=2, model=store))
    assert lm[4].accumulation == "layer_major"
    _assert_same(lm, micro)


def test_layer_major_runs_packed_rows_like_micro_major(tiny_models, cfg_factory):
    """``data.packing``: a micro-batch is one row of sequences end to end (position ids restart per
    sequence, no mask); the captured layer kwargs carry the block-diagonal mask to every layer call."""
    path = tiny_models("llama", layers=3, hidden=32)
    off = {"tier": "nvme", "prefetch_depth": 1}
    micro = _train(_cfg(cfg_factory, path, dict(off), micro=2, acc="micro_major", data={"packing": True}))
    lm = _train(_cfg(cfg_factory, path, dict(off), micro=2, data={"packing": True}))
    assert lm[4].accumulation == "layer_major"
    _assert_same(lm, micro)
    assert lm[2][1:] == [x // 2 for x in micro[2][1:]], "half the reads of micro-major with 2 micro-batches"
    padded = _train(_cfg(cfg_factory, path, dict(off), micro=2, acc="micro_major"))
    assert padded[0] != micro[0], "packing changed nothing: the packed path did not run"

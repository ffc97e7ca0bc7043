"""Streamed LoRA without recompute: activations kept, weights saved by reference and fetched again.

The reference is resident LoRA with an fp32 store, whose layers run under plain autograd (no
function boundary, no fetch). A bf16 store is compared with a resident run on a copy of the
model whose weights are the bf16-rounded values in fp32: the working copies hold the same
numbers, so the same GEMMs run on both sides and the runs must agree bit for bit.

Five layers with ``prefetch_depth: 1`` (a ring of 3 slots): by the time backward reaches a
layer, its slot has served other layers. The streamer's slot choice (LRU over a ring of
``prefetch_depth + 2``) happens to bring each block back into the slot it had in forward, so a
weight kept as a plain tensor would not change these results today; that weights leave as
references is checked by counting them (``FOEngine.weight_refs``: every linear and norm weight
of every layer, every micro-batch), and ``unpack`` refuses a block that is not fetched.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ferrytune.engine import LoraTrainer, layer_activation_bytes
from ferrytune.errors import ConfigError

LORA = {"rank": 4, "alpha": 8, "dropout": 0.1, "target_modules": "all-linear"}
STEPS = 2


def _cfg(cfg_factory, path, offload, **kw):
    sections = {"train": {"steps": STEPS, "lr": 1e-2, "batch_size": 4, "micro_batch_size": 2}, "lora": LORA,
                "data": {"eval": None}, "offload": offload}
    for k, v in kw.items():
        sections[k] = {**sections.get(k, {}), **v}
    return cfg_factory(path, method="lora", **sections)


def _train(cfg):
    """(losses, adapter tensors, forwards per layer per step, trainer counters, plan) of STEPS steps."""
    tr = LoraTrainer(cfg)
    tr.setup()
    try:
        layers = tr.rt.layout.model.model.layers
        counts = [0] * len(layers)
        handles = [layer.mlp.register_forward_hook(lambda *_a, i=i: counts.__setitem__(i, counts[i] + 1))
                   for i, layer in enumerate(layers)]  # the HF submodule runs on every forward, recompute too
        losses, per_step = [], []
        for step in range(STEPS):
            before = list(counts)
            losses.append(tr.train_step(step).loss)
            per_step.append([c - b for c, b in zip(counts, before)])
        for h in handles:
            h.remove()
        state = {k: v.detach().clone() for k, v in tr.adapter.state_dict().items()}
        return losses, state, per_step, (tr.engine.weight_refs, tr.engine.kept_bytes), tr.rt.plan
    finally:
        tr.close()


def _bf16_rounded_copy(path: str, dest: Path) -> str:
    """The model folder with every weight rounded to bf16 and stored as fp32."""
    if not dest.exists():
        shutil.copytree(path, dest)
        f = dest / "model.safetensors"
        save_file({k: v.to(torch.bfloat16).to(torch.float32).contiguous() for k, v in load_file(f).items()}, f)
    return str(dest)


def _assert_same(got, ref):
    assert got[0] == ref[0]
    assert got[1].keys() == ref[1].keys()
    assert all(torch.equal(got[1][k], ref[1][k]) for k in ref[1])


@pytest.mark.parametrize("store", ["float32", "bfloat16"])
def test_no_recompute_streamed_lora_equals_resident(tiny_models, cfg_factory, tmp_path, store):
    path = tiny_models("llama", layers=5, hidden=32)
    ref_path = path if store == "float32" else _bf16_rounded_copy(path, tmp_path / "rounded")
    ref = _train(_cfg(cfg_factory, ref_path, {"tier": "resident"}, model={"store_dtype": "float32"}))
    assert ref[2] == [[2] * 5] * STEPS  # 2 micro-batches, each layer once
    for tier in ("host", "nvme"):
        got = _train(_cfg(cfg_factory, path, {"tier": tier, "prefetch_depth": 1}, model={"store_dtype": store}))
        assert got[4].keep == [f"layer.{i}" for i in range(5)]
        _assert_same(got, ref)
        assert got[2] == [[2] * 5] * STEPS, "one forward per layer per micro-batch: no recompute"
        weight_refs, kept = got[3]
        if tier == "host" and store == "float32":  # on a CPU device these masters serve in place: nothing streams
            assert weight_refs == 0
            continue
        # every linear (7) and norm (2) weight of each layer, per micro-batch, left as a reference
        assert weight_refs == 9 * 5 * 2 * STEPS
        assert kept > 0


def test_planner_recomputes_what_the_activation_budget_cannot_hold(tiny_models, cfg_factory, tmp_path):
    path = tiny_models("llama", layers=5, hidden=32)
    ref = _train(_cfg(cfg_factory, path, {"tier": "resident"}, model={"store_dtype": "float32"}))
    probe = _cfg(cfg_factory, path, {"tier": "nvme"})
    tr = LoraTrainer(probe)
    tr.setup()
    per_layer = tr.rt.plan.activation_bytes_per_layer
    tr.close()
    assert per_layer > 0
    gib = 2**30
    for budget, kept in ((2.5 * per_layer / gib, 2), (0.0, 0)):
        got = _train(_cfg(cfg_factory, path, {"tier": "nvme", "prefetch_depth": 1, "activation_budget_gib": budget}))
        assert got[4].keep == [f"layer.{i}" for i in range(kept)]
        _assert_same(got, ref)
        assert got[2] == [[2] * kept + [4] * (5 - kept)] * STEPS, "recomputed layers run twice per micro-batch"


def test_default_activation_budget_is_what_the_device_budget_leaves(tiny_models, cfg_factory):
    path = tiny_models("llama", layers=5, hidden=32)
    tr = LoraTrainer(_cfg(cfg_factory, path, {"tier": "host"}))
    tr.setup()
    plan = tr.rt.plan
    tr.close()
    gib = 2**30
    device = plan.device_bytes + int(3.5 * plan.activation_bytes_per_layer)  # working set + 3.5 layers
    tr = LoraTrainer(_cfg(cfg_factory, path, {"tier": "host", "device_budget_gib": device / gib}))
    tr.setup()
    try:
        p = tr.rt.plan
        assert p.activation_budget_bytes == int(device / gib * gib) - p.device_bytes
        assert p.keep == ["layer.0", "layer.1", "layer.2"]
        assert "keep activations of 3 layers, recompute 2" in p.describe()
    finally:
        tr.close()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_activation_estimate_bounds_what_the_engine_keeps(tiny_models, cfg_factory, arch, dropout):
    path = tiny_models(arch, layers=3, hidden=32)
    cfg = _cfg(cfg_factory, path, {"tier": "nvme"}, lora={"dropout": dropout}, train={"micro_batch_size": 4})
    tr = LoraTrainer(cfg)
    tr.setup()
    try:
        from ferrytune.data import pad_positions

        (mb,) = pad_positions(tr.batcher.batches_for_step(0, pad_id=tr.pad_id))
        tr.train_step(0)
        kept = tr.engine.kept_bytes / 3
        est = layer_activation_bytes(tr.rt.layout, tr.spec, rows=mb.input_ids.shape[0], tokens=mb.input_ids.shape[1],
                                     dtype=torch.float32)
        assert kept <= est <= 2 * kept, (kept, est)
    finally:
        tr.close()


def test_activation_budget_must_not_be_negative(tiny_models, cfg_factory):
    with pytest.raises(ConfigError, match="offload.activation_budget_gib"):
        _cfg(cfg_factory, tiny_models("llama", layers=2, hidden=32), {"tier": "host", "activation_budget_gib": -1})


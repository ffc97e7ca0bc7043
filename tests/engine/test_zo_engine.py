"""The ZO engine against a plain MeZO loop, and streamed tiers against resident."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from ferrytune.data import Batcher, load_examples, load_tokenizer, loss_per_sample, pad_id_for
from ferrytune.data import pad_positions
from ferrytune.kernels import PerturbKey, add_perturbation_
from ferrytune.launch.train import run
from ferrytune.models import load_resident_model


def _final_weights(cfg) -> dict[str, torch.Tensor]:
    return load_file(f"{cfg.output_dir}/final/model.safetensors")


def _losses(cfg) -> list[float]:
    lines = open(f"{cfg.output_dir}/metrics.jsonl").read().splitlines()
    return [json.loads(ln)["loss"] for ln in lines if "loss" in json.loads(ln)]


def _reference_mezo(cfg) -> tuple[dict[str, torch.Tensor], list[float]]:
    """MeZO's loop (Malladi et al. 2023, Algorithm 1), written out plainly on a resident HF model."""
    model = load_resident_model(cfg.model.path).eval()  # aligned like the engine's blocks: the same GEMMs
    params = list(model.named_parameters())  # deduplicated: a tied weight appears once
    tok = load_tokenizer(cfg.model.path)
    train, _ = load_examples(cfg.data, tok)
    t, z_cfg = cfg.train, cfg.zo
    batcher = Batcher(train, global_batch_size=t.batch_size, seed=t.seed, shuffle=cfg.data.shuffle)
    q, eps = z_cfg.num_perturbations, z_cfg.eps

    def perturb(p, step, k, i, alpha):  # MeZO: regenerate z from the seed and add it in place
        add_perturbation_(p, PerturbKey(t.seed, step, k, i), alpha=alpha, dist=z_cfg.distribution)

    def loss(batch) -> float:
        with torch.no_grad():
            h = model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
            idx = batch.loss_positions.unsqueeze(-1).expand(-1, -1, h.shape[-1])
            logits = model.get_output_embeddings()(torch.gather(h, 1, idx))
            return float(loss_per_sample(logits, batch).sum()) / batch.batch_size

    losses = []
    with torch.no_grad():
        for step in range(t.steps):
            (batch,) = pad_positions(batcher.batches_for_step(step, pad_id=pad_id_for(tok)))
            grads, step_loss = [], None
            for k in range(q):
                for i, (_, p) in enumerate(params):
                    perturb(p, step, k, i, eps)
                lp = loss(batch)
                for i, (_, p) in enumerate(params):
                    perturb(p, step, k, i, -2 * eps)
                lm = loss(batch)
                for i, (_, p) in enumerate(params):
                    perturb(p, step, k, i, eps)
                grads.append((lp - lm) / (2 * eps))
                if k == 0:
                    step_loss = (lp + lm) / 2
            losses.append(step_loss)
            for i, (name, p) in enumerate(params):
                if t.weight_decay and p.dim() >= 2:
                    p.mul_(1.0 - t.lr * t.weight_decay)
                for k, g in enumerate(grads):
                    perturb(p, step, k, i, -t.lr * g / q)
    return {n: p.detach().clone() for n, p in params}, losses


@pytest.mark.parametrize("arch,opts", [("llama", {}), ("gpt2", {}), ("opt", {}), ("qwen2", {"tie": False})])
def test_zo_step_equals_plain_mezo_loop(tiny_models, cfg_factory, arch, opts):
    path = tiny_models(arch, layers=2, hidden=32, **opts)
    cfg = cfg_factory(path, data={"eval": None})
    ref_weights, ref_losses = _reference_mezo(cfg)
    run(cfg, progress=False)
    got = _final_weights(cfg)
    assert _losses(cfg) == ref_losses
    for name, w in ref_weights.items():
        assert torch.equal(got[name], w), name  # bit-identical, tied weights included


def test_zo_q2_weight_decay_equals_plain_loop(tiny_models, cfg_factory):
    path = tiny_models("llama", layers=2, hidden=32)
    cfg = cfg_factory(path, data={"eval": None}, zo={"num_perturbations": 2, "distribution": "rademacher"},
                      train={"weight_decay": 0.1, "lr": 1e-2})
    ref_weights, ref_losses = _reference_mezo(cfg)
    run(cfg, progress=False)
    got = _final_weights(cfg)
    assert _losses(cfg) == ref_losses
    for name, w in ref_weights.items():
        assert torch.equal(got[name], w), name


@pytest.mark.parametrize("store", ["float32", "bfloat16"])
def test_streamed_tiers_equal_resident(tiny_models, cfg_factory, store):
    path = tiny_models("llama", layers=3, hidden=32)
    results = {}
    for tier in ("resident", "host", "nvme"):
        cfg = cfg_factory(path, model={"store_dtype": store}, offload={"tier": tier, "prefetch_depth": 1},
                          zo={"momentum": 0.5}, train={"steps": 4, "lr": 1e-2})
        run(cfg, progress=False)
        results[tier] = (_final_weights(cfg), _losses(cfg))
    ref_w, ref_l = results["resident"]
    for tier in ("host", "nvme"):
        w, losses = results[tier]
        assert losses == ref_l, tier
        for name in ref_w:
            assert torch.equal(w[name], ref_w[name]), (tier, name)
    # the weights moved, and a bf16 store kept bf16 masters
    base = load_file(f"{path}/model.safetensors")
    name = next(iter(ref_w))
    assert ref_w[name].dtype == (torch.bfloat16 if store == "bfloat16" else torch.float32)
    assert not torch.equal(ref_w[name].float(), base[name].float())


def test_streaming_moves_the_bytes_it_should(tiny_models, cfg_factory):
    """Each step reads every block once and writes it once; a device budget keeps some blocks resident."""
    path = tiny_models("llama", layers=4, hidden=32)
    cfg = cfg_factory(path, offload={"tier": "nvme", "prefetch_depth": 2}, train={"steps": 2}, data={"eval": None})
    run(cfg, progress=False)
    rec = [json.loads(ln) for ln in open(f"{cfg.output_dir}/metrics.jsonl")]
    total = sum(t.numel() * 4 for t in load_file(f"{path}/model.safetensors").values())  # fp32 store
    # Step 1 has nothing pending, step 2 applies step 1's update: both read and write every block.
    for r in rec:
        assert r["bytes_read_nvme"] == r["bytes_written_nvme"] > 0
        assert total <= r["bytes_read_nvme"] <= total * 1.05  # records pad each tensor to 64 elements


@pytest.mark.parametrize("zo", [{}, {"momentum": 0.9, "num_perturbations": 2}])
def test_replay_of_the_log_reproduces_the_run(tiny_models, cfg_factory, zo):
    """(seed, projected gradient) per step + the initial weights = the trained weights, bit for bit."""
    from ferrytune.engine._zo_trainer import ZOTrainer

    path = tiny_models("llama", layers=2, hidden=32)
    cfg = cfg_factory(path, zo=zo, train={"steps": 4, "lr": 1e-2}, data={"eval": None})
    run(cfg, progress=False)
    tr = ZOTrainer(cfg.model_copy(update={"output_dir": cfg.output_dir + "-replay"}))
    tr.setup()
    try:
        dest = tr.replay(f"{cfg.output_dir}/zo_log.jsonl")
    finally:
        tr.close()
    a, b = _final_weights(cfg), load_file(f"{dest}/model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("zo_opts", [{}, {"mask_fraction": 0.3}])
def test_z_cache_is_a_pure_speed_knob(tiny_models, cfg_factory, monkeypatch, zo_opts):
    """εz generated once and added with multipliers 1, -2, 1 = the fused kernel three times, bit for bit."""
    import ferrytune.engine._zo as zo

    path = tiny_models("llama", layers=2, hidden=32)
    results = []
    for numel in (64 * 2**20, 0):  # cache every unit / no unit
        monkeypatch.setattr(zo.ZOEngine.__init__, "__kwdefaults__", {"state_streamer": None, "z_cache_numel": numel})
        cfg = cfg_factory(path, data={"eval": None}, zo={"distribution": "gaussian", **zo_opts})
        run(cfg, progress=False)
        results.append(_final_weights(cfg))
    a, b = results
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_store_dtype_auto_keeps_a_bf16_checkpoint_in_bf16(tiny_models):
    """`model.store_dtype: auto` means the checkpoint's dtype (building the model must not rewrite it)."""
    from ferrytune.models._layout import load_layout

    assert load_layout(tiny_models("llama", layers=2, hidden=32, dtype="bfloat16")).checkpoint_dtype == torch.bfloat16
    assert load_layout(tiny_models("llama", layers=2, hidden=32)).checkpoint_dtype == torch.float32


@pytest.mark.parametrize("store", ["float32", "bfloat16"])
def test_host_masters_serve_in_place_on_a_cpu_device(tiny_models, cfg_factory, store):
    """On a CPU device, host-arena masters in the compute dtype are the working copies: nothing is copied
    (and no slot ring is allocated); a bf16 store still goes through the slots, cast on the way."""
    path = tiny_models("llama", layers=3, hidden=32)
    cfg = cfg_factory(path, model={"store_dtype": store}, offload={"tier": "host"}, data={"eval": None})
    run(cfg, progress=False)
    recs = [json.loads(ln) for ln in open(f"{cfg.output_dir}/metrics.jsonl")]
    moved = [r["bytes_read_host"] + r["bytes_written_host"] for r in recs]
    assert all(m == 0 for m in moved) if store == "float32" else all(m > 0 for m in moved)


@pytest.mark.parametrize("q", [1, 2])
def test_a_tied_weight_is_copied_2q_minus_1_times_per_step(tiny_models, cfg_factory, q):
    """Embedding = lm_head: the first unit runs the chain in place; later units bind copies of the
    values they need, the last θ-εz stays in place. (Bit-identity to MeZO: the tests above, tied.)"""
    from ferrytune.engine import ZOTrainer

    path = tiny_models("llama", layers=2, hidden=32)
    cfg = cfg_factory(path, data={"eval": None}, zo={"num_perturbations": q})
    tr = ZOTrainer(cfg)
    tr.setup()
    try:
        (tied,) = [p for p in tr.rt.layout.blocks["outer"].params if p.param_id in tr.engine._shared]
        for step in range(2):
            before = tr.engine.shared_copy_numel
            tr.train_step(step)
            assert tr.engine.shared_copy_numel - before == (2 * q - 1) * tied.numel
    finally:
        tr.close()

"""LoRA over the streamed base: equals resident, matches PEFT, saves a PEFT adapter, resumes exactly."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from ferrytune.data import pad_id_for
from ferrytune.engine._lora_trainer import LoraTrainer
from ferrytune.data import pad_positions
from ferrytune.launch.train import run
from ferrytune.lora import peft_key

LORA = {"rank": 4, "alpha": 8, "dropout": 0.1, "target_modules": "all-linear"}


def _lora_cfg(cfg_factory, path, **kw):
    sections = {"train": {"steps": 3, "lr": 1e-2, "micro_batch_size": 2}, "lora": LORA, "data": {"eval": None}}
    for k, v in kw.items():
        sections[k] = {**sections.get(k, {}), **v}
    return cfg_factory(path, method="lora", **sections)


def test_streamed_lora_equals_resident(tiny_models, cfg_factory):
    path = tiny_models("llama", layers=3, hidden=32)
    out = {}
    for tier in ("resident", "host", "nvme"):
        cfg = _lora_cfg(cfg_factory, path, offload={"tier": tier, "prefetch_depth": 1},
                        model={"store_dtype": "bfloat16"})
        res = run(cfg, progress=False)
        out[tier] = (res.losses, load_file(f"{cfg.output_dir}/final/adapter_model.safetensors"),
                     [json.loads(x) for x in open(f"{cfg.output_dir}/metrics.jsonl")])
    ref_losses, ref_w, _ = out["resident"]
    for tier in ("host", "nvme"):
        losses, w, recs = out[tier]
        assert losses == ref_losses
        assert all(torch.equal(w[k], ref_w[k]) for k in ref_w)
    # nvme: the base is read, never written; the forward/backward turn reuses blocks still in memory
    recs = out["nvme"][2]
    assert all(r["bytes_written_nvme"] == 0 for r in recs)
    assert all(r["cache_hits"] >= 1 for r in recs)


def _peft_model(base_path, trainer):
    """PEFT's LoraModel on the same base, with our adapter's weights copied in."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    spec = trainer.spec
    targets = sorted({p.rsplit(".", 1)[-1] for p in trainer.adapter.paths})
    cfg = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=0.0, target_modules=targets,
                     fan_in_fan_out=base.config.model_type == "gpt2", use_rslora=spec.use_rslora)
    model = get_peft_model(base, cfg)
    state = model.state_dict()
    with torch.no_grad():
        for path in trainer.adapter.paths:
            a, b = trainer.adapter.a(path), trainer.adapter.b(path)
            b.copy_(torch.randn_like(b) * 0.1)  # non-zero B so that A gets a gradient too
            state[peft_key(path, "lora_A").replace(".weight", ".default.weight")].copy_(a)
            state[peft_key(path, "lora_B").replace(".weight", ".default.weight")].copy_(b)
    return model


@pytest.mark.parametrize("arch", ["llama", "qwen2", "opt", "gpt2"])
def test_loss_and_grads_match_peft(tiny_models, cfg_factory, arch):
    path = tiny_models(arch, layers=2, hidden=32)
    lora = {**LORA, "dropout": 0.0, "target_modules": ["c_attn"] if arch == "gpt2" else "all-linear"}
    cfg = _lora_cfg(cfg_factory, path, offload={"tier": "nvme"}, lora=lora)
    tr = LoraTrainer(cfg)
    tr.setup()
    try:
        tr.rt.layout.model.eval()  # parity without base dropout (GPT-2 has resid_pdrop)
        peft_model = _peft_model(path, tr).eval()
        (batch,) = pad_positions(tr.batcher.batches_for_step(0, pad_id=pad_id_for(tr.tokenizer))[:1])
        from ferrytune.data import gather_positions, loss_per_sample

        tr.engine.begin_step(1)
        logits = tr.engine.forward(batch.input_ids, batch.attention_mask, batch.loss_positions)
        loss = loss_per_sample(logits, batch).mean()
        loss.backward()
        tr.engine.end_step()

        out = peft_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        ref = loss_per_sample(gather_positions(out.logits, batch.loss_positions), batch).mean()
        ref.backward()
        torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
        params = dict(peft_model.named_parameters())
        for path_ in tr.adapter.paths:
            for which, ours in (("lora_A", tr.adapter.a(path_)), ("lora_B", tr.adapter.b(path_))):
                theirs = params[peft_key(path_, which).replace(".weight", ".default.weight")]
                torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-4, atol=1e-6)
    finally:
        tr.close()


def test_saved_adapter_loads_in_peft_with_same_logits(tiny_models, cfg_factory):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    path = tiny_models("llama", layers=2, hidden=32)
    cfg = _lora_cfg(cfg_factory, path, lora={"dropout": 0.0})
    run(cfg, progress=False)
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
                                           f"{cfg.output_dir}/final").eval()
    ours_cfg = cfg.model_copy(update={"lora": cfg.lora.model_copy(update={"init_from": f"{cfg.output_dir}/final"}),
                                      "output_dir": cfg.output_dir + "-eval"})
    tr = LoraTrainer(ours_cfg)
    tr.setup()
    try:
        ids = torch.tensor([[5, 9, 12, 40, 7, 3]])
        mask = torch.ones_like(ids)
        pos = torch.arange(6).unsqueeze(0)
        tr.rt.layout.model.eval()
        with torch.no_grad():
            tr.engine.begin_step(1, backward=False)
            ours = tr.engine.forward(ids, mask, pos)
            tr.engine.end_step()
            theirs = peft_model(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    finally:
        tr.close()


def test_lora_resume_equals_uninterrupted(tiny_models, cfg_factory):
    path = tiny_models("llama", layers=2, hidden=32)
    full = _lora_cfg(cfg_factory, path, train={"steps": 4, "checkpoint_every_steps": 2})
    run(full, progress=False)
    part = _lora_cfg(cfg_factory, path, train={"steps": 4, "checkpoint_every_steps": 2})
    run(part.model_copy(update={"train": part.train.model_copy(update={"steps": 3})}), progress=False)
    run(part.model_copy(update={"resume": "auto"}), progress=False)
    a = load_file(f"{full.output_dir}/final/adapter_model.safetensors")
    b = load_file(f"{part.output_dir}/final/adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_zo_on_lora_equals_plain_mezo_lora_loop(tiny_models, cfg_factory):
    """zo.trainable: lora = MeZO's loop over the adapter's parameters on a resident model."""
    from ferrytune.data import Batcher, load_examples, load_tokenizer
    from ferrytune.kernels import PerturbKey, perturbation
    from ferrytune.lora import Adapter, LoraSpec, attach, find_targets
    from ferrytune.models import load_resident_model

    path = tiny_models("llama", layers=2, hidden=32)
    lora = {"rank": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    cfg = cfg_factory(path, zo={"trainable": "lora", "eps": 1e-2, "num_perturbations": 2},
                      train={"steps": 3, "lr": 1e-2}, lora=lora, data={"eval": None}, offload={"tier": "nvme"})
    res = run(cfg, progress=False)

    model = load_resident_model(path).eval()  # aligned like the engine's blocks: the same GEMMs
    spec = LoraSpec(rank=4, alpha=8, target_modules=["q_proj", "v_proj"])
    adapter = Adapter.create(find_targets(model, spec), spec, seed=cfg.train.seed)
    attach(model, [adapter])
    theta = [p for pth in adapter.paths for p in (adapter.a(pth), adapter.b(pth))]
    tok = load_tokenizer(path)
    train, _ = load_examples(cfg.data, tok)
    batcher = Batcher(train, global_batch_size=cfg.train.batch_size, seed=cfg.train.seed)
    eps, lr, q = 1e-2, 1e-2, 2
    losses = []

    def loss_of(b):
        h = model.base_model(input_ids=b.input_ids, attention_mask=b.attention_mask).last_hidden_state
        idx = b.loss_positions.unsqueeze(-1).expand(-1, -1, h.shape[-1])
        return float(loss_per_sample(model.get_output_embeddings()(torch.gather(h, 1, idx)), b).sum()) / b.batch_size

    from ferrytune.data import loss_per_sample
    with torch.no_grad():
        for step in range(3):
            (b,) = pad_positions(batcher.batches_for_step(step, pad_id=pad_id_for(tok)))
            z = lambda k, i, p: perturbation(PerturbKey(cfg.train.seed, step, k, i), p.shape)  # noqa: E731
            grads = []
            for k in range(q):
                for i, p in enumerate(theta):
                    p.add_(z(k, i, p), alpha=eps)
                lp = loss_of(b)
                for i, p in enumerate(theta):
                    p.add_(z(k, i, p), alpha=-2 * eps)
                lm = loss_of(b)
                for i, p in enumerate(theta):
                    p.add_(z(k, i, p), alpha=eps)
                grads.append((lp - lm) / (2 * eps))
                if k == 0:
                    losses.append((lp + lm) / 2)
            for i, p in enumerate(theta):
                for k, g in enumerate(grads):
                    p.add_(z(k, i, p), alpha=-lr * g / q)
    assert res.losses == losses
    got = load_file(f"{cfg.output_dir}/final/adapter_model.safetensors")
    for pth in adapter.paths:
        assert torch.equal(got[peft_key(pth, "lora_A")], adapter.a(pth))
        assert torch.equal(got[peft_key(pth, "lora_B")], adapter.b(pth))

"""22 Hugging Face architectures as a user saves them: ZO and LoRA train on the resident and NVMe
tiers with equal results, and ``final/`` loads back in transformers (ZO) or PEFT (LoRA).

The checkpoints are written by ``save_pretrained`` of the installed transformers, so their names
are transformers' checkpoint names (one tensor per expert for Mixtral and Qwen3-MoE, ``embed_out``
for GPT-NeoX); ferrytune reads and writes them through transformers' own conversion mapping.

Equalities: resident vs NVMe run the same arithmetic on 64-byte-aligned buffers: bit for bit.
The weights in ``final/`` loaded by transformers equal ferrytune's trained masters bit for bit.
Logits of transformers' / PEFT's model against ferrytune's streamed forward run other code paths
(a whole-model forward vs per-unit calls, PEFT's layers vs hooks), so they are compared within
rtol 1e-5 / atol 1e-5 (an unmapped or misplaced tensor moves them by O(1)).
"""

from __future__ import annotations

import json

import pytest
import torch
from arch_testlib import ARCHS, build_arch
from safetensors.torch import load_file

from ferrytune.engine import LoraTrainer, ZOTrainer
from ferrytune.launch.train import run
from ferrytune.models import load_resident_model

STEPS = {"steps": 2, "batch_size": 4, "seed": 3}
DATA = {"eval": None, "max_length": 32}
LORA = {"rank": 2, "alpha": 4, "dropout": 0.0, "target_modules": "all-linear"}


@pytest.fixture(scope="session")
def arch_path(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("archs")
    tokenizer_dir = tiny_models("llama", layers=1, hidden=16)
    return lambda arch: str(build_arch(root / arch, arch, tokenizer_dir))


def _ids(n_rows: int = 2, n_tokens: int = 9) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(4, 200, (n_rows, n_tokens), generator=torch.Generator().manual_seed(0))
    return ids, torch.ones_like(ids)


def _losses(cfg) -> list[float]:
    recs = [json.loads(ln) for ln in open(f"{cfg.output_dir}/metrics.jsonl")]
    return [r["loss"] for r in recs if "loss" in r]


def _train_open(trainer):
    """setup + train, leaving the trainer open (its streamer holds the trained masters)."""
    trainer.setup()
    try:
        trainer.train(progress=False)
    except BaseException:
        trainer.close()
        raise
    return trainer


@pytest.mark.parametrize("arch", ARCHS)
def test_zo_trains_on_every_tier_and_final_loads_in_transformers(arch_path, cfg_factory, arch):
    path = arch_path(arch)
    resident = cfg_factory(path, train={**STEPS, "lr": 1e-2}, data=DATA, offload={"tier": "resident"})
    run(resident, progress=False)
    nvme = cfg_factory(path, train={**STEPS, "lr": 1e-2}, data=DATA, offload={"tier": "nvme", "prefetch_depth": 1})
    tr = _train_open(ZOTrainer(nvme))
    try:
        assert _losses(nvme) == _losses(resident)
        a, b = load_file(f"{resident.output_dir}/final/model.safetensors"), \
            load_file(f"{nvme.output_dir}/final/model.safetensors")
        assert a.keys() == b.keys() == load_file(f"{path}/model.safetensors").keys()  # the file's own names
        assert all(torch.equal(a[k], b[k]) for k in a)

        hf = load_resident_model(f"{nvme.output_dir}/final").eval()
        hf_params = dict(hf.named_parameters(remove_duplicate=False))
        layout, moved = tr.rt.layout, 0
        for bid, spec in layout.blocks.items():
            flat = torch.empty(spec.numel, dtype=torch.float32)
            tr.rt.streamer.read_master(bid, flat)
            for p in spec.params:
                ours = flat[p.offset:p.offset + p.numel].view(p.shape)
                for name in [p.name, *p.aliases]:
                    assert torch.equal(hf_params[name], ours), name
        base = dict(load_resident_model(path).named_parameters())
        moved = sum(not torch.equal(base[n], t) for n, t in hf.named_parameters())
        assert moved == len(base)  # ZO moves every parameter

        ids, mask = _ids()
        out = {}
        tr.engine.run(-1, ids, mask, torch.arange(ids.shape[1]).expand(ids.shape[0], -1), [(0, 0)], ids.shape[0],
                      lambda logits: out.setdefault("logits", logits.clone()), dirty=False)
        with torch.no_grad():
            theirs = hf(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(out["logits"], theirs, rtol=1e-5, atol=1e-5)
    finally:
        tr.close()


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_trains_on_every_tier_and_final_loads_in_peft(arch_path, cfg_factory, arch):
    from peft import PeftModel

    path = arch_path(arch)
    sections = dict(method="lora", train={**STEPS, "lr": 5e-2}, data=DATA, lora=LORA)
    resident = cfg_factory(path, offload={"tier": "resident"}, **sections)
    run(resident, progress=False)
    nvme = cfg_factory(path, offload={"tier": "nvme", "prefetch_depth": 1}, **sections)
    tr = _train_open(LoraTrainer(nvme))
    try:
        assert _losses(nvme) == _losses(resident)
        a = load_file(f"{resident.output_dir}/final/adapter_model.safetensors")
        b = load_file(f"{nvme.output_dir}/final/adapter_model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert any(t.abs().sum() > 0 for k, t in b.items() if "lora_B" in k)  # the adapter moved

        peft_model = PeftModel.from_pretrained(load_resident_model(path), f"{nvme.output_dir}/final").eval()
        ids, mask = _ids()
        tr.rt.layout.model.eval()
        with torch.no_grad():
            tr.engine.begin_step(1, backward=False)
            ours = tr.engine.forward(ids, mask, torch.arange(ids.shape[1]).expand(ids.shape[0], -1))
            tr.engine.end_step()
            theirs = peft_model(input_ids=ids, attention_mask=mask).logits
            plain = load_resident_model(path).eval()(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(theirs, plain, rtol=1e-5, atol=1e-5)  # PEFT really applied the adapter
    finally:
        tr.close()

"""Resume from a checkpoint equals an uninterrupted run; a crash mid-checkpoint loses nothing."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from ferrytune.engine._checkpoint import list_checkpoints
from ferrytune.launch.train import run
from ferrytune.models import _safetensors


def _weights(out) -> dict:
    return load_file(f"{out}/final/model.safetensors")


@pytest.mark.parametrize("tier", ["resident", "nvme"])
def test_resume_equals_uninterrupted(tiny_models, cfg_factory, tier):
    path = tiny_models("llama", layers=2, hidden=32)
    opts = dict(offload={"tier": tier}, zo={"momentum": 0.9}, train={"steps": 6, "checkpoint_every_steps": 2},
                data={"eval": None})
    full = cfg_factory(path, **opts)
    run(full, progress=False)

    part = cfg_factory(path, **{**opts, "train": {"steps": 6, "checkpoint_every_steps": 2}})
    stopped = part.model_copy(update={"train": part.train.model_copy(update={"steps": 3})})
    run(stopped, progress=False)  # checkpoints at step 2; final at 3
    assert [s for s, _ in list_checkpoints(part.output_dir)] == [2]
    resumed = part.model_copy(update={"resume": "auto"})
    run(resumed, progress=False)  # resumes from step 2, not from the final of the stopped run
    a, b = _weights(full.output_dir), _weights(part.output_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    log_full = [json.loads(x) for x in open(f"{full.output_dir}/zo_log.jsonl")]
    log_part = [json.loads(x) for x in open(f"{part.output_dir}/zo_log.jsonl")]
    assert log_full == log_part  # the (seed, projected gradient) log is continuous


def test_crash_during_checkpoint_keeps_previous(tiny_models, cfg_factory, monkeypatch):
    path = tiny_models("llama", layers=2, hidden=32)
    cfg = cfg_factory(path, train={"steps": 4, "checkpoint_every_steps": 1, "keep_checkpoints": 5},
                      data={"eval": None})
    real_write = _safetensors.SafetensorsWriter.write
    calls = {"n": 0}
    per_ckpt = len(load_file(f"{path}/model.safetensors"))

    def failing_write(self, name, tensor):
        calls["n"] += 1
        if calls["n"] > 2 * per_ckpt + per_ckpt // 2:  # the third checkpoint dies half-way
            raise KeyboardInterrupt("killed during checkpoint write")
        return real_write(self, name, tensor)

    monkeypatch.setattr(_safetensors.SafetensorsWriter, "write", failing_write)
    with pytest.raises(KeyboardInterrupt):
        run(cfg, progress=False)
    monkeypatch.setattr(_safetensors.SafetensorsWriter, "write", real_write)
    ckpts = list_checkpoints(cfg.output_dir)
    assert [s for s, _ in ckpts] == [1, 2]
    # the newest complete checkpoint loads in transformers and resumes to the same result
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(ckpts[-1][1])
    run(cfg.model_copy(update={"resume": "auto"}), progress=False)
    ref = cfg_factory(path, train={"steps": 4}, data={"eval": None})
    run(ref, progress=False)
    a, b = _weights(cfg.output_dir), _weights(ref.output_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_eval_and_checkpoint_between_steps_do_not_change_training(tiny_models, cfg_factory):
    """Reading masters for a checkpoint after an eval pass must not leave stale blocks in the slots."""
    path = tiny_models("llama", layers=2, hidden=32)
    base = dict(offload={"tier": "nvme", "prefetch_depth": 1}, data={"eval_samples": 8})
    plain = cfg_factory(path, train={"steps": 4}, **base)
    busy = cfg_factory(path, train={"steps": 4, "eval_every_steps": 2, "checkpoint_every_steps": 2}, **base)
    run(plain, progress=False)
    run(busy, progress=False)
    a, b = _weights(plain.output_dir), _weights(busy.output_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the metrics of the checkpoint step survive a resume from it
    lines = [json.loads(x) for x in open(f"{busy.output_dir}/metrics.jsonl")]
    run(busy.model_copy(update={"resume": f"{busy.output_dir}/checkpoints/step-000002",
                                "train": busy.train.model_copy(update={"steps": 4})}), progress=False)
    after = [json.loads(x) for x in open(f"{busy.output_dir}/metrics.jsonl")]
    assert [r["step"] for r in after if "loss" in r][:2] == [1, 2]
    assert len([r for r in after if "loss" in r]) == len([r for r in lines if "loss" in r])

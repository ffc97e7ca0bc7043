"""save_peft / load_peft against PEFT's own loader and writer, atomic writes, bad folders."""

from __future__ import annotations

import json
import os

import pytest
import torch
from lora_testlib import build_model, randomize_b, token_batch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from ferrytune.errors import CheckpointError, ConfigError
from ferrytune.lora import Adapter, LoraSpec, attach, find_targets, load_peft, save_peft
from ferrytune.lora import _peft_io

ATOL, RTOL = 1e-5, 1e-4  # see test_lora_peft_parity.py: bitwise in practice

CASES = {
    "llama-qv": ("llama", LoraSpec(rank=4, alpha=8, dropout=0.1, target_modules=["v_proj", "q_proj"])),
    "llama-all-linear": (
        "llama",
        LoraSpec(rank=4, alpha=8, target_modules="all-linear", rank_pattern={"o_proj": 2},
                 alpha_pattern={r"layers\.0\.mlp\..*": 3.0}),
    ),
    "qwen2-rslora": ("qwen2", LoraSpec(rank=8, alpha=4, target_modules=["k_proj", "up_proj"], use_rslora=True)),
    "gpt2-c_attn": ("gpt2", LoraSpec(rank=4, alpha=8, target_modules=["c_attn"])),
}


def trained_adapter(arch: str, spec: LoraSpec):
    model = build_model(arch).eval()
    adapter = Adapter.create(find_targets(model, spec), spec, seed=3)
    randomize_b(adapter, seed=4)
    return model, adapter


def our_logits(model, adapter, ids):
    with torch.no_grad(), attach(model, [adapter]):
        return model(input_ids=ids).logits


@pytest.mark.parametrize("case", sorted(CASES))
def test_save_peft_loads_in_peft_with_same_logits(case, tmp_path):
    arch, spec = CASES[case]
    model, adapter = trained_adapter(arch, spec)
    out = tmp_path / "adapter"
    save_peft(adapter, out, base_model_name_or_path=f"tiny-{arch}", spec=spec)
    assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM" and config["bias"] == "none"
    assert config["fan_in_fan_out"] == (arch == "gpt2")
    tensors = load_file(out / "adapter_model.safetensors")
    path = adapter.paths[0]
    assert torch.equal(tensors[f"base_model.model.{path}.lora_A.weight"], adapter.a(path))
    assert len(tensors) == 2 * len(adapter.paths)

    ids = token_batch(2, 8)
    peft_model = PeftModel.from_pretrained(build_model(arch), str(out)).eval()
    with torch.no_grad():
        theirs = peft_model(input_ids=ids).logits
    torch.testing.assert_close(our_logits(model, adapter, ids), theirs, atol=ATOL, rtol=RTOL)

    # and back through load_peft, on a meta model: same spec, same tensors bitwise
    loaded, loaded_spec = load_peft(out, build_model(arch, device="meta"))
    assert loaded.targets == adapter.targets
    assert loaded_spec.rank_alpha_for(path) == spec.rank_alpha_for(path)
    assert all(torch.equal(loaded.a(p), adapter.a(p)) and torch.equal(loaded.b(p), adapter.b(p)) for p in adapter.paths)


@pytest.mark.parametrize("case", ["llama-all-linear", "gpt2-c_attn", "qwen2-rslora"])
def test_peft_save_pretrained_loads_through_load_peft(case, tmp_path):
    arch, spec = CASES[case]
    config = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, target_modules=spec.target_modules,
                        rank_pattern=spec.rank_pattern, alpha_pattern=spec.alpha_pattern,
                        use_rslora=spec.use_rslora, fan_in_fan_out=arch == "gpt2", task_type="CAUSAL_LM")
    torch.manual_seed(9)
    peft_model = get_peft_model(build_model(arch), config).eval()
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.2)
    peft_model.save_pretrained(str(tmp_path))
    ids = token_batch(2, 8)
    with torch.no_grad():
        theirs = peft_model(input_ids=ids).logits

    model = build_model(arch).eval()
    adapter, loaded_spec = load_peft(tmp_path, model)
    assert loaded_spec.use_rslora == spec.use_rslora
    torch.testing.assert_close(our_logits(model, adapter, ids), theirs, atol=ATOL, rtol=RTOL)


def test_save_replaces_an_old_adapter_atomically_and_refuses_other_folders(tmp_path, monkeypatch):
    arch, spec = CASES["llama-qv"]
    model, adapter = trained_adapter(arch, spec)
    out = tmp_path / "ckpt"
    save_peft(adapter, out, base_model_name_or_path="x", spec=spec)
    old = (out / "adapter_model.safetensors").read_bytes()

    with torch.no_grad():
        adapter.b(adapter.paths[0]).add_(1.0)

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(_peft_io, "save_file", fail)
    with pytest.raises(CheckpointError, match="could not write the adapter.*disk full"):
        save_peft(adapter, out, base_model_name_or_path="x", spec=spec)
    assert (out / "adapter_model.safetensors").read_bytes() == old  # untouched
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no temporary folder left behind
    monkeypatch.undo()

    save_peft(adapter, out, base_model_name_or_path="x", spec=spec)
    assert (out / "adapter_model.safetensors").read_bytes() != old
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]

    other = tmp_path / "home"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="not an adapter folder"):
        save_peft(adapter, other, base_model_name_or_path="x", spec=spec)
    assert (other / "notes.txt").read_text() == "keep me"


def test_save_refuses_a_spec_that_disagrees_with_the_adapter(tmp_path):
    arch, spec = CASES["llama-qv"]
    _, adapter = trained_adapter(arch, spec)
    with pytest.raises(ConfigError, match="rank 2"):
        save_peft(adapter, tmp_path / "a", base_model_name_or_path="x", spec=LoraSpec(rank=2))


def _saved(tmp_path):
    arch, spec = CASES["llama-qv"]
    model, adapter = trained_adapter(arch, spec)
    save_peft(adapter, tmp_path, base_model_name_or_path="x", spec=spec)
    return model, tmp_path / "adapter_config.json", tmp_path / "adapter_model.safetensors"


def _edit_config(path, **changes):
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def _edit_tensors(path, fn):
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path)


Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"

BAD = {
    "no folder": (lambda c, w: os.rename(c.parent, c.parent.with_name("gone")), "adapter_config.json: not found"),
    "no weights": (lambda c, w: w.unlink(), "adapter_model.safetensors: not found"),
    "config not json": (lambda c, w: c.write_text("{oops"), "not JSON"),
    "not lora": (lambda c, w: _edit_config(c, peft_type="IA3"), "peft_type must be 'LORA'"),
    "dora": (lambda c, w: _edit_config(c, use_dora=True), "use_dora=True is not supported"),
    "pissa": (lambda c, w: _edit_config(c, init_lora_weights="pissa"), "init_lora_weights='pissa' changes the base"),
    "bad targets": (lambda c, w: _edit_config(c, target_modules=["nope"]), "does not fit the model.*lora.target_modules"),
    "truncated": (lambda c, w: w.write_bytes(w.read_bytes()[:100]), "corrupt or truncated"),
    "garbage": (lambda c, w: w.write_bytes(b"\xff" * 64), "corrupt or truncated"),
    "missing key": (lambda c, w: _edit_tensors(w, lambda t: t.pop(Q_A)), f"missing key '{Q_A}'"),
    "unexpected key": (
        lambda c, w: _edit_tensors(w, lambda t: t.update({Q_A.replace("layers.0", "layers.9"): t[Q_A].clone()})),
        "layers.9.self_attn.q_proj.lora_A.weight' matches no target module",
    ),
    "wrong shape": (
        lambda c, w: _edit_tensors(w, lambda t: t.update({Q_A: torch.zeros(3, 32)})),
        r"q_proj.lora_A.weight' has shape \(3, 32\), the model needs \(4, 32\)",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_adapter_folder_is_one_line_checkpoint_error(case, tmp_path):
    model, config, weights = _saved(tmp_path / "a")
    damage, pattern = BAD[case]
    damage(config, weights)
    with pytest.raises(CheckpointError, match=pattern) as err:
        load_peft(tmp_path / "a", model)
    assert "\n" not in str(err.value)

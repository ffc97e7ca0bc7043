"""Hooks vs PEFT's get_peft_model: same weights, same batch -> same logits, loss and LoRA grads.

Both compute ``result + lora_B(lora_A(dropout(x))) * scaling`` with the same ops in the same
order, so on CPU they agree bitwise in practice (~50 fresh processes: max |diff| 0.0). We assert
ATOL/RTOL instead: once, under heavy load from other processes, logits differed by 1.1e-5 (a
BLAS result that depends on more than its inputs), and a harmless reordering in a future PEFT
should not break the test either.
"""

from __future__ import annotations

import copy

import pytest
import torch
from lora_testlib import build_model, causal_lm_loss, lora_grads, randomize_b, token_batch
from peft import LoraConfig, get_peft_model

from ferrytune.lora import Adapter, LoraSpec, attach, find_targets

ATOL = 1e-5
RTOL = 1e-4

CASES = {
    "llama-qv": ("llama", LoraSpec(rank=4, alpha=8, target_modules=["q_proj", "v_proj"])),
    "llama-all-linear-patterns": (
        "llama",
        LoraSpec(rank=4, alpha=8, target_modules="all-linear",
                 rank_pattern={"q_proj": 2, r"layers\.1\.mlp\.down_proj": 6}, alpha_pattern={"v_proj": 3.0}),
    ),
    "qwen2-all-linear-rslora": ("qwen2", LoraSpec(rank=8, alpha=4, target_modules="all-linear", use_rslora=True)),
    "opt-list": ("opt", LoraSpec(rank=4, alpha=16, target_modules=["q_proj", "v_proj", "fc1"])),
    "gpt2-c_attn": ("gpt2", LoraSpec(rank=4, alpha=8, target_modules=["c_attn"])),
    "gpt2-all-linear-rslora-patterns": (
        "gpt2",
        LoraSpec(rank=4, alpha=8, target_modules="all-linear", use_rslora=True, rank_pattern={"mlp.c_proj": 2}),
    ),
    "llama-dropout": ("llama", LoraSpec(rank=4, alpha=8, dropout=0.25, target_modules=["q_proj", "v_proj", "up_proj"])),
}


def peft_config(spec: LoraSpec, arch: str) -> LoraConfig:
    return LoraConfig(
        r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=spec.target_modules,
        rank_pattern=dict(spec.rank_pattern), alpha_pattern=dict(spec.alpha_pattern), use_rslora=spec.use_rslora,
        fan_in_fan_out=arch == "gpt2", task_type="CAUSAL_LM",
    )


def peft_layers(peft_model) -> dict:
    inner = peft_model.base_model.model
    return {path: m for path, m in inner.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}


def make_pair(arch: str, spec: LoraSpec):
    """(our model with hooks, our adapter, PEFT model) sharing base weights and adapter weights."""
    model = build_model(arch)
    peft_model = get_peft_model(copy.deepcopy(model), peft_config(spec, arch))
    targets = find_targets(model, spec)
    layers = peft_layers(peft_model)
    assert sorted(layers) == sorted(targets)
    adapter = Adapter.create(targets, spec, seed=1)
    randomize_b(adapter, seed=2)
    with torch.no_grad():
        for path, a, b in adapter.named_pairs():
            layer = layers[path]
            assert (layer.r["default"], layer.scaling["default"]) == (targets[path].rank, targets[path].scaling)
            layer.lora_A["default"].weight.copy_(a)
            layer.lora_B["default"].weight.copy_(b)
    attach(model, [adapter])
    return model, adapter, peft_model


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_peft_logits_loss_and_grads(case):
    arch, spec = CASES[case]
    model, adapter, peft_model = make_pair(arch, spec)
    ids = token_batch(3, 10)

    torch.manual_seed(123)  # same dropout masks: both draw them target by target in forward order
    ours = model(input_ids=ids).logits
    our_loss = causal_lm_loss(ours, ids)
    our_loss.backward()

    torch.manual_seed(123)
    theirs = peft_model(input_ids=ids).logits
    their_loss = causal_lm_loss(theirs, ids)
    their_loss.backward()

    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(our_loss, their_loss, atol=ATOL, rtol=RTOL)
    layers = peft_layers(peft_model)
    grads = lora_grads(adapter)
    for path in adapter.paths:
        torch.testing.assert_close(grads[f"{path}.lora_A"], layers[path].lora_A["default"].weight.grad,
                                   atol=ATOL, rtol=RTOL, msg=lambda m: f"{path}.lora_A: {m}")
        torch.testing.assert_close(grads[f"{path}.lora_B"], layers[path].lora_B["default"].weight.grad,
                                   atol=ATOL, rtol=RTOL, msg=lambda m: f"{path}.lora_B: {m}")
    # the base stays frozen and the adapter really moved the output
    assert all(p.grad is None for p in model.parameters())
    with torch.no_grad():
        handle_free = build_model(arch)(input_ids=ids).logits
    assert not torch.allclose(ours, handle_free)


def test_hf_loss_with_labels_matches_peft():
    """The model's own labels= loss path goes through the hooks too."""
    arch, spec = CASES["llama-qv"]
    model, adapter, peft_model = make_pair(arch, spec)
    ids = token_batch(2, 8, seed=5)
    ours = model(input_ids=ids, labels=ids).loss
    theirs = peft_model(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=RTOL)

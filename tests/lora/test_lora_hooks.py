"""The hooks under the engine's conditions: swapped-in plain-tensor weights, a meta-device
model, and non-reentrant activation checkpointing (dropout included)."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from lora_testlib import assert_near_bitwise, build_model, causal_lm_loss, lora_grads, randomize_b, token_batch
from torch.utils.checkpoint import checkpoint

from ferrytune.errors import ConfigError, FerrytuneError
from ferrytune.lora import Adapter, LoraSpec, Router, attach, find_targets

SPEC = LoraSpec(rank=4, alpha=8, dropout=0.2, target_modules=["q_proj", "v_proj", "gate_proj"])


def make_adapter(model, spec=SPEC, seed=0) -> Adapter:
    adapter = Adapter.create(find_targets(model, spec), spec, seed=seed)
    randomize_b(adapter, seed=seed + 1)
    return adapter


def step(model, adapter, ids, *, seed: int = 3):
    torch.manual_seed(seed)
    logits = model(input_ids=ids).logits
    causal_lm_loss(logits, ids).backward()
    grads = lora_grads(adapter)
    adapter.zero_grad(set_to_none=True)
    return logits.detach(), grads


def swap_in(model, source) -> None:
    """What the engine does: every parameter and buffer becomes a plain tensor in _parameters/_buffers."""
    src = dict(source.named_modules())
    for path, module in model.named_modules():
        for name, p in list(module._parameters.items()):
            if p is not None:
                module._parameters[name] = src[path]._parameters[name].detach().clone()
        for name, b in list(module._buffers.items()):
            if b is not None:
                module._buffers[name] = src[path]._buffers[name].clone()


def checkpoint_layers(model) -> None:
    """Wrap each decoder layer's forward (on the instance) in non-reentrant checkpointing."""
    for layer in model.model.layers:
        inner = layer.forward
        layer.forward = lambda *a, _inner=inner, **kw: checkpoint(_inner, *a, use_reentrant=False, **kw)


def test_plain_tensor_weights_and_meta_built_model_match_parameters():
    reference = build_model("llama")
    adapter = make_adapter(reference)
    ids = token_batch(3, 9)
    with attach(reference, [adapter]):
        want_logits, want_grads = step(reference, adapter, ids)

    meta = build_model("llama", device="meta")
    targets = find_targets(meta, SPEC)
    assert targets == adapter.targets  # shapes and types only: no weights read
    with attach(meta, [adapter]):  # hooks go on before any real weight exists
        swap_in(meta, reference)
        assert not isinstance(meta.model.layers[0].self_attn.q_proj.weight, torch.nn.Parameter)
        got_logits, got_grads = step(meta, adapter, ids)
    bitwise = assert_near_bitwise(got_logits, want_logits, "logits")
    for name in want_grads:
        bitwise &= assert_near_bitwise(got_grads[name], want_grads[name], name)
    print(f"[plain tensors on a meta-built model vs Parameters] bitwise equal: {bitwise}")


@pytest.mark.parametrize("multi", [False, True], ids=["one-adapter", "packed-router"])
def test_checkpointed_grads_equal_plain_grads_with_dropout(multi):
    model = build_model("llama")
    ids = token_batch(4, 9)
    adapters = [make_adapter(model, seed=0)]
    router = None
    segments = [(0, 0, 4)]
    if multi:
        spec2 = LoraSpec(rank=2, alpha=4, dropout=0.5, target_modules=["v_proj", "down_proj"])
        adapters.append(make_adapter(model, spec2, seed=5))
        router, segments = Router(), [(1, 0, 1), (0, 1, 4)]

    def run():
        torch.manual_seed(11)
        with attach(model, adapters, router=router):
            with router.route(segments) if router else contextlib.nullcontext():
                logits = model(input_ids=ids).logits
                sum(causal_lm_loss(logits[s:e], ids[s:e]) for _, s, e in segments).backward()
        grads = [lora_grads(a) for a in adapters]
        for a in adapters:
            a.zero_grad(set_to_none=True)
        return logits.detach(), grads

    plain_logits, plain_grads = run()
    checkpoint_layers(model)
    ckpt_logits, ckpt_grads = run()
    # the recompute in backward must reuse the forward's dropout masks (checkpoint restores the
    # RNG) and routing (the route context is still open): anything else changes these grads
    bitwise = assert_near_bitwise(ckpt_logits, plain_logits, "logits")
    for plain, ckpt in zip(plain_grads, ckpt_grads):
        for name in plain:
            bitwise &= assert_near_bitwise(ckpt[name], plain[name], name)
    print(f"[checkpointed vs plain, dropout > 0] bitwise equal: {bitwise}")
    torch.manual_seed(12)  # sanity: dropout is live, another seed moves the grads
    with attach(model, adapters, router=router):
        with router.route(segments) if router else contextlib.nullcontext():
            logits = model(input_ids=ids).logits
            sum(causal_lm_loss(logits[s:e], ids[s:e]) for _, s, e in segments).backward()
    assert not torch.equal(lora_grads(adapters[0])["model.layers.0.self_attn.q_proj.lora_A"],
                           plain_grads[0]["model.layers.0.self_attn.q_proj.lora_A"])


def test_backward_outside_route_fails_clearly_under_checkpointing():
    model = build_model("llama")
    adapter = make_adapter(model)
    router = Router()
    checkpoint_layers(model)
    ids = token_batch(2, 6)
    with attach(model, [adapter], router=router):
        with router.route([(0, 0, 2)]):
            loss = causal_lm_loss(model(input_ids=ids).logits, ids)
        with pytest.raises(FerrytuneError, match="forward AND backward"):
            loss.backward()


def test_eval_mode_disables_dropout_and_remove_restores_base():
    model = build_model("llama").eval()
    adapter = make_adapter(model)
    ids = token_batch(2, 6)
    with torch.no_grad():
        base = model(input_ids=ids).logits
        handle = attach(model, [adapter])
        torch.manual_seed(0)
        a = model(input_ids=ids).logits
        torch.manual_seed(1)
        b = model(input_ids=ids).logits
        handle.remove()
        handle.remove()  # idempotent
        after = model(input_ids=ids).logits
    assert torch.equal(a, b) and not torch.equal(a, base)
    assert torch.equal(after, base)


def test_fresh_adapter_is_identity_and_init_is_seeded_like_peft():
    model = build_model("llama")
    targets = find_targets(model, SPEC)
    a1 = Adapter.create(targets, SPEC, seed=0)
    a2 = Adapter.create(targets, SPEC, seed=0)
    a3 = Adapter.create(targets, SPEC, seed=1)
    for path, a, b in a1.named_pairs():
        assert a.dtype == torch.float32 and b.dtype == torch.float32
        assert torch.equal(a, a2.a(path)) and not torch.equal(a, a3.a(path))
        assert torch.count_nonzero(b) == 0
        # kaiming_uniform_(a=sqrt(5)) on (r, in) is U(-1/sqrt(in), 1/sqrt(in)), like nn.Linear
        assert a.abs().max() <= 1 / math.sqrt(targets[path].in_features)
    # the first target's A is the generator's first draw (sorted path order)
    first = a1.paths[0]
    expect = torch.empty_like(a1.a(first))
    torch.nn.init.kaiming_uniform_(expect, a=math.sqrt(5), generator=torch.Generator().manual_seed(0))
    assert torch.equal(a1.a(first), expect)
    assert set(dict(a1.named_parameters())) == {f"lora_{w}.{p.replace('.', '-')}" for p in a1.paths for w in "AB"}
    ids = token_batch(2, 6)
    model.eval()
    with torch.no_grad():
        base = model(input_ids=ids).logits
        with attach(model, [a1]):
            assert torch.equal(model(input_ids=ids).logits, base)


def test_attach_rejects_double_hooks_and_foreign_targets():
    model = build_model("llama")
    adapter = make_adapter(model)
    with attach(model, [adapter]):
        with pytest.raises(ConfigError, match="already has a LoRA hook"):
            attach(model, [adapter])
    opt = build_model("opt")
    with pytest.raises(ConfigError, match="does not have"):
        attach(opt, [make_adapter(model, LoraSpec(target_modules=["gate_proj"]))])


def test_low_precision_base_keeps_its_dtype_and_fp32_adapter_grads():
    model = build_model("llama").to(torch.bfloat16)
    adapter = make_adapter(model)
    with attach(model, [adapter]):
        q = model.model.layers[0].self_attn.q_proj
        out = q(torch.randn(2, 5, 32, dtype=torch.bfloat16))
        assert out.dtype == torch.bfloat16
        out.float().sum().backward()
    assert adapter.b("model.layers.0.self_attn.q_proj").grad.dtype == torch.float32

"""Packed multi-LoRA (mLoRA BatchLoRA): one base GEMM over all jobs, per-segment adapter deltas.

With the loss = sum over jobs of each job's mean loss, job k's adapter gets exactly the gradient
it would get trained alone on its rows: rows never mix (attention is per row), each segment's
delta is computed by the same ops on the same rows as the solo run, and the base GEMMs compute
each output row from that row alone. See lora_testlib.NEAR_BITWISE_RTOL for what is asserted.
"""

from __future__ import annotations

import pytest
import torch
from lora_testlib import assert_near_bitwise, build_model, causal_lm_loss, lora_grads, randomize_b, token_batch

from ferrytune.errors import ConfigError, FerrytuneError
from ferrytune.lora import Adapter, LoraSpec, Router, attach, find_targets

SPECS = [
    LoraSpec(rank=4, alpha=8, target_modules=["q_proj", "v_proj"]),
    LoraSpec(rank=2, alpha=16, target_modules="all-linear", use_rslora=True),
    LoraSpec(rank=8, alpha=4, target_modules=["k_proj", "o_proj", "down_proj"], rank_pattern={"down_proj": 3}),
]
# job k: rows [start, end); row 6 is padding that belongs to no job
SEGMENTS = [(0, 0, 2), (1, 2, 5), (2, 5, 6)]
NUM_ROWS, NUM_TOKENS = 7, 12


def make_adapters(model, specs, *, dropout: float = 0.0) -> list[Adapter]:
    adapters = []
    for k, spec in enumerate(specs):
        spec = LoraSpec(**{**spec.__dict__, "dropout": dropout if k != 2 else 0.0})
        adapter = Adapter.create(find_targets(model, spec), spec, seed=10 + k)
        randomize_b(adapter, seed=20 + k)
        adapters.append(adapter)
    return adapters


def run_packed(model, adapters, ids, *, seed: int = 0):
    router = Router()
    handle = attach(model, adapters, router=router)
    try:
        with router.route(SEGMENTS):
            torch.manual_seed(seed)
            logits = model(input_ids=ids).logits
            loss = sum(causal_lm_loss(logits[s:e], ids[s:e]) for _, s, e in SEGMENTS)
            loss.backward()
    finally:
        handle.remove()
    grads = [lora_grads(a) for a in adapters]
    for a in adapters:
        a.zero_grad(set_to_none=True)
    return logits.detach(), grads


def run_solo(model, adapter, ids, *, seed: int = 0):
    with attach(model, [adapter]):
        torch.manual_seed(seed)
        logits = model(input_ids=ids).logits
        causal_lm_loss(logits, ids).backward()
    grads = lora_grads(adapter)
    adapter.zero_grad(set_to_none=True)
    return logits.detach(), grads


def test_packed_equals_solo_per_adapter():
    model = build_model("llama")
    adapters = make_adapters(model, SPECS)
    ids = token_batch(NUM_ROWS, NUM_TOKENS)
    packed_logits, packed_grads = run_packed(model, adapters, ids)

    all_bitwise = True
    for k, (_, start, end) in enumerate(SEGMENTS):
        solo_logits, solo_grads = run_solo(model, adapters[k], ids[start:end])
        all_bitwise &= assert_near_bitwise(packed_logits[start:end], solo_logits, f"adapter {k} logits")
        assert packed_grads[k].keys() == solo_grads.keys()
        for name, g in solo_grads.items():
            assert g.abs().max() > 0, name
            all_bitwise &= assert_near_bitwise(packed_grads[k][name], g, f"adapter {k} {name}")
    # the padding row that no segment covers gets the base model's output
    with torch.no_grad():
        base_row = model(input_ids=ids[6:]).logits
    all_bitwise &= assert_near_bitwise(packed_logits[6:], base_row, "padding row")
    print(f"[packed vs solo] bitwise equal: {all_bitwise}")


def test_adapters_with_different_target_sets_touch_only_their_modules():
    model = build_model("llama")
    adapters = make_adapters(model, SPECS)
    assert {p.rsplit(".", 1)[-1] for p in adapters[0].paths} == {"q_proj", "v_proj"}
    assert len(adapters[1].paths) == 14  # 7 linears x 2 layers, lm_head excluded
    assert adapters[2].targets["model.layers.0.mlp.down_proj"].rank == 3
    assert adapters[2].targets["model.layers.0.self_attn.k_proj"].rank == 8


def test_dropout_packed_is_deterministic_and_dropout_free_adapters_match_solo():
    """With dropout > 0, masks come from the global RNG in the order the hooks run: packed
    and solo runs draw different masks (same distribution), so only these hold exactly:
    a packed step repeats bitwise under the same seed, a different seed changes it, and an
    adapter with dropout 0 packed beside dropout adapters still matches its solo run."""
    model = build_model("llama")
    adapters = make_adapters(model, SPECS, dropout=0.3)  # adapter 2 keeps dropout 0
    ids = token_batch(NUM_ROWS, NUM_TOKENS)
    logits1, grads1 = run_packed(model, adapters, ids, seed=7)
    logits2, grads2 = run_packed(model, adapters, ids, seed=7)
    logits3, _ = run_packed(model, adapters, ids, seed=8)
    assert torch.equal(logits1, logits2)
    assert all(torch.equal(grads1[k][n], grads2[k][n]) for k in range(3) for n in grads1[k])
    assert not torch.equal(logits1[0:5], logits3[0:5])  # rows of the dropout adapters
    solo_logits, solo_grads = run_solo(model, adapters[2], ids[5:6])
    assert_near_bitwise(logits1[5:6], solo_logits, "dropout-free adapter logits")
    for name, g in solo_grads.items():
        assert_near_bitwise(grads1[2][name], g, f"dropout-free adapter {name}")


def test_router_errors():
    model = build_model("llama")
    adapters = make_adapters(model, SPECS)
    ids = token_batch(NUM_ROWS, NUM_TOKENS)
    with pytest.raises(ConfigError, match="Router"):
        attach(model, adapters)
    router = Router()
    with pytest.raises(ValueError, match="previous row_end"):
        with router.route([(0, 0, 3), (1, 2, 5)]):
            pass
    with pytest.raises(ValueError, match="at least one"):
        with router.route([]):
            pass
    with attach(model, adapters, router=router):
        with pytest.raises(FerrytuneError, match="no segments"):
            model(input_ids=ids)
        with pytest.raises(FerrytuneError, match="batch has 7 rows"):
            with router.route([(0, 0, 8)]):
                model(input_ids=ids)
        with pytest.raises(FerrytuneError, match="adapter 3"):
            with router.route([(3, 0, 7)]):
                model(input_ids=ids)
    assert router.segments is None

"""Packing without padding: sequences end to end in one row (``collate_packed``) give each sequence
the loss, logits and adapter gradients it gets alone, and attention never crosses a boundary.

Bound, not bit-exact: the packed forward runs GEMMs of another shape (N tokens of all sequences
instead of n of one, attention over a T x T block-diagonal mask instead of n x n), so BLAS sums
in another order; float32 rounding of ~1e-7 relative, a few ulps amplified through the layers.
"""

import pytest
import torch

from ferrytune.data import Example, collate, collate_packed, gather_packed, gather_positions, loss_per_sample
from ferrytune.launch._demo import build_tiny_model
from ferrytune.lora import Adapter, LoraSpec, Router, attach, find_targets
from ferrytune.models import load_resident_model, logits_at

REL = 1e-5  # max|packed - alone| <= REL * max|alone|, logits, losses and gradients


def _close(got, want, what):
    bound = REL * float(want.abs().max()) + 1e-7
    err = float((got - want).abs().max())
    assert err <= bound, f"{what}: max|packed - alone| = {err:.3g} > {bound:.3g}"


def _examples(lengths, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(4, vocab, (n,), generator=g).tolist()
        pos = list(range(n // 2, n - 1))  # completion-style: score the second half
        out.append(Example(input_ids=ids, loss_positions=pos, loss_targets=[ids[p + 1] for p in pos]))
    return out


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def base(request, tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp(request.param), arch=request.param)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_row_equals_each_sequence_alone(base, attn):
    model = load_resident_model(base, dtype=torch.float32, device="cpu")
    model.config._attn_implementation = attn
    model.eval()
    vocab = model.config.vocab_size
    examples = _examples([7, 12, 3, 9], vocab)
    packed = collate_packed(examples, pad_id=0)
    assert packed.input_ids.shape == (1, 31) and packed.padded_tokens == packed.real_tokens == 31
    with torch.no_grad():
        h = model.base_model(input_ids=packed.input_ids, position_ids=packed.position_ids, use_cache=False).last_hidden_state
        got = logits_at(model, gather_packed(h, packed.loss_positions))  # (S, L, V)
        for s, e in enumerate(examples):
            b = collate([e], pad_id=0)
            hs = model.base_model(input_ids=b.input_ids, attention_mask=b.attention_mask).last_hidden_state
            want = logits_at(model, gather_positions(hs, b.loss_positions))[0]
            _close(got[s, :len(e.loss_positions)], want, f"{attn} sequence {s} logits")
        # isolation: change sequence 1's tokens; the others' logits must not move
        changed = [examples[0], _examples([12], vocab, seed=99)[0], *examples[2:]]
        p2 = collate_packed(changed, pad_id=0)
        h2 = model.base_model(input_ids=p2.input_ids, position_ids=p2.position_ids, use_cache=False).last_hidden_state
        got2 = logits_at(model, gather_packed(h2, p2.loss_positions))
    for s in (0, 2, 3):
        _close(got2[s], got[s], f"{attn} sequence {s} after changing sequence 1")
    assert float((got2[1] - got[1]).abs().max()) > 1e-3  # the change itself is visible


def test_attention_across_boundaries_is_detected(base):
    """The isolation check above bites: without per-sequence position ids (one long sequence)
    a later sequence attends to the earlier ones and its logits change."""
    model = load_resident_model(base, dtype=torch.float32, device="cpu").eval()
    examples = _examples([7, 12], model.config.vocab_size)
    packed = collate_packed(examples, pad_id=0)
    flat = torch.arange(packed.input_ids.shape[1]).unsqueeze(0)
    with torch.no_grad():
        h = model.base_model(input_ids=packed.input_ids, position_ids=packed.position_ids, use_cache=False).last_hidden_state
        leak = model.base_model(input_ids=packed.input_ids, position_ids=flat, use_cache=False).last_hidden_state
    assert float((h[0, 7:] - leak[0, 7:]).abs().max()) > 1e-3


def test_multi_adapter_token_routing_gradients_equal_alone(base):
    """Three adapters, their sequences in one packed row routed by token range: each adapter's
    loss and gradients equal a run of its sequences alone (padded collate, row routing)."""
    model = load_resident_model(base, dtype=torch.float32, device="cpu")
    model.requires_grad_(False)
    specs = [LoraSpec(rank=4, alpha=8, target_modules=["q_proj", "v_proj"]),
             LoraSpec(rank=2, alpha=4, target_modules=["o_proj", "up_proj"]),
             LoraSpec(rank=8, alpha=8, target_modules=["k_proj", "down_proj"], use_rslora=True)]
    adapters = [Adapter.create(find_targets(model, s), s, seed=i) for i, s in enumerate(specs)]
    for a in adapters:  # B != 0, so A gets a gradient too
        with torch.no_grad():
            for n, p in a.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.05)
    router = Router()
    handle = attach(model, adapters, router=router)
    per_job = [_examples([5, 9], model.config.vocab_size, 1), _examples([11], model.config.vocab_size, 2),
               _examples([4, 6, 8], model.config.vocab_size, 3)]
    flat = [e for ex in per_job for e in ex]
    packed = collate_packed(flat, pad_id=0)
    segments, first = [], 0
    for k, ex in enumerate(per_job):
        segments.append((k, packed.spans[first][0], packed.spans[first + len(ex) - 1][1]))
        first += len(ex)
    with router.route(segments, tokens=packed.input_ids.numel()):
        h = model.base_model(input_ids=packed.input_ids, position_ids=packed.position_ids, use_cache=False).last_hidden_state
        per = loss_per_sample(logits_at(model, gather_packed(h, packed.loss_positions)), packed)
        sizes = [len(ex) for ex in per_job]
        per.sum().backward()
    got_loss = per.detach()
    got_grads = [{n: p.grad.clone() for n, p in a.named_parameters()} for a in adapters]
    for a in adapters:
        a.zero_grad(set_to_none=True)
    first = 0
    for k, ex in enumerate(per_job):
        b = collate(ex, pad_id=0)
        with router.route([(k, 0, len(ex))]):
            hs = model.base_model(input_ids=b.input_ids, attention_mask=b.attention_mask).last_hidden_state
            alone = loss_per_sample(logits_at(model, gather_positions(hs, b.loss_positions)), b)
            alone.sum().backward()
        _close(got_loss[first:first + sizes[k]], alone.detach(), f"adapter {k} losses")
        first += sizes[k]
        for n, p in adapters[k].named_parameters():
            assert p.grad is not None and float(p.grad.abs().max()) > 0, f"adapter {k} {n} got no gradient"
            _close(got_grads[k][n], p.grad, f"adapter {k} grad {n}")
    handle.remove()


def test_token_routing_refuses_a_wrong_layout(base):
    model = load_resident_model(base, dtype=torch.float32, device="cpu")
    spec = LoraSpec(rank=2, alpha=2, target_modules=["q_proj"])
    router = Router()
    handle = attach(model, [Adapter.create(find_targets(model, spec), spec, seed=0)], router=router)
    packed = collate_packed(_examples([5, 6], model.config.vocab_size), pad_id=0)
    from ferrytune.errors import FerrytuneError
    with pytest.raises(FerrytuneError, match="token routing needs"), router.route([(0, 0, 5)], tokens=12):
        model.base_model(input_ids=packed.input_ids, position_ids=packed.position_ids, use_cache=False)
    handle.remove()


def test_rows_of_a_capacity_hold_whole_sequences():
    examples = _examples([5, 4, 6, 2], 100)
    p = collate_packed(examples, pad_id=0, capacity=10)
    assert p.input_ids.shape == (2, 9)  # [5, 4] and [6, 2]: no sequence split across rows
    assert p.spans == ((0, 5), (5, 9), (9, 15), (15, 17))
    assert p.position_ids[1].tolist() == [0, 1, 2, 3, 4, 5, 0, 1, 0]  # the tail restarts too
    assert p.real_tokens == 17 and p.padded_tokens == 18
    with pytest.raises(ValueError, match="more than a packed row holds"):
        collate_packed(examples, pad_id=0, capacity=5)

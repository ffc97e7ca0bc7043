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


# ---- data.packing: single-job method lora ----

LORA = {"rank": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"}


def _packing_run(cfg_factory, path, packing, **offload):
    from ferrytune.launch.train import run

    cfg = cfg_factory(path, method="lora", train={"steps": 3, "lr": 1e-2, "batch_size": 8, "micro_batch_size": 4},
                      lora=LORA, data={"eval": None, "packing": packing}, offload=offload or {"tier": "resident"})
    res = run(cfg, progress=False)
    from safetensors.torch import load_file
    import json
    recs = [json.loads(x) for x in open(f"{cfg.output_dir}/metrics.jsonl")]
    return res.losses, load_file(f"{cfg.output_dir}/final/adapter_model.safetensors"), [r for r in recs if "loss" in r]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_data_packing_trains_like_unpacked(tiny_models, cfg_factory, arch):
    """``data.packing: true`` = unpacked training over 3 steps, within float rounding.

    Same loss normalisation (per-sample sum over the global batch), same arithmetic per sequence;
    the GEMMs have other shapes (one row of all of a micro-batch's tokens vs 4 padded rows), so
    float32 sums differ in order, and Adam's scale-free update lr * m / (sqrt(v) + eps) turns that
    into up to ~lr * 1e-3 per step on gradient elements near zero, where rounding is the whole
    value (seen: 8.7e-6 after 3 steps). Attention across a boundary (positions not restarting)
    moves weights by ~lr per step (seen: > 1e-3 after 3 steps).
    """
    path = tiny_models(arch, layers=2, hidden=32)
    ref_losses, ref_w, ref_recs = _packing_run(cfg_factory, path, False)
    losses, w, recs = _packing_run(cfg_factory, path, True)
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    atol = 3 * 1e-2 * 1e-3
    for k in ref_w:
        err = float((w[k] - ref_w[k]).abs().max())
        assert err <= atol, f"{k}: max|packed - unpacked| = {err:.3g} > {atol:.3g}"
    assert max(float(v.abs().max()) for k, v in ref_w.items() if "lora_B" in k) > 100 * atol
    for r, rr in zip(recs, ref_recs):
        assert r["real_tokens"] == rr["real_tokens"]
        assert r["padded_tokens"] / r["real_tokens"] <= 1.05
        assert rr["padded_tokens"] > rr["real_tokens"]  # the unpacked run pads (rt-polarity lengths vary)


def test_data_packing_on_a_streamed_base_equals_resident(tiny_models, cfg_factory):
    """position_ids and what the model derives from them reach the NVMe-streamed layers unchanged."""
    path = tiny_models("llama", layers=2, hidden=32)
    ref_losses, ref_w, _ = _packing_run(cfg_factory, path, True)
    losses, w, _ = _packing_run(cfg_factory, path, True, tier="nvme", prefetch_depth=1)
    assert losses == ref_losses
    assert all(torch.equal(w[k], ref_w[k]) for k in ref_w)


def test_data_packing_bad_config_is_one_line(tiny_models, cfg_factory):
    from ferrytune.errors import ConfigError

    path = tiny_models("llama", layers=2, hidden=32)
    with pytest.raises(ConfigError, match=r"data.packing: packs sequences for method: lora only \(got method: zo\)"):
        cfg_factory(path, data={"packing": True})  # method zo
    from ferrytune.engine._fo import check_packing_supported
    from transformers import GPT2Config, GPT2LMHeadModel
    with pytest.raises(ConfigError, match=r"data.packing: packing is checked for model types llama, qwen2 only \(this model is 'gpt2'\)"):
        check_packing_supported(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=10)))


def test_activation_estimate_of_a_packed_micro_batch(tiny_models, cfg_factory):
    """With data.packing the planner sizes one row of micro_batch_size x max_length tokens: the
    same bytes per token, but eager attention's T x T probabilities grow with the whole row."""
    from ferrytune.engine._activations import lora_activation_estimate
    from ferrytune.models import load_layout

    path = tiny_models("llama", layers=2, hidden=32)
    layout = load_layout(path)
    est = {}
    for packing in (False, True):
        cfg = cfg_factory(path, method="lora", lora=LORA, train={"batch_size": 8, "micro_batch_size": 4},
                          data={"packing": packing, "max_length": 64})
        est[packing] = lora_activation_estimate(cfg)
    sdpa = {p: e(layout, torch.float32) for p, e in est.items()}
    layout.model.config._attn_implementation = "eager"
    eager = {p: e(layout, torch.float32) for p, e in est.items()}
    assert sdpa[True] == sdpa[False]
    heads = layout.model.config.num_attention_heads
    assert eager[True] - eager[False] == 2 * heads * 4 * 64 * (4 * 64 - 64) * 4  # bytes: fp32


def test_evaluation_of_a_packed_run_is_packed_and_equals_padded(tiny_models, cfg_factory):
    """With ``data.packing`` the eval chunks are packed too (one row, no padding): the same eval loss
    as padded rows within float rounding (other GEMM shapes), the same accuracy up to a near-tie row."""
    from ferrytune.engine import LoraTrainer

    path = tiny_models("llama", layers=2, hidden=32)
    results, calls = {}, {}
    for packing in (False, True):
        cfg = cfg_factory(path, method="lora", lora=LORA, train={"steps": 1, "batch_size": 8, "micro_batch_size": 4},
                          data={"packing": packing, "eval_samples": 37}, offload={"tier": "nvme", "prefetch_depth": 1})
        tr = LoraTrainer(cfg)
        tr.setup()
        try:
            forward, seen = tr.engine.forward, []

            def spy(ids, mask, pos, *, position_ids=None, forward=forward, seen=seen):
                seen.append((tuple(ids.shape), mask is None, position_ids is not None))
                return forward(ids, mask, pos, position_ids=position_ids)

            tr.engine.forward = spy
            results[packing], calls[packing] = tr.evaluate(prefix="eval_"), seen
        finally:
            tr.close()
    assert all(rows == 1 and no_mask and pids for (rows, _), no_mask, pids in calls[True])
    assert all(rows > 1 and not no_mask and not pids for (rows, _), no_mask, pids in calls[False][:-1])
    assert len(calls[True]) == len(calls[False]) == 10  # 37 rows in chunks of 4
    assert results[True]["eval_samples"] == results[False]["eval_samples"] == 37
    assert results[True]["eval_loss"] == pytest.approx(results[False]["eval_loss"], rel=1e-5)
    assert abs(results[True]["eval_accuracy"] - results[False]["eval_accuracy"]) <= 1 / 37 + 1e-9

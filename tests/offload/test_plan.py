"""The planner is a pure function: placements and the errors that name a budget."""

import pytest

from ferrytune.errors import PlanError
from ferrytune.offload._plan import BlockSize, Tier, make_plan

MIB = 2**20
BLOCKS = {"outer": BlockSize(8 * MIB, 16 * MIB), **{f"layer.{i}": BlockSize(4 * MIB, 8 * MIB) for i in range(6)}}


def _plan(**kw):
    args = dict(outer_block="outer", tier="nvme", prefetch_depth=2, device_budget_bytes=None,
                host_budget_bytes=1 << 30, zero_copy=False)
    args.update(kw)
    return make_plan(BLOCKS, **args)


def test_nvme_without_device_budget_streams_every_block():
    p = _plan()
    assert p.count(Tier.NVME) == 7 and p.ring_size == 4
    assert p.host_bytes == 4 * 4 * MIB + 8 * MIB  # ring staging + outer staging


def test_device_budget_keeps_early_layers_resident():
    working = 16 * MIB + 4 * 8 * MIB
    p = _plan(device_budget_bytes=working + 2 * 4 * MIB)
    assert [b for b, t in p.home.items() if t == Tier.DEVICE] == ["layer.0", "layer.1"]


def test_resident_over_budget_names_device_budget():
    with pytest.raises(PlanError, match="offload.device_budget_gib"):
        _plan(tier="resident", device_budget_bytes=10 * MIB)


def test_host_budget_too_small_for_one_block():
    with pytest.raises(PlanError, match="offload.host_budget_gib"):
        _plan(host_budget_bytes=5 * MIB)


def test_host_tier_over_budget_suggests_nvme():
    with pytest.raises(PlanError, match="offload.tier: nvme"):
        _plan(tier="host", host_budget_bytes=10 * MIB)


def test_zero_copy_cpu_nvme_computes_in_staging():
    p = _plan(zero_copy=True)
    assert p.ring_size == 0 and p.device_bytes == 0 and p.staging_buffers == 4


def test_activations_kept_while_the_budget_holds_them_earliest_first():
    p = _plan(activation_bytes_per_layer=3 * MIB, activation_budget_bytes=10 * MIB)
    assert p.keep == ["layer.0", "layer.1", "layer.2"]
    assert "keep activations of 3 layers, recompute 3" in p.describe()


def test_activation_budget_defaults_to_what_the_device_budget_leaves():
    working = 16 * MIB + 4 * 8 * MIB
    p = _plan(device_budget_bytes=working + 4 * MIB + 7 * MIB, activation_bytes_per_layer=3 * MIB)
    assert p.count(Tier.DEVICE) == 2  # blocks first: layer.0 and layer.1 take 8 MiB, 3 MiB left
    assert p.activation_budget_bytes == 3 * MIB and p.keep == ["layer.0"]
    assert _plan(activation_bytes_per_layer=3 * MIB).keep == [f"layer.{i}" for i in range(6)]  # no limit


def test_without_an_estimate_a_bounded_budget_recomputes_the_streamed_layers():
    working = 16 * MIB + 4 * 8 * MIB
    p = _plan(device_budget_bytes=working + 4 * MIB)
    assert p.keep == ["layer.0"]  # the device-home layer; the streamed ones recompute, as before


def test_layer_major_holds_every_micro_batch_or_falls_back():
    act, hid = 3 * MIB, MIB // 2  # kept activations and hidden state of one micro-batch per layer
    kw = dict(activation_bytes_per_layer=act, boundary_bytes_per_layer=hid)
    # micro_major is unchanged: one micro-batch's activations, whatever num_micro
    p = _plan(activation_budget_bytes=2 * act, accumulation="micro_major", num_micro=4, **kw)
    assert (p.accumulation, p.keep) == ("micro_major", ["layer.0", "layer.1"])
    # no limit: every layer keeps, for every micro-batch
    p = _plan(accumulation="auto", num_micro=4, **kw)
    assert p.accumulation == "layer_major" and len(p.keep) == 6
    assert "accumulation: layer_major (4 micro-batches" in p.describe()
    # the hidden states of 4 micro-batches x 6 layers, plus 2 layers' kept activations x 4
    boundary = 4 * 6 * hid
    p = _plan(activation_budget_bytes=boundary + 2 * 4 * act + act, accumulation="layer_major", num_micro=4, **kw)
    assert (p.accumulation, p.keep) == ("layer_major", ["layer.0", "layer.1"])
    # not even the hidden states: micro-batch-major, keeping what one micro-batch needs, and why
    p = _plan(activation_budget_bytes=boundary - 1, accumulation="layer_major", num_micro=4, **kw)
    assert p.accumulation == "micro_major" and "hidden states between layers" in p.accumulation_why
    assert p.keep == [f"layer.{i}" for i in range((boundary - 1) // act)]
    # one micro-batch: the orders are the same
    assert _plan(accumulation="auto", num_micro=1, **kw).accumulation == "micro_major"
    with pytest.raises(PlanError, match="train.accumulation"):
        _plan(accumulation="layers", num_micro=2, **kw)

"""stochastic_round_: bitwise equal to the reference, unbiased, deterministic per key, safe on special values."""

from __future__ import annotations

import pytest
import torch

from ferrytune.kernels import PerturbKey, _api, perturbation, set_num_threads, stochastic_round_
from ferrytune.kernels import _reference as R

KEY = PerturbKey(seed=5, step=9, index=0, param_id=3)


def _round(src: torch.Tensor, key: PerturbKey = KEY) -> torch.Tensor:
    dst = torch.empty(src.shape, dtype=torch.bfloat16)
    stochastic_round_(src, dst, key)
    return dst


@pytest.mark.parametrize("numel", [1, 1000, 1024, 4099, 300_001])
def test_matches_reference_bitwise(numel):
    src = torch.randn(numel) * 100
    expected = torch.empty(numel, dtype=torch.bfloat16)
    R.stochastic_round_(src, expected, KEY)
    assert torch.equal(_round(src).view(torch.int16), expected.view(torch.int16))


def test_threads_do_not_change_bits(monkeypatch):
    monkeypatch.setattr(_api, "MIN_SPAN_NUMEL", 1)
    src = torch.randn(9 * 1024 + 5)
    set_num_threads(1)
    one = _round(src)
    set_num_threads(3)
    try:
        assert torch.equal(_round(src).view(torch.int16), one.view(torch.int16))
    finally:
        set_num_threads(None)


def test_result_is_a_bf16_neighbour_and_deterministic():
    src = torch.randn(100_000)
    out = _round(src).float()
    down = src.view(torch.int32).bitwise_and(-65536).view(torch.float32)  # truncation toward zero
    up = (src.view(torch.int32) + 65536).bitwise_and(-65536).view(torch.float32)  # next bf16 away from zero
    exact = down == src
    assert torch.all((out == down) | ((out == up) & ~exact))
    assert torch.equal(_round(src).view(torch.int16), _round(src).view(torch.int16))
    assert not torch.equal(_round(src).view(torch.int16), _round(src, PerturbKey(5, 10, 0, 3)).view(torch.int16))


def test_unbiased():
    """E[dst] = src: each of 64 values is rounded 16384 times (different elements, different bits)."""
    values = 1 + torch.rand(64) * 2**-7  # well inside one bf16 step, where nearest rounding is biased
    src = values.repeat_interleave(16384)
    mean = _round(src).float().view(64, -1).double().mean(dim=1)
    step = 2.0**-7  # bf16 spacing in [1, 2)
    tolerance = 5 * step / 2 / 16384**0.5  # 5 sigma of a two-point distribution
    assert torch.all((mean - values.double()).abs() < tolerance)
    nearest = values.bfloat16().double()
    assert (nearest - values.double()).abs().max() > 10 * tolerance  # round-to-nearest would fail this


def test_small_update_survives_in_expectation():
    """The ZO2-AMP failure: w + 1e-5 rounds back to w under nearest rounding, but not on average under SR."""
    w = torch.full((1 << 18,), 1.0)
    updated = w + 1e-5
    assert torch.equal(updated.bfloat16().float(), w)
    assert abs(_round(updated).double().mean().item() - (1.0 + 1e-5)) < 3e-6


def test_special_values():
    src = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 3.3895313892515355e38, 1e-40])
    nan_low = torch.tensor([0x7F800001], dtype=torch.int32).view(torch.float32)  # nan whose payload is in the low bits
    src = torch.cat([src, nan_low])
    out = _round(src).float()
    assert out[0] == 0 and out[1] == 0 and torch.signbit(out[1])
    assert out[2] == float("inf") and out[3] == -float("inf")
    assert torch.isnan(out[4]) and torch.isnan(out[7])
    assert torch.isfinite(out[6])


def test_rounding_bits_independent_of_z():
    src = torch.full((1 << 16,), 1.0 + 2.0**-9)  # exactly half a bf16 step above 1
    up = (_round(src).float() > 1.0).double()
    z = perturbation(KEY, 1 << 16).double()
    corr = ((up - up.mean()) * (z - z.mean())).mean() / (up.std() * z.std())
    assert abs(corr.item()) < 0.02


def test_bad_inputs():
    with pytest.raises(TypeError, match="bfloat16"):
        stochastic_round_(torch.zeros(4), torch.zeros(4, dtype=torch.float16), KEY)
    with pytest.raises(TypeError, match="float32"):
        stochastic_round_(torch.zeros(4, dtype=torch.float64), torch.zeros(4, dtype=torch.bfloat16), KEY)
    with pytest.raises(ValueError, match="numel"):
        stochastic_round_(torch.zeros(4), torch.zeros(5, dtype=torch.bfloat16), KEY)

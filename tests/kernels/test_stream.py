"""The stream definition: keys, Philox known answers, and the accuracy of the float32 transform."""

from __future__ import annotations

import math

import pytest
import torch

from ferrytune.kernels import PerturbKey, perturbation
from ferrytune.kernels import _reference as R
from ferrytune.kernels import _stream as S


@pytest.mark.parametrize(
    ("counter", "key", "expected"),
    [  # Random123 known-answer vectors for Philox4x32-10 (Salmon et al. 2011)
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        (
            (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
            (0xA4093822, 0x299F31D0),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
        ),
    ],
)
def test_philox_known_answers(counter, key, expected):
    out = R.philox4x32(torch.tensor([counter[0]]), *counter[1:], *key)
    assert tuple(int(x) for x in out) == expected


def test_key_validation():
    PerturbKey(seed=2**64 - 1, step=2**32 - 1, index=2**30 - 1, param_id=2**32 - 1)
    with pytest.raises(ValueError, match="seed"):
        PerturbKey(seed=-1, step=0, index=0, param_id=0)
    with pytest.raises(ValueError, match="index"):
        PerturbKey(seed=0, step=0, index=2**30, param_id=0)
    with pytest.raises(TypeError, match="step"):
        PerturbKey(seed=0, step=1.0, index=0, param_id=0)
    with pytest.raises(ValueError, match="dist"):
        perturbation(PerturbKey(0, 0, 0, 0), 4, dist="uniform")


def test_key_words_separate_streams():
    key = PerturbKey(seed=(7 << 32) | 9, step=5, index=3, param_id=11)
    assert S.key_words(key, S.TAG_GAUSSIAN) == (5, 11, 3, 9, 7)
    assert S.key_words(key, S.TAG_ROUND) == (5, 11, (2 << 30) | 3, 9, 7)


def test_transform_matches_float64_box_muller():
    """The polynomial float32 transform stays within 2e-6 * max(1, |z|) of exact Box-Muller on the same bits."""
    key = PerturbKey(seed=99, step=1, index=0, param_id=2)
    n = 1 << 16
    z = perturbation(key, n).double()
    i = torch.arange(n)
    r = i & 1023
    lane = r >> 8
    x0, x1, x2, x3 = R.philox4x32(((i >> 10) << 8) | (r & 255), *S.key_words(key, 0))
    a = torch.where(lane < 2, x0, x2).double()
    b = torch.where(lane < 2, x1, x3)
    odd = (lane & 1) == 1
    u = (torch.div(a, 256, rounding_mode="floor") + 1) * 2.0**-24
    radius = torch.sqrt(-2 * torch.log(u))
    theta = math.pi / 4 + ((((b >> 8) & 0xFFFFFF) - 2**23).double() + 0.5) * (math.pi / 2) * 2.0**-24
    sign = 1 - 2 * torch.where(odd, (b >> 1) & 1, b & 1).double()
    exact = sign * radius * torch.where(odd, torch.sin(theta), torch.cos(theta))
    err = (z - exact).abs() / exact.abs().clamp(min=1)
    assert err.max().item() < 2e-6
    assert z.abs().max().item() <= math.sqrt(-2 * math.log(2.0**-24)) + 1e-5


def test_reference_sqrt_is_correctly_rounded():
    x = torch.rand(1 << 16) * 40
    exact = x.double().sqrt()
    got = R._sqrt_rn(x)
    best = exact.float()  # float64 -> float32 rounding of a float64 sqrt: correct except at exact ties
    assert torch.equal(got, best)

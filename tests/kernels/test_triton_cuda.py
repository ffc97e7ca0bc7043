"""The Triton kernels compiled for a real GPU against the reference and numba (``pytest -m cuda``).

Skipped, with the reason, without CUDA (tests/conftest.py). benchmarks/gpu_check.sh runs these.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ferrytune.kernels import PerturbKey, _api, add_perturbation_, perturbation, stochastic_round_
from ferrytune.kernels import _reference as R
from ferrytune.kernels import _stream as S

pytestmark = pytest.mark.cuda

KEYS = [PerturbKey(seed=2**31 - 1, step=2**31, index=2**30 - 1, param_id=2**31 + 1),
        PerturbKey(seed=2**32 + 2**31, step=2**32 - 1, index=0, param_id=2**32 - 1),
        PerturbKey(seed=2**63 - 1, step=1, index=1, param_id=0),
        PerturbKey(seed=2**63 + 12345, step=3, index=7, param_id=2**31),
        PerturbKey(seed=2**64 - 1, step=0, index=0, param_id=1)]
SIZES = [1, 3, 17, 1023, 1025, 4097, (1 << 20) + 13]


@pytest.fixture(autouse=True)
def _triton_really_compiles():
    pytest.importorskip("triton")
    assert _api._load_triton() is not None, "the Triton kernels did not import on this CUDA machine"
    yield
    assert not _api._triton_failed, "a Triton kernel fell back to the reference (compile error, see the log)"


@pytest.mark.parametrize("dist", ["gaussian", "rademacher"])
@pytest.mark.parametrize("key", KEYS, ids=lambda k: f"seed{k.seed}")
def test_z_and_add_equal_reference_for_odd_sizes_and_views(key, dist):
    for n in SIZES:
        assert torch.equal(perturbation(key, n, dist=dist, device="cuda").cpu(), perturbation(key, n, dist=dist))
        base = torch.randn(n + 37)
        ref = base[5:5 + n].clone()
        R.add_perturbation_(ref, key, alpha=-0.37, dist=dist)
        got = base.cuda()
        add_perturbation_(got[5:5 + n], key, alpha=-0.37, dist=dist)  # a view at an unaligned offset
        got = got.cpu()
        assert torch.equal(got[5:5 + n], ref), (n, dist)
        assert torch.equal(got[:5], base[:5]) and torch.equal(got[5 + n:], base[5 + n:])


@pytest.mark.parametrize("key", KEYS, ids=lambda k: f"seed{k.seed}")
def test_stochastic_rounding_of_special_values(key):
    special = torch.tensor([float("inf"), -float("inf"), float("nan"), -float("nan"), 0.0, -0.0, 1e-40, -1e-40,
                            1.4e-45, -1.4e-45, 1.1754942e-38, 3.4028235e38, -3.4028235e38, 3.3961e38, 1.0])
    for n in SIZES:
        src = torch.randn(n + 9) * 7
        src[2:2 + min(n, len(special))] = special[:min(n, len(special))]
        if n > 40:
            src.view(torch.int32)[30:34] = torch.tensor([0x7F800001, 0x7FC00001, -8388317, 0x7FFFFFFF],
                                                        dtype=torch.int32)  # NaN payloads, signalling too
        view = src[2:2 + n]
        expected = torch.empty(n, dtype=torch.bfloat16)
        R.stochastic_round_(view.clone(), expected, key)
        out = torch.zeros(n + 4, dtype=torch.bfloat16, device="cuda")
        stochastic_round_(view.cuda(), out[1:1 + n], key)
        out = out.cpu()
        assert torch.equal(out[1:1 + n].view(torch.int16), expected.view(torch.int16)), n
        assert not out[0].item() and not out[1 + n:].any()
        assert torch.isnan(out[1:1 + n][torch.isnan(view)].float()).all()


def test_one_tensor_over_2_31_elements():
    """Index arithmetic past 2**31 (int64 offsets): check the spans around 2**31 and the end with numba."""
    from ferrytune.kernels import _cpu

    free, _ = torch.cuda.mem_get_info()
    n = (1 << 31) + 4099
    if free < n * 4 * 2 + n * 2 + (2 << 30):
        pytest.skip(f"needs {(n * 10) / 2**30:.0f} GiB free on the device, {free / 2**30:.0f} GiB free")
    key = KEYS[3]
    spans = [(0, 4096), ((1 << 31) - 3000, (1 << 31) + 3000), (n - 5000, n)]
    for dist in ("gaussian", "rademacher"):
        z = perturbation(key, n, dist=dist, device="cuda")
        words = S.key_words(key, S.DISTS[dist])
        for lo, hi in spans:
            expected = np.empty(hi - lo, dtype=np.float32)
            _cpu.perturb_span(expected, lo, S.DISTS[dist], *words, np.float32(1.0), True)
            assert torch.equal(z[lo:hi].cpu(), torch.from_numpy(expected)), (dist, lo)
        del z
    src = torch.empty(n, dtype=torch.float32, device="cuda").normal_(generator=torch.Generator("cuda").manual_seed(0))
    dst = torch.empty(n, dtype=torch.bfloat16, device="cuda")
    stochastic_round_(src, dst, key)
    words = S.key_words(key, S.TAG_ROUND)
    for lo, hi in spans:
        expected = np.empty(hi - lo, dtype=np.int16)
        _cpu.round_span(src[lo:hi].cpu().view(torch.int32).numpy(), expected, lo, *words)
        assert torch.equal(dst[lo:hi].cpu().view(torch.int16), torch.from_numpy(expected)), lo

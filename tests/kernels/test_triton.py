"""Triton kernels: checked on CPU under TRITON_INTERPRET=1, and on CUDA where a GPU is present."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from ferrytune.kernels import PerturbKey, add_perturbation_, perturbation, stochastic_round_
from ferrytune.kernels import _reference as R

REPO = Path(__file__).resolve().parents[2]
HAS_TRITON = importlib.util.find_spec("triton") is not None

# Runs in a fresh interpreter: TRITON_INTERPRET must be set before triton is imported.
_INTERPRETER_CHECK = textwrap.dedent(
    """
    import torch
    from ferrytune.kernels import PerturbKey, _reference as R, _stream as S, _triton
    key = PerturbKey(seed=2**40 + 3, step=77, index=2, param_id=5)
    for code, dist in ((0, "gaussian"), (1, "rademacher")):
        words = S.key_words(key, code)
        for n in (1, 1024, 2500):
            z = torch.full((n,), float("nan"))
            _triton.perturb_(z, code, words, 1.0, True)
            assert torch.equal(z, R.perturbation_span(key, 0, n, dist=dist)), (dist, n)
        t = torch.randn(2500)
        expected = t.clone()
        R.add_perturbation_(expected, key, alpha=-0.37, dist=dist)
        _triton.perturb_(t, code, words, torch.tensor(-0.37).item(), False)
        assert torch.equal(t, expected), dist
    src = torch.randn(2100) * 7
    src[:3] = torch.tensor([float("inf"), float("nan"), -float("inf")])
    got, expected = torch.empty(2100, dtype=torch.bfloat16), torch.empty(2100, dtype=torch.bfloat16)
    _triton.round_(src, got, S.key_words(key, S.TAG_ROUND))
    R.stochastic_round_(src, expected, key)
    assert torch.equal(got.view(torch.int16), expected.view(torch.int16))
    print("TRITON-INTERPRETER-OK")
    """
)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_triton_kernels_match_reference_in_interpreter():
    env = {
        **os.environ,
        "TRITON_INTERPRET": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    out = subprocess.run(
        [sys.executable, "-c", _INTERPRETER_CHECK], check=False, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "TRITON-INTERPRETER-OK" in out.stdout


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu_stream():
    key = PerturbKey(seed=11, step=2, index=0, param_id=9)
    for dist in ("gaussian", "rademacher"):
        n = (1 << 20) + 17
        assert torch.equal(perturbation(key, n, dist=dist, device="cuda").cpu(), perturbation(key, n, dist=dist))
        t = torch.randn(n)
        t_cuda = t.cuda()
        add_perturbation_(t, key, alpha=1e-3, dist=dist)
        add_perturbation_(t_cuda, key, alpha=1e-3, dist=dist)
        assert torch.equal(t_cuda.cpu(), t)
        view = torch.zeros(3 * n, device="cuda")[n : 2 * n]
        add_perturbation_(view, key, alpha=1.0, dist=dist)
        assert torch.equal(view.cpu(), perturbation(key, n, dist=dist))
    src = torch.randn(100_000)
    dst_cpu = torch.empty(100_000, dtype=torch.bfloat16)
    dst_cuda = dst_cpu.cuda()
    stochastic_round_(src, dst_cpu, key)
    stochastic_round_(src.cuda(), dst_cuda, key)
    assert torch.equal(dst_cuda.cpu().view(torch.int16), dst_cpu.view(torch.int16))
    expected = torch.empty(100_000, dtype=torch.bfloat16, device="cuda")
    R.stochastic_round_(src.cuda(), expected, key)  # the device fallback path agrees too
    assert torch.equal(expected.cpu().view(torch.int16), dst_cpu.view(torch.int16))

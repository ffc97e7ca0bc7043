"""Triton kernels: checked on CPU under TRITON_INTERPRET=1, and on CUDA where a GPU is present."""

from __future__ import annotations

import importlib.util
import json
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

KERNELS = ["gaussian z", "gaussian add", "rademacher z", "rademacher add", "stochastic round"]

# Runs in a fresh interpreter: TRITON_INTERPRET must be set before triton is imported. Each kernel is
# checked against the torch reference AND the numba kernels on keys near 2**31, 2**32, 2**63 and 2**64,
# odd sizes, and views at odd offsets into larger buffers; one JSON line per kernel says how it went.
_INTERPRETER_CHECK = textwrap.dedent(
    """
    import json, os, traceback
    import numpy as np
    import torch
    import triton
    from ferrytune.kernels import PerturbKey, _cpu, _reference as R, _stream as S, _triton

    KEYS = [PerturbKey(seed=2**40 + 3, step=77, index=2, param_id=5),
            PerturbKey(seed=2**31 - 1, step=2**31, index=2**30 - 1, param_id=2**31 + 1),
            PerturbKey(seed=2**32 + 2**31, step=2**32 - 1, index=0, param_id=2**32 - 1),
            PerturbKey(seed=2**63 - 1, step=1, index=1, param_id=0),
            PerturbKey(seed=2**63 + 12345, step=3, index=7, param_id=2**31),
            PerturbKey(seed=2**64 - 1, step=0, index=0, param_id=1)]
    SIZES = [1, 3, 1023, 1025, 2500, 4097]
    TRITON_DIR = os.path.dirname(triton.__file__)

    def first_diff(a, b):
        i = int((a != b).nonzero()[0]) if a.numel() == b.numel() else -1
        return f"first difference at element {i}"

    def gaussian_or_rademacher(dist, store):
        code = S.DISTS[dist]
        for key in KEYS:
            words = S.key_words(key, code)
            for n in SIZES:
                alpha = torch.tensor(-0.37).item()
                base = torch.randn(n + 11, generator=torch.Generator().manual_seed(n))
                ref = base[5:5 + n].clone()
                if store:
                    ref = R.perturbation_span(key, 0, n, dist=dist)
                else:
                    R.add_perturbation_(ref, key, alpha=alpha, dist=dist)
                nb = base[5:5 + n].clone().numpy()
                _cpu.perturb_span(nb, 0, code, *words, np.float32(alpha if not store else 1.0), store)
                got = base.clone()
                view = got[5:5 + n]  # a view at an odd offset: element 0 of the view = stream element 0
                _triton.perturb_(view, code, words, alpha if not store else 1.0, store)
                assert torch.equal(view, ref), (str(key), n, "triton != reference", first_diff(view, ref))
                assert torch.equal(torch.from_numpy(nb), ref), (str(key), n, "numba != reference")
                assert torch.equal(got[:5], base[:5]) and torch.equal(got[5 + n:], base[5 + n:]), "wrote outside"

    def stochastic_round():
        special = torch.tensor([float("inf"), -float("inf"), float("nan"), -float("nan"), 0.0, -0.0,
                                1e-40, -1e-40, 1.4e-45, -1.4e-45, 1.1754942e-38, 3.4028235e38, -3.4028235e38,
                                3.3961e38, 1.0, -1.0 - 2**-20])
        bits = special.view(torch.int32).clone()
        payload = torch.tensor([0x7F800001, 0x7FC00001, 0xFF800123 - 2**32, 0x7FFFFFFF], dtype=torch.int32)
        for key in KEYS:
            words = S.key_words(key, S.TAG_ROUND)
            for n in SIZES:
                src_all = torch.randn(n + 9, generator=torch.Generator().manual_seed(n)) * 7
                src_all[4:4 + min(n, 16)] = special[:min(n, 16)]
                if n > 20:
                    src_all.view(torch.int32)[20:24] = payload
                src = src_all[4:4 + n]
                ref = torch.empty(n, dtype=torch.bfloat16)
                R.stochastic_round_(src.clone(), ref, key)
                nb = torch.empty(n, dtype=torch.bfloat16)
                _cpu.round_span(src.clone().view(torch.int32).numpy(), nb.view(torch.int16).numpy(), 0, *words)
                out_all = torch.zeros(n + 3, dtype=torch.bfloat16)
                out = out_all[1:1 + n]
                _triton.round_(src, out, words)
                assert torch.equal(out.view(torch.int16), ref.view(torch.int16)), (str(key), n, "triton != reference")
                assert torch.equal(nb.view(torch.int16), ref.view(torch.int16)), (str(key), n, "numba != reference")
                assert not out_all[0].item() and not out_all[-2:].any(), "wrote outside"
                nan_in = torch.isnan(src)
                assert torch.isnan(out[nan_in].float()).all(), "a NaN did not stay a NaN"

    CHECKS = {"gaussian z": lambda: gaussian_or_rademacher("gaussian", True),
              "gaussian add": lambda: gaussian_or_rademacher("gaussian", False),
              "rademacher z": lambda: gaussian_or_rademacher("rademacher", True),
              "rademacher add": lambda: gaussian_or_rademacher("rademacher", False),
              "stochastic round": stochastic_round}
    for name, check in CHECKS.items():
        try:
            check()
            print(json.dumps({"kernel": name, "status": "ok"}))
        except AssertionError as exc:
            print(json.dumps({"kernel": name, "status": "mismatch", "detail": repr(exc.args)}))
        except Exception as exc:
            tb = traceback.extract_tb(exc.__traceback__)
            inside = tb and tb[-1].filename.startswith(TRITON_DIR)
            print(json.dumps({"kernel": name, "status": "unsupported" if inside else "error",
                              "detail": f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1:]}"
                                        + ("" if inside else " " + traceback.format_exc()[-1500:])}))
    """
)


@pytest.fixture(scope="module")
def interpreter_results():
    if not HAS_TRITON:
        if os.environ.get("FERRYTUNE_REQUIRE_TRITON") == "1":  # CI: these tests must run
            pytest.fail("FERRYTUNE_REQUIRE_TRITON=1 but triton is not installed")
        pytest.skip("triton is not installed (pip install triton; CI installs it)")
    env = {
        **os.environ,
        "TRITON_INTERPRET": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    out = subprocess.run(
        [sys.executable, "-c", _INTERPRETER_CHECK], check=False, env=env, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    results = {}
    for line in out.stdout.splitlines():
        if line.startswith("{"):
            rec = json.loads(line)
            results[rec["kernel"]] = rec
    return results


@pytest.mark.parametrize("kernel", KERNELS)
def test_triton_kernel_matches_reference_and_numba_in_interpreter(interpreter_results, kernel):
    rec = interpreter_results.get(kernel)
    assert rec is not None, f"the interpreter check did not report {kernel}"
    if rec["status"] == "unsupported":
        pytest.skip(f"the Triton interpreter cannot run the {kernel} kernel: {rec['detail']}")
    assert rec["status"] == "ok", rec


def test_a_triton_compile_error_falls_back_to_the_reference(caplog):
    """The fallback itself; a real compile error needs CUDA (see test_triton_cuda.py)."""
    pytest.importorskip("triton")
    import ast

    from triton.compiler.errors import CompilationError

    from ferrytune.kernels import _api

    key = PerturbKey(seed=1, step=2, index=0, param_id=3)
    t = torch.randn(3000)
    expected = t.clone()
    R.add_perturbation_(expected, key, alpha=0.5)
    saved = (_api._triton_module, _api._triton_failed)

    def launch():
        raise CompilationError("def k(): ...", ast.Pass(), "unsupported operand")

    try:
        with caplog.at_level("WARNING", logger="ferrytune.kernels._api"):
            _api._triton_or_reference("gaussian add", t, launch, lambda: R.add_perturbation_(t, key, alpha=0.5))
        assert torch.equal(t, expected)
        assert _api._triton_failed and _api._triton_module is None  # later calls go straight to the reference
        assert any("failed to compile (CompilationError: unsupported operand)" in r.getMessage()
                   for r in caplog.records)
        # after a specialisation launched once, an error is a runtime fault: it propagates
        _api._triton_launched.add(("x", t.device, t.numel() % 16 == 0, t.data_ptr() % 16 == 0))

        def fault():
            raise RuntimeError("device-side assert")

        with pytest.raises(RuntimeError, match="device-side assert"):
            _api._triton_or_reference("x", t, fault, lambda: None)
    finally:
        _api._triton_module, _api._triton_failed = saved
        _api._triton_launched.clear()


@pytest.mark.cuda
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

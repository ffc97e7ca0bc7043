"""add_perturbation_ / perturbation: the compiled CPU kernel against the torch reference, and z's properties."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ferrytune.kernels
from ferrytune.kernels import PerturbKey, _api, add_perturbation_, perturbation, set_num_threads
from ferrytune.kernels import _reference as R

KEY = PerturbKey(seed=2**40 + 17, step=123, index=1, param_id=7)
DISTS = ["gaussian", "rademacher"]
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _restore_threads():
    yield
    set_num_threads(None)


@pytest.fixture
def small_spans(monkeypatch):
    """Let tiny tensors be split across threads, so chunking is exercised cheaply."""
    monkeypatch.setattr(_api, "MIN_SPAN_NUMEL", 1)


def test_cpu_backend_is_compiled():
    assert _api.cpu_backend() == "numba"


@pytest.mark.parametrize("dist", DISTS)
@pytest.mark.parametrize("numel", [1, 255, 1024, 1500, 70_001])
def test_matches_reference_bitwise(dist, numel):
    z = perturbation(KEY, numel, dist=dist)
    assert torch.equal(z, R.perturbation_span(KEY, 0, numel, dist=dist))


@pytest.mark.parametrize("dist", DISTS)
def test_matches_reference_bitwise_large(dist):
    n = (1 << 20) + 333
    assert torch.equal(perturbation(KEY, n, dist=dist), R.perturbation_span(KEY, 0, n, dist=dist))


@pytest.mark.parametrize("dist", DISTS)
def test_add_matches_reference_and_is_unfused(dist):
    t = torch.randn(5000)
    expected = t.clone()
    R.add_perturbation_(expected, KEY, alpha=1e-3, dist=dist)
    add_perturbation_(t, KEY, alpha=1e-3, dist=dist)
    assert torch.equal(t, expected)
    # fl(t + fl(alpha * z)): the product is rounded first, no fused multiply-add
    t0 = torch.randn(5000)
    t1 = t0.clone()
    add_perturbation_(t1, KEY, alpha=0.3, dist=dist)
    assert torch.equal(t1, t0 + perturbation(KEY, 5000, dist=dist) * torch.tensor(0.3).item())


@pytest.mark.parametrize("dist", DISTS)
@pytest.mark.parametrize("num_threads", [1, 2, 3, 5])
def test_threads_and_chunks_do_not_change_bits(dist, num_threads, small_spans):
    n = 20 * 1024 + 77
    set_num_threads(1)
    whole = perturbation(KEY, n, dist=dist)
    set_num_threads(num_threads)
    assert torch.equal(perturbation(KEY, n, dist=dist), whole)
    # arbitrary unaligned spans of the stream, as a second process or device would compute them
    for lo, hi in [(0, 1), (5, 1029), (1023, 4097), (3000, n)]:
        assert torch.equal(R.perturbation_span(KEY, lo, hi - lo, dist=dist), whole[lo:hi])


@pytest.mark.parametrize("dist", DISTS)
def test_view_into_flat_buffer_gets_standalone_z(dist):
    flat = torch.randn(10_000)
    before = flat.clone()
    view = flat[1234 : 1234 + 3000].view(30, 100)
    add_perturbation_(view, KEY, alpha=0.5, dist=dist)
    standalone = before[1234 : 1234 + 3000].clone().view(30, 100)
    add_perturbation_(standalone, KEY, alpha=0.5, dist=dist)
    assert torch.equal(view, standalone)
    assert torch.equal(flat[:1234], before[:1234])
    assert torch.equal(flat[4234:], before[4234:])


def test_shape_does_not_matter_only_numel():
    assert torch.equal(perturbation(KEY, (6, 7, 8)).view(-1), perturbation(KEY, 336))


def test_mezo_sequence_restores_up_to_rounding():
    """+eps, -2eps, +eps (MeZO's in-place loop) returns to the start within float32 rounding."""
    w = torch.randn(4096)
    start = w.clone()
    for a in (1e-3, -2e-3, 1e-3):
        add_perturbation_(w, KEY, alpha=a)
    assert torch.allclose(w, start, rtol=0, atol=1e-6)
    assert not torch.equal(perturbation(KEY, 4096), perturbation(PerturbKey(0, 0, 0, 0), 4096))


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(TypeError, match="float32"):
        add_perturbation_(torch.zeros(4, dtype=torch.bfloat16), KEY, alpha=1.0)
    with pytest.raises(TypeError, match="float32"):
        add_perturbation_(torch.zeros(4, dtype=torch.float64), KEY, alpha=1.0)
    with pytest.raises(ValueError, match="contiguous"):
        add_perturbation_(torch.zeros(4, 4).t(), KEY, alpha=1.0)
    with pytest.raises(ValueError, match="dist"):
        add_perturbation_(torch.zeros(4), KEY, alpha=1.0, dist="normal")
    with pytest.raises(ValueError, match="num_threads"):
        set_num_threads(0)
    add_perturbation_(torch.zeros(0), KEY, alpha=1.0)  # empty: nothing to do


def test_parameter_with_grad_is_perturbed_in_place():
    p = torch.nn.Parameter(torch.zeros(3000))
    add_perturbation_(p, KEY, alpha=2.0)
    assert torch.equal(p.detach(), perturbation(KEY, 3000) * 2.0)


def test_gaussian_statistics():
    z = perturbation(KEY, 1 << 20).double()
    n = z.numel()
    assert abs(z.mean().item()) < 5 / n**0.5
    assert abs(z.var().item() - 1) < 0.01
    assert abs(((z - z.mean()) ** 4).mean().item() / z.var().item() ** 2 - 3) < 0.05  # kurtosis
    normal = torch.distributions.Normal(0.0, 1.0)
    for x in (-2.0, -1.0, 0.0, 0.5, 1.5):
        assert abs((z < x).double().mean().item() - normal.cdf(torch.tensor(x)).item()) < 3e-3
    # the two members of a Box-Muller pair (lanes 0 and 1 of a group) must be independent, not just uncorrelated
    g = z.view(-1, 4, 256)
    assert abs(_corr(g[:, 0] ** 2, g[:, 1] ** 2)) < 0.01
    assert abs(_corr(g[:, 0], g[:, 1])) < 0.01
    assert abs(_corr(z[1:], z[:-1])) < 0.01


def test_rademacher_statistics():
    z = perturbation(KEY, 1 << 20, dist="rademacher")
    assert set(z.unique().tolist()) == {-1.0, 1.0}
    assert abs(z.double().mean().item()) < 5 / z.numel() ** 0.5
    assert abs(_corr(z[1:].double(), z[:-1].double())) < 0.01


@pytest.mark.parametrize("dist", DISTS)
def test_keys_give_uncorrelated_z(dist):
    n = 1 << 18
    base = perturbation(KEY, n, dist=dist).double()
    others = [
        PerturbKey(KEY.seed + 1, KEY.step, KEY.index, KEY.param_id),
        PerturbKey(KEY.seed + (1 << 32), KEY.step, KEY.index, KEY.param_id),
        PerturbKey(KEY.seed, KEY.step + 1, KEY.index, KEY.param_id),
        PerturbKey(KEY.seed, KEY.step, KEY.index + 1, KEY.param_id),
        PerturbKey(KEY.seed, KEY.step, KEY.index, KEY.param_id + 1),
    ]
    for other in others:
        assert abs(_corr(base, perturbation(other, n, dist=dist).double())) < 6 / n**0.5, other


def test_reference_fallback_when_numba_is_missing(monkeypatch, caplog):
    """With numba unimportable, the reference runs (same bits) and one warning is logged."""
    monkeypatch.setitem(sys.modules, "numba", None)  # makes `import numba` raise ImportError
    monkeypatch.delitem(sys.modules, "ferrytune.kernels._cpu", raising=False)
    monkeypatch.delattr(ferrytune.kernels, "_cpu", raising=False)  # `from pkg import mod` checks this first
    monkeypatch.setattr(_api, "_cpu_module", None)
    monkeypatch.setattr(_api, "_cpu_failed", False)
    t = torch.randn(3000)
    expected = t.clone()
    R.add_perturbation_(expected, KEY, alpha=0.25)
    with caplog.at_level("WARNING", logger="ferrytune.kernels._api"):
        add_perturbation_(t, KEY, alpha=0.25)
        perturbation(KEY, 10)
    assert torch.equal(t, expected)
    assert _api.cpu_backend() == "reference"
    assert len([r for r in caplog.records if "numba" in r.getMessage()]) == 1


def test_another_process_regenerates_the_same_z():
    n = 100_003
    code = (
        "import hashlib, sys, torch; from ferrytune.kernels import PerturbKey, perturbation, set_num_threads;"
        "assert 'numba' not in sys.modules, 'importing ferrytune.kernels must stay cheap';"
        "set_num_threads(1);"
        f"z = perturbation(PerturbKey({KEY.seed}, {KEY.step}, {KEY.index}, {KEY.param_id}), {n});"
        "print(hashlib.sha256(z.numpy().tobytes()).hexdigest())"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    set_num_threads(2)
    mine = hashlib.sha256(perturbation(KEY, n).numpy().tobytes()).hexdigest()
    assert out.stdout.strip() == mine


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a = a - a.mean()
    b = b - b.mean()
    return ((a * b).mean() / (a.std() * b.std())).item()


def _child(queue) -> None:
    # Only ferrytune's kernels run in the child, and the values go back as bytes: a torch reduction
    # (``.sum()``) after a fork deadlocks in libgomp when the parent's OpenMP pool was up (a torch
    # limitation), and a float sum would depend on the thread count anyway.
    set_num_threads(2)
    queue.put(perturbation(KEY, 50_000).numpy().tobytes())


def test_threads_work_after_fork(small_spans):
    import multiprocessing

    set_num_threads(2)
    expected = perturbation(KEY, 50_000).numpy().tobytes()  # starts the pool in the parent
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(queue,))
    proc.start()
    got = queue.get(timeout=60)  # would hang if the child reused the parent's (threadless) pool
    proc.join(timeout=60)
    assert got == expected


def test_concurrent_callers_from_python_threads(small_spans):
    """The engine's prefetch and compute threads may both perturb at once."""
    from concurrent.futures import ThreadPoolExecutor

    set_num_threads(2)
    keys = [PerturbKey(1, step, 0, 0) for step in range(8)]
    expected = [R.perturbation_span(k, 0, 9000) for k in keys]
    with ThreadPoolExecutor(4) as callers:
        got = list(callers.map(lambda k: perturbation(k, 9000), keys))
    assert all(torch.equal(g, e) for g, e in zip(got, expected))


def test_bit_identical_to_mezo_in_place_loop():
    """MeZO's perturb_parameters: param = param + scaling_factor * z * eps, scaling_factor in (1, -2, 1)."""
    eps = 1e-3
    z = perturbation(KEY, 8192)
    ours = torch.randn(8192)
    mezo = ours.clone()
    for scale in (1, -2, 1):
        mezo = mezo + scale * z * eps
        add_perturbation_(ours, KEY, alpha=scale * eps)
        assert torch.equal(ours, mezo)

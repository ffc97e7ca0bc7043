"""Plain-torch reference of the perturbation stream (see ``_stream`` for its definition).

Slow but obviously correct: every element's Philox counter is computed from its
index with int64 tensor ops and the Box-Muller transform is spelled out op by
op in float32. The compiled kernels (``_cpu``, ``_triton``) are tested to equal
this bit for bit. It runs on any device, so it is also the CUDA fallback when
Triton is missing. Work is done in spans of ``_SPAN`` elements so its int64
temporaries stay bounded (about 30 x 8 bytes per element of a span).

Philox words are held as int64 in [0, 2**32): products of two such words
overflow int64, but two's-complement wrapping keeps the low 64 bits exact, and
every shifted value is masked back to 32 bits.
"""

from __future__ import annotations

import torch

from ferrytune.kernels import _stream as S

__all__ = [
    "add_perturbation_",
    "perturbation_span",
    "philox4x32",
    "stochastic_round_",
]

_SPAN = 1 << 20  # elements per chunk of work
_M = S.MASK32


def philox4x32(
    c0: torch.Tensor, c1: int, c2: int, c3: int, k0: int, k1: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox4x32-10 of counters (c0[j], c1, c2, c3) under key (k0, k1); int64 words in [0, 2**32)."""
    x0 = c0
    x1 = torch.full_like(c0, c1)
    x2 = torch.full_like(c0, c2)
    x3 = torch.full_like(c0, c3)
    for _ in range(S.PHILOX_ROUNDS):
        p0 = x0 * S.PHILOX_M0  # (n,) int64, wraps; low 64 bits exact
        p1 = x2 * S.PHILOX_M1
        n0 = ((p1 >> 32) & _M) ^ x1 ^ k0
        n2 = ((p0 >> 32) & _M) ^ x3 ^ k1
        x1 = p1 & _M
        x3 = p0 & _M
        x0, x2 = n0, n2
        k0 = (k0 + S.PHILOX_W0) & _M
        k1 = (k1 + S.PHILOX_W1) & _M
    return x0, x1, x2, x3


def _horner(x: torch.Tensor, coeffs: tuple[float, ...]) -> torch.Tensor:
    """coeffs[0] + x * (coeffs[1] + x * (...)), one float32 op at a time."""
    p = torch.full_like(x, coeffs[-1])
    for c in coeffs[-2::-1]:
        p = p * x + c
    return p


def _sqrt_rn(x: torch.Tensor) -> torch.Tensor:
    """Correctly rounded float32 sqrt of x >= 0.

    torch's CPU float32 sqrt is not always correctly rounded (1 ulp off on about
    0.6% of this stream's inputs in torch 2.13), while ``vsqrtps`` (numba) and ``sqrt.rn``
    (Triton) are. So take torch's value y and move it to a neighbour when x lies
    beyond the midpoint between them. The test is exact: midpoints of float32
    values have 25 significant bits, so their squares are exact in float64.
    """
    y = torch.sqrt(x)
    xd = x.double()
    up = torch.nextafter(y, torch.full_like(y, float("inf")))
    down = torch.nextafter(y, torch.zeros_like(y))
    mid_up = (y.double() + up.double()) * 0.5
    mid_down = (y.double() + down.double()) * 0.5
    y = torch.where(xd > mid_up * mid_up, up, y)
    return torch.where(xd < mid_down * mid_down, down, y)


def _neg_log_uniform(a: torch.Tensor) -> torch.Tensor:
    """-ln(u) for u = ((a >> 8) + 1) * 2**-24, in float32 without calling a library log."""
    k = ((a >> 8) + 1).to(torch.int32)  # in [1, 2**24]: exact in float32
    bits = k.to(torch.float32).view(torch.int32)
    e = (bits >> 23) - 127  # k = m * 2**e, m in [1, 2)
    m = ((bits & 0x7FFFFF) | 0x3F800000).view(torch.float32)
    big = m > S.SQRT2_F32  # move m into [sqrt(1/2), sqrt(2)] so log1p's argument is small
    m = torch.where(big, m * 0.5, m)
    e = e + big.to(torch.int32)
    x = m - 1.0
    x2 = x * x
    log_m = x + (x2 * -0.5 + x2 * x * _horner(x, S.LOG_P))
    # -ln(u) = (24 - e) ln 2 - ln m: folding the 2**-24 into the exponent avoids cancellation near u = 1
    return (24 - e).to(torch.float32) * S.LN2_F32 - log_m


def _box_muller(a: torch.Tensor, b: torch.Tensor, odd: torch.Tensor) -> torch.Tensor:
    """Element of the Box-Muller pair made from words (a, b): the cos-like one, or the sin-like one where odd."""
    rr = _sqrt_rn(_neg_log_uniform(a))  # r / sqrt(2)
    j = (((b >> 8) & 0xFFFFFF) - 0x800000).to(torch.int32).to(torch.float32)
    phi = (j + 0.5) * S.ANGLE_STEP_F32  # in (-pi/4, pi/4)
    q = phi * phi
    sin = phi + phi * q * _horner(q, S.SIN_S)
    cos = 1.0 + q * _horner(q, S.COS_C)
    sign_bit = torch.where(odd, (b >> 1) & 1, b & 1)
    sign = (1 - 2 * sign_bit).to(torch.float32)
    return (rr * torch.where(odd, cos + sin, cos - sin)) * sign


def _gaussian(i: torch.Tensor, words: tuple[int, int, int, int, int]) -> torch.Tensor:
    """Gaussian z at element indices i (int64); planar layout of ``_stream``."""
    r = i & (S.GROUP - 1)
    lane = r >> 8
    block = ((i >> 10) << 8) | (r & (S.GAUSS_W - 1))
    x0, x1, x2, x3 = philox4x32(block, *words)
    first_pair = lane < 2
    a = torch.where(first_pair, x0, x2)
    b = torch.where(first_pair, x1, x3)
    return _box_muller(a, b, (lane & 1) == 1)


def _select_word(words4: tuple[torch.Tensor, ...], w: torch.Tensor) -> torch.Tensor:
    x0, x1, x2, x3 = words4
    return torch.where(w == 0, x0, torch.where(w == 1, x1, torch.where(w == 2, x2, x3)))


def _rademacher(i: torch.Tensor, words: tuple[int, int, int, int, int]) -> torch.Tensor:
    """Rademacher z at element indices i: one Philox bit per element."""
    x = _select_word(philox4x32(i >> 7, *words), (i >> 5) & 3)
    return (1 - 2 * ((x >> (i & 31)) & 1)).to(torch.float32)


def perturbation_span(
    key: S.PerturbKey, start: int, count: int, *, dist: str = "gaussian", device="cpu"
) -> torch.Tensor:
    """z for elements [start, start + count) of the stream of ``key``, as a flat float32 tensor."""
    code = S.dist_code(dist)
    S.check_numel(start + count)
    words = S.key_words(key, code)
    out = torch.empty(count, dtype=torch.float32, device=device)
    make = _gaussian if code == S.DISTS["gaussian"] else _rademacher
    for lo in range(0, count, _SPAN):
        hi = min(count, lo + _SPAN)
        i = torch.arange(start + lo, start + hi, dtype=torch.int64, device=device)
        out[lo:hi] = make(i, words)
    return out


def add_perturbation_(t: torch.Tensor, key: S.PerturbKey, *, alpha: float, dist: str = "gaussian") -> None:
    """t += fl32(alpha) * z, the product rounded to float32 before the add (no fused multiply-add)."""
    flat = t.view(-1)
    alpha32 = torch.tensor(alpha, dtype=torch.float32).item()
    for lo in range(0, flat.numel(), _SPAN):
        hi = min(flat.numel(), lo + _SPAN)
        z = perturbation_span(key, lo, hi - lo, dist=dist, device=t.device)
        flat[lo:hi] += z * alpha32


def _round_bits(i: torch.Tensor, words: tuple[int, int, int, int, int]) -> torch.Tensor:
    """16 random bits per element index (int64 in [0, 2**16))."""
    r = i & (S.GROUP - 1)
    lane = r >> 7
    block = ((i >> 10) << 7) | (r & (S.ROUND_W - 1))
    x = _select_word(philox4x32(block, *words), lane >> 1)
    return (x >> ((lane & 1) * 16)) & 0xFFFF


def stochastic_round_(src: torch.Tensor, dst: torch.Tensor, key: S.PerturbKey) -> None:
    """dst (bfloat16) <- float32 src rounded up with probability (dropped low 16 bits) / 2**16.

    Adding 16 uniform bits to the float32 pattern and truncating carries into the
    bf16 part exactly with that probability, so E[dst] = src for every finite src
    (values within one bf16 step of the largest float round to inf with the
    matching probability). Inf stays inf; NaN stays NaN (quiet bit set).
    """
    words = S.key_words(key, S.TAG_ROUND)
    src_bits = src.reshape(-1).view(torch.int32)
    dst_bits = dst.view(-1).view(torch.int16)
    n = src_bits.numel()
    for lo in range(0, n, _SPAN):
        hi = min(n, lo + _SPAN)
        i = torch.arange(lo, hi, dtype=torch.int64, device=src.device)
        bits = src_bits[lo:hi].to(torch.int64) & _M
        special = (bits & 0x7F800000) == 0x7F800000
        is_nan = special & ((bits & 0x7FFFFF) != 0)
        out = torch.where(special, bits >> 16, (bits + _round_bits(i, words)) >> 16)
        out = torch.where(is_nan, out | 0x40, out)
        out = torch.where(out >= 0x8000, out - 0x10000, out)  # as signed int16
        dst_bits[lo:hi] = out.to(torch.int16)

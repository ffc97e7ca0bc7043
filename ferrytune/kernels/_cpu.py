"""CPU kernels: the perturbation stream of ``_stream`` compiled with numba.

Why numba: it compiles on first call (5-10 s for both kernels on two busy
cores) and caches the machine code next to this file (``cache=True``; a later
process loads it in about 1 s), where a C++ extension through
``torch.utils.cpp_extension`` costs about a minute of JIT compile here and
needs a compiler on every machine. The
loops below are written so LLVM vectorises them: Philox on int64 lanes (the
32x32->64 products become ``vpmuludq``), the transform on float32 lanes,
and the planar Gaussian layout keeps every store contiguous.

Determinism: ``fastmath=False`` keeps LLVM from reassociating or contracting
a*b+c into a fused multiply-add, so each float32 operation rounds exactly as
the torch reference's does. Every element depends only on (key, index), so
threads and chunk boundaries cannot change a bit.

Threads: the kernels release the GIL (``nogil=True``) and ``_api`` runs them on
spans of whole groups from a Python thread pool, not numba's ``parallel=True``:
its "workqueue" layer (the fallback without TBB or a usable OpenMP) aborts the
process when two Python threads launch parallel kernels at once, and the
engine's prefetch and compute threads may both call in.

Importing this module imports numba (~0.5 s) but compiles nothing.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit
from numba.core import types
from numba.extending import intrinsic

from ferrytune.kernels import _stream as S

__all__ = ["perturb_span", "round_span"]

# Typed numpy scalars: numba freezes globals as constants of their own type, so these keep
# the arithmetic in float32 / int64 (a bare Python float would promote float32 math to float64).
_F = np.float32
_I = np.int64
_M32 = _I(S.MASK32)
_M0, _M1 = _I(S.PHILOX_M0), _I(S.PHILOX_M1)
_W0, _W1 = _I(S.PHILOX_W0), _I(S.PHILOX_W1)
_L0, _L1, _L2, _L3, _L4, _L5, _L6 = (_F(c) for c in S.LOG_P)
_S0, _S1, _S2 = (_F(c) for c in S.SIN_S)
_C0, _C1, _C2, _C3 = (_F(c) for c in S.COS_C)
_SQRT2 = _F(S.SQRT2_F32)
_LN2 = _F(S.LN2_F32)
_ANGLE = _F(S.ANGLE_STEP_F32)
_ONE, _HALF, _NHALF, _TWO = _F(1.0), _F(0.5), _F(-0.5), _F(2.0)
_GROUP = S.GROUP
_GW = S.GAUSS_W
_RW = S.ROUND_W


@intrinsic
def _f32_bits(typingctx, x):
    """Bit pattern of a float32 as int32 (an LLVM bitcast; numba has no scalar view)."""
    sig = types.int32(types.float32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return sig, codegen


@intrinsic
def _bits_f32(typingctx, x):
    """float32 with the given int32 bit pattern."""
    sig = types.float32(types.int32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


@njit(inline="always")
def _philox(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 on int64 lanes holding 32-bit words (see ``_reference.philox4x32``)."""
    for _ in range(S.PHILOX_ROUNDS):
        p0 = _M0 * c0
        p1 = _M1 * c2
        n0 = ((p1 >> 32) & _M32) ^ c1 ^ k0
        n2 = ((p0 >> 32) & _M32) ^ c3 ^ k1
        c1 = p1 & _M32
        c3 = p0 & _M32
        c0 = n0
        c2 = n2
        k0 = (k0 + _W0) & _M32
        k1 = (k1 + _W1) & _M32
    return c0, c1, c2, c3


@njit(inline="always")
def _box_muller(a, b):
    """The Gaussian pair of words (a, b); op-for-op the same as ``_reference._box_muller``."""
    k = np.int32((a >> 8) + 1)
    bits = _f32_bits(_F(k))
    e = np.int32((bits >> 23) - 127)
    m = _bits_f32(np.int32((bits & 0x7FFFFF) | 0x3F800000))
    big = m > _SQRT2
    m = m * _HALF if big else m
    e = np.int32(e + 1) if big else e
    x = m - _ONE
    x2 = x * x
    p = ((((((_L6 * x + _L5) * x + _L4) * x + _L3) * x + _L2) * x + _L1) * x) + _L0
    log_m = x + (x2 * _NHALF + x2 * x * p)
    rr = np.sqrt(_F(np.int32(24 - e)) * _LN2 - log_m)
    j = np.int32(((b >> 8) & 0xFFFFFF) - 0x800000)
    phi = (_F(j) + _HALF) * _ANGLE
    q = phi * phi
    sin = phi + phi * q * (((_S2 * q) + _S1) * q + _S0)
    cos = _ONE + q * ((((_C3 * q) + _C2) * q + _C1) * q + _C0)
    s0 = _ONE - _TWO * _F(np.int32(b & 1))
    s1 = _ONE - _TWO * _F(np.int32((b >> 1) & 1))
    return (rr * (cos - sin)) * s0, (rr * (cos + sin)) * s1


@njit(inline="always")
def _gaussian_group(tv, g, c1, c2, c3, k0, k1, alpha, store, x0s, x1s, x2s, x3s):
    """tv[r] (+)= alpha * z[1024 g + r] for r < 1024: one whole Gaussian group.

    tv is a 1024-element view, indexed from 0 by loop counters so that numba can
    drop its negative-index wraparound and LLVM vectorises the loops. x*s are
    256-element uint32 scratch rows for the Philox pass; the transform passes then
    run on float32 lanes with contiguous loads and stores.
    """
    b0 = _I(g) * _GW
    for j in range(_GW):  # Philox pass
        x0, x1, x2, x3 = _philox(b0 + j, c1, c2, c3, k0, k1)
        x0s[j] = x0
        x1s[j] = x1
        x2s[j] = x2
        x3s[j] = x3
    _box_muller_lanes(tv[: 2 * _GW], x0s, x1s, alpha, store)
    _box_muller_lanes(tv[2 * _GW :], x2s, x3s, alpha, store)


@njit(inline="always")
def _box_muller_lanes(tv, xas, xbs, alpha, store):
    """Lanes (tv[:256], tv[256:512]) from Philox words (xas, xbs)."""
    if store:
        for j in range(_GW):
            za, zb = _box_muller(_I(xas[j]), _I(xbs[j]))
            tv[j] = za
            tv[_GW + j] = zb
    else:
        for j in range(_GW):
            za, zb = _box_muller(_I(xas[j]), _I(xbs[j]))
            tv[j] = tv[j] + alpha * za
            tv[_GW + j] = tv[_GW + j] + alpha * zb


@njit(inline="always")
def _rademacher_group(tv, g, c1, c2, c3, k0, k1, alpha, store, ws, signs):
    """tv[r] (+)= alpha * z[1024 g + r] for r < 1024: one whole Rademacher group (8 Philox blocks).

    The bits are first expanded into +-1.0 (into tv itself when storing, else into
    the ``signs`` scratch) and then applied in a separate contiguous pass: a fused
    select-and-add over variable shifts vectorises badly (measured 3-4x slower).
    """
    for blk in range(_GROUP // 128):
        x0, x1, x2, x3 = _philox(_I(g) * 8 + blk, c1, c2, c3, k0, k1)
        ws[4 * blk] = x0
        ws[4 * blk + 1] = x1
        ws[4 * blk + 2] = x2
        ws[4 * blk + 3] = x3
    out = tv if store else signs
    for w in range(_GROUP // 32):
        x = np.int32(ws[w])
        for bit in range(32):
            out[32 * w + bit] = _F(1 - 2 * ((x >> bit) & 1))
    if not store:
        for r in range(_GROUP):
            tv[r] = tv[r] + alpha * signs[r]


@njit(inline="always")
def _group(tv, g, dist, c1, c2, c3, k0, k1, alpha, store, xs, signs):
    if dist == 0:
        _gaussian_group(tv, g, c1, c2, c3, k0, k1, alpha, store, xs[0], xs[1], xs[2], xs[3])
    else:
        _rademacher_group(tv, g, c1, c2, c3, k0, k1, alpha, store, xs[0], signs)


@njit(nogil=True, cache=True)
def perturb_span(t, e0, dist, c1, c2, c3, k0, k1, alpha, store):
    """t[r] += alpha * z[e0 + r] (or t[r] = z[e0 + r] when store) for r in [0, len(t)).

    t is a 1-D contiguous float32 array whose first element is element e0 of the
    stream; alpha is float32; dist is a ``_stream.DISTS`` code; c1..k1 come from
    ``_stream.key_words``. Whole groups are written in place; the partial groups at
    either end (two at most) go through a 4 KiB scratch z.
    """
    n = t.shape[0]
    end = e0 + n
    xs = np.empty((4, _GW), np.uint32)
    z = np.empty(_GROUP, np.float32)
    signs = np.empty(_GROUP, np.float32)
    pos = e0
    while pos < end:
        g = pos // _GROUP
        lo = pos - g * _GROUP
        hi = min(end - g * _GROUP, _GROUP)
        off = pos - e0 - lo  # t[off + r] is element 1024 g + r
        whole = lo == 0 and hi == _GROUP
        tv = t[off : off + _GROUP] if whole else z  # one call site: the group code is inlined once
        _group(tv, g, dist, c1, c2, c3, k0, k1, alpha, store or not whole, xs, signs)
        if not whole:
            for r in range(lo, hi):
                t[off + r] = z[r] if store else t[off + r] + alpha * z[r]
        pos = g * _GROUP + hi


@njit(nogil=True, cache=True)
def round_span(src_bits, dst_bits, e0, c1, c2, c3, k0, k1):
    """Stochastic rounding float32 -> bfloat16 on bit patterns (see ``_reference.stochastic_round_``).

    src_bits: int32 view of the float32 source; dst_bits: int16 view of the bfloat16
    destination; both 1-D of equal length, element 0 being stream element e0.
    """
    n = src_bits.shape[0]
    end = e0 + n
    xs = np.empty((4, _RW), np.uint32)
    pos = e0
    while pos < end:
        g = pos // _GROUP
        b0 = _I(g) * _RW
        for j in range(_RW):  # Philox pass
            x0, x1, x2, x3 = _philox(b0 + j, c1, c2, c3, k0, k1)
            xs[0, j] = x0
            xs[1, j] = x1
            xs[2, j] = x2
            xs[3, j] = x3
        lo = pos - g * _GROUP
        hi = min(end - g * _GROUP, _GROUP)
        base = pos - e0 - lo  # src_bits[base + r] is element 1024 g + r
        for lane in range(8):  # planar: lane = r // 128 takes half (lane % 2) of word lane // 2
            j0 = max(lo - lane * _RW, 0)
            j1 = min(hi - lane * _RW, _RW)
            if j0 >= j1:
                continue
            words = xs[lane >> 1]
            shift = 16 * (lane & 1)
            sv = src_bits[base + lane * _RW + j0 : base + lane * _RW + j1]
            dv = dst_bits[base + lane * _RW + j0 : base + lane * _RW + j1]
            for j in range(j1 - j0):
                _round_one(sv, dv, j, (_I(words[j0 + j]) >> shift) & 0xFFFF)
        pos = g * _GROUP + hi


@njit(inline="always")
def _round_one(sv, dv, j, rnd):
    bits = _I(sv[j]) & _M32
    special = (bits & 0x7F800000) == 0x7F800000  # inf or nan: truncate, keep a nan a nan
    nan_bit = 0x40 if (bits & 0x7FFFFF) != 0 else 0
    out = ((bits >> 16) | nan_bit) if special else ((bits + rnd) >> 16)
    dv[j] = np.int16(out - 0x10000 if out >= 0x8000 else out)

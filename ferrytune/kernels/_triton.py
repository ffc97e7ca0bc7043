"""CUDA kernels: the perturbation stream of ``_stream`` in Triton, bit for bit the CPU stream.

One program handles one layout group of 1024 elements, so no Philox call is
repeated: 256 calls feed the four Gaussian lanes, 32 (8 blocks x 4 words) the
Rademacher bits, 128 the eight 16-bit rounding lanes.

Bit equality with ``_reference`` / ``_cpu`` rests on three choices:
``enable_fp_fusion=False`` at launch (Triton otherwise contracts a*b+c into an
FMA, which rounds once instead of twice), ``sqrt_rn`` (``tl.sqrt`` is the
approximate ``sqrt.approx.f32``), and only basic float32 operations elsewhere.
So every rank of a job may mix CPU and GPU workers. Under ``TRITON_INTERPRET=1``
the kernels run on CPU tensors (numpy semantics), which is how the tests check
them without a GPU.

Importing this module imports triton; ``_api`` does so on the first CUDA call.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ferrytune.kernels import _stream as S

__all__ = ["perturb_", "round_"]

_WORD_ARGS = ["c1", "c2", "c3", "k0", "k1"]  # never specialise on a value (e.g. == 1)


@triton.jit
def _philox(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 on uint32 tensors (Salmon et al. 2011)."""
    for _ in tl.static_range(10):
        hi0 = tl.umulhi(c0, 0xD2511F53)
        hi1 = tl.umulhi(c2, 0xCD9E8D57)
        lo0 = c0 * 0xD2511F53
        lo1 = c2 * 0xCD9E8D57
        c0 = hi1 ^ c1 ^ k0
        c2 = hi0 ^ c3 ^ k1
        c1 = lo1
        c3 = lo0
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
    return c0, c1, c2, c3


@triton.jit
def _words(c1, c2, c3, k0, k1):
    return c1.to(tl.uint32), c2.to(tl.uint32), c3.to(tl.uint32), k0.to(tl.uint32), k1.to(tl.uint32)


@triton.jit
def _box_muller(a, b):
    """Gaussian pair of uint32 words (a, b): op for op ``_reference._box_muller``."""
    k = ((a >> 8) + 1).to(tl.int32)
    bits = k.to(tl.float32).to(tl.int32, bitcast=True)
    e = (bits >> 23) - 127
    m = ((bits & 0x7FFFFF) | 0x3F800000).to(tl.float32, bitcast=True)
    big = m > 1.4142135381698608
    m = tl.where(big, m * 0.5, m)
    e = e + big.to(tl.int32)
    x = m - 1.0
    x2 = x * x
    p = 0.08506953716278076 * x + -0.14197471737861633
    p = p * x + 0.14950978755950928
    p = p * x + -0.165879487991333
    p = p * x + 0.19960597157478333
    p = p * x + -0.250009685754776
    p = p * x + 0.33333972096443176
    log_m = x + (x2 * -0.5 + x2 * x * p)
    rr = tl.sqrt_rn((24 - e).to(tl.float32) * 0.6931471824645996 - log_m)
    j = (((b >> 8) & 0xFFFFFF).to(tl.int32) - 0x800000).to(tl.float32)
    phi = (j + 0.5) * 9.362675967850009e-08
    q = phi * phi
    sin = phi + phi * q * ((-0.00019587950373534113 * q + 0.008332748897373676) * q + -0.166666641831398)
    cos = 1.0 + q * (((2.446383768983651e-05 * q + -0.001388759003020823) * q + 0.04166664928197861) * q + -0.5)
    s0 = 1.0 - 2.0 * (b & 1).to(tl.int32).to(tl.float32)
    s1 = 1.0 - 2.0 * ((b >> 1) & 1).to(tl.int32).to(tl.float32)
    return (rr * (cos - sin)) * s0, (rr * (cos + sin)) * s1


@triton.jit
def _emit(t_ptr, offs, n, z, alpha, STORE: tl.constexpr):
    mask = offs < n
    if STORE:
        tl.store(t_ptr + offs, z, mask=mask)
    else:
        t = tl.load(t_ptr + offs, mask=mask)
        tl.store(t_ptr + offs, t + alpha * z, mask=mask)


@triton.jit(do_not_specialize=_WORD_ARGS)
def _gaussian_kernel(t_ptr, n, c1, c2, c3, k0, k1, alpha, STORE: tl.constexpr):
    g = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, 256)
    c1, c2, c3, k0, k1 = _words(c1, c2, c3, k0, k1)
    x0, x1, x2, x3 = _philox((g * 256 + j).to(tl.uint32), c1, c2, c3, k0, k1)
    base = g * 1024 + j
    za, zb = _box_muller(x0, x1)
    _emit(t_ptr, base, n, za, alpha, STORE)
    _emit(t_ptr, base + 256, n, zb, alpha, STORE)
    za, zb = _box_muller(x2, x3)
    _emit(t_ptr, base + 512, n, za, alpha, STORE)
    _emit(t_ptr, base + 768, n, zb, alpha, STORE)


@triton.jit(do_not_specialize=_WORD_ARGS)
def _rademacher_kernel(t_ptr, n, c1, c2, c3, k0, k1, alpha, STORE: tl.constexpr):
    g = tl.program_id(0).to(tl.int64)
    w = tl.arange(0, 32)  # word number within the group: block w // 4, word w % 4
    c1, c2, c3, k0, k1 = _words(c1, c2, c3, k0, k1)
    x0, x1, x2, x3 = _philox((g * 8 + (w >> 2)).to(tl.uint32), c1, c2, c3, k0, k1)
    sel = w & 3
    x = tl.where(sel == 0, x0, tl.where(sel == 1, x1, tl.where(sel == 2, x2, x3)))
    bit = tl.arange(0, 32).to(tl.uint32)
    b = (x[:, None] >> bit[None, :]) & 1  # (32 words, 32 bits)
    z = 1.0 - 2.0 * b.to(tl.int32).to(tl.float32)
    offs = g * 1024 + w.to(tl.int64)[:, None] * 32 + tl.arange(0, 32)[None, :]
    _emit(t_ptr, offs, n, z, alpha, STORE)


@triton.jit
def _round_lane(src_ptr, dst_ptr, offs, n, x, SHIFT: tl.constexpr):
    mask = offs < n
    bits = tl.load(src_ptr + offs, mask=mask, other=0).to(tl.uint32, bitcast=True)
    rnd = (x >> SHIFT) & 0xFFFF
    special = (bits & 0x7F800000) == 0x7F800000  # inf or nan: truncate, keep a nan a nan
    nan_bit = tl.where((bits & 0x7FFFFF) != 0, 0x40, 0).to(tl.uint32)
    out = tl.where(special, (bits >> 16) | nan_bit, (bits + rnd) >> 16)
    tl.store(dst_ptr + offs, out.to(tl.uint16).to(tl.int16, bitcast=True), mask=mask)


@triton.jit(do_not_specialize=_WORD_ARGS)
def _round_kernel(src_ptr, dst_ptr, n, c1, c2, c3, k0, k1):
    g = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, 128)
    c1, c2, c3, k0, k1 = _words(c1, c2, c3, k0, k1)
    x0, x1, x2, x3 = _philox((g * 128 + j).to(tl.uint32), c1, c2, c3, k0, k1)
    base = g * 1024 + j
    _round_lane(src_ptr, dst_ptr, base, n, x0, 0)
    _round_lane(src_ptr, dst_ptr, base + 128, n, x0, 16)
    _round_lane(src_ptr, dst_ptr, base + 256, n, x1, 0)
    _round_lane(src_ptr, dst_ptr, base + 384, n, x1, 16)
    _round_lane(src_ptr, dst_ptr, base + 512, n, x2, 0)
    _round_lane(src_ptr, dst_ptr, base + 640, n, x2, 16)
    _round_lane(src_ptr, dst_ptr, base + 768, n, x3, 0)
    _round_lane(src_ptr, dst_ptr, base + 896, n, x3, 16)


def perturb_(flat: torch.Tensor, code: int, words: tuple[int, ...], alpha: float, store: bool) -> None:
    """flat += alpha * z (or flat = z when store); flat is 1-D contiguous float32, element 0 = stream element 0."""
    n = flat.numel()
    kernel = _gaussian_kernel if code == S.DISTS["gaussian"] else _rademacher_kernel
    grid = (triton.cdiv(n, S.GROUP),)
    kernel[grid](flat, n, *words, alpha, STORE=store, num_warps=4, enable_fp_fusion=False)


def round_(src: torch.Tensor, dst: torch.Tensor, words: tuple[int, ...]) -> None:
    """dst (bfloat16) <- stochastic rounding of src (float32); both 1-D contiguous of equal numel."""
    n = src.numel()
    grid = (triton.cdiv(n, S.GROUP),)
    _round_kernel[grid](src.view(torch.int32), dst.view(torch.int16), n, *words, num_warps=4)

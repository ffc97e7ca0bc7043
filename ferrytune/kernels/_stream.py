"""The definition of ferrytune's perturbation stream: keys, counters, layout, constants.

MeZO (Malladi et al. 2023, "Fine-Tuning Language Models with Just Forward
Passes", Alg. 1) never stores z: it re-seeds the generator and regenerates the
same z for +eps, -2eps, +eps and the update. ZO2 does the same with one global
generator per step, which only works while blocks are visited in one fixed order
(and gives a tied weight two different z's). ferrytune instead makes every
element of z a pure function of a *key* and the element's index:

    z[i] = f(PerturbKey(seed, step, index, param_id), i, dist)

so any device, thread, rank or chunking regenerates the same numbers.

The random bits come from Philox4x32-10 (Salmon et al. 2011, "Parallel random
numbers: as easy as 1, 2, 3"), the counter-based generator behind cuRAND and
torch's CUDA RNG. One Philox call maps a 128-bit counter and a 64-bit key to
128 random bits:

    key     (k0, k1) = (seed mod 2**32, seed >> 32)
    counter (c0, c1, c2, c3) = (block, step, param_id, tag << 30 | index)

``tag`` separates the streams that share a key (Gaussian z, Rademacher z,
stochastic-rounding bits), so rounding a tensor right after perturbing it with
the same key does not reuse z's bits. ``block`` is the Philox call an element
draws from; the element -> (block, word) layout below is part of the stream and
every implementation (``_reference``, ``_cpu``, ``_triton``) follows it.

Layout (GROUP = 1024 elements; all implementations work group by group):

* gaussian: element i, r = i mod 1024, lane = r // 256, block = 256 * (i // 1024) + r mod 256.
  Words (x0, x1) give lanes 0 and 1, words (x2, x3) lanes 2 and 3, by Box-Muller.
  "Planar" lanes keep the CPU kernel's stores contiguous (no 4-way interleave).
* rademacher: block = i // 128, word = (i // 32) mod 4, bit = i mod 32; z = 1 - 2 * bit.
* rounding: r = i mod 1024, lane = r // 128, block = 128 * (i // 1024) + r mod 128;
  16 bits = (word[lane // 2] >> (16 * (lane mod 2))) mod 2**16 (planar again).

Box-Muller, in float32 with basic operations only (so that torch, numba and
Triton agree bit for bit; no library transcendental is called):

    u   = (a >> 8 + 1) * 2**-24 in (0, 1]          (24 bits; |z| <= sqrt(-2 ln 2**-24) = 5.77)
    rr  = sqrt(-ln u) = r / sqrt(2)                ln by exponent split + polynomial
    phi = ((b >> 8) - 2**23 + 0.5) * (pi/2) * 2**-24 in (-pi/4, pi/4)
    (z_even, z_odd) = (s0 * rr * (cos phi - sin phi), s1 * rr * (cos phi + sin phi))

which is (r cos theta, r sin theta) with theta = pi/4 + phi uniform on (0, pi/2),
reflected into all four quadrants by the sign bits s0 = bit 0 of b, s1 = bit 1.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DISTS", "GROUP", "PerturbKey", "check_numel", "key_words"]

DISTS: dict[str, int] = {"gaussian": 0, "rademacher": 1}
"""Distribution name -> kernel code (also the stream tag)."""

TAG_GAUSSIAN = 0
TAG_RADEMACHER = 1
TAG_ROUND = 2

GROUP = 1024
"""Elements per layout group (see module docstring)."""
GAUSS_W = 256
"""Philox blocks per Gaussian group: 4 lanes of 256 elements."""
ROUND_W = 128
"""Philox blocks per rounding group: 8 lanes (4 words x 2 halves) of 128 elements."""

MAX_NUMEL = 1 << 34
"""Largest tensor a key can cover: Gaussian uses numel / 4 blocks of the 32-bit counter word c0."""

MASK32 = 0xFFFFFFFF

# Philox4x32-10 constants (Salmon et al. 2011, Random123 defaults).
PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
PHILOX_ROUNDS = 10

# Float32 constants. Each value below is exactly representable in float32.
SQRT2_F32 = 1.4142135381698608  # float32(sqrt 2): the mantissa split point of the log
LN2_F32 = 0.6931471824645996  # float32(ln 2)
ANGLE_STEP_F32 = 9.362675967850009e-08  # float32(pi/2 * 2**-24)

# log1p(x) = x + (-0.5 * x^2 + x^3 * P(x)) on [sqrt(1/2) - 1, sqrt(2) - 1]; P of degree 6,
# coefficients low to high. Weighted least-squares fit (float64, 2000 Chebyshev nodes,
# target from the exact series) rounded to float32: max relative error 9.4e-8.
LOG_P = (
    0.33333972096443176,
    -0.250009685754776,
    0.19960597157478333,
    -0.165879487991333,
    0.14950978755950928,
    -0.14197471737861633,
    0.08506953716278076,
)
# sin(p) = p + p^3 * S(p^2), cos(p) = 1 + p^2 * C(p^2) on [-pi/4, pi/4]; same fitting
# procedure: max absolute error 4.7e-8 (sin) and 6.5e-8 (cos).
SIN_S = (-0.166666641831398, 0.008332748897373676, -0.00019587950373534113)
COS_C = (-0.5, 0.04166664928197861, -0.001388759003020823, 2.446383768983651e-05)


@dataclass(frozen=True)
class PerturbKey:
    """Names one perturbation z of one parameter; z is a pure function of (key, numel, dist).

    Attributes:
        seed: run seed, 0 <= seed < 2**64 (use ``seed % 2**64`` for a signed value).
        step: optimiser step, 0 <= step < 2**32.
        index: perturbation number within the step (q > 1 MeZO), 0 <= index < 2**30.
        param_id: stable id of the parameter (a tied weight has one id), 0 <= param_id < 2**32.
    """

    seed: int
    step: int
    index: int
    param_id: int

    def __post_init__(self) -> None:
        limits = {"seed": 1 << 64, "step": 1 << 32, "index": 1 << 30, "param_id": 1 << 32}
        for name, limit in limits.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"PerturbKey.{name} must be an int, got {type(value).__name__}")
            if not 0 <= value < limit:
                raise ValueError(f"PerturbKey.{name}={value} is out of range [0, {limit})")


def key_words(key: PerturbKey, tag: int) -> tuple[int, int, int, int, int]:
    """Return the Philox words fixed by ``key``: (c1, c2, c3, k0, k1), each in [0, 2**32)."""
    c3 = (tag << 30) | key.index
    return key.step, key.param_id, c3, key.seed & MASK32, key.seed >> 32


def check_numel(numel: int) -> None:
    """Raise ``ValueError`` when a tensor is too large for one key's counter space."""
    if numel >= MAX_NUMEL:
        raise ValueError(
            f"tensor of {numel} elements exceeds the perturbation stream's limit of {MAX_NUMEL}; "
            "split the parameter and give each part its own param_id"
        )


def dist_code(dist: str) -> int:
    """Validate a distribution name and return its code."""
    try:
        return DISTS[dist]
    except KeyError:
        raise ValueError(f"dist={dist!r} is not supported; use one of {sorted(DISTS)}") from None

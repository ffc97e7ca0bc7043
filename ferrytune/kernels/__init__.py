"""Counter-based perturbations for zeroth-order training, and stochastic rounding.

MeZO (Malladi et al. 2023) regenerates z from a seed instead of storing it.
Here every element of z is a pure function of ``(PerturbKey, element index,
dist)`` (Philox4x32-10 + an exact-operation Box-Muller; ``_stream`` defines it),
so the same z comes back on any device, thread count, rank or block order.

    from ferrytune.kernels import PerturbKey, add_perturbation_
    key = PerturbKey(seed=0, step=12, index=0, param_id=3)
    add_perturbation_(w, key, alpha=+eps)       # w + eps z
    add_perturbation_(w, key, alpha=-2 * eps)   # w - eps z
    add_perturbation_(w, key, alpha=+eps)       # back to w (up to float32 rounding, as in MeZO)

Backends: numba on CPU (threaded), Triton on CUDA, a plain-torch reference
everywhere (``ferrytune.kernels._reference``); all three give identical bits.
See docs/kernels.md.
"""

from ferrytune.kernels._api import (
    add_perturbation_,
    cpu_backend,
    get_num_threads,
    perturbation,
    set_num_threads,
    stochastic_round_,
)
from ferrytune.kernels._stream import DISTS, PerturbKey

__all__ = [
    "DISTS",
    "PerturbKey",
    "add_perturbation_",
    "cpu_backend",
    "get_num_threads",
    "perturbation",
    "set_num_threads",
    "stochastic_round_",
]

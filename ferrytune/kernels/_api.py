"""Public perturbation functions: validation and dispatch to the CPU, Triton or reference kernels.

Dispatch by the tensor's device:

* CPU: the numba kernels of ``_cpu`` on spans of whole groups, run on a thread
  pool (``set_num_threads``; default ``torch.get_num_threads()``). If numba is
  missing or fails to import, the torch reference (``_reference``) runs instead
  and a warning is logged once.
* CUDA: the Triton kernels of ``_triton`` (same stream, bit for bit); without
  Triton, the reference runs on the device (slow, correct; warned once). A
  kernel that fails to *compile* (a ``triton.errors.TritonError``, or any error
  on the first launch of a specialisation) is warned once and the reference
  runs from then on; an error after a kernel has launched fine is raised.
* anything else: the reference on that device.

Nothing is imported or compiled until the first call: numba compiles on first
use (a few seconds) and caches the machine code beside ``_cpu.py``.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from ferrytune.kernels import _reference
from ferrytune.kernels import _stream as S
from ferrytune.kernels._stream import PerturbKey


logger = logging.getLogger(__name__)

MIN_SPAN_NUMEL = 1 << 16
"""Elements per thread below which a call runs on the calling thread alone (pool hand-off costs ~50 us)."""

_state_lock = threading.Lock()
_num_threads: int | None = None
_pool: ThreadPoolExecutor | None = None
_pool_workers = 0
_cpu_module = None
_cpu_failed = False
_triton_module = None
_triton_failed = False
_triton_launched: set[tuple] = set()  # specialisations that compiled and launched once


def _forget_pool_after_fork() -> None:
    """A forked child inherits the pool object but not its threads: submitting would hang."""
    global _pool, _pool_workers
    _pool, _pool_workers = None, 0


os.register_at_fork(after_in_child=_forget_pool_after_fork)


def set_num_threads(num_threads: int | None) -> None:
    """Threads for the CPU kernels; ``None`` follows ``torch.get_num_threads()`` (the default)."""
    global _num_threads
    valid = isinstance(num_threads, int) and not isinstance(num_threads, bool) and num_threads >= 1
    if num_threads is not None and not valid:
        raise ValueError(f"num_threads must be a positive int or None, got {num_threads!r}")
    _num_threads = num_threads


def get_num_threads() -> int:
    """Threads the CPU kernels will use."""
    return _num_threads if _num_threads is not None else torch.get_num_threads()


def cpu_backend() -> str:
    """``"numba"`` when the compiled CPU kernels import, else ``"reference"``."""
    return "numba" if _load_cpu() is not None else "reference"


def _load_cpu():
    global _cpu_module, _cpu_failed
    if _cpu_module is None and not _cpu_failed:
        try:
            from ferrytune.kernels import _cpu
        except Exception as exc:  # noqa: BLE001 - ImportError, or a numba/llvmlite mismatch raising anything
            _cpu_failed = True
            logger.warning("numba CPU kernels unavailable (%s); using the slow torch reference", exc)
        else:
            _cpu_module = _cpu
    return _cpu_module


def _load_triton():
    global _triton_module, _triton_failed
    if _triton_module is None and not _triton_failed:
        try:
            from ferrytune.kernels import _triton
        except Exception as exc:  # noqa: BLE001 - triton raises RuntimeError without a driver in some versions
            _triton_failed = True
            logger.warning("Triton kernels unavailable (%s); CUDA tensors use the slow torch reference", exc)
        else:
            _triton_module = _triton
    return _triton_module


def _triton_or_reference(name: str, t: torch.Tensor, launch: Callable[[], None],
                         reference: Callable[[], None]) -> None:
    """Run a Triton launch; if the kernel fails to compile, warn once and run ``reference`` instead.

    Triton compiles on the first launch of each specialisation (kernel, constexprs, and whether
    the size and the pointer are 16-aligned); an error there is a compile error (``TritonError``,
    or e.g. a RuntimeError of an MLIR pass). Once a specialisation launched, errors propagate:
    they are runtime faults, and a reference run would only hide them.
    """
    global _triton_failed, _triton_module
    spec = (name, t.device, t.numel() % 16 == 0, t.data_ptr() % 16 == 0)
    try:
        launch()
    except Exception as exc:  # noqa: BLE001 - classified below
        try:
            from triton.errors import TritonError
        except ImportError:  # pragma: no cover - triton imported fine when the module loaded
            TritonError = ()  # noqa: N806
        if not isinstance(exc, TritonError) and (spec in _triton_launched or not isinstance(exc, RuntimeError)
                                                 or "CUDA error" in str(exc)):
            raise
        with _state_lock:
            _triton_failed, _triton_module = True, None
        first = (str(exc).strip().splitlines() or [""])[-1][:300]
        logger.warning("Triton kernel %s failed to compile (%s: %s); CUDA tensors use the slow torch "
                       "reference from now on", name, type(exc).__name__, first)
        reference()
        return
    _triton_launched.add(spec)


def _executor(workers: int) -> ThreadPoolExecutor:
    """A pool with at least ``workers`` threads, created on first use and replaced when too small.

    A replaced pool is not shut down: another caller may be about to submit to it (its
    idle threads stay until exit). ThreadPoolExecutor starts threads only as work arrives.
    """
    global _pool, _pool_workers
    with _state_lock:
        if _pool is None or _pool_workers < workers:
            _pool_workers = max(workers, os.cpu_count() or 1)
            _pool = ThreadPoolExecutor(max_workers=_pool_workers, thread_name_prefix="ferrytune-kernels")
        return _pool


def _spans(numel: int, num_threads: int) -> list[tuple[int, int]]:
    """Split [0, numel) into at most num_threads spans whose inner bounds are group-aligned."""
    parts = max(1, min(num_threads, numel // MIN_SPAN_NUMEL))
    per = -(-numel // parts)
    per = -(-per // S.GROUP) * S.GROUP  # whole groups: no group is split across two threads
    return [(lo, min(numel, lo + per)) for lo in range(0, numel, per)]


def _run_spans(numel: int, work: Callable[[int, int], None]) -> None:
    """Call work(lo, hi) over the spans of [0, numel): the caller takes the first, the pool the rest."""
    spans = _spans(numel, get_num_threads())
    if len(spans) == 1:
        work(*spans[0])
        return
    futures = [_executor(len(spans) - 1).submit(work, lo, hi) for lo, hi in spans[1:]]
    work(*spans[0])
    for f in futures:
        f.result()  # re-raises a worker's exception here


def _check_tensor(t: torch.Tensor, name: str, dtype: torch.dtype) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise TypeError(
            f"{name} must be {dtype}, got {t.dtype}; perturbations are applied to float32 master "
            "weights (keep a float32 copy and write low precision with stochastic_round_)"
            if dtype == torch.float32
            else f"{name} must be {dtype}, got {t.dtype}"
        )
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (got shape {tuple(t.shape)}, stride {t.stride()})")
    S.check_numel(t.numel())


def _f32(alpha: float) -> float:
    """alpha rounded to float32 (the value every backend multiplies by)."""
    return torch.tensor(float(alpha), dtype=torch.float32).item()


def _apply(flat: torch.Tensor, key: PerturbKey, code: int, alpha: float, store: bool) -> None:
    """flat (+)= alpha * z on flat's device, by the best available backend."""
    words = S.key_words(key, code)
    dist = "gaussian" if code == S.DISTS["gaussian"] else "rademacher"
    if flat.device.type == "cpu" and _load_cpu() is not None:
        arr = flat.numpy()
        a32 = np.float32(alpha)

        def work(lo: int, hi: int) -> None:
            _cpu_module.perturb_span(arr[lo:hi], lo, code, *words, a32, store)

        _run_spans(flat.numel(), work)
    elif flat.device.type == "cuda" and _load_triton() is not None:
        triton_module = _triton_module

        def launch() -> None:
            with torch.cuda.device(flat.device):
                triton_module.perturb_(flat, code, words, alpha, store)

        _triton_or_reference(f"{dist} {'z' if store else 'add'}", flat, launch,
                             lambda: _reference_apply(flat, key, dist, alpha, store))
    else:
        _reference_apply(flat, key, dist, alpha, store)


def _reference_apply(flat: torch.Tensor, key: PerturbKey, dist: str, alpha: float, store: bool) -> None:
    if store:
        flat.copy_(_reference.perturbation_span(key, 0, flat.numel(), dist=dist, device=flat.device))
    else:
        _reference.add_perturbation_(flat, key, alpha=alpha, dist=dist)


@torch.no_grad()
def add_perturbation_(t: torch.Tensor, key: PerturbKey, *, alpha: float, dist: str = "gaussian") -> None:
    """In place ``t += alpha * z(key)``, the MeZO perturbation (Malladi et al. 2023, Alg. 1).

    z has t's numel and depends only on (key, numel, dist): the same bits on CPU
    and CUDA, for any thread count or chunking, and for a view into a larger flat
    buffer as for a standalone tensor. The result is ``fl(t + fl(fl32(alpha) * z))``
    (no fused multiply-add), so with alpha = +eps, -2 eps, +eps it equals MeZO's
    float32 ``param + scale * z * eps`` bit for bit (the scales are powers of two).

    Args:
        t: contiguous float32 tensor (views are fine; only t's elements are touched).
        key: names the perturbation.
        alpha: scale, rounded to float32.
        dist: ``"gaussian"`` (N(0, 1), truncated at |z| = 5.77) or ``"rademacher"`` (+-1).

    Raises:
        TypeError: t is not float32. ValueError: t is not contiguous, or dist is unknown.
    """
    code = S.dist_code(dist)
    _check_tensor(t, "t", torch.float32)
    if t.numel():
        _apply(t.detach().view(-1), key, code, _f32(alpha), store=False)


def perturbation(
    key: PerturbKey,
    shape: Sequence[int] | torch.Size | int,
    *,
    dist: str = "gaussian",
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """z(key) of the given shape as a new float32 tensor: exactly what ``add_perturbation_`` adds."""
    code = S.dist_code(dist)
    out = torch.empty(shape, dtype=torch.float32, device=device)
    S.check_numel(out.numel())
    if out.numel():
        _apply(out.view(-1), key, code, 1.0, store=True)
    return out


@torch.no_grad()
def stochastic_round_(src: torch.Tensor, dst: torch.Tensor, key: PerturbKey) -> None:
    """dst (bfloat16) <- src (float32) rounded stochastically: E[dst] = src, deterministic per key.

    Round-to-nearest loses every update smaller than half a bf16 step (2**-9
    relative), which is most ZO updates (lr * g * z ~ 1e-6); ZO2's AMP master copy
    loses them that way. Stochastic rounding keeps them in expectation. Uses the
    key's own stream (tag 2), independent of z for the same key.

    Raises:
        TypeError: src is not float32 or dst not bfloat16. ValueError: not contiguous,
        numel or device differ.
    """
    _check_tensor(src, "src", torch.float32)
    _check_tensor(dst, "dst", torch.bfloat16)
    if src.numel() != dst.numel() or src.device != dst.device:
        raise ValueError(
            f"src and dst must match in numel and device, got {src.numel()} on {src.device} "
            f"and {dst.numel()} on {dst.device}"
        )
    if not src.numel():
        return
    src_flat, dst_flat = src.detach().view(-1), dst.detach().view(-1)
    if src.device.type == "cpu" and _load_cpu() is not None:
        src_bits = src_flat.view(torch.int32).numpy()
        dst_bits = dst_flat.view(torch.int16).numpy()
        words = S.key_words(key, S.TAG_ROUND)

        def work(lo: int, hi: int) -> None:
            _cpu_module.round_span(src_bits[lo:hi], dst_bits[lo:hi], lo, *words)

        _run_spans(src.numel(), work)
    elif src.device.type == "cuda" and _load_triton() is not None:
        triton_module = _triton_module

        def launch() -> None:
            with torch.cuda.device(src.device):
                triton_module.round_(src_flat, dst_flat, S.key_words(key, S.TAG_ROUND))

        _triton_or_reference("stochastic round", src_flat, launch,
                             lambda: _reference.stochastic_round_(src_flat, dst_flat, key))
    else:
        _reference.stochastic_round_(src_flat, dst_flat, key)

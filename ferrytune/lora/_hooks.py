"""Adapters as forward hooks, and the router that packs several adapters into one batch.

Why hooks: the engine builds the model on the meta device and swaps each base
weight in (``module._parameters["weight"] = tensor``) just before a decoder layer
runs. Replacing ``nn.Linear`` by a LoRA module (as PEFT does) would rename the
weights and break that. A forward hook sees only ``(module, args, output)``, so
it neither knows nor cares whether the weight is a Parameter, a plain tensor, or
streamed in from NVMe.

Multi-LoRA (mLoRA's BatchLoRA, Ye et al. 2023, https://arxiv.org/abs/2312.02515):
the hooked module has already run its base GEMM once over the whole packed
batch; the hook then adds, for each segment (k, start, end) of rows::

    out[start:end] += s_k * dropout_k(x[start:end]) A_k^T B_k^T

at the targets adapter k has. Rows are dim 0 of the hooked module's input. The
per-segment pieces are joined with ``torch.cat``, so each segment's arithmetic
is exactly what a solo run of adapter k on those rows would do.

Packed sequences (``data.packing``, no padding): several tenants' sequences share one row, so
``route(segments, tokens=R*T)`` makes the segments ranges of the *flattened* tokens of the
hooked input ``(R, T, ..., in)`` -> ``(R*T, ..., in)``: a per-token (per-sequence run) routing.
The same per-segment arithmetic applies to a sequence's tokens as in a solo run of it.

Activation checkpointing: the hooks re-run in backward, so they must compute the
same thing twice. Dropout uses the global RNG, which
``torch.utils.checkpoint`` saves and restores (``preserve_rng_state=True``);
routing comes from :class:`Router`, whose ``route`` context must stay open until
``backward()`` returns.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ferrytune.errors import ConfigError, FerrytuneError
from ferrytune.lora._adapter import Adapter
from ferrytune.lora._spec import _linear_shape

__all__ = ["LoraHandle", "Router", "Segment", "attach"]

Segment = tuple[int, int, int]
"""(adapter_index, row_start, row_end): rows [row_start, row_end) of the packed batch use that adapter."""


class Router:
    """Which rows of the current packed batch belong to which adapter.

    ``with router.route(segments): loss = ...; loss.backward()`` – keep the context open
    through backward, because activation checkpointing re-runs the hooks there. Segments
    must be sorted by ``row_start`` and must not overlap; rows no segment covers get the
    base output only (padding rows, for instance).
    """

    def __init__(self) -> None:
        self._segments: tuple[Segment, ...] | None = None
        self._tokens: int | None = None

    @property
    def tokens(self) -> int | None:
        """Inside ``route(..., tokens=N)``: segments index the N flattened tokens, not rows."""
        return self._tokens

    @property
    def segments(self) -> tuple[Segment, ...] | None:
        """The active segments, or None outside ``route``."""
        return self._segments

    @contextlib.contextmanager
    def route(self, segments: Sequence[Segment], *, tokens: int | None = None) -> Iterator["Router"]:
        """Make ``segments`` the routing for every hooked forward (and recompute) inside.

        ``tokens=N`` (packed sequences): segments are ranges of the flattened first two dims
        (rows x positions) of each hooked input, which must hold exactly N tokens; a module
        that sees tokens in another layout (an MoE expert's gathered tokens) raises.
        """
        checked = _check_segments(segments)
        if tokens is not None and (tokens <= 0 or checked[-1][2] > tokens):
            raise ValueError(f"router: tokens={tokens} but a segment ends at {checked[-1][2]}")
        previous = self._segments, self._tokens
        self._segments, self._tokens = checked, tokens
        try:
            yield self
        finally:
            self._segments, self._tokens = previous


def _check_segments(segments: Sequence[Segment]) -> tuple[Segment, ...]:
    checked: list[Segment] = []
    last_end = 0
    for seg in segments:
        if len(seg) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) for v in seg):
            raise ValueError(f"router segment must be (adapter_index, row_start, row_end) ints, got {seg!r}")
        k, start, end = seg
        if k < 0 or start < last_end or end <= start:
            raise ValueError(
                f"router segment {seg!r}: need adapter_index >= 0, row_start >= previous row_end "
                f"({last_end}) and row_end > row_start"
            )
        checked.append((k, start, end))
        last_end = end
    if not checked:
        raise ValueError("router.route() needs at least one segment")
    return tuple(checked)


class _LoraHook:
    """The forward hook on one target module; a class so ``attach`` can recognise its own hooks."""

    def __init__(self, path: str, adapters: dict[int, Adapter], num_adapters: int, router: Router | None):
        self.path = path
        self.adapters = adapters  # adapter index -> adapter, only those that target this module
        self.num_adapters = num_adapters
        self.router = router

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        if not args:
            raise FerrytuneError(f"LoRA hook on {self.path}: the input must be passed positionally")
        x = args[0]  # (rows, ..., in)
        tokens = None if self.router is None else self.router.tokens
        if tokens is not None:  # packed sequences: route the flattened (rows x positions) tokens
            if x.dim() < 3 or x.shape[0] * x.shape[1] != tokens or output.shape[:2] != x.shape[:2]:
                raise FerrytuneError(
                    f"LoRA hook on {self.path}: token routing needs a (rows, positions, ...) input of "
                    f"{tokens} tokens, got {tuple(x.shape)}")
            lead = x.shape[:2]
            out = self._apply(module, (x.flatten(0, 1),) + tuple(args[1:]), output.flatten(0, 1))
            return out.unflatten(0, lead)
        return self._apply(module, args, output)

    def _apply(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        num_rows = x.shape[0]
        segments = self._segments(num_rows)
        if len(segments) == 1 and segments[0][1:] == (0, num_rows):
            # one adapter over the whole batch: exactly PEFT's lora.Linear expression
            k = segments[0][0]
            if k not in self.adapters:
                return output
            return (output + self._delta(module, self.adapters[k], x)).to(output.dtype)
        pieces: list[torch.Tensor] = []  # row blocks of the new output, in order
        row = 0
        for k, start, end in segments:
            if start > row:
                pieces.append(output[row:start])
            if k in self.adapters:
                pieces.append(output[start:end] + self._delta(module, self.adapters[k], x[start:end]))
            else:
                pieces.append(output[start:end])
            row = end
        if row < num_rows:
            pieces.append(output[row:])
        # pieces with a delta were promoted to the adapter dtype; cast back like PEFT does
        return torch.cat([p.to(output.dtype) for p in pieces], dim=0)

    def _segments(self, num_rows: int) -> tuple[Segment, ...]:
        if self.router is None:
            return ((0, 0, num_rows),)
        segments = self.router.segments
        if segments is None:
            raise FerrytuneError(
                f"LoRA hook on {self.path}: the router has no segments; run forward AND backward "
                f"inside `with router.route(segments):`"
            )
        if segments[-1][2] > num_rows:
            raise FerrytuneError(
                f"LoRA hook on {self.path}: router segment ends at {segments[-1][2]} "
                f"but the batch has {num_rows} rows"
            )
        max_k = max(k for k, _, _ in segments)
        if max_k >= self.num_adapters:
            raise FerrytuneError(
                f"LoRA hook on {self.path}: router names adapter {max_k} but {self.num_adapters} are attached"
            )
        return segments

    def _delta(self, module: nn.Module, adapter: Adapter, x: torch.Tensor) -> torch.Tensor:
        """s * dropout(x) A^T B^T in the adapter dtype, in PEFT's order: (B(A(dropout(x)))) * s."""
        a, b = adapter.a(self.path), adapter.b(self.path)  # (r, in), (out, r)
        x = x.to(a.dtype)
        if adapter.spec.dropout > 0.0:
            # the base module's train/eval flag, as for PEFT's dropout child module; p = 0 draws no RNG
            x = F.dropout(x, p=adapter.spec.dropout, training=module.training)
        return F.linear(F.linear(x, a), b) * adapter.targets[self.path].scaling  # (rows, ..., out)


class LoraHandle:
    """The hooks :func:`attach` registered; ``remove()`` takes them all off (idempotent)."""

    def __init__(self, adapters: list[Adapter], router: Router | None, handles: list):
        self.adapters = adapters
        self.router = router
        self._handles = handles

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> "LoraHandle":
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def attach(model: nn.Module, adapters: list[Adapter], *, router: Router | None = None) -> LoraHandle:
    """Register one forward hook per module that any adapter targets.

    Adapter ``i`` of ``adapters`` is router index ``i``. With one adapter and no router every
    row uses adapter 0; with several adapters a router is required. Checks that every target
    path exists in ``model`` with the adapter's in/out sizes (works on a meta-device model)
    and that ``model`` has no LoRA hooks already.
    """
    if not adapters:
        raise ConfigError("lora: attach() needs at least one adapter")
    if router is None and len(adapters) > 1:
        raise ConfigError(f"lora: {len(adapters)} adapters need a Router to say which rows use which")
    modules = dict(model.named_modules())
    by_path: dict[str, dict[int, Adapter]] = {}
    for index, adapter in enumerate(adapters):
        for path, info in adapter.targets.items():
            _check_target(modules, path, info.in_features, info.out_features, index)
            by_path.setdefault(path, {})[index] = adapter
    handles = []
    for path, owners in by_path.items():
        hook = _LoraHook(path, owners, len(adapters), router)
        handles.append(modules[path].register_forward_hook(hook))
    return LoraHandle(list(adapters), router, handles)


def _check_target(modules: dict[str, nn.Module], path: str, in_features: int, out_features: int, index: int) -> None:
    module = modules.get(path)
    if module is None:
        raise ConfigError(f"lora: adapter {index} targets {path!r}, which the model does not have")
    if _linear_shape(module) != (in_features, out_features):
        raise ConfigError(
            f"lora: adapter {index} targets {path!r} as a linear ({in_features} -> {out_features}) "
            f"but the model has {module!r}"
        )
    if any(isinstance(h, _LoraHook) for h in module._forward_hooks.values()):
        raise ConfigError(f"lora: {path!r} already has a LoRA hook; remove() the old handle first")

"""Intercept each unit's forward on the instance, and split a stacked batch into streams.

The engine never copies a model's forward code. It replaces ``unit.module.forward``
(an instance attribute, so ``nn.Module.__call__`` and every hook still run) with
a function that fetches the unit's block, binds its tensors and calls the
original forward — possibly several times, once per *stream* (a slice of rows of
the batch that sees its own perturbed weights).

Which arguments carry rows: every tensor with at least 2 dimensions whose first
dimension is the stacked batch size ``N`` (hidden states, masks, input ids).
Everything else (rotary tables with batch 1, 1-D ``cache_position``, flags) is
passed whole to each call, and an output with batch 1 is expanded to the rows of
its stream (GPT-2's ``wpe`` is called on ``position_ids`` of batch 1).

Some models build a tensor once per forward from the whole batch in a *batch-major* layout with
several rows per sample: ALiBi (BLOOM, Falcon with ``alibi``) is ``(N * heads, 1, T)``. Its first
dimension is ``f * N`` for a *row factor* ``f`` (``row_factors(layout)``: the attention heads), and a
slice of samples ``start:end`` is its rows ``f*start : f*end`` — exactly the tensor a plain forward
of those samples builds, since every row is computed from its own sample only.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch

from ferrytune.models import ModelLayout, Unit


def row_factors(layout: ModelLayout) -> tuple[int, ...]:
    """Rows per sample of the tensors a unit may receive: 1, and the attention heads (ALiBi's layout)."""
    cfg = layout.config
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    heads = getattr(cfg, "num_attention_heads", None)
    return (1, heads) if isinstance(heads, int) and heads > 1 else (1,)


def slice_rows(obj: Any, n_total: int, start: int, end: int, factors: tuple[int, ...] = (1,)) -> Any:
    """Slice samples ``start:end`` of every batch-carrying tensor inside ``obj`` (see the module doc)."""
    if isinstance(obj, torch.Tensor):
        if obj.dim() >= 2 and n_total > 1:
            for f in factors:
                if obj.shape[0] == f * n_total:
                    return obj[f * start:f * end]
        return obj
    if isinstance(obj, tuple):
        return tuple(slice_rows(o, n_total, start, end, factors) for o in obj)
    if isinstance(obj, list):
        return [slice_rows(o, n_total, start, end, factors) for o in obj]
    if isinstance(obj, dict):
        return {k: slice_rows(v, n_total, start, end, factors) for k, v in obj.items()}
    return obj


def cat_rows(outs: list[Any], rows: list[int]) -> Any:
    """Concatenate per-stream outputs along the batch dimension (inverse of slice_rows)."""
    first = outs[0]
    if isinstance(first, torch.Tensor):
        parts = [o.expand(r, *o.shape[1:]) if o.shape[0] == 1 and r != 1 else o for o, r in zip(outs, rows)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
    if isinstance(first, (tuple, list)):
        cols = [cat_rows([o[i] for o in outs], rows) for i in range(len(first))]
        return type(first)(cols)
    return first  # None, flags


class UnitInterceptor:
    """Installs ``handler(unit, original_forward, *args, **kwargs)`` as every unit's forward."""

    def __init__(self, layout: ModelLayout) -> None:
        self.layout = layout
        self._originals: dict[int, Callable] = {}
        self.handler: Callable[..., Any] | None = None

    def install(self) -> None:
        for unit in self.layout.units:
            mod = unit.module
            if id(mod) in self._originals:
                continue
            orig = mod.forward
            self._originals[id(mod)] = orig
            mod.forward = functools.partial(self._dispatch, unit, orig)

    def uninstall(self) -> None:
        for unit in self.layout.units:
            if id(unit.module) in self._originals:
                del unit.module.forward  # falls back to the class's forward
                del self._originals[id(unit.module)]

    def _dispatch(self, unit: Unit, orig: Callable, *args: Any, **kwargs: Any) -> Any:
        if self.handler is None:
            raise RuntimeError(f"unit {unit.name} called outside an engine pass")
        return self.handler(unit, orig, *args, **kwargs)

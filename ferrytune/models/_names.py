"""Checkpoint names as transformers maps them: file tensors <-> the model's parameters, one block at a time.

A module's parameter names are not always the names in the file. transformers keeps, per
architecture, a list of *weight transforms* (``transformers.conversion_mapping``): renamings
(GPT-NeoX's ``embed_out`` is the module's ``lm_head``; legacy ``LayerNorm.gamma``) and converters
that fuse or split tensors (Mixtral's and Qwen3-MoE's one-tensor-per-expert files become one fused
``experts.gate_up_proj`` / ``experts.down_proj`` per layer, through ``MergeModulelist`` and
``Concatenate``). ``from_pretrained`` applies them on load and ``save_pretrained`` reverts them on
save. ferrytune uses the same transforms and the same functions of
``transformers.core_model_loading`` (``rename_source_key``, each transform's ``convert``,
``revert_weight_conversion``), so what transformers loads ferrytune loads, and what ferrytune
saves transformers loads.

Both directions work per block: every transform's sources and targets lie inside one decoder
layer (or in the outer block), so a block is read by converting only its own checkpoint tensors,
and written by reverting only its own parameters; host memory holds one block at a time.
"""

from __future__ import annotations

import functools
import logging
from copy import deepcopy
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch

from ferrytune.errors import CheckpointError

logger = logging.getLogger(__name__)


def _transforms(model, *, loading: bool) -> tuple[list, list]:
    """(renamings, converters) transformers applies to ``model``'s checkpoints (load: with legacy names)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import PrefixChange, WeightConverter, WeightRenaming

    transforms = get_model_conversion_mapping(model, add_legacy=loading)
    if not loading:  # as save_pretrained of a model not made by from_pretrained: no prefix guessing
        transforms = [t for t in transforms if not isinstance(t, PrefixChange)]
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    return renamings, converters


@dataclass
class _Group:
    """The checkpoint tensors that make one target (a renamed tensor, or a converter's fused output)."""

    first_target: str  # the model name transformers keys the group by
    converter: object | None  # a WeightConverter template, or None for a plain (renamed) copy
    sources: list[tuple[str, str]] = field(default_factory=list)  # (source pattern, checkpoint key)
    block: str | None = None


class CheckpointLoader:
    """Fills blocks from a checkpoint whose tensor names follow transformers' mapping for the model.

    ``keys``: every tensor name in the checkpoint; ``read(key, out=None)`` reads one (into ``out``
    when given, checking its shape). Raises ``CheckpointError`` naming a parameter the checkpoint
    does not provide."""

    def __init__(self, layout, keys: Iterable[str], read: Callable[..., torch.Tensor], *, where: str) -> None:
        from transformers.core_model_loading import dot_natural_key, rename_source_key

        self.layout, self._read, self._where = layout, read, where
        model = layout.model
        renamings, converters = _transforms(model, loading=True)
        by_pattern = {pat: c for c in converters for pat in c.source_patterns}
        self._by_name = {n: p for p in layout.params for n in [p.name, *p.aliases]}
        self._block_of = {p.param_id: b for b, spec in layout.blocks.items() for p in spec.params}
        meta = {n: True for n in self._by_name}
        prefix = getattr(model, "base_model_prefix", "") or None
        groups: dict[str, _Group] = {}
        unexpected = []
        for key in sorted(keys, key=dot_natural_key):  # natural order: expert 10 after expert 9, as transformers
            target, pattern = rename_source_key(key, renamings, converters, prefix, meta)
            if target not in meta and key in meta:
                target, pattern = rename_source_key(key, [], [], prefix, meta)
            if target not in meta:
                unexpected.append(key)
                continue
            conv = by_pattern[pattern] if pattern is not None else None
            group = groups.setdefault(target, _Group(target, conv))
            group.sources.append((pattern if pattern is not None else key, key))
        covered: set[int] = set()
        self._groups: dict[str, list[_Group]] = {b: [] for b in layout.blocks}
        for g in groups.values():
            targets = self._targets(g)
            blocks = {self._block_of[self._by_name[t].param_id] for t in targets if t in self._by_name}
            if len(blocks) != 1:
                raise CheckpointError(f"{where}: checkpoint tensors {[k for _, k in g.sources]} convert into "
                                      f"parameters of {len(blocks)} blocks; ferrytune converts within one block")
            g.block = blocks.pop()
            self._groups[g.block].append(g)
            covered.update(self._by_name[t].param_id for t in targets if t in self._by_name)
        missing = [p for p in layout.params if p.param_id not in covered]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise CheckpointError(f"{where}: checkpoint has no tensor {_file_name(model, missing[0])}{more} "
                                  f"(is model.path the right model?)")
        if unexpected:
            logger.debug("%s: %d checkpoint tensors the model does not use, e.g. %s", where, len(unexpected),
                         unexpected[0])

    @staticmethod
    def _targets(g: _Group) -> list[str]:
        if g.converter is None:
            return [g.first_target]
        first = g.converter.target_patterns[0]
        return [g.first_target.replace(first, t) for t in g.converter.target_patterns]

    def source_keys(self, block_id: str) -> list[str]:
        """The checkpoint tensors ``block_id`` is made of."""
        return [k for g in self._groups[block_id] for _, k in g.sources]

    def read_block(self, block_id: str, flat: torch.Tensor) -> None:
        """Fill ``flat`` (a block's buffer) from the checkpoint tensors of that block."""
        for g in self._groups[block_id]:
            if g.converter is None:
                p = self._by_name[g.first_target]
                self._read(g.sources[0][1], out=_view(flat, p))
                continue
            conv = deepcopy(g.converter)  # transforms collect tensors: one fresh instance per use
            for pattern, key in g.sources:
                conv.add_tensor(g.first_target, key, pattern, functools.partial(self._read, key))
            try:
                out = conv.convert(g.first_target, model=self.layout.model, config=self.layout.config)
            except Exception as e:  # noqa: BLE001 - transformers' ops raise anything
                raise CheckpointError(f"{self._where}: cannot convert {[k for _, k in g.sources][:4]} into "
                                      f"{g.first_target} ({type(e).__name__}: {str(e).splitlines()[0]})") from e
            for name, t in out.items():
                t = t[0] if isinstance(t, list) else t
                p = self._by_name.get(name)
                if p is None:
                    continue
                if tuple(t.shape) != p.shape:
                    absent = _absent_members(g, p.shape)
                    if absent:
                        more = f" (and {len(absent) - 1} more)" if len(absent) > 1 else ""
                        raise CheckpointError(f"{self._where}: checkpoint has no tensor {absent[0]}{more} "
                                              f"(one of the tensors that make {name}; is model.path complete?)")
                    raise CheckpointError(f"{self._where}: tensors {[k for _, k in g.sources][:4]} convert to "
                                          f"{name} of shape {tuple(t.shape)}, the model expects {p.shape}")
                _view(flat, p).copy_(t)


def _file_name(model, p) -> str:
    """``p``'s name as save_pretrained writes it, with the module's name beside it where they differ."""
    from transformers.core_model_loading import revert_weight_conversion

    try:
        names = list(revert_weight_conversion(model, {p.name: torch.empty(p.shape, device="meta")}))
    except Exception:  # noqa: BLE001 - a fused parameter alone may not revert; the module name is enough
        names = []
    if len(names) == 1 and names[0] != p.name:
        return f"{names[0]} (the model's {p.name})"
    return p.name


def _absent_members(g: _Group, shape: tuple[int, ...]) -> list[str]:
    """Checkpoint keys a stacked group (``experts.*.w1``: one tensor per expert) lacks, given the fused
    parameter's ``shape`` (its first dimension is the number of members)."""
    import re

    absent = []
    for pattern in g.converter.source_patterns if g.converter is not None else []:
        if "*" not in pattern:
            continue
        rx = re.compile(re.escape(pattern).replace(r"\*", r"(\d+)"))
        found = {}
        for pat, key in g.sources:
            m = rx.search(key) if pat == pattern else None
            if m:
                found[int(m.group(1))] = (key, m.span(1))
        if not found:
            continue
        key, (a, b) = next(iter(found.values()))
        absent += [key[:a] + str(i) + key[b:] for i in range(shape[0]) if i not in found]
    return absent


def open_checkpoint(folder, layout) -> CheckpointLoader:
    """A ``CheckpointLoader`` over the safetensors files of the HF folder ``folder``."""
    from ferrytune.models._safetensors import SafetensorsReader

    reader = SafetensorsReader(folder)
    return CheckpointLoader(layout, list(reader.entries), reader.read, where=str(folder))


def checkpoint_tensors(layout, block_id: str, flat: torch.Tensor) -> dict[str, torch.Tensor]:
    """The checkpoint tensors (names and values, as ``save_pretrained`` writes them) of one block.

    ``flat`` may be on the meta device: then only names, shapes and dtypes are computed."""
    from transformers.core_model_loading import revert_weight_conversion

    state = {p.name: _view(flat, p) for p in layout.blocks[block_id].params}
    # What save_pretrained does for a model not loaded by from_pretrained: every non-legacy transform, reverted.
    return revert_weight_conversion(layout.model, state)


def _view(flat: torch.Tensor, p) -> torch.Tensor:
    return flat[p.offset: p.offset + p.numel].view(p.shape)

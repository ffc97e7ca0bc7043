"""Build an HF causal LM on the meta device and cut it into units and blocks.

No forward code is copied per architecture: the decoder layers are found as the
largest ``nn.ModuleList`` of identical modules, and every other module that owns
parameters directly (embeddings, positional embeddings, final norm, lm_head)
becomes an *outer* unit. The engine later replaces each unit's ``forward`` on the
instance, so every architecture (docs/models.md lists the 22 tested) runs through its
own HF code.
"""

from __future__ import annotations

import json
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ferrytune.errors import CheckpointError

logger = logging.getLogger(__name__)

OUTER = "outer"
_ALIGN_ELEMS = 64  # param offsets inside a block are 256-byte aligned for fp32
EXPERT_ALIGN_ELEMS = 2048  # a fused expert tensor starts 4 KiB-aligned (bf16; 8 KiB fp32): O_DIRECT reads of one expert


@dataclass
class ParamSpec:
    """One checkpoint tensor: its place in its block and every module that uses it."""

    name: str  # canonical name: the module's (files may differ: ferrytune.models._names maps them)
    param_id: int  # stable global index; keys the perturbation RNG
    shape: tuple[int, ...]
    offset: int  # element offset inside the block's flat buffer
    owners: list[tuple[nn.Module, str]] = field(default_factory=list)
    aliases: list[str] = field(default_factory=list)  # other names of a tied weight

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass
class Unit:
    """A module whose forward the engine intercepts."""

    name: str
    module: nn.Module
    block_id: str
    params: list[ParamSpec]


@dataclass
class ExpertLayout:
    """Where a MoE layer's experts lie in its block: the dense part (attention, norms, router, shared
    experts) is ``[0, dense_numel)``; each fused expert tensor ``[E, ...]`` follows, contiguous, starting
    at a multiple of ``EXPERT_ALIGN_ELEMS``, so expert ``e``'s slice ``t[e]`` is one contiguous range of it."""

    module: nn.Module  # the experts module (its forward receives the routed ``top_k_index``)
    num_experts: int
    dense_numel: int
    fused: list[ParamSpec]

    def ranges(self, e: int) -> list[tuple[int, int]]:
        """Element ranges ``[lo, hi)`` of the block holding expert ``e`` (one per fused tensor)."""
        out = []
        for p in self.fused:
            per = p.numel // self.num_experts
            out.append((p.offset + e * per, p.offset + (e + 1) * per))
        return out


@dataclass
class BlockSpec:
    block_id: str
    params: list[ParamSpec]
    numel: int  # padded flat length
    experts: ExpertLayout | None = None  # MoE layers: the experts' ranges

    def nbytes(self, dtype: torch.dtype) -> int:
        return self.numel * torch.empty((), dtype=dtype).element_size()


@dataclass
class ModelLayout:
    model: nn.Module
    config: object
    units: list[Unit]  # in forward order for layers; outer units first
    blocks: dict[str, BlockSpec]  # OUTER first, then layer blocks in forward order
    layer_blocks: list[str]
    params: list[ParamSpec]  # by param_id
    checkpoint_dtype: torch.dtype

    def param(self, name: str) -> ParamSpec:
        for p in self.params:
            if p.name == name or name in p.aliases:
                return p
        raise KeyError(name)


@contextmanager
def _meta_params():
    """Create parameters on the meta device but buffers (rotary tables) for real."""
    orig = nn.Module.register_parameter

    def register(module, name, param):
        orig(module, name, param)
        if param is not None and param.device.type != "meta":
            p = module._parameters[name]
            module._parameters[name] = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = orig


def _checkpoint_dtype(folder: Path) -> torch.dtype:
    """The dtype the checkpoint declares in config.json (read raw: building the model rewrites it)."""
    try:
        raw = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return torch.float32
    dt = raw.get("dtype") or raw.get("torch_dtype")
    dt = getattr(torch, dt, None) if isinstance(dt, str) else None
    return dt if isinstance(dt, torch.dtype) else torch.float32


def build_skeleton(path: str | os.PathLike, *, trust_remote_code: bool = False) -> tuple[nn.Module, object]:
    """Instantiate the model of an HF folder with every parameter on the meta device."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(path)
    if not (folder / "config.json").exists():
        raise CheckpointError(f"{folder}: no config.json (model.path must be a local Hugging Face model folder)")
    try:
        json.loads((folder / "config.json").read_text())
        config = AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=trust_remote_code)
    except (ValueError, OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{folder}/config.json: {str(e).splitlines()[0]}") from e
    config.use_cache = False
    with _meta_params():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code,
                                                 dtype=torch.float32)
    model.eval()  # ZO runs without dropout; LoRA dropout lives in the adapters
    model.requires_grad_(False)
    return model, config


def find_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    best, best_n = None, -1
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and len({type(m) for m in mod}) == 1:
            n = sum(p.numel() for p in mod.parameters())
            if n > best_n:
                best, best_n = (name, mod), n
    if best is None:
        raise CheckpointError(f"{type(model).__name__}: cannot find the decoder layers (no uniform nn.ModuleList)")
    return best


def build_layout(model: nn.Module, config, *, checkpoint_dtype: torch.dtype = torch.float32) -> ModelLayout:
    """Cut the model into units and blocks. Tied weights become one ParamSpec with several owners."""
    layers_name, layers = find_layers(model)
    # Canonical names: the first name under which named_parameters() reports a tensor.
    specs: dict[int, ParamSpec] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        key = id(p)
        if key not in specs:
            specs[key] = ParamSpec(name=name, param_id=len(specs), shape=tuple(p.shape), offset=0)
        elif name != specs[key].name:
            specs[key].aliases.append(name)
    for mod in model.modules():
        for attr, p in mod._parameters.items():
            if p is not None:
                specs[id(p)].owners.append((mod, attr))
    prefix = layers_name + "."
    layer_of: dict[int, int] = {}
    for i, layer in enumerate(layers):
        for p in layer.parameters():
            layer_of[id(p)] = i

    params = sorted(specs.values(), key=lambda s: s.param_id)
    block_params: dict[str, list[ParamSpec]] = {OUTER: []}
    layer_blocks = [f"layer.{i}" for i in range(len(layers))]
    for b in layer_blocks:
        block_params[b] = []
    for key, spec in specs.items():
        bid = f"layer.{layer_of[key]}" if key in layer_of else OUTER
        block_params[bid].append(spec)
    blocks: dict[str, BlockSpec] = {}
    for bid, plist in block_params.items():
        plist.sort(key=lambda s: s.param_id)
        found = _experts_of(layers[int(bid.split(".")[1])]) if bid != OUTER else None
        fused_ids = {id(p) for p in found[0]._parameters.values() if p is not None} if found else set()
        fused = [specs[k] for k in sorted(fused_ids, key=lambda k: specs[k].param_id)]
        dense = [s for s in plist if all(s is not f for f in fused)]
        off = 0
        for s in dense:  # the dense part first, in parameter order
            s.offset = off
            off += -(-s.numel // _ALIGN_ELEMS) * _ALIGN_ELEMS
        experts = None
        if fused:
            dense_numel = off
            for s in fused:  # then each fused expert tensor, 4 KiB-aligned: one expert is a contiguous sub-range
                off = -(-off // EXPERT_ALIGN_ELEMS) * EXPERT_ALIGN_ELEMS
                s.offset = off
                off += s.numel
            off = -(-off // _ALIGN_ELEMS) * _ALIGN_ELEMS
            experts = ExpertLayout(found[0], found[1], dense_numel, fused)
        blocks[bid] = BlockSpec(bid, dense + fused, max(off, _ALIGN_ELEMS), experts)

    units: list[Unit] = []
    for name, mod in model.named_modules():
        if name.startswith(prefix) or name == layers_name:
            continue
        own = [specs[id(p)] for p in mod._parameters.values() if p is not None]
        if own:
            units.append(Unit(name=name or "<root>", module=mod, block_id=OUTER, params=own))
    for i, layer in enumerate(layers):
        own = sorted({id(p): specs[id(p)] for p in layer.parameters()}.values(), key=lambda s: s.param_id)
        units.append(Unit(name=f"{layers_name}.{i}", module=layer, block_id=f"layer.{i}", params=own))
    logger.debug("layout: %d layers under %s, %d outer units, %d params",
                 len(layers), layers_name, len(units) - len(layers), len(params))
    return ModelLayout(model=model, config=config, units=units, blocks=blocks, layer_blocks=layer_blocks,
                       params=params, checkpoint_dtype=checkpoint_dtype)


def _experts_of(layer: nn.Module) -> tuple[nn.Module, int] | None:
    """A layer's fused experts module (transformers 5: ``mlp.experts`` of Mixtral, Qwen3-MoE, ...): a module
    named ``experts`` with an integer ``num_experts`` whose own parameters are all ``[num_experts, ...]``."""
    for name, mod in layer.named_modules():
        n = getattr(mod, "num_experts", None)
        own = [p for p in mod._parameters.values() if p is not None]
        if (name.rsplit(".", 1)[-1] == "experts" and isinstance(n, int) and n > 1 and own
                and all(p.dim() >= 2 and p.shape[0] == n for p in own)):
            return mod, n
    return None


def load_layout(path: str | os.PathLike, *, trust_remote_code: bool = False) -> ModelLayout:
    dtype = _checkpoint_dtype(Path(path))  # before the skeleton: from_config sets config.dtype to fp32
    model, config = build_skeleton(path, trust_remote_code=trust_remote_code)
    return build_layout(model, config, checkpoint_dtype=dtype)


def bind(spec: ParamSpec, tensor: torch.Tensor | None) -> None:
    """Point every owner of ``spec`` at ``tensor`` (a view into a block buffer), or back to meta."""
    for mod, attr in spec.owners:
        if tensor is None:
            mod._parameters[attr] = nn.Parameter(torch.empty(spec.shape, device="meta"), requires_grad=False)
        else:
            mod._parameters[attr] = tensor

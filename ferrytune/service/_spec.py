"""Job specs: parse, validate where they enter, and turn them into a TrainConfig dict.

A job spec is the LoRA training config (``docs/config.md``) with three differences:

* ``model: NAME`` names a base the service serves (or ``model: {name: NAME, compute_dtype: ...}``);
  ``model.path`` is refused: the server never opens a path a tenant names;
* ``data.train`` names a file the tenant uploaded, relative to its files area;
  ``output_dir`` (optional) names the adapter folder relative to its outputs area;
* optional ``name`` (free text) and ``priority`` (integer, higher runs first).

Sections the service decides (``offload``, ``parallel``, ``device``, ``resume``, ``zo``)
are refused. Every error is a :class:`SpecError` whose message starts with the field.
"""

from __future__ import annotations

import copy
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ferrytune.errors import ConfigError, FerrytuneError
from ferrytune.service._paths import UnsafePathError, resolve_inside
from ferrytune.service._policy import BaseCost, adapter_state_bytes

__all__ = ["BaseCatalog", "SpecError", "ValidSpec", "parse_spec_text", "validate_spec"]

_ALLOWED_KEYS = {"method", "model", "data", "train", "lora", "output_dir", "name", "priority"}
_SERVICE_KEYS = {"offload", "parallel", "device", "resume", "zo"}
PRIORITY_RANGE = (-100, 100)
_ELEM_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Saved activations per token per decoder layer, in elements, for a backward through a frozen
# base with LoRA: layer inputs, norms, q/k/v/o, attention probs' inputs, MLP up/gate/act
# (~12 x hidden + 3 x intermediate). A deliberately rough, conservative estimate.
_ACT_HIDDEN_FACTOR = 12
_ACT_INTERMEDIATE_FACTOR = 3


class SpecError(FerrytuneError, ValueError):
    """A job spec is malformed. The message starts with the field: ``train.lr: must be > 0``."""


@dataclass(frozen=True)
class ValidSpec:
    name: str
    priority: int
    base: str
    dtype: str
    config: dict  # a TrainConfig dict; data.train and model.path are server paths
    train_file: Path  # the tenant's uploaded file (resolved inside its area)
    output_rel: str | None  # output_dir as given (validated), or None
    max_steps: int
    max_length: int
    adapter_params: int

    @property
    def adapter_bytes(self) -> int:
        return adapter_state_bytes(self.adapter_params)


class BaseCatalog:
    """The served bases, with their shapes read once from config.json (a meta-device model)."""

    def __init__(self, bases: dict[str, str]):
        self.paths = dict(bases)
        self._meta: dict[str, Any] = {}
        self._lock = threading.Lock()

    def names(self) -> list[str]:
        return sorted(self.paths)

    def meta_model(self, name: str):
        with self._lock:
            if name not in self._meta:
                import torch
                from transformers import AutoConfig, AutoModelForCausalLM

                config = AutoConfig.from_pretrained(self.paths[name], local_files_only=True)
                with torch.device("meta"):
                    self._meta[name] = AutoModelForCausalLM.from_config(config)
            return self._meta[name]

    def cost(self, name: str, dtype: str) -> BaseCost:
        model = self.meta_model(name)
        cfg = model.config
        num_params = sum(p.numel() for p in model.parameters())
        hidden = int(getattr(cfg, "hidden_size", 0) or getattr(cfg, "n_embd", 0))
        inter = int(getattr(cfg, "intermediate_size", 0) or 4 * hidden)
        layers = int(getattr(cfg, "num_hidden_layers", 0) or getattr(cfg, "n_layer", 1))
        elem = _ELEM_BYTES[dtype]
        act = layers * (_ACT_HIDDEN_FACTOR * hidden + _ACT_INTERMEDIATE_FACTOR * inter) * elem
        return BaseCost(base_bytes=num_params * elem, act_bytes_per_token=act)


def parse_spec_text(text: str) -> dict:
    """YAML or JSON (JSON is YAML) text -> mapping. Raises SpecError."""
    try:
        raw = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise SpecError(f"spec: not valid YAML or JSON{where}: {getattr(e, 'problem', None) or e}") from None
    if not isinstance(raw, dict):
        raise SpecError(f"spec: must be a mapping of sections (got {type(raw).__name__})")
    return raw


def validate_spec(raw: dict, *, catalog: BaseCatalog, files_root: Path, outputs_root: Path) -> ValidSpec:
    """Check everything a worker would trip over, before the job is queued."""
    from ferrytune.config import config_from_dict
    from ferrytune.lora import LoraSpec, find_targets

    raw = copy.deepcopy(raw)
    for key in raw:
        if key in _SERVICE_KEYS:
            raise SpecError(f"{key}: chosen by the service, not by a job spec; remove it")
        if key not in _ALLOWED_KEYS:
            raise SpecError(f"{key}: unknown key; a job spec has {', '.join(sorted(_ALLOWED_KEYS))}")
    name = raw.pop("name", None)
    if name is not None and (not isinstance(name, str) or len(name) > 200):
        raise SpecError("name: must be a string of at most 200 characters")
    priority = raw.pop("priority", 0)
    if isinstance(priority, bool) or not isinstance(priority, int) or not (
            PRIORITY_RANGE[0] <= priority <= PRIORITY_RANGE[1]):
        raise SpecError(f"priority: must be an integer in [{PRIORITY_RANGE[0]}, {PRIORITY_RANGE[1]}] (got {priority!r})")
    method = raw.setdefault("method", "lora")
    if method != "lora":
        raise SpecError(f"method: the service trains LoRA jobs only (got {method!r})")
    base, model_section = _model_section(raw.get("model"), catalog)
    raw["model"] = model_section
    train_file = _data_section(raw, files_root)
    output_rel = raw.pop("output_dir", None)
    if output_rel is not None:
        if not isinstance(output_rel, str):
            raise SpecError("output_dir: must be a relative path string")
        try:
            resolve_inside(outputs_root, output_rel, field="output_dir")
        except UnsafePathError as e:
            raise SpecError(str(e)) from None
    lora = raw.get("lora") or {}
    if isinstance(lora, dict) and lora.get("init_from") is not None:
        raise SpecError("lora.init_from: not supported by the service (it would read a server path); remove it")
    try:
        cfg = config_from_dict(raw, source="spec", check_device=False)
        spec = LoraSpec(rank=cfg.lora.rank, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout,
                        target_modules=cfg.lora.target_modules, rank_pattern=dict(cfg.lora.rank_pattern),
                        alpha_pattern=dict(cfg.lora.alpha_pattern), use_rslora=cfg.lora.use_rslora)
        targets = find_targets(catalog.meta_model(base), spec)
    except ConfigError as e:
        raise SpecError(str(e).removeprefix("spec: ")) from None
    params = sum(t.rank * (t.in_features + t.out_features) for t in targets.values())
    return ValidSpec(name=name or "", priority=priority, base=base, dtype=cfg.model.compute_dtype,
                     config=cfg.to_dict(), train_file=train_file, output_rel=output_rel,
                     max_steps=cfg.train.steps, max_length=cfg.data.max_length, adapter_params=params)


def _model_section(model: Any, catalog: BaseCatalog) -> tuple[str, dict]:
    served = ", ".join(catalog.names()) or "(none)"
    if isinstance(model, str):
        model = {"name": model}
    if not isinstance(model, dict):
        raise SpecError(f"model: name a served base, e.g. 'model: {catalog.names()[0] if catalog.names() else 'NAME'}' "
                        f"(served: {served})")
    model = dict(model)
    if "path" in model:
        raise SpecError(f"model.path: not allowed; name a served base instead (model: NAME; served: {served})")
    name = model.pop("name", None)
    if name not in catalog.paths:
        raise SpecError(f"model: unknown base {name!r}; served: {served}")
    return name, {"path": catalog.paths[name], **model}


def _data_section(raw: dict, files_root: Path) -> Path:
    data = raw.get("data")
    if not isinstance(data, dict):
        raise SpecError("data: required section with at least 'train: FILE' (a file you uploaded)")
    if data.get("eval") is not None:
        raise SpecError("data.eval: evaluation is not run by the service; remove it")
    if "train" not in data:
        raise SpecError("data.train: required; name a file you uploaded")
    try:
        path = resolve_inside(files_root, data["train"], field="data.train")
    except UnsafePathError as e:
        raise SpecError(str(e)) from None
    if not path.is_file():
        raise SpecError(f"data.train: {data['train']!r} is not among your uploaded files; upload it first")
    data["train"] = str(path)
    return path


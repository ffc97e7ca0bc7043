"""Which modules get an adapter, with which rank and scaling.

The matching rules are PEFT's (``peft.tuners.tuners_utils.check_target_module_exists``
and ``peft.utils.other.get_pattern_key``), so an adapter trained here and one
trained with ``get_peft_model`` on the same config adapt the same modules:

* ``target_modules`` as a list: a module matches when its path equals a name or
  ends with ``"." + name`` (``"q_proj"`` matches ``model.layers.0.self_attn.q_proj``).
* ``target_modules`` as a string: ``"all-linear"`` (any case) is every
  ``nn.Linear`` / GPT-2 ``Conv1D`` except the output head; any other string is a
  regex that must match the whole module path (``re.fullmatch``).
* ``rank_pattern`` / ``alpha_pattern``: the first key (in dict order) for which
  ``re.match(rf"(.*\\.)?({key})$", path)`` succeeds gives the value.

Only module types and ``in/out`` sizes are read, never weights, so this works on
a model built on the meta device.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Literal

import torch.nn as nn
from transformers.pytorch_utils import Conv1D

from ferrytune.errors import ConfigError

__all__ = ["LoraSpec", "TargetInfo", "find_targets"]

ALL_LINEAR = "all-linear"
_NUM_NAMES_IN_ERROR = 12


@dataclass
class LoraSpec:
    """One adapter's hyperparameters (the fields of PEFT's ``LoraConfig`` that ferrytune supports)."""

    rank: int = 8
    """adapter rank r (PEFT ``r``)"""
    alpha: float = 16
    """scaling numerator (PEFT ``lora_alpha``): s = alpha / r, or alpha / sqrt(r) with rsLoRA"""
    dropout: float = 0.0
    """dropout probability on the adapter input (PEFT ``lora_dropout``)"""
    target_modules: list[str] | str = field(default_factory=lambda: ["q_proj", "v_proj"])
    """module-name suffixes, ``"all-linear"``, or one regex fullmatched against the module path"""
    rank_pattern: dict[str, int] = field(default_factory=dict)
    """module-path regex -> rank override"""
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    """module-path regex -> alpha override"""
    use_rslora: bool = False
    """scale by alpha / sqrt(r) (Kalajdzievski 2023) instead of alpha / r"""

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)
        _check_positive_int("lora.rank", self.rank)
        _check_positive_number("lora.alpha", self.alpha)
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout: must be in [0, 1) (got {self.dropout!r})")
        tm = self.target_modules
        if isinstance(tm, str):
            if tm.lower() != ALL_LINEAR:
                _check_regex("lora.target_modules", tm)
        elif not (isinstance(tm, list) and tm and all(isinstance(s, str) and s for s in tm)):
            raise ConfigError(
                f"lora.target_modules: must be a non-empty list of module names, "
                f"'all-linear' or a regex (got {tm!r})"
            )
        for pattern, value in self.rank_pattern.items():
            _check_regex("lora.rank_pattern", pattern)
            _check_positive_int(f"lora.rank_pattern[{pattern!r}]", value)
        for pattern, value in self.alpha_pattern.items():
            _check_regex("lora.alpha_pattern", pattern)
            _check_positive_number(f"lora.alpha_pattern[{pattern!r}]", value)

    @classmethod
    def from_config(cls, lora) -> "LoraSpec":
        """The spec of a config's ``lora`` section (``ferrytune.config.LoRAConfig``)."""
        return cls(rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout, target_modules=lora.target_modules,
                   rank_pattern=dict(lora.rank_pattern), alpha_pattern=dict(lora.alpha_pattern),
                   use_rslora=lora.use_rslora)

    def rank_alpha_for(self, path: str) -> tuple[int, float]:
        """The (rank, alpha) PEFT would give the module at ``path``."""
        rank = _pattern_value(self.rank_pattern, path, self.rank)
        alpha = _pattern_value(self.alpha_pattern, path, self.alpha)
        return rank, alpha

    def scaling(self, rank: int, alpha: float) -> float:
        """s = alpha / r (Hu et al. 2021), or alpha / sqrt(r) with rsLoRA (Kalajdzievski 2023)."""
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank


@dataclass(frozen=True)
class TargetInfo:
    """One adapted module, as seen from its type and shape."""

    in_features: int
    out_features: int
    rank: int
    alpha: float
    scaling: float
    kind: Literal["linear", "conv1d"]
    """``conv1d`` is transformers' GPT-2 ``Conv1D``: weight stored [in, out] (PEFT ``fan_in_fan_out``)"""


def find_targets(model: nn.Module, spec: LoraSpec) -> dict[str, TargetInfo]:
    """Module path -> :class:`TargetInfo` for every module ``spec`` adapts, in ``named_modules`` order.

    Raises :class:`ConfigError` (naming ``lora.target_modules``) when nothing matches or when
    a matched module is not a linear layer.
    """
    head = _output_head(model)
    targets: dict[str, TargetInfo] = {}
    for path, module in model.named_modules():
        if not path or not _matches(spec.target_modules, path, module, head):
            continue
        shape = _linear_shape(module)
        if shape is None:
            raise ConfigError(
                f"lora.target_modules: {path!r} is a {type(module).__name__}; only nn.Linear and "
                f"GPT-2 Conv1D can take a LoRA adapter (name its linear submodules instead)"
            )
        rank, alpha = spec.rank_alpha_for(path)
        targets[path] = TargetInfo(
            in_features=shape[0],
            out_features=shape[1],
            rank=rank,
            alpha=alpha,
            scaling=spec.scaling(rank, alpha),
            kind="conv1d" if isinstance(module, Conv1D) else "linear",
        )
    if not targets:
        names = sorted({p.rsplit(".", 1)[-1] for p, m in model.named_modules() if _linear_shape(m)})
        shown = ", ".join(names[:_NUM_NAMES_IN_ERROR]) + (", ..." if len(names) > _NUM_NAMES_IN_ERROR else "")
        raise ConfigError(
            f"lora.target_modules: {spec.target_modules!r} matches no module of "
            f"{type(model).__name__}; its linear modules are: {shown or '(none)'}"
        )
    return targets


def _matches(target_modules: list[str] | str, path: str, module: nn.Module, head: nn.Module | None) -> bool:
    if isinstance(target_modules, str):
        if target_modules.lower() == ALL_LINEAR:
            return _linear_shape(module) is not None and module is not head
        return re.fullmatch(target_modules, path) is not None
    return path in target_modules or any(path.endswith("." + name) for name in target_modules)


def _pattern_value(patterns: dict, path: str, default):
    # PEFT's get_pattern_key: the key is a regex for a dotted suffix of the path; first hit wins.
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def _linear_shape(module: nn.Module) -> tuple[int, int] | None:
    """(in_features, out_features) of an nn.Linear or Conv1D, else None. Reads no weights."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, Conv1D):
        return module.nx, module.nf
    return None


def _output_head(model: nn.Module) -> nn.Module | None:
    # PEFT excludes get_output_embeddings() from all-linear; fall back to a top-level lm_head.
    get_head = getattr(model, "get_output_embeddings", None)
    if callable(get_head):
        try:
            head = get_head()
        except (AttributeError, NotImplementedError):
            head = None
        if head is not None:
            return head
    return getattr(model, "lm_head", None)


def _check_positive_int(key: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{key}: must be a positive integer (got {value!r})")


def _check_positive_number(key: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ConfigError(f"{key}: must be a number > 0 (got {value!r})")


def _check_regex(key: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as e:
        raise ConfigError(f"{key}: bad regex {pattern!r}: {e}") from None

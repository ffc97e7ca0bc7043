"""Job specs: parse, validate where they enter, and turn them into a TrainConfig dict.

A job spec is the LoRA training config (``docs/config.md``) with these differences:

* ``model: NAME`` names a base the service serves (or ``model: {name: NAME, compute_dtype: ...}``);
  ``model.path`` is refused: the server never opens a path a tenant names;
* ``data.train`` (and ``data.eval``, optional) name files the tenant uploaded, relative to its
  files area;
* ``lora.init_from`` names one of the tenant's own succeeded jobs by its id (never a path);
  the API looks it up (:func:`check_init_from` checks it fits);
  ``output_dir`` (optional) names the adapter folder relative to its outputs area;
* optional ``name`` (free text) and ``priority`` (integer, higher runs first).

Sections the service decides (``offload``, ``parallel``, ``device``, ``resume``, ``zo``)
are refused. Every error is a :class:`SpecError` whose message starts with the field.

Everything a worker could trip over is checked here, before the job is queued: every
value's type and range (integers within 32 bits, finite floats, text that is valid
Unicode), the tenant's limits (``train.steps``, tokens per step), and the dataset itself:
:func:`check_dataset` reads and tokenises the job's copy of it, so a broken line, an
empty file, wrong keys or a label out of range is refused naming the file and line.
"""

from __future__ import annotations

import copy
import math
import re
import threading
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import yaml

from ferrytune.errors import ConfigError, DataError, FerrytuneError
from ferrytune.service._limits import TenantLimits

if TYPE_CHECKING:
    from ferrytune.config import TrainConfig
from ferrytune.service._paths import UnsafePathError, check_file_name, resolve_inside
from ferrytune.service._policy import BaseCost, adapter_state_bytes

__all__ = ["BaseCatalog", "DatasetStats", "SpecError", "ValidSpec", "check_dataset", "check_init_from",
           "job_memory_bytes", "parse_spec_text", "validate_spec"]

_ALLOWED_KEYS = {"method", "model", "data", "train", "lora", "output_dir", "name", "priority"}
_SERVICE_KEYS = {"offload", "parallel", "device", "resume", "zo"}
PRIORITY_RANGE = (-100, 100)
_ELEM_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Saved activations per token per decoder layer, in elements, for a backward through a frozen
# base with LoRA: layer inputs, norms, q/k/v/o, attention probs' inputs, MLP up/gate/act
# (~12 x hidden + 3 x intermediate). A deliberately rough, conservative estimate.
_ACT_HIDDEN_FACTOR = 12
_ACT_INTERMEDIATE_FACTOR = 3
# A job's data on a worker: its tokenised examples (Python tuples of ints: ~ 3 x 8-byte
# slots + int objects per token, and a few hundred bytes per row), and one step's collated
# batch (int64 ids + mask, built twice: per job and packed). Rough and conservative.
_EXAMPLE_BYTES_PER_TOKEN = 64
_EXAMPLE_BYTES_PER_ROW = 512
_STEP_BYTES_PER_TOKEN = 32
INT_RANGE = (-(2**31), 2**31 - 1)
JOB_ID_RE = re.compile(r"j-[0-9a-f]{16}")
_MAX_OUTPUT_DEPTH = 8


class SpecError(FerrytuneError, ValueError):
    """A job spec is malformed. The message starts with the field: ``train.lr: must be > 0``."""


@dataclass(frozen=True)
class ValidSpec:
    name: str
    priority: int
    base: str
    cfg: TrainConfig  # the job's config, parsed and checked once; data.train and model.path are server paths
    train_file: Path  # the tenant's uploaded file (resolved inside its area)
    output_rel: str | None  # output_dir as given (validated), or None
    adapter_params: int
    eval_file: Path | None = None  # the tenant's uploaded data.eval file (resolved inside its area), or None
    init_from_job: str | None = None  # lora.init_from: a job id of the tenant (looked up by the API), or None
    optimizer_bytes: int | None = None  # the state of its train.optimizer; None: AdamW's (the largest)

    @property
    def adapter_bytes(self) -> int:
        return adapter_state_bytes(self.adapter_params, self.optimizer_bytes)

    def stored_config(self, *, train: str, output_dir: str, eval: str | None = None,
                      init_from: str | None = None) -> dict:
        """The config as the job store keeps it (JSON), with the job's own copies of the data, of the
        adapter it continues (``init_from``) and its folder."""
        data = self.cfg.data.model_copy(update={"train": train, "eval": eval})
        lora = self.cfg.lora.model_copy(update={"init_from": init_from})
        return self.cfg.model_copy(update={"data": data, "lora": lora, "output_dir": output_dir}).to_dict()


@dataclass(frozen=True)
class DatasetStats:
    rows: int
    tokens: int


def job_memory_bytes(valid: ValidSpec, data: DatasetStats) -> int:
    """What the job adds to a worker: adapter state, its tokenised dataset, one step's batch."""
    return (valid.adapter_bytes + data.tokens * _EXAMPLE_BYTES_PER_TOKEN + data.rows * _EXAMPLE_BYTES_PER_ROW
            + valid.cfg.train.batch_size * valid.cfg.data.max_length * _STEP_BYTES_PER_TOKEN)


class BaseCatalog:
    """The served bases, with their shapes read once from config.json (a meta-device model)."""

    def __init__(self, bases: dict[str, str]):
        self.paths = dict(bases)
        self._meta: dict[str, Any] = {}
        self._tokenizers: dict[str, Any] = {}
        self._lock = threading.Lock()
        # One dataset check at a time: bounds the service's memory to one dataset in flight,
        # and a fast tokenizer must not be used from two threads at once.
        self.encode_lock = threading.Lock()

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

    def tokenizer(self, name: str):
        with self._lock:
            if name not in self._tokenizers:
                from ferrytune.data import load_tokenizer

                self._tokenizers[name] = load_tokenizer(self.paths[name])
            return self._tokenizers[name]

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


def validate_spec(raw: dict, *, catalog: BaseCatalog, files_root: Path, outputs_root: Path,
                  limits: TenantLimits | None = None) -> ValidSpec:
    """Check everything a worker would trip over, before the job is queued."""
    from ferrytune.config import config_from_dict
    from ferrytune.engine import optimizer_state_bytes
    from ferrytune.lora import LoraSpec, find_targets

    limits = limits or TenantLimits()
    raw = copy.deepcopy(raw)
    _check_values(raw, "")
    for key in raw:
        if key in _SERVICE_KEYS:
            raise SpecError(f"{key}: chosen by the service, not by a job spec; remove it")
        if key not in _ALLOWED_KEYS:
            raise SpecError(f"{key}: unknown key; a job spec has {', '.join(sorted(_ALLOWED_KEYS))}")
    name = raw.pop("name", None)
    if name is not None and (not isinstance(name, str) or len(name) > 200):
        raise SpecError("name: must be a string of at most 200 characters")
    if name is not None and (not name.isprintable() or "$" in name):
        raise SpecError(f"name: plain printable text without '$' please (got {_short(name)})")
    priority = raw.pop("priority", 0)
    if isinstance(priority, bool) or not isinstance(priority, int) or not (
            PRIORITY_RANGE[0] <= priority <= PRIORITY_RANGE[1]):
        raise SpecError(f"priority: must be an integer in [{PRIORITY_RANGE[0]}, {PRIORITY_RANGE[1]}] (got {priority!r})")
    method = raw.setdefault("method", "lora")
    if method != "lora":
        raise SpecError(f"method: the service trains LoRA jobs only (got {method!r})")
    base, model_section = _model_section(raw.get("model"), catalog)
    raw["model"] = model_section
    train_file, eval_file = _data_section(raw, files_root)
    output_rel = raw.pop("output_dir", None)
    if output_rel is not None:
        output_rel = _output_dir(output_rel, outputs_root)
    init_from_job = _init_from(raw.get("lora"))
    try:
        cfg = config_from_dict(raw, source="spec", check_device=False)
        spec = LoraSpec.from_config(cfg.lora)
        targets = find_targets(catalog.meta_model(base), spec)
    except ConfigError as e:
        raise SpecError(str(e).removeprefix("spec: ")) from None
    if cfg.train.steps > limits.max_steps:
        raise SpecError(f"train.steps: at most {limits.max_steps} on this service (got {cfg.train.steps})")
    tokens = cfg.train.batch_size * cfg.data.max_length
    if tokens > limits.max_tokens_per_step:
        raise SpecError(f"train.batch_size: batch_size x data.max_length = {tokens} tokens per step; this service "
                        f"allows {limits.max_tokens_per_step}; lower train.batch_size or data.max_length")
    if cfg.train.eval_every_steps is not None and eval_file is None:
        raise SpecError("train.eval_every_steps: needs data.eval (a file you uploaded to evaluate on)")
    params = sum(t.rank * (t.in_features + t.out_features) for t in targets.values())
    shapes = [s for t in targets.values() for s in ((t.rank, t.in_features), (t.out_features, t.rank))]  # A, B
    return ValidSpec(name=name or "", priority=priority, base=base, cfg=cfg, train_file=train_file,
                     output_rel=output_rel, adapter_params=params, eval_file=eval_file,
                     init_from_job=init_from_job, optimizer_bytes=optimizer_state_bytes(cfg.train.optimizer, shapes))


def check_dataset(valid: ValidSpec, catalog: BaseCatalog, path: Path, *, shown: str,
                  eval_path: Path | None = None, eval_shown: str = "") -> DatasetStats:
    """Read and tokenise the job's dataset at ``path`` (and its eval file) exactly as its worker will.

    Errors name the file as the tenant knows it (``shown``, ``eval_shown``) and the line, never a path.
    """
    from ferrytune.data import load_examples

    data = valid.cfg.data.model_copy(update={"train": str(path), "eval": None if eval_path is None else str(eval_path)})
    tokenizer = catalog.tokenizer(valid.base)
    try:
        with catalog.encode_lock:
            examples, eval_examples = load_examples(data, tokenizer)
    except (DataError, ConfigError) as e:
        message = " ".join(str(e).split())
        in_eval = eval_path is not None and str(eval_path) in message
        message = message.replace(str(path), shown)
        if eval_path is not None:
            message = message.replace(str(eval_path), eval_shown)
        if isinstance(e, DataError):
            message = f"{'data.eval' if in_eval else 'data.train'}: {message}"
        raise SpecError(message.removeprefix("spec: ")) from None
    examples = examples + (eval_examples or [])  # a worker holds both
    return DatasetStats(rows=len(examples), tokens=sum(len(e.input_ids) for e in examples))


def check_init_from(valid: ValidSpec, catalog: BaseCatalog, parent_id: str, parent_base: str,
                    parent_config: dict) -> None:
    """The job continues ``parent_id``'s adapter: same base, and the adapter this spec describes.

    ``load_peft`` takes rank, alpha, targets and dropout from the parent's adapter, so a spec
    that says otherwise is refused, naming the first field that differs.
    """
    from ferrytune.config import config_from_dict
    from ferrytune.lora import LoraSpec, find_targets

    where = f"lora.init_from: job {parent_id}"
    if parent_base != valid.base:
        raise SpecError(f"{where} trained base {parent_base!r}, this spec names {valid.base!r}; "
                        "continue a job of the same base")
    parent = config_from_dict(parent_config, source=f"job {parent_id}", check_device=False).lora
    mine = valid.cfg.lora
    model = catalog.meta_model(valid.base)
    theirs = find_targets(model, LoraSpec.from_config(parent))
    ours = find_targets(model, LoraSpec.from_config(mine))
    if set(theirs) != set(ours):
        raise SpecError(f"lora.target_modules: {_short(mine.target_modules)} adapts other modules than {where}'s "
                        f"{_short(parent.target_modules)}; use the same targets to continue its adapter")
    for path, t in theirs.items():
        if ours[path].rank != t.rank:
            field = "lora.rank_pattern" if mine.rank_pattern or parent.rank_pattern else "lora.rank"
            raise SpecError(f"{field}: rank {ours[path].rank} at {path.rsplit('.', 1)[-1]} differs from {where}'s "
                            f"{t.rank}; use the same rank to continue its adapter")
        if ours[path].scaling != t.scaling:
            field = "lora.alpha_pattern" if mine.alpha_pattern or parent.alpha_pattern else (
                "lora.use_rslora" if mine.use_rslora != parent.use_rslora else "lora.alpha")
            raise SpecError(f"{field}: scaling {ours[path].scaling:g} differs from {where}'s {t.scaling:g} "
                            f"(lora.alpha {parent.alpha:g}, use_rslora {parent.use_rslora}); use the same to "
                            "continue its adapter")
    if mine.dropout != parent.dropout:
        raise SpecError(f"lora.dropout: {mine.dropout:g} differs from {where}'s {parent.dropout:g}; use the same "
                        "to continue its adapter")


def _init_from(lora: Any) -> str | None:
    """``lora.init_from``: a job id of the tenant's, never a path; removed from the section (the API
    puts the server's copy of that job's adapter there)."""
    if not isinstance(lora, dict) or lora.get("init_from") is None:
        return None
    value = lora.pop("init_from")
    if not isinstance(value, str) or not JOB_ID_RE.fullmatch(value):
        raise SpecError(f"lora.init_from: name one of your succeeded jobs by its id (e.g. j-0123456789abcdef), "
                        f"not a path (got {_short(value)})")
    return value


def _check_values(value: Any, where: str) -> None:
    """Every key a string, every integer in 32 bits, every float finite, every string valid Unicode."""
    field = where or "spec"
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise SpecError(f"{where + '.' if where else ''}{key!r}: keys must be strings")
            _check_values(key, f"{where}.{key}" if where else key)
            _check_values(item, f"{where}.{key}" if where else key)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_values(item, f"{field}[{i}]")
    elif isinstance(value, bool) or value is None:
        return
    elif isinstance(value, int):
        if not INT_RANGE[0] <= value <= INT_RANGE[1]:
            raise SpecError(f"{field}: {_short(value)} is out of range (integers here are at most {INT_RANGE[1]})")
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise SpecError(f"{field}: must be a finite number (got {value})")
    elif isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise SpecError(f"{field}: not valid Unicode text (a lone surrogate such as \\ud800)") from None
        if "\x00" in value:
            raise SpecError(f"{field}: contains a NUL character")
    else:
        raise SpecError(f"{field}: unsupported value of type {type(value).__name__}")


def _output_dir(rel: Any, outputs_root: Path) -> str:
    """A folder strictly inside the tenant's outputs area, named by plain components."""
    if not isinstance(rel, str):
        raise SpecError("output_dir: must be a relative path string, e.g. 'runs/sentiment'")
    try:
        resolve_inside(outputs_root, rel, field="output_dir")
        parts = PurePosixPath(rel).parts
        if not parts:
            raise UnsafePathError(f"output_dir: {rel!r} names your outputs area itself; name a folder in it, "
                                  "e.g. 'runs/sentiment'")
        if len(parts) > _MAX_OUTPUT_DEPTH:
            raise UnsafePathError(f"output_dir: at most {_MAX_OUTPUT_DEPTH} levels (got {len(parts)})")
        for part in parts:
            check_file_name(part)
    except UnsafePathError as e:
        message = str(e)
        raise SpecError(message if message.startswith("output_dir") else f"output_dir: {message}") from None
    return "/".join(parts)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


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


def _data_section(raw: dict, files_root: Path) -> tuple[Path, Path | None]:
    data = raw.get("data")
    if not isinstance(data, dict):
        raise SpecError("data: required section with at least 'train: FILE' (a file you uploaded)")
    if "train" not in data:
        raise SpecError("data.train: required; name a file you uploaded")
    paths = {}
    for key in ("train", "eval"):
        if key == "eval" and data.get("eval") is None:
            paths[key] = None
            continue
        field = f"data.{key}"
        try:
            path = resolve_inside(files_root, data[key], field=field)
        except UnsafePathError as e:
            raise SpecError(str(e)) from None
        if not path.is_file():
            raise SpecError(f"{field}: {data[key]!r} is not among your uploaded files; upload it first")
        data[key] = str(path)
        paths[key] = path
    return paths["train"], paths["eval"]


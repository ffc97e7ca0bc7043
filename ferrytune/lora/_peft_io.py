"""Read and write adapters in PEFT's folder format.

A PEFT LoRA folder holds ``adapter_config.json`` (a ``LoraConfig``) and
``adapter_model.safetensors`` with, for every adapted module path ``P`` of the
base ``*ForCausalLM`` model::

    base_model.model.P.lora_A.weight   (r, in)
    base_model.model.P.lora_B.weight   (out, r)

GPT-2's ``Conv1D`` stores its weight as (in, out); the LoRA tensors keep the
shapes above and the config says ``fan_in_fan_out: true`` (it only matters when
PEFT merges). ``peft.PeftModel.from_pretrained`` loads what ``save_peft`` writes,
and ``load_peft`` reads PEFT's own ``save_pretrained`` output.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from ferrytune.errors import CheckpointError, ConfigError
from ferrytune.lora._adapter import Adapter
from ferrytune.lora._spec import ALL_LINEAR, LoraSpec, find_targets

__all__ = ["load_peft", "save_peft"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
KEY_PREFIX = "base_model.model."

# LoraConfig fields whose non-default values change the math; we refuse them rather than ignore them.
_UNSUPPORTED = {
    "use_dora": False,
    "lora_bias": False,
    "bias": "none",
    "modules_to_save": None,
    "layers_to_transform": None,
    "layer_replication": None,
    "target_parameters": None,
    "exclude_modules": None,
    "trainable_token_indices": None,
    "alora_invocation_tokens": None,
    "use_qalora": False,
    "use_bdlora": None,
    "velora_config": None,
    "monteclora_config": None,
    "arrow_config": None,
    "kasa_config": None,
}
# inits that leave the base weights alone; PiSSA, OLoRA, CorDA, LoftQ, MiCA... rewrite them
# (or change the forward) unless PEFT converted the adapter to plain LoRA on save
_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")


def peft_key(path: str, which: str) -> str:
    """The safetensors key of ``lora_A`` / ``lora_B`` (``which``) at module ``path``."""
    return f"{KEY_PREFIX}{path}.{which}.weight"


def save_peft(adapter: Adapter, out_dir: str | os.PathLike, *, base_model_name_or_path: str, spec: LoraSpec) -> None:
    """Write ``adapter`` as a PEFT LoRA folder at ``out_dir``, atomically.

    Everything is written and fsync'd into a temporary sibling folder that is then renamed
    to ``out_dir``; an existing adapter folder there is replaced (moved aside, then deleted).
    A reader sees the old adapter, no folder, or the new one, never a half-written one.
    Refuses to replace a non-empty folder that holds no ``adapter_config.json``. OS errors
    (disk full, permissions) become :class:`CheckpointError`.
    """
    _check_spec_matches(adapter, spec)
    out = Path(out_dir)
    if out.exists() and not _is_replaceable(out):
        raise CheckpointError(f"{out}: exists and is not an adapter folder; refusing to replace it")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as e:
        raise CheckpointError(f"{out}: could not write the adapter ({_one_line(e)})") from e
    try:
        tmp.chmod(0o755)  # mkdtemp makes it 0700; the folder outlives us as out_dir
        tensors = {}
        for path, a, b in adapter.named_pairs():
            tensors[peft_key(path, "lora_A")] = a.detach().to("cpu", torch.float32).contiguous()
            tensors[peft_key(path, "lora_B")] = b.detach().to("cpu", torch.float32).contiguous()
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        config = _peft_config(adapter, spec, base_model_name_or_path)
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for name in (WEIGHTS_NAME, CONFIG_NAME):
            _fsync_path(tmp / name)
        _fsync_path(tmp)
        _swap_into_place(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):  # disk full, permissions: one line for the CLI, naming the folder
            raise CheckpointError(f"{out}: could not write the adapter ({_one_line(e)})") from e
        raise


def load_peft(
    adapter_dir: str | os.PathLike, model: nn.Module, *, device: str | torch.device = "cpu"
) -> tuple[Adapter, LoraSpec]:
    """Read a PEFT LoRA folder (ours or PEFT's ``save_pretrained``) for ``model``.

    ``model`` may be on the meta device: only its module names, types and shapes are read.
    Raises :class:`CheckpointError` (one line, naming the file and key) when a file is missing
    or corrupt, the config uses a PEFT feature ferrytune does not implement, or the tensors do
    not fit the model's modules.
    """
    folder = Path(adapter_dir)
    spec = _read_spec(folder / CONFIG_NAME)
    try:
        targets = find_targets(model, spec)
    except ConfigError as e:
        raise CheckpointError(f"{folder / CONFIG_NAME}: does not fit the model: {e}") from None
    tensors, weights_file = _read_tensors(folder)
    expected = {peft_key(p, w): (p, w) for p in targets for w in ("lora_A", "lora_B")}
    for key in tensors:
        if key not in expected:
            raise CheckpointError(f"{weights_file}: key {key!r} matches no target module of the model")
    adapter = Adapter(targets, spec, device="cpu")
    with torch.no_grad():
        for key, (path, which) in expected.items():
            if key not in tensors:
                raise CheckpointError(f"{weights_file}: missing key {key!r}")
            param = adapter.a(path) if which == "lora_A" else adapter.b(path)
            got = tensors[key]
            if tuple(got.shape) != tuple(param.shape):
                raise CheckpointError(
                    f"{weights_file}: {key!r} has shape {tuple(got.shape)}, the model needs {tuple(param.shape)}"
                )
            param.copy_(got.to(torch.float32))
    return adapter.to(device), spec


def _peft_config(adapter: Adapter, spec: LoraSpec, base_model_name_or_path: str) -> dict:
    target_modules = spec.target_modules
    if isinstance(target_modules, str) and target_modules.lower() == ALL_LINEAR:
        # like PEFT's own save: the resolved module paths, so loading does not depend on the head rule
        target_modules = adapter.paths
    elif isinstance(target_modules, list):
        target_modules = sorted(target_modules)
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "lora_dropout": spec.dropout,
        "target_modules": target_modules,
        "rank_pattern": dict(spec.rank_pattern),
        "alpha_pattern": dict(spec.alpha_pattern),
        "use_rslora": spec.use_rslora,
        "fan_in_fan_out": any(t.kind == "conv1d" for t in adapter.targets.values()),
        "bias": "none",
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }


def _check_spec_matches(adapter: Adapter, spec: LoraSpec) -> None:
    # the config is all PEFT will know: it must give every target the rank and scaling we trained with
    for path, info in adapter.targets.items():
        rank, alpha = spec.rank_alpha_for(path)
        if (rank, spec.scaling(rank, alpha)) != (info.rank, info.scaling):
            raise ConfigError(
                f"lora: spec gives {path!r} rank {rank}, scaling {spec.scaling(rank, alpha)} but the adapter "
                f"has rank {info.rank}, scaling {info.scaling}; pass the spec the adapter was created with"
            )


def _read_spec(config_file: Path) -> LoraSpec:
    try:
        raw = json.loads(config_file.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{config_file}: not found (not a PEFT adapter folder?)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{config_file}: unreadable or not JSON ({_one_line(e)})") from None
    if not isinstance(raw, dict) or raw.get("peft_type") != "LORA":
        got = raw.get("peft_type") if isinstance(raw, dict) else type(raw).__name__
        raise CheckpointError(f"{config_file}: peft_type must be 'LORA' (got {got!r})")
    for field, default in _UNSUPPORTED.items():
        value = raw.get(field, default)
        if value != default and value not in ([], {}):
            raise CheckpointError(f"{config_file}: {field}={value!r} is not supported by ferrytune (only {default!r})")
    init = raw.get("init_lora_weights", True)
    if init not in _PLAIN_INITS:
        raise CheckpointError(
            f"{config_file}: init_lora_weights={init!r} changes the base model; save it with PEFT's "
            f"path_initial_model_for_weight_conversion to get a plain LoRA adapter"
        )
    try:
        return LoraSpec(
            rank=raw.get("r", 8),
            alpha=raw.get("lora_alpha", 8),  # PEFT's LoraConfig default
            dropout=raw.get("lora_dropout", 0.0),
            target_modules=raw.get("target_modules"),
            rank_pattern=raw.get("rank_pattern") or {},
            alpha_pattern=raw.get("alpha_pattern") or {},
            use_rslora=bool(raw.get("use_rslora", False)),
        )
    except ConfigError as e:
        raise CheckpointError(f"{config_file}: {e}") from None


def _read_tensors(folder: Path) -> tuple[dict[str, torch.Tensor], Path]:
    weights_file = folder / WEIGHTS_NAME
    if weights_file.exists():
        try:
            with safe_open(str(weights_file), framework="pt", device="cpu") as f:
                return {key: f.get_tensor(key) for key in f.keys()}, weights_file
        except Exception as e:  # safetensors raises its own SafetensorError and plain OSError
            raise CheckpointError(f"{weights_file}: corrupt or truncated ({_one_line(e)})") from None
    legacy = folder / LEGACY_WEIGHTS_NAME
    if legacy.exists():
        try:
            state = torch.load(legacy, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"{legacy}: corrupt or truncated ({_one_line(e)})") from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(f"{legacy}: not a dict of tensors")
        return state, legacy
    raise CheckpointError(f"{weights_file}: not found")


def _is_replaceable(out: Path) -> bool:
    return out.is_dir() and ((out / CONFIG_NAME).exists() or not any(out.iterdir()))


def _swap_into_place(tmp: Path, out: Path) -> None:
    # rename(2) cannot replace a non-empty directory: move the old one aside first
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        if old is not None:
            os.rename(old, out)
        raise
    _fsync_path(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__

"""Checkpoints: HF-loadable weights plus trainer state, written atomically.

Layout of ``OUTPUT_DIR``::

    checkpoints/step-000100/   config.json, tokenizer files, model*.safetensors,
                               trainer_state.json (written last), extra state files
    final/                     the same, loadable by AutoModelForCausalLM.from_pretrained

Every checkpoint is written into a hidden temporary folder beside its final
name, fsync'd, then renamed: a run killed mid-write leaves the previous
checkpoint untouched and only a ``.tmp-*`` folder to ignore (and delete on the
next save). A folder counts as a checkpoint only if ``trainer_state.json``
exists in it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Callable

import torch

from ferrytune.atomic import fsync_dir, write_atomic_json
from ferrytune.errors import CheckpointError
from ferrytune.models import ModelLayout
from ferrytune.models import SafetensorsWriter, checkpoint_tensors

logger = logging.getLogger(__name__)

STATE_NAME = "trainer_state.json"
_COPY = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
         "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "added_tokens.json")
_STEP_RE = re.compile(r"^step-(\d+)$")


def save_model_folder(dest: Path, layout: ModelLayout, *, model_path: Path, store_dtype: torch.dtype,
                      read_block: Callable[[str, torch.Tensor], None], state: dict | None,
                      extra: Callable[[Path], None] | None = None) -> Path:
    """Write an HF model folder at ``dest`` atomically (tmp folder + rename).

    ``read_block(block_id, flat)`` fills a CPU tensor with a block's master copy;
    blocks are read one at a time, so memory stays at one block.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".tmp-{dest.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        # Names as save_pretrained writes them (transformers' mapping reverted), block by block:
        # first on meta for the header, then with the values.
        blocks = list(layout.blocks.items())
        specs = []
        for b, spec in blocks:
            meta = torch.empty(spec.numel, dtype=store_dtype, device="meta")
            specs += [(n, tuple(t.shape), store_dtype) for n, t in checkpoint_tensors(layout, b, meta).items()]
        writer = SafetensorsWriter(tmp, specs)
        scratch = torch.empty(max(s.numel for s in layout.blocks.values()), dtype=store_dtype)
        for b, spec in blocks:
            flat = scratch[: spec.numel]
            read_block(b, flat)
            for name, t in checkpoint_tensors(layout, b, flat).items():
                writer.write(name, t)
        writer.close()
        cfg = json.loads((Path(model_path) / "config.json").read_text())
        dtype_name = str(store_dtype).removeprefix("torch.")
        for key in ("torch_dtype", "dtype"):
            if key in cfg:
                cfg[key] = dtype_name
        cfg.setdefault("torch_dtype", dtype_name)
        write_atomic_json(tmp / "config.json", cfg)
        for name in _COPY:
            src = Path(model_path) / name
            if src.exists():
                shutil.copyfile(src, tmp / name)
        if extra is not None:
            extra(tmp)
        if state is not None:
            write_atomic_json(tmp / STATE_NAME, state)
        fsync_dir(tmp)
        if dest.exists():
            old = dest.parent / f".old-{dest.name}-{os.getpid()}"
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
        fsync_dir(dest.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def checkpoint_dir(output_dir: Path, step: int) -> Path:
    return Path(output_dir) / "checkpoints" / f"step-{step:06d}"


def list_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        m = _STEP_RE.match(d.name)
        if m and (d / STATE_NAME).exists():
            found.append((int(m.group(1)), d))
    return sorted(found)


def prune_checkpoints(output_dir: Path, keep: int) -> None:
    ckpts = list_checkpoints(output_dir)
    for _, d in ckpts[:-keep]:
        shutil.rmtree(d, ignore_errors=True)
    root = Path(output_dir) / "checkpoints"
    for d in root.glob(".tmp-*"):  # left by a run killed mid-write
        shutil.rmtree(d, ignore_errors=True)


def resolve_resume(output_dir: Path, resume: str) -> Path | None:
    """The checkpoint to resume from: ``auto`` (latest, if any), ``never``, or a path."""
    if resume == "never":
        return None
    if resume == "auto":
        ckpts = list_checkpoints(output_dir)
        return ckpts[-1][1] if ckpts else None
    path = Path(resume)
    if not (path / STATE_NAME).exists():
        raise CheckpointError(f"resume: {path} is not a ferrytune checkpoint (no {STATE_NAME})")
    return path


def read_state(ckpt: Path) -> dict:
    try:
        return json.loads((Path(ckpt) / STATE_NAME).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{ckpt}/{STATE_NAME}: unreadable trainer state ({e})") from e

"""Checkpoint names through transformers' mapping: what the file holds, what the module wants, and
one-line errors for a checkpoint that lacks a tensor."""

from __future__ import annotations

import shutil

import pytest
import torch
from arch_testlib import build_arch
from safetensors.torch import load_file, save_file

from ferrytune.engine import weights_from
from ferrytune.errors import CheckpointError
from ferrytune.models import load_layout, open_checkpoint


@pytest.fixture(scope="module")
def saved(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("names")
    tok = tiny_models("llama", layers=1, hidden=16)
    return lambda arch: build_arch(root / arch, arch, tok)


def _without(src, dest, drop: str):
    shutil.copytree(src, dest)
    tensors = load_file(f"{src}/model.safetensors")
    del tensors[drop]
    save_file(tensors, f"{dest}/model.safetensors", metadata={"format": "pt"})
    return dest


def test_moe_file_has_one_tensor_per_expert_and_a_block_reads_its_own(saved):
    path = saved("mixtral")
    keys = load_file(f"{path}/model.safetensors").keys()
    assert "model.layers.0.block_sparse_moe.experts.3.w1.weight" in keys  # the file: per expert, old names
    layout = load_layout(path)
    names = [p.name for p in layout.blocks["layer.0"].params]
    assert "model.layers.0.mlp.experts.gate_up_proj" in names  # the module: fused per layer
    loader = open_checkpoint(path, layout)
    src = loader.source_keys("layer.0")
    assert all(k.startswith("model.layers.0.") for k in src) and len(src) == len(
        [k for k in keys if k.startswith("model.layers.0.")])


@pytest.mark.parametrize("arch,drop,named", [
    ("llama", "model.layers.1.input_layernorm.weight", "model.layers.1.input_layernorm.weight"),
    ("gpt_neox", "embed_out.weight", "checkpoint has no tensor embed_out.weight (the model's lm_head.weight)"),
    ("mixtral", "model.layers.1.block_sparse_moe.experts.2.w2.weight",
     "checkpoint has no tensor model.layers.1.block_sparse_moe.experts.2.w2.weight"),
])
def test_a_missing_tensor_is_one_line_naming_it(saved, tmp_path, arch, drop, named):
    path = _without(saved(arch), tmp_path / arch, drop)
    layout = load_layout(path)
    with pytest.raises(CheckpointError) as e:
        init = weights_from(path, layout)
        for b, spec in layout.blocks.items():
            init(b, torch.empty(spec.numel))
    msg = str(e.value)
    assert "\n" not in msg and named in msg, msg

"""A resident Hugging Face model whose tensors sit where the engine's blocks sit: 64-byte aligned.

MKL promises bit-reproducible GEMMs only for the same operand *alignment* (besides the same
shapes, thread count and CPU); on AMD EPYC its results do change with it. ``from_pretrained``
leaves parameters in the safetensors mmap, at the 8-byte offsets of the file, while the
engine's blocks (device masters, host arena, slots, staging buffers) are all at least 64-byte
aligned. A plain resident model that is compared with the streamed engine bit for bit (the
service's resident base, the tests' references) must therefore own aligned storage too.
"""

from __future__ import annotations

import os

import torch
from torch import nn

ALIGN_BYTES = 64  # what torch's CPU allocator guarantees, and what every ferrytune buffer has


def own_aligned_storage_(module: nn.Module) -> nn.Module:
    """Copy every parameter and buffer of ``module`` that is not ``ALIGN_BYTES``-aligned into fresh
    memory (torch's allocator, 64-byte aligned), in place; tied tensors stay tied."""
    done: dict[int, torch.Tensor] = {}
    for tensors in (module.parameters(), module.buffers()):
        for t in tensors:
            if t.device.type == "meta" or t.data_ptr() % ALIGN_BYTES == 0:
                continue
            key = t.data_ptr()
            if key not in done:
                done[key] = t.data.clone(memory_format=torch.contiguous_format)
            t.data = done[key]
    return module


def load_resident_model(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu") -> nn.Module:
    """``AutoModelForCausalLM.from_pretrained(path)`` on ``device``, with aligned storage (see above)."""
    from transformers import AutoModelForCausalLM  # heavy import, only when a model is loaded

    model = AutoModelForCausalLM.from_pretrained(os.fspath(path), dtype=dtype, local_files_only=True)
    return own_aligned_storage_(model.to(device))

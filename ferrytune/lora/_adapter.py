"""One LoRA adapter: the A and B matrices of every target, outside the model.

LoRA (Hu et al. 2021, https://arxiv.org/abs/2106.09685) adds a low-rank update to
a frozen linear layer ``y = x W^T``::

    y = x W^T + s * dropout(x) A^T B^T        A: (r, in), B: (out, r)
    s = alpha / r          (LoRA)
    s = alpha / sqrt(r)    (rsLoRA, Kalajdzievski 2023, https://arxiv.org/abs/2312.03732)

The parameters live here, in fp32, not inside the model: the model is built on
the meta device and its base weights come and go, so the adapter must not be
part of it. :func:`ferrytune.lora.attach` wires an adapter in with forward hooks.
"""

from __future__ import annotations

import math
from typing import Iterator

import torch
import torch.nn as nn

from ferrytune.errors import ConfigError
from ferrytune.lora._spec import LoraSpec, TargetInfo

__all__ = ["Adapter"]


def _escape(path: str) -> str:
    # nn.Module forbids "." in parameter names; "-" never appears in a Python attribute name.
    return path.replace(".", "-")


class Adapter(nn.Module):
    """The LoRA parameters of one adapter, keyed by module path.

    ``lora_A[escaped path]`` is (r, in) and ``lora_B[escaped path]`` is (out, r), both fp32
    ``nn.Parameter``; use :meth:`a` / :meth:`b` with the real module path. The constructor
    allocates uninitialised parameters; :meth:`create` initialises them like PEFT.
    """

    def __init__(self, targets: dict[str, TargetInfo], spec: LoraSpec, *, device: str | torch.device = "cpu"):
        super().__init__()
        if not targets:
            raise ConfigError("lora.target_modules: an adapter needs at least one target module")
        self.spec = spec
        self.targets: dict[str, TargetInfo] = dict(sorted(targets.items()))
        self._keys: dict[str, str] = {path: _escape(path) for path in self.targets}
        if len(set(self._keys.values())) != len(self._keys):
            raise ConfigError("lora.target_modules: two module paths collide once '.' is escaped to '-'")
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        for path, info in self.targets.items():
            key = self._keys[path]
            self.lora_A[key] = nn.Parameter(torch.empty(info.rank, info.in_features, device=device))
            self.lora_B[key] = nn.Parameter(torch.empty(info.out_features, info.rank, device=device))

    @classmethod
    def create(
        cls,
        targets: dict[str, TargetInfo],
        spec: LoraSpec,
        *,
        seed: int,
        device: str | torch.device = "cpu",
    ) -> "Adapter":
        """A fresh adapter initialised like PEFT's default (``init_lora_weights=True``).

        A ~ kaiming_uniform_(a=sqrt(5)) (nn.Linear's default, i.e. U(-1/sqrt(in), 1/sqrt(in))),
        B = 0, so the adapter starts as the identity update. All A's are drawn from ONE CPU
        ``torch.Generator`` seeded with ``seed``, one target after another in sorted path
        order, then moved to ``device``: the init depends only on (seed, target set), not on
        the device or the global RNG. (PEFT draws from the global RNG in module order, so
        parity tests copy weights rather than seeds.)
        """
        adapter = cls(targets, spec, device="cpu")
        generator = torch.Generator(device="cpu").manual_seed(seed)
        with torch.no_grad():
            for path in adapter.paths:
                nn.init.kaiming_uniform_(adapter.a(path), a=math.sqrt(5), generator=generator)
                nn.init.zeros_(adapter.b(path))
        return adapter.to(device)

    @property
    def paths(self) -> list[str]:
        """Target module paths, sorted."""
        return list(self.targets)

    def a(self, path: str) -> nn.Parameter:
        """lora_A of the module at ``path``: (r, in)."""
        return self.lora_A[self._keys[path]]

    def b(self, path: str) -> nn.Parameter:
        """lora_B of the module at ``path``: (out, r)."""
        return self.lora_B[self._keys[path]]

    def named_pairs(self) -> Iterator[tuple[str, nn.Parameter, nn.Parameter]]:
        """(path, A, B) for every target, in sorted path order."""
        for path in self.targets:
            yield path, self.a(path), self.b(path)

    def extra_repr(self) -> str:
        ranks = sorted({t.rank for t in self.targets.values()})
        return f"num_targets={len(self.targets)}, ranks={ranks}, dropout={self.spec.dropout}"

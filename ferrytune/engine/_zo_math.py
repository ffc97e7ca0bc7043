"""The zeroth-order arithmetic, in one place: MeZO's perturbation chain and the update rule.

Both ZO trainers (full model: ``_zo.py``; LoRA adapters: ``_zo_lora_trainer.py``) call these,
each with its own way of adding ``alpha * z_k`` (``add_z``): the fused counter-based kernel on a
streamed block, or a generated z on a resident adapter. The operations and their order are the
ones the bit-identity tests hold against plain MeZO loops.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

CHAIN = (1, -2, 1)
"""MeZO's in-place multipliers of εz per perturbation: θ+εz (stream +), θ−εz (stream −), θ again."""

SIGNS = (1, -1)
"""The stream each of the first two links of ``CHAIN`` evaluates."""


@dataclass(frozen=True)
class ZOHyper:
    eps: float
    num_perturbations: int
    distribution: str
    update: str  # "sgd" | "sign"
    momentum: float
    weight_decay: float
    seed: int
    block_fraction: float = 1.0
    mask_fraction: float = 1.0
    estimator: str = "mezo"  # "mezo" | "fzoo" | "hizoo"
    routed_experts: bool = False  # MoE: perturb and update only the experts routed to in the step
    hessian_smooth: float = 0.0  # HiZOO's EMA weight α of the diagonal Hessian

    @classmethod
    def from_config(cls, zo, train) -> "ZOHyper":
        """From the ``zo`` and ``train`` sections of a config."""
        return cls(eps=zo.eps, num_perturbations=zo.num_perturbations, distribution=zo.distribution,
                   update=zo.update, momentum=zo.momentum, weight_decay=train.weight_decay, seed=train.seed,
                   block_fraction=zo.block_fraction, mask_fraction=zo.mask_fraction,
                   estimator=zo.estimator, routed_experts=zo.routed_experts, hessian_smooth=zo.hessian_smooth)


def fzoo_coefficients(l0: float, losses: Sequence[float], eps: float) -> tuple[list[float], float, list[float]]:
    """FZOO's (Dang et al. 2025) step from the unperturbed loss ``l0`` and the N one-sided losses
    ``l_i = f(θ+εz_i)``: ``g_i = (l_i - l0) / ε`` and ``σ = std(l_1..l_N)`` (the sample standard
    deviation, divisor N-1, in float64); returns ``(c, σ, g)`` with ``c_i = g_i / σ``, so the update
    ``θ ← θ - lr·(1/N)·Σ c_i z_i = θ - (lr/σ)·(1/N)·Σ g_i z_i`` is :func:`zo_update_` with ``grads = c``
    (momentum, sign and weight decay compose as for MeZO)."""
    n = len(losses)
    mean = sum(losses) / n
    sigma = (sum((x - mean) ** 2 for x in losses) / (n - 1)) ** 0.5
    g = [(x - l0) / eps for x in losses]
    if sigma == 0:
        raise FloatingPointError("zo.estimator fzoo: the perturbed losses are all equal (σ = 0); raise zo.eps")
    return [gi / sigma for gi in g], sigma, g


def hizoo_terms(means: Sequence[float], eps: float) -> tuple[list[float], float, list[float]]:
    """HiZOO's (Zhao et al. 2024) per-step scalars from the batch-mean losses ``means`` =
    ``[L+_0, L-_0, ..., L+_{q-1}, L-_{q-1}, L0]`` (L0 = f(θ)): ``(g, L0, D)`` with
    ``g_k = (L+_k - L-_k) / 2ε`` and ``D_k = |L+_k + L-_k - 2 L0| / 2ε²``."""
    q = (len(means) - 1) // 2
    l0 = means[2 * q]
    grads = [(means[2 * k] - means[2 * k + 1]) / (2 * eps) for k in range(q)]
    curv = [abs(means[2 * k] + means[2 * k + 1] - 2 * l0) / (2 * eps * eps) for k in range(q)]
    return grads, l0, curv


def hessian_update_(h: torch.Tensor, zs: Sequence[torch.Tensor], curv: Sequence[float], alpha: float) -> None:
    """HiZOO's diagonal Hessian EMA in place, from the H the step perturbed with and the raw z_k:
    ``H ← (1-α) H + Σ_k (α D_k / q) (H z_k z_k)``."""
    q = len(curv)
    new = h * (1 - alpha)
    for z, d in zip(zs, curv):
        new = new + (alpha * d / q) * (h * z * z)
    h.copy_(new)


def mask_threshold(values: torch.Tensor, fraction: float) -> float:
    """Sparse MeZO's ``h``: the ``fraction`` quantile of ``|values|`` (the k-th smallest, k = round(fraction·n),
    at least 1), so ``|v| <= h`` selects about that fraction of the tensor's elements."""
    flat = values.detach().reshape(-1).abs().float()
    k = max(1, min(flat.numel(), round(fraction * flat.numel())))
    return float(flat.kthvalue(k).values)


def active_blocks(blocks: Sequence[str], *, seed: int, step: int, fraction: float) -> frozenset[str]:
    """The blocks step ``step`` perturbs and updates (LeZO's layer-wise sparsity).

    ``round(fraction * len(blocks))`` of them (at least one), drawn without replacement by a
    generator keyed by ``(seed, step)`` alone: a pure function, so every rank, a resumed run and
    ``ferrytune replay`` draw the same set, whatever the visiting order or the timing.
    """
    if fraction >= 1:
        return frozenset(blocks)
    n = max(1, round(fraction * len(blocks)))
    rng = random.Random(f"ferrytune-block-sparsity:{seed}:{step}")  # str seeds hash with SHA-512: portable
    return frozenset(rng.sample(sorted(blocks), n))  # sorted: the draw does not depend on the order given


def chained_copies(base: torch.Tensor, add: Callable[[torch.Tensor, float], None],
                   eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(θ+εz, θ−εz, θ restored)`` as new tensors, each one link of ``CHAIN`` after the previous,
    with ``add(t, alpha)`` doing ``t += alpha * z`` (for values that cannot be perturbed in place)."""
    out, cur = [], base
    for mult in CHAIN:
        cur = cur.clone()
        add(cur, mult * eps)
        out.append(cur)
    return out[0], out[1], out[2]


def zo_update_(v: torch.Tensor, add_z: Callable[[torch.Tensor, int, float], None], grads: Sequence[float], *,
               lr: float, hyper: ZOHyper, momentum: torch.Tensor | None = None) -> None:
    """One ZO step on parameter ``v`` in place, from the projected gradients ``g_k`` of its q perturbations.

    ``d = Σ_k g_k z_k / q``; with momentum ``m ← β m + d`` and ``d = m``; ``update: sign`` takes
    ``sign(d)``; then ``v ← v (1 − lr·wd) − lr·d`` (weight decay on matrices only). Plain SGD
    without momentum adds each ``−lr·g_k/q · z_k`` straight into ``v`` (no d buffer: MeZO's
    update). ``add_z(t, k, alpha)`` does ``t += alpha * z_k``.
    """
    q = len(grads)
    if hyper.weight_decay and v.dim() >= 2:
        v.mul_(1.0 - lr * hyper.weight_decay)
    if hyper.update == "sgd" and momentum is None:
        for k, g in enumerate(grads):
            add_z(v, k, -lr * g / q)
        return
    d = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
    for k, g in enumerate(grads):
        add_z(d, k, g / q)
    if momentum is not None:
        d = momentum.mul_(hyper.momentum).add_(d)
    if hyper.update == "sign":
        d = torch.sign(d)
    v.add_(d, alpha=-lr)

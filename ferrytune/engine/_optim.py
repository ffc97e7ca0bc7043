"""The optimizers of the backprop LoRA trainers (``train.optimizer``), built in one place.

* ``adamw``: ``torch.optim.AdamW`` (``foreach=False``: the same per-tensor kernels on every
  device, so a packed multi-LoRA job and a solo run do the same arithmetic). State: two
  moments per parameter and a step counter (a 0-dim tensor) per tensor.
* ``adam_mini``: :class:`AdamMini`, one second moment per *row* of each adapter matrix.
* ``sgd_sai``: :class:`SGDSaI`, SGD with momentum and a per-tensor learning-rate scale fixed
  once from the gradient's signal-to-noise ratio; no second moment.

Both lean optimizers keep ``torch.optim.Optimizer``'s ``state_dict`` contract (everything a
resume needs is in the state, nothing in attributes), run on any device without a process
group, and are deterministic. They are written here rather than taken from the PyPI packages
``adam-mini`` 1.1.1 and ``sgd-sai`` 1.0.3, which the tests use as their references:

* ``adam_mini.Adam_mini`` partitions by parameter *name* (``q_proj`` / ``k_proj`` are cut per
  attention head of ``dim * dim / n_heads`` elements, which a rank-r LoRA factor does not
  have), reads ``torch.cuda.device_count()`` as its world size and then calls
  ``dist.all_gather`` (fails without a process group on a multi-GPU machine), and prints.
* ``sgd_sai.SGD_sai`` keeps "scales computed" in an attribute outside ``state_dict``, so a
  resumed run recomputes every scale from the resume step's gradient (not exact); it prints
  at its first step; and it fixes every scale at the very first step, where a LoRA ``A``
  (under its zero-initialised ``B``) has an all-zero gradient: its scale would be 0 and ``A``
  would never train.

:func:`optimizer_state_bytes` is the state size of each optimizer for given parameter shapes
(the service's memory model uses it); the tests check it against the real state.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch.optim import Optimizer

from ferrytune.errors import CheckpointError

__all__ = ["OPTIMIZERS", "AdamMini", "SGDSaI", "build_optimizer", "load_optimizer_state", "optimizer_state_bytes"]

OPTIMIZERS = ("adamw", "adam_mini", "sgd_sai")
# what each keeps per parameter tensor (a resumed state of another optimizer has other keys)
_STATE_KEYS = {"adamw": {"step", "exp_avg", "exp_avg_sq"}, "adam_mini": {"step", "m", "v"},
               "sgd_sai": {"gsnr", "momentum_buffer"}}


def _rows(p: torch.Tensor) -> int:
    """Adam-mini's blocks of one tensor: its rows (dim 0) for a matrix, the whole tensor otherwise."""
    return p.shape[0] if p.dim() >= 2 else 1


class AdamMini(Optimizer):
    """Adam-mini (Zhang et al. 2024, "Adam-mini: Use Fewer Learning Rates To Gain More",
    arXiv:2406.16793): Adam with ONE second-moment value per parameter block, the mean of the
    squared gradient over the block, instead of one per element.

    Blocks: each row (output neuron) of a matrix, i.e. ``r`` blocks for a LoRA ``A`` (r x in)
    and ``out`` blocks for a LoRA ``B`` (out x r); a tensor of fewer than two dimensions is one
    block. This is the paper's partition for the linear layers it does not cut per head
    (values, attention output, MLP: "one learning rate per output neuron") and the branch the
    reference implementation (``adam-mini`` 1.1.1) runs for those layers; its per-head cut of
    queries and keys does not apply to a low-rank factor, whose rows mix all heads (``A``) or
    refine them (``B``: a head's rows are a subset of its block). The update, in the
    reference's order of operations (so the two agree bit for bit on the same gradients)::

        v_b  <- beta2 v_b + (1 - beta2) mean_{i in b} g_i^2
        p    <- p (1 - lr wd)                          # decoupled weight decay
        m    <- m + (1 - beta1) (g - m)                 # lerp
        p    <- p - lr * m / (1 - beta1^t) / (sqrt(v_b / (1 - beta2^t)) + eps)

    State per tensor: ``m`` (its shape), ``v`` (rows x 1) and ``step`` (an int).
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0):
        if lr < 0 or eps < 0 or weight_decay < 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"AdamMini: invalid lr={lr}, betas={betas}, eps={eps} or weight_decay={weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                rows = _rows(p)
                if len(state) == 0:
                    state["step"] = 0
                    state["m"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["v"] = p.new_zeros((rows, 1))
                grad = p.grad.reshape(rows, -1)
                state["v"].mul_(beta2).add_(torch.mean(grad * grad, dim=1, keepdim=True), alpha=1 - beta2)
                state["step"] += 1
                if wd > 0.0:
                    p.mul_(1 - lr * wd)
                m = state["m"]
                m.lerp_(p.grad, 1 - beta1)
                bias_correction_1 = 1 - beta1 ** state["step"]
                bias_correction_2_sqrt = math.sqrt(1 - beta2 ** state["step"])
                h = (state["v"].sqrt() / bias_correction_2_sqrt).add_(eps)
                stepsize = (1 / bias_correction_1) / h  # (rows, 1)
                update = (m.reshape(rows, -1) * stepsize).view(p.size())
                p.sub_(update.mul_(lr))  # the reference's p.add_(-update), bit for bit, without the negated copy
        return loss


class SGDSaI(Optimizer):
    """SGD-SaI (Xu et al. 2024, "No More Adam: Learning Rate Scaling at Initialization is All You
    Need", arXiv:2412.11768): SGD with momentum, each parameter tensor's learning rate scaled by
    a constant fixed once from its gradient signal-to-noise ratio; no second moment::

        gsnr  = ||g|| / (std(g) + eps)                  # once per tensor, then kept
        buf   <- g                at the tensor's first update, else  momentum buf + (1 - momentum) g
        p     <- p (1 - lr wd) - lr gsnr buf            # decoupled weight decay

    ``std`` is the unbiased standard deviation over the tensor's elements (0 for one element).
    The paper and the reference (``sgd-sai`` 1.0.3) fix every scale at the first step; here a
    tensor whose gradient is all zero at that step is left untouched (no scale, no momentum,
    no weight decay) until the first step where its gradient is not: a LoRA ``A`` under its
    zero-initialised ``B`` gets an exactly zero gradient at step 0, where the SNR is 0/0, and
    the reference would fix its scale at 0 (``A`` never trains). With every gradient non-zero
    at the first step the two agree bit for bit. The scale is invariant to gradient clipping
    (a common factor cancels in ``||g|| / std(g)``, up to ``eps``).

    State per tensor: ``gsnr`` (a 0-dim tensor) and ``momentum_buffer`` (its shape, when
    ``momentum > 0``); the scales are in ``state_dict``, so a resume continues with them.
    """

    def __init__(self, params: Iterable, lr: float = 1e-2, momentum: float = 0.9, eps: float = 1e-8,
                 weight_decay: float = 0.0):
        if lr < 0 or eps < 0 or weight_decay < 0 or not 0 <= momentum < 1:
            raise ValueError(f"SGDSaI: invalid lr={lr}, momentum={momentum}, eps={eps} or weight_decay={weight_decay}")
        super().__init__(params, dict(lr=lr, momentum=momentum, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum, eps, wd = group["lr"], group["momentum"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g, state = p.grad, self.state[p]
                if "gsnr" not in state:
                    if not bool(g.any()):
                        continue  # no signal yet: the scale waits for a non-zero gradient
                    state["gsnr"] = g.norm() / (g.std().nan_to_num() + eps)
                if momentum != 0:
                    if "momentum_buffer" not in state:
                        buf = state["momentum_buffer"] = torch.clone(g).detach()
                    else:
                        buf = state["momentum_buffer"]
                        buf.mul_(momentum).add_(g, alpha=1 - momentum)
                else:
                    buf = g
                p.mul_(1 - wd * lr).add_(buf, alpha=-(lr * state["gsnr"]))
        return loss


def build_optimizer(params: Sequence[torch.nn.Parameter], train) -> Optimizer:
    """The optimizer ``train.optimizer`` names over ``params`` (one group), at ``train.lr`` with
    ``train.weight_decay`` (decoupled in all three). The trainers set each group's ``lr`` from the
    schedule before every step and clip gradients before it; defaults: AdamW's and Adam-mini's
    betas (0.9, 0.999) and eps 1e-8; SGD-SaI's momentum 0.9 and eps 1e-8 (the papers')."""
    params = list(params)
    name = train.optimizer
    if name == "adamw":
        return torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay, foreach=False)
    if name == "adam_mini":
        return AdamMini(params, lr=train.lr, weight_decay=train.weight_decay)
    if name == "sgd_sai":
        return SGDSaI(params, lr=train.lr, weight_decay=train.weight_decay)
    raise ValueError(f"train.optimizer: unknown optimizer {name!r} (one of {', '.join(OPTIMIZERS)})")


def load_optimizer_state(optim: Optimizer, state: dict, name: str, *, source: str) -> None:
    """``optim.load_state_dict(state)`` after checking ``state`` was saved by optimizer ``name``
    (``train.optimizer``): resuming a run with another optimizer is refused, naming the key,
    instead of failing inside ``step()`` or silently mixing states."""
    saved = {k for s in state.get("state", {}).values() for k in s}
    if not saved <= _STATE_KEYS[name]:
        theirs = [repr(n) for n, keys in _STATE_KEYS.items() if saved <= keys]
        raise CheckpointError(f"{source}: train.optimizer: the checkpoint holds the state of "
                              f"{theirs[0] if theirs else 'another optimizer'}, this run uses {name!r}; resume with "
                              "the optimizer it was trained with, or start a new run")
    optim.load_state_dict(state)


def optimizer_state_bytes(name: str, shapes: Iterable[Sequence[int]], *, element_bytes: int = 4) -> int:
    """Bytes of the state optimizer ``name`` holds once it has stepped parameters of ``shapes``
    (``element_bytes`` each: 4 for the fp32 adapters), counting every tensor in its state:

    * ``adamw``: 2 per element (the moments) + 1 per tensor (``step``, a 0-dim tensor);
    * ``adam_mini``: 1 per element (``m``) + 1 per row (``v``); its ``step`` is an int;
    * ``sgd_sai``: 1 per element (the momentum buffer) + 1 per tensor (``gsnr``).
    """
    shapes = [tuple(s) for s in shapes]
    numel = sum(math.prod(s) for s in shapes)
    if name == "adamw":
        elements = 2 * numel + len(shapes)
    elif name == "adam_mini":
        elements = numel + sum(s[0] if len(s) >= 2 else 1 for s in shapes)
    elif name == "sgd_sai":
        elements = numel + len(shapes)
    else:
        raise ValueError(f"unknown optimizer {name!r} (one of {', '.join(OPTIMIZERS)})")
    return elements * element_bytes

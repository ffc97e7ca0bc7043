"""``method: zo`` with ``zo.trainable: lora`` — MeZO on the LoRA parameters (MeZO-LoRA).

The base is streamed read-only (as for first-order LoRA); only the adapter is
perturbed. All perturbed versions of the adapter are computed up front — with
the in-place arithmetic of MeZO's loop (``+εz, -2εz, +εz``) done on copies, so
the numbers are the loop's — and loaded into one adapter per stream ``(k, ±)``.
One streamed pass then runs every stream: each unit runs once per stream slice
of the batch, with that stream's adapter routed to it. So the base is read once
per micro-batch for all 2q forwards.

``zo.estimator: hizoo`` (HiZOO, Zhao et al. 2024, arXiv 2402.15173) adds the unperturbed stream
``(0, 0)`` (f(θ)) and keeps a diagonal Hessian estimate ``H`` (one fp32 value per adapter parameter,
``H_0 = 1``, saved in checkpoints as ``zo_hessian.pt``). Per step, with ``u_k = z_k / sqrt(H)``::

    L±_k = f(θ ± ε u_k),  L0 = f(θ),  g_k = (L+_k - L-_k) / 2ε
    θ ← update(θ, Σ_k g_k u_k / q)                (zo_update_: sgd/sign, momentum, weight decay)
    H ← (1 - α) H + Σ_k (α D_k / q) (H z_k z_k),  D_k = |L+_k + L-_k - 2 L0| / (2ε²)

(α = ``zo.hessian_smooth``), the update using the H the step perturbed with; E[g u] ≈ H^-1 ∇f: the
Hessian-preconditioned step. The H update is HiZOO's (its Σ^{-1} is our H).

Every step appends ``(step, seed, g_k, lr)`` (HiZOO: and ``D_k``, ``curv``) to ``zo_log.jsonl``, as the
full-model trainer does: from the initial adapter (the seed's, or ``lora.init_from``) the log rebuilds
the run's adapter without a forward (:meth:`ZOLoraTrainer.replay`, ``ferrytune replay``), bit for bit:
the replay runs the same chain on copies and the same update (momentum and H included).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch

from ferrytune.data import loss_per_sample
from ferrytune.engine._lora_trainer import LoraTrainer
from ferrytune.engine._schedule import lr_at
from ferrytune.engine._loop import StepResult
from ferrytune.engine._zo_math import ZOHyper, chained_copies, hessian_update_, zo_update_
from ferrytune.data import pad_positions
from ferrytune.engine._zo_trainer import (append_zo_log, grads_from, hizoo_grads_from, read_zo_log, streams_for,
                                          trim_zo_log)
from ferrytune.errors import CheckpointError
from ferrytune.kernels import PerturbKey, perturbation
from ferrytune.lora import Adapter, Router, attach
from ferrytune.parallel import all_reduce_sum_

logger = logging.getLogger(__name__)

MOMENTUM_NAME = "zo_momentum.pt"
HESSIAN_NAME = "zo_hessian.pt"


class ZOLoraTrainer(LoraTrainer):
    """Shares the runtime, adapter, evaluation and checkpoints with :class:`LoraTrainer`; its own
    training state (stream adapters and their hooks, momentum; no ``train.optimizer``: the config
    refuses one other than the default for method zo) and step."""

    def _activation_estimate(self):
        return None  # no backward: nothing is kept

    def _setup_training(self) -> None:
        self.rt.layout.model.eval()  # ZO runs without dropout, like MeZO
        # The trained adapter is not run directly: per-stream copies of it are, perturbed.
        self.theta = [p for path in self.adapter.paths for p in (self.adapter.a(path), self.adapter.b(path))]
        for p in self.theta:
            p.requires_grad_(False)
        self.hizoo = self.cfg.zo.estimator == "hizoo"
        self.streams = ([(0, 0)] if self.hizoo else []) + streams_for(self.cfg.zo.num_perturbations, self.mesh)
        self.stream_adapters = [Adapter(self.adapter.targets, self.spec, device=self.rt.device)
                                for _ in self.streams]
        self.router = Router()
        self.handle = attach(self.rt.layout.model, self.stream_adapters, router=self.router)  # close() removes it
        self.momentum = None
        if self.cfg.zo.momentum > 0:
            self.momentum = [torch.zeros_like(p) for p in self.theta]
            if self.ckpt is not None and (self.ckpt / MOMENTUM_NAME).exists():
                for m, v in zip(self.momentum, torch.load(self.ckpt / MOMENTUM_NAME)):
                    m.copy_(v)
        self.hessian = None
        if self.hizoo:
            self.hessian = [torch.ones_like(p) for p in self.theta]
            if self.ckpt is not None:
                if not (self.ckpt / HESSIAN_NAME).exists():
                    raise CheckpointError(f"{self.ckpt}: has no {HESSIAN_NAME} (saved without zo.estimator: hizoo); "
                                          "resume it with the zo settings it was trained with")
                for h, v in zip(self.hessian, torch.load(self.ckpt / HESSIAN_NAME)):
                    h.copy_(v)
        if self.mesh.is_main and not self.read_only:
            trim_zo_log(self.output_dir, self.start_step)

    def _eval_handle(self):
        return attach(self.rt.layout.model, [self.adapter])

    # ----------------------------------------------------------------- step
    def train_step(self, step: int) -> StepResult:
        t, z_cfg = self.cfg.train, self.cfg.zo
        q, eps, dev = z_cfg.num_perturbations, z_cfg.eps, self.rt.device
        micro = pad_positions(self.batcher.batches_for_step(step, pad_id=self.pad_id))
        B, M = micro[0].batch_size, self.batcher.num_micro_batches
        values, restored = self._perturbed_values(step)
        with torch.no_grad():
            for adapter, stream in zip(self.stream_adapters, self.streams):
                for dst, src in zip(_params(adapter), values[stream]):
                    dst.copy_(src)
        table = torch.zeros(2 * q + (1 if self.hizoo else 0), M, dtype=torch.float64)  # row 2q: f(θ)
        S = len(self.streams)
        self.engine.chunk_rows = B
        self.engine.chunk_context = lambda i: self.router.route([(i, 0, B)])
        try:
            with torch.no_grad():
                for i, mb in enumerate(micro):
                    gi = i * self.mesh.data + self.mesh.dp_rank
                    b = mb.to(dev)
                    self.engine.begin_step(1, backward=False)
                    try:
                        logits = self.engine.forward(b.input_ids.repeat(S, 1), b.attention_mask.repeat(S, 1),
                                                     b.loss_positions.repeat(S, 1))
                    except BaseException:
                        self.engine.end_step(failed=True)
                        raise
                    self.engine.end_step()
                    for s, (k, sign) in enumerate(self.streams):
                        per = loss_per_sample(logits[s * B:(s + 1) * B], b)
                        table[2 * q if sign == 0 else 2 * k + (0 if sign == 1 else 1), gi] = float(per.sum())
        finally:
            self.engine.chunk_rows = self.engine.chunk_context = None
        all_reduce_sum_(table, self.mesh)
        curv = None
        if self.hizoo:  # the step's loss is f(θ)
            grads, loss, curv = hizoo_grads_from(table, eps=eps, rows_total=t.batch_size)
        else:
            grads, loss = grads_from(table, eps=eps, rows_total=t.batch_size)
        if not all(math.isfinite(g) for g in grads + (curv or [])):
            raise FloatingPointError(f"step {step}: non-finite loss; lower train.lr or zo.eps")
        lr = lr_at(step, t)
        self._update(step, grads, restored, lr, curv)
        self.agree.update(*grads, lr)
        if self.mesh.is_main:
            append_zo_log(self.output_dir, {"step": step, "seed": t.seed, "grads": grads, "lr": lr,
                                            **({} if curv is None else {"curv": curv})})
        return StepResult(loss, lr, sum(int(m.attention_mask.sum()) for m in micro) * S, {"grad": grads[0]})

    def _perturbed_values(self, step: int) -> tuple[dict, list[torch.Tensor]]:
        z_cfg = self.cfg.zo
        base = [p.detach().clone() for p in self.theta]
        values = {(0, 0): [b.clone() for b in base]}  # f(θ): HiZOO's stream (unused otherwise)
        for k in range(z_cfg.num_perturbations):
            zs = self._z(step, k)
            links = [chained_copies(b, lambda t, a, z=z: t.add_(z, alpha=a), z_cfg.eps) for b, z in zip(base, zs)]
            values[(k, 1)], values[(k, -1)] = [c[0] for c in links], [c[1] for c in links]
            base = [c[2] for c in links]
        return values, base

    def _z(self, step: int, k: int, *, raw: bool = False) -> list[torch.Tensor]:
        """z_k per adapter parameter; under HiZOO (unless ``raw``) the perturbation ``u_k = z_k / sqrt(H)``."""
        zs = [perturbation(PerturbKey(self.cfg.train.seed, step, k, i), p.shape,
                           dist=self.cfg.zo.distribution, device=self.rt.device)
              for i, p in enumerate(self.theta)]
        if self.hessian is None or raw:
            return zs
        return [z / h.sqrt() for z, h in zip(zs, self.hessian)]

    def _update(self, step: int, grads: list[float], restored: list[torch.Tensor], lr: float,
                curv: list[float] | None = None) -> None:
        hyper = ZOHyper.from_config(self.cfg.zo, self.cfg.train)
        zs = [self._z(step, k) for k in range(len(grads))]
        with torch.no_grad():
            for i, p in enumerate(self.theta):
                p.copy_(restored[i])
                zo_update_(p, lambda t, k, a, i=i: t.add_(zs[k][i], alpha=a), grads, lr=lr, hyper=hyper,
                           momentum=None if self.momentum is None else self.momentum[i])
            if curv is not None:  # from the H this step perturbed with
                raw = [self._z(step, k, raw=True) for k in range(len(curv))]
                for i, h in enumerate(self.hessian):
                    hessian_update_(h, [r[i] for r in raw], curv, self.cfg.zo.hessian_smooth)

    def replay(self, log_path: Path, *, to_step: int | None = None) -> Path:
        """Rebuild the run's adapter from the initial one and ``zo_log.jsonl`` (no data, no forward):
        per logged step the chain on copies and the update, as :meth:`train_step` ran them. Writes
        ``OUTPUT_DIR/replayed/`` (a PEFT folder) and returns it."""
        entries = read_zo_log(log_path, start_step=self.start_step, seed=self.cfg.train.seed, to_step=to_step)
        for e in entries:
            _, restored = self._perturbed_values(e["step"])
            self._update(e["step"], list(e["grads"]), restored, float(e["lr"]), e.get("curv"))
        dest = self.output_dir / "replayed"
        self.save_final(dest)
        return dest

    # ------------------------------------------------------ eval, checkpoint
    def evaluate(self, *, prefix: str = "") -> dict:
        self.handle.remove()
        handle = self._eval_handle()
        try:
            return super().evaluate(prefix=prefix)
        finally:
            handle.remove()
            self.rt.layout.model.eval()
            self.handle = attach(self.rt.layout.model, self.stream_adapters, router=self.router)

    def _save_optimizer(self, folder: Path) -> None:
        if self.momentum is not None:
            torch.save(self.momentum, folder / MOMENTUM_NAME)
        if self.hessian is not None:
            torch.save(self.hessian, folder / HESSIAN_NAME)


def _params(adapter: Adapter) -> list[torch.nn.Parameter]:
    return [p for path in adapter.paths for p in (adapter.a(path), adapter.b(path))]

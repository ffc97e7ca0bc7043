"""``method: zo`` — the training loop around :class:`ZOEngine`.

Per step: take the step's micro-batches (a pure function of the step, so resume
is exact), stack them once per stream, run one pass, reduce the per-micro-batch
loss sums (one all-reduce of a tiny table across ranks), and turn them into the
projected gradients ``g_k``, which become the pending update. Every step appends
``(step, seed, g_k, lr)`` to ``zo_log.jsonl``: with the initial weights, that
log reproduces the run without any forward pass.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch

from ferrytune.data import Batch, collate, correct_per_sample, eval_batches, pad_positions
from ferrytune.data import loss_per_sample
from ferrytune.engine._checkpoint import (checkpoint_dir, prune_checkpoints, save_model_folder)
from ferrytune.engine._loop import StepLoop, StepResult
from ferrytune.engine._runtime import Runtime, build_runtime, weights_from
from ferrytune.engine._schedule import lr_at
from ferrytune.engine._zo import PendingUpdate, Stream, ZOEngine
from ferrytune.engine._zo_math import ZOHyper, fzoo_coefficients, hizoo_terms, mask_threshold
from ferrytune.errors import CheckpointError, ConfigError
from ferrytune.offload import build_streamer
from ferrytune.parallel import AgreementCheck, zo_sample
from ferrytune.parallel import Mesh, all_reduce_sum_

logger = logging.getLogger(__name__)

ZO_LOG = "zo_log.jsonl"
MOMENTUM_FILE = "zo_momentum.safetensors"  # in a checkpoint, beside the weights
HESSIAN_FILE = "zo_hessian.safetensors"  # HiZOO's H


def append_zo_log(output_dir: Path, entry: dict) -> None:
    """Append one step's line to ``output_dir/zo_log.jsonl`` (the main rank only calls it)."""
    with open(Path(output_dir) / ZO_LOG, "a") as f:
        f.write(json.dumps(entry) + "\n")


def trim_zo_log(output_dir: Path, start_step: int) -> None:
    """Drop the log lines of steps >= ``start_step`` (a resumed run logs them again)."""
    path = Path(output_dir) / ZO_LOG
    if path.exists():
        keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] < start_step]
        path.write_text("".join(k + "\n" for k in keep))


def read_zo_log(log_path: Path, *, start_step: int, seed: int, to_step: int | None = None) -> list[dict]:
    """The log's entries from ``start_step`` (up to ``to_step``), checked contiguous and of ``seed``."""
    entries = [json.loads(ln) for ln in Path(log_path).read_text().splitlines() if ln.strip()]
    if to_step is not None:
        entries = [e for e in entries if e["step"] < to_step]
    expected = list(range(start_step, start_step + len(entries)))
    if [e["step"] for e in entries] != expected:
        raise CheckpointError(f"{log_path}: steps are not contiguous from {start_step}")
    for e in entries:
        if e["seed"] != seed:
            raise CheckpointError(f"{log_path}: step {e['step']} has seed {e['seed']}, config has train.seed={seed}")
    return entries


def streams_for(q: int, mesh: Mesh, estimator: str = "mezo") -> list[Stream]:
    """The (k, sign) streams this rank computes: all of them, or one sign under PertP. FZOO's are
    the unperturbed ``(0, 0)`` and ``(k, +1)`` for k < q; HiZOO's ``(0, 0)`` and MeZO's (the config
    refuses both with PertP)."""
    if estimator == "fzoo":
        return [(0, 0)] + [(k, 1) for k in range(q)]
    all_streams = [(k, s) for k in range(q) for s in (1, -1)]
    if estimator == "hizoo":
        return [(0, 0)] + all_streams
    if mesh.perturbation == 1:
        return all_streams
    sign = 1 if mesh.pp_rank == 0 else -1
    return [st for st in all_streams if st[1] == sign]


def stream_row(stream: Stream) -> int:
    """The loss table's row of a stream: MeZO's ``(k, +)``, ``(k, -)`` at 2k, 2k+1; FZOO's f(θ) (the
    ``(0, 0)`` stream) and ``(k, +)`` at rows 0 and 1+k (its own table: :func:`zo_forward`'s ``rows``)."""
    k, sign = stream
    return 2 * k + (0 if sign == 1 else 1)


def _fzoo_row(stream: Stream) -> int:
    return 0 if stream[1] == 0 else 1 + stream[0]


def zo_forward(engine: ZOEngine, step: int, micro: list[Batch], streams: list[Stream], *,
               micro_index: list[int], num_micro_global: int, q: int, mesh: Mesh, dirty: bool = True) -> torch.Tensor:
    """One pass; returns the global table of per-micro-batch loss sums (float64): (2q, M_global) for
    MeZO, (1+q, M_global) for FZOO (row 0: f(θ), row 1+k: f(θ+εz_k)), (2q+1, M_global) for HiZOO
    (MeZO's rows, then f(θ))."""
    fzoo, hizoo = engine.h.estimator == "fzoo", engine.h.estimator == "hizoo"
    if fzoo:
        row_of = _fzoo_row
    elif hizoo:  # f(θ) after MeZO's 2q rows
        def row_of(st: Stream) -> int:
            return 2 * q if st[1] == 0 else stream_row(st)
    else:
        row_of = stream_row
    micro = pad_positions(micro)
    B = micro[0].batch_size
    dev = engine.device
    ids = torch.cat([m.input_ids for m in micro]).to(dev)  # (M*B, T)
    mask = torch.cat([m.attention_mask for m in micro]).to(dev)
    pos = torch.cat([m.loss_positions for m in micro]).to(dev)  # (M*B, L)
    S = len(streams)
    table = torch.zeros(1 + q if fzoo else 2 * q + hizoo, num_micro_global, dtype=torch.float64)

    def head(logits: torch.Tensor) -> None:  # (S*M*B, L, V)
        for si, stream in enumerate(streams):
            row = row_of(stream)
            for mi, mb in enumerate(micro):
                start = (si * len(micro) + mi) * B
                losses = loss_per_sample(logits[start:start + B], mb.to(dev))  # (B,)
                table[row, micro_index[mi]] = float(losses.sum())

    engine.run(step, ids.repeat(S, 1), mask.repeat(S, 1), pos.repeat(S, 1), streams, B, head, dirty=dirty,
               num_micro=len(micro))
    return all_reduce_sum_(table, mesh)


def grads_from(table: torch.Tensor, *, eps: float, rows_total: int) -> tuple[list[float], float]:
    """g_k = (L+ - L-) / 2ε with L the global batch mean, summed in micro-batch order."""
    q = table.shape[0] // 2
    means = [sum(table[r].tolist()) / rows_total for r in range(2 * q)]
    grads = [(means[2 * k] - means[2 * k + 1]) / (2 * eps) for k in range(q)]
    return grads, (means[0] + means[1]) / 2


def hizoo_grads_from(table: torch.Tensor, *, eps: float, rows_total: int) -> tuple[list[float], float, list[float]]:
    """HiZOO's ``(g_k, f(θ), D_k)`` (``hizoo_terms``) from a (2q+1, M) table: MeZO's rows, then f(θ)."""
    return hizoo_terms([sum(table[r].tolist()) / rows_total for r in range(table.shape[0])], eps)


def fzoo_grads_from(table: torch.Tensor, *, eps: float, rows_total: int) -> tuple[list[float], float, dict]:
    """FZOO's coefficients ``c_k = g_k / σ`` from a (1+q, M) table (``fzoo_coefficients``), the step's
    loss f(θ), and what the log keeps beside c (``g`` and ``sigma``)."""
    means = [sum(table[r].tolist()) / rows_total for r in range(table.shape[0])]
    coefs, sigma, g = fzoo_coefficients(means[0], means[1:], eps)
    return coefs, means[0], {"g": g, "sigma": sigma}


class ZOTrainer(StepLoop):
    """Owns the runtime, data and engine of one ``method: zo`` run; the loop is :class:`StepLoop`'s."""

    method = "zo"

    # --------------------------------------------------------------- set up
    def setup(self) -> None:
        cfg, mesh = self.cfg, self.mesh
        self._resolve_resume("zo")
        source = self.ckpt if self.ckpt is not None else Path(cfg.model.path)
        sub = self.nvme_subdir()
        self.rt: Runtime = build_runtime(cfg.model, cfg.offload, device=cfg.device, nvme_subdir=sub,
                                         sliced_over=mesh if cfg.parallel.sliced_loading else None)
        rt = self.rt
        problem = None
        if cfg.zo.routed_experts and not any(s.experts is not None for s in rt.layout.blocks.values()):
            problem = f"{cfg.model.path} has no MoE layers (no experts to route); set it to false"
        elif cfg.zo.routed_experts and mesh.distributed:
            problem = "runs in one process (ranks would route differently); set it to false or run one process"
        if problem is not None:  # before the streamer opens: nothing to release yet
            raise ConfigError(f"zo.routed_experts: {problem}")
        self.agree = AgreementCheck(mesh, every_steps=cfg.parallel.check_every_steps)
        logger.info("plan:\n%s", rt.plan.describe())
        rt.streamer.open(weights_from(source, rt.layout))
        self.state_streamer = self.hessian_streamer = None
        if cfg.zo.momentum > 0:
            self.state_streamer = self._open_state("momentum", MOMENTUM_FILE, fill=0.0)  # a checkpoint without: 0
        if cfg.zo.estimator == "hizoo":
            self.hessian_streamer = self._open_state("hessian", HESSIAN_FILE, fill=1.0, required="zo.estimator: hizoo")
        hyper = ZOHyper.from_config(cfg.zo, cfg.train)
        self.engine = ZOEngine(rt.layout, rt.streamer, hyper, device=rt.device, compute_dtype=rt.compute_dtype,
                               store_dtype=rt.store_dtype, state_streamer=self.state_streamer,
                               hessian_streamer=self.hessian_streamer)
        if hyper.mask_fraction < 1:
            self.engine.thresholds = self._mask_thresholds(hyper.mask_fraction)

        self._setup_data()
        if mesh.is_main and not self.read_only:
            trim_zo_log(self.output_dir, self.start_step)

    def _mask_thresholds(self, fraction: float) -> dict[int, float]:
        """Sparse MeZO's h_p per parameter: from the run's initial weights (a resumed run reads them from
        its checkpoint; a replay starts from the initial weights, so it computes the same ones)."""
        if self.ckpt is not None:
            from ferrytune.engine._checkpoint import read_state
            saved = read_state(self.ckpt).get("zo_mask_thresholds")
            if saved is None:
                raise CheckpointError(f"{self.ckpt}: has no zo_mask_thresholds (saved without zo.mask_fraction); "
                                      "resume it with the zo settings it was trained with")
            return {int(k): float(v) for k, v in saved.items()}
        rt, out = self.rt, {}
        flat = torch.empty(max(s.numel for s in rt.layout.blocks.values()), dtype=rt.store_dtype)
        for b, spec in rt.layout.blocks.items():  # every rank, in the same order (sliced reads are collective)
            rt.streamer.read_master(b, flat[:spec.numel])
            for p in spec.params:
                out[p.param_id] = mask_threshold(flat[p.offset:p.offset + p.numel], fraction)
        return out

    def _open_state(self, name: str, filename: str, *, fill: float, required: str | None = None):
        """A streamer of per-parameter fp32 optimizer state (momentum, HiZOO's H) over the model's blocks,
        in the weights' tiers; filled with ``fill``, or read from the resumed checkpoint's ``filename``
        (``required``: the setting that needs it, named when a resumed checkpoint lacks it)."""
        cfg, rt, sub = self.cfg, self.rt, self.nvme_subdir()
        st = build_streamer(
            rt.plan, {b: s.numel for b, s in rt.layout.blocks.items()}, device=rt.device,
            compute_dtype=torch.float32, store_dtype=torch.float32,
            nvme_dir=None if not cfg.offload.nvme_dir else str(Path(cfg.offload.nvme_dir) / f"{name}{'-' + sub if sub else ''}"),
            io_threads=cfg.offload.io_threads, verify_checksums=cfg.offload.verify_checksums,
            io_backend=cfg.offload.io_backend)
        try:
            st.open(self._state_init(self.ckpt / filename if self.ckpt else None, fill, required))
        except BaseException:
            self.close_streamer(st)
            raise
        return st

    def _state_init(self, path: Path | None, fill: float, required: str | None):
        layout = self.rt.layout
        if path is not None and not path.exists() and required is not None:
            raise CheckpointError(f"{self.ckpt}: has no {path.name} (saved without {required}); "
                                  "resume it with the zo settings it was trained with")
        if path is None or not path.exists():
            return lambda b, flat: flat.fill_(fill)
        from safetensors.torch import load_file
        tensors = load_file(str(path))

        def init(b: str, flat: torch.Tensor) -> None:
            for p in layout.blocks[b].params:
                flat[p.offset:p.offset + p.numel].view(p.shape).copy_(tensors[p.name])
        return init

    # ----------------------------------------------------------------- step
    def train_step(self, step: int) -> StepResult:
        cfg, mesh, t = self.cfg, self.mesh, self.cfg.train
        q = cfg.zo.num_perturbations
        streams = streams_for(q, mesh, cfg.zo.estimator)
        M = self.batcher.num_micro_batches
        micro = self.batcher.batches_for_step(step, pad_id=self.pad_id)
        table = zo_forward(self.engine, step, micro, streams, micro_index=list(range(M))[mesh.dp_rank::mesh.data],
                           num_micro_global=M, q=q, mesh=mesh)
        extra = {}
        curv = None
        if cfg.zo.estimator == "fzoo":  # grads = the update's coefficients g_k / σ; the log keeps g and σ too
            grads, loss, extra = fzoo_grads_from(table, eps=cfg.zo.eps, rows_total=t.batch_size)
        elif cfg.zo.estimator == "hizoo":  # the step's loss is f(θ); the log keeps D_k for replay
            grads, loss, curv = hizoo_grads_from(table, eps=cfg.zo.eps, rows_total=t.batch_size)
            extra = {"curv": curv}
        else:
            grads, loss = grads_from(table, eps=cfg.zo.eps, rows_total=t.batch_size)
        if not all(math.isfinite(g) for g in grads + (curv or [])):
            raise FloatingPointError(f"step {step}: non-finite loss; lower train.lr or zo.eps")
        lr = lr_at(step, t)
        routed = self.engine.last_routed if cfg.zo.routed_experts else None
        self.engine.pending = PendingUpdate(step, grads, lr, experts=routed, curv=curv)
        self.agree.update(*grads, lr)
        if routed is not None:  # replay needs the experts each perturbation's chain covered
            extra = {**extra, "experts": {b: {str(k): sorted(es) for k, es in ks.items()} for b, ks in routed.items()}}
        self._log_step(step, grads, lr, extra)
        tokens = sum(int(m.attention_mask.sum()) for m in micro) * len(streams)
        return StepResult(loss, lr, tokens, {"grad": grads[0]})

    def before_final(self) -> None:
        self.engine.flush()

    def save_final(self, final: Path) -> None:
        self._save(final, self.cfg.train.steps)

    def check_agreement(self, step: int) -> None:
        sliced = self.rt.streamer.sliced  # slices differ by design: no weight sample
        if self.mesh.distributed:
            self.agree.check(step, sample=zo_sample(self.engine, step=step, with_params=not sliced))

    def replay(self, log_path: Path, *, to_step: int | None = None) -> Path:
        """Rebuild the weights of a run from its initial weights and its ``zo_log.jsonl``.

        Needs no data and no forward pass: per logged step, the update and the
        perturbation arithmetic are redone with z regenerated from the seed.
        Writes ``OUTPUT_DIR/replayed/`` and returns it.
        """
        entries = read_zo_log(log_path, start_step=self.start_step, seed=self.cfg.train.seed, to_step=to_step)
        for e in entries:
            routed = None
            if "experts" in e:
                routed = {b: {int(k): set(es) for k, es in ks.items()} for b, ks in e["experts"].items()}
            self.engine.replay_step(e["step"], routed)
            self.engine.pending = PendingUpdate(e["step"], list(e["grads"]), float(e["lr"]), experts=routed,
                                                curv=e.get("curv"))
        self.engine.flush()
        dest = self.output_dir / "replayed"
        end = self.start_step + len(entries)
        self._save(dest, end)
        return dest

    def _log_step(self, step: int, grads: list[float], lr: float, extra: dict | None = None) -> None:
        """``grads`` are the update's coefficients (MeZO: the projected gradients; FZOO: g_k / σ,
        with ``g`` and ``sigma`` beside them): replay needs nothing else."""
        if self.mesh.is_main:
            append_zo_log(self.output_dir, {"step": step, "seed": self.cfg.train.seed, "grads": grads, "lr": lr,
                                            **(extra or {})})

    # ------------------------------------------------------ eval, checkpoint
    def evaluate(self, *, prefix: str = "") -> dict:
        """Loss and accuracy on the eval set with the current (flushed) weights."""
        self.engine.flush()
        if not self.eval_examples:
            return {}
        n = self.cfg.data.eval_samples
        examples = self.eval_examples[:n] if n else self.eval_examples
        mb = self.cfg.train.micro_batch_size or self.cfg.train.batch_size
        total_loss = total_correct = count = 0.0
        mesh = self.mesh  # eval has no perturbation: every rank of the mesh takes its share
        chunks = list(eval_batches(examples, micro_batch_size=mb, rank=mesh.rank, world_size=mesh.world_size))
        # Sliced loading makes every pass collective: a rank one chunk short runs its first chunk again, uncounted.
        num_passes = len(chunks)
        if self.cfg.parallel.sliced_loading:
            num_passes = math.ceil(math.ceil(len(examples) / mb) / mesh.world_size)
        for i in self.eval_progress(list(range(num_passes))):
            chunk = chunks[i] if i < len(chunks) else examples[:1]
            batch = pad_positions([collate(chunk, pad_id=self.pad_id)])[0]
            out = {}

            def head(logits: torch.Tensor) -> None:
                b = batch.to(self.engine.device)
                out["loss"] = loss_per_sample(logits, b)
                out["correct"] = correct_per_sample(logits, b)

            dev = self.engine.device
            self.engine.run(-1, batch.input_ids.to(dev), batch.attention_mask.to(dev), batch.loss_positions.to(dev),
                            [(0, 0)], batch.batch_size, head, dirty=False, num_micro=1)
            if i < len(chunks):
                total_loss += float(out["loss"].sum())
                total_correct += float(out["correct"].sum())
                count += batch.batch_size
        totals = torch.tensor([total_loss, total_correct, count], dtype=torch.float64)
        return self._eval_result(totals, prefix)

    def save_checkpoint(self, step: int) -> Path:
        dest = checkpoint_dir(self.output_dir, step)
        self._save(dest, step)
        if self.mesh.is_main:
            prune_checkpoints(self.output_dir, self.cfg.train.keep_checkpoints)
        return dest

    def _save(self, dest: Path, step: int) -> None:
        self.engine.flush()
        rt = self.rt
        if not self.mesh.is_main:
            if rt.streamer.sliced:  # rank 0's read_master gathers every slice
                rt.streamer.serve_master_reads(list(rt.layout.blocks))
            return

        def extra(tmp: Path) -> None:
            from safetensors.torch import save_file
            for st, filename in ((self.state_streamer, MOMENTUM_FILE), (self.hessian_streamer, HESSIAN_FILE)):
                if st is None:
                    continue
                tensors = {}
                for b, spec in rt.layout.blocks.items():
                    flat = torch.empty(spec.numel, dtype=torch.float32)
                    st.read_master(b, flat)
                    for p in spec.params:
                        tensors[p.name] = flat[p.offset:p.offset + p.numel].view(p.shape).clone()
                save_file(tensors, str(tmp / filename))

        state = {"method": "zo", "step": step, "seed": self.cfg.train.seed, "world_size": self.mesh.world_size}
        if self.engine.thresholds is not None:
            state["zo_mask_thresholds"] = {str(k): v for k, v in self.engine.thresholds.items()}
        save_model_folder(dest, rt.layout, model_path=Path(self.cfg.model.path), store_dtype=rt.store_dtype,
                          read_block=rt.streamer.read_master, state=state, extra=extra)
        logger.info("saved %s", dest)

    def close(self) -> None:
        """Release what ``setup`` opened; also after a ``setup`` that raised part-way."""
        try:
            if getattr(self, "engine", None) is not None:
                self.engine.close()
            for name in ("state_streamer", "hessian_streamer"):
                if getattr(self, name, None) is not None:
                    self.close_streamer(getattr(self, name))
        finally:
            if getattr(self, "rt", None) is not None:
                self.close_streamer(self.rt.streamer)


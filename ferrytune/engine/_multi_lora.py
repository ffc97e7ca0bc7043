"""Packed multi-LoRA training: K jobs, K adapters, one frozen base, one forward per microbatch.

Each call of :meth:`MultiLoraTrainer.step` is one optimizer step of every active job:

1. every job takes its global batch for its own step counter (``Batcher``, so a job's data
   is a pure function of (seed, step) and resuming needs only the step);
2. all samples are cut into microbatches by a ``packer`` (the service passes
   first-fit-decreasing token packing; the default is one microbatch);
3. inside a microbatch rows are sorted by job, so each adapter's rows are contiguous, and
   ONE base forward runs over them with the :class:`~ferrytune.lora.Router` saying which
   rows use which adapter (mLoRA's BatchLoRA, Ye et al. 2023, arXiv:2312.02515);
   With ``packing`` the microbatch's sequences instead go end to end into ONE row, no padding
   (``collate_packed`` per job, ``join_packed``): position ids restart at 0 per sequence, so
   transformers' packed-sequence mask keeps attention inside each sequence, and the router
   routes each job's token range to its adapter (``route(segments, tokens=N)``);
4. the loss is ``sum over jobs of sum(per-sample loss of the job's rows) / job batch size``,
   i.e. the sum of each job's own mean; one ``backward`` per microbatch;
5. each job then clips its own gradient norm, sets its own scheduled lr and steps its own
   optimizer (its ``train.optimizer``: jobs of one step may use different ones). Adapters share no parameter, so each gets exactly the gradient it would get
   trained alone on the same samples (up to float summation order).

**Evaluation** (``data.eval``) follows the single-job loop's cadence: at step 0 (the
baseline), every ``train.eval_every_steps`` and after the last step. A job whose eval is
due stops stepping (its weights are those of that step) while its eval chunks, the
``ferrytune eval`` chunks of ``train.micro_batch_size or train.batch_size`` rows, run as
forward-only microbatches under ``no_grad`` in :meth:`MultiLoraTrainer.evaluate_some`,
one call per step boundary within a time budget; the chunks of every job evaluating at
that moment share a forward (router segments, like training rows; with ``packing`` one row
of their sequences end to end, routed by token range). The other jobs keep
stepping in between. Eval rows are not packed *into* training microbatches: the backward
of a training microbatch spans all its rows, so a forward-only row there would cost its
backward GEMMs too (about 3x a forward-only microbatch).

The base forward is behind two methods, :meth:`_forward_hidden` and :meth:`_head`, so
the resident base can be swapped for the streamed one of the engine without touching
the step logic.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ferrytune.config import TrainConfig, config_from_dict
from ferrytune.data import (
    Batch,
    Batcher,
    Example,
    collate,
    collate_packed,
    correct_per_sample,
    eval_batches,
    gather_packed,
    gather_positions,
    join_packed,
    load_examples,
    load_tokenizer,
    loss_per_sample,
    pad_id_for,
)
from ferrytune.engine._optim import build_optimizer, load_optimizer_state
from ferrytune.engine._schedule import lr_at
from ferrytune.errors import CheckpointError, ConfigError
from ferrytune.lora import Adapter, LoraSpec, Router, attach, find_targets, load_peft, save_peft
from ferrytune.models import load_resident_model, logits_at

logger = logging.getLogger(__name__)

__all__ = ["CHECKPOINT_NAME", "MultiLoraTrainer", "Packer"]

CHECKPOINT_NAME = "checkpoint.pt"
_CHECKPOINT_FORMAT = 1

Packer = Callable[[Sequence[int]], list[list[int]]]
"""Sample lengths (tokens) -> microbatches as lists of sample indices; every index once."""


def _one_microbatch(lengths: Sequence[int]) -> list[list[int]]:
    return [list(range(len(lengths)))]


@dataclass
class _Job:
    job_id: str
    cfg: TrainConfig
    spec: LoraSpec
    adapter: Adapter
    optimizer: torch.optim.Optimizer
    batcher: Batcher
    work_dir: Path
    step: int = 0
    resumed_from: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    eval_examples: Sequence[Example] | None = None
    eval_chunks: list[list[Example]] = field(default_factory=list)  # pending chunks of the running eval
    eval_totals: torch.Tensor | None = None  # (loss sum, correct, count) of the running eval, float64
    eval_done_step: int | None = None  # the last step whose eval completed

    @property
    def evaluating(self) -> bool:
        return bool(self.eval_chunks)

    def eval_due(self) -> bool:
        """An eval belongs to this step (0, every eval_every_steps, the last) and has not run."""
        if not self.eval_examples or self.eval_done_step == self.step:
            return False
        every = self.cfg.train.eval_every_steps
        return self.step == 0 or self.step >= self.max_steps or bool(every and self.step % every == 0)

    @property
    def max_steps(self) -> int:
        return self.cfg.train.steps


class MultiLoraTrainer:
    """One frozen base model (resident, loaded once) training a changing set of LoRA jobs.

    Jobs join (:meth:`add_job`) and leave (:meth:`remove_job`) between steps.
    ``packer`` splits one step's samples into microbatches (see ``ferrytune.service``'s
    ``pack_microbatches``); the default runs all of them in one forward.
    """

    def __init__(self, base_path: str | os.PathLike, *, device: str | torch.device = "cpu", seed: int = 0,
                 dtype: str = "float32", packer: Packer | None = None, offload=None, store_dtype: str = "auto",
                 eval_tokens: int | None = None, packing: bool = False):
        """``eval_tokens``: most padded tokens of one eval forward (the service's token capacity); an
        eval chunk longer than that is cut into pieces of ``eval_tokens // data.max_length`` rows.

        ``packing``: a training microbatch's sequences go end to end into one row, no padding
        (``ferrytune.data.collate_packed``: position ids restart per sequence, attention never
        crosses a boundary) and the router routes per token range (``route(..., tokens=N)``); the
        packer then bounds real tokens (``pack_microbatches(..., packed=True)``)."""
        self.packing = packing
        self.base_path = os.fspath(base_path)
        self.eval_tokens = eval_tokens
        self.device = torch.device(device)
        self.seed = seed
        self.dtype = dtype
        self._packer = packer or _one_microbatch
        self.tokenizer = load_tokenizer(self.base_path)
        self.pad_id = pad_id_for(self.tokenizer)
        self.engine = None
        if offload is None:
            # aligned like the streamed base's blocks, so both run the same GEMMs (models/_resident.py)
            self.model = load_resident_model(self.base_path, dtype=getattr(torch, dtype), device=self.device)
        else:
            # One streamed copy of the base serves every adapter: each block is read once per
            # packed microbatch (and its backward), however many jobs share the step.
            from ferrytune.engine._fo import FOEngine
            from ferrytune.engine._runtime import build_base_runtime, weights_from

            self.runtime = build_base_runtime(self.base_path, offload, device=str(self.device),
                                              compute_dtype=dtype, store_dtype=store_dtype)
            self.runtime.streamer.open(weights_from(self.base_path, self.runtime.layout))
            self.engine = FOEngine(self.runtime.layout, self.runtime.streamer, device=self.device)
            self.model = self.runtime.layout.model
        if packing:
            from ferrytune.engine._fo import check_packing_supported
            check_packing_supported(self.model, key="packing")
        self.model.requires_grad_(False)
        self.model.train()  # as PEFT trains: LoRA dropout follows the base module's mode
        self.router = Router()
        self._jobs: dict[str, _Job] = {}
        self._eval_done: dict[str, dict] = {}
        self._handle = None

    def close(self) -> None:
        """Release the streamed base (threads, direct-IO files) and the adapters' hooks."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        if self.engine is not None:
            self.engine.close()
            self.runtime.streamer.close()
            self.engine = None

    # ---- the base forward: resident, or streamed through the engine's intercepted units ----
    def _forward_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                        position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Last hidden states (B, T, C) of the frozen base, adapters applied by the hooks.

        With a streamed base the same call runs through the engine's intercepted units.
        Packed rows pass ``position_ids`` (restarting per sequence) and no mask.
        """
        if position_ids is not None:
            out = self.model.base_model(input_ids=input_ids, position_ids=position_ids, use_cache=False)
        else:
            out = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return out.last_hidden_state  # (B, T, C)

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits (B, L, V) from hidden states gathered at the scored positions (B, L, C)."""
        return logits_at(self.model, hidden)  # the model's own head code (soft-capping, logit scales)

    # ---- jobs ----
    @property
    def job_ids(self) -> list[str]:
        return list(self._jobs)

    def add_job(self, job_id: str, cfg: TrainConfig | dict, *, train_path: str | os.PathLike | None = None,
                work_dir: str | os.PathLike, examples: Sequence[Example] | None = None,
                eval_examples: Sequence[Example] | None = None) -> int:
        """Add a job; resumes from ``work_dir/checkpoint.pt`` when there is one. Returns its step.

        ``train_path`` replaces ``cfg.data.train`` (the service passes its own copy of the data).
        ``examples``, when given, are the job's training examples already loaded and encoded
        from that data (the service loads them in another thread, beside the training loop);
        ``eval_examples`` likewise those of ``cfg.data.eval`` (loaded here when not given).
        Raises ConfigError / DataError / CheckpointError naming the problem.
        """
        if job_id in self._jobs:
            raise ConfigError(f"job {job_id}: already on this trainer")
        if isinstance(cfg, dict):
            cfg = config_from_dict(cfg, source=f"job {job_id}", check_device=False)
        if cfg.method != "lora":
            raise ConfigError(f"job {job_id}: method: the multi-LoRA trainer trains method 'lora' (got {cfg.method!r})")
        data = cfg.data.model_copy(update={"train": os.fspath(train_path)} if train_path else {})
        if examples is None or (eval_examples is None and data.eval):
            loaded, loaded_eval = load_examples(data, self.tokenizer)
            examples = loaded if examples is None else examples
            eval_examples = loaded_eval if eval_examples is None else eval_examples
        adapter, spec = self._new_adapter(cfg)
        train = cfg.train
        optimizer = build_optimizer(adapter.parameters(), train)
        batcher = Batcher(examples, global_batch_size=train.batch_size, seed=train.seed, shuffle=data.shuffle)
        job = _Job(job_id, cfg, spec, adapter, optimizer, batcher, Path(work_dir),
                   eval_examples=list(eval_examples) if eval_examples else None)
        job.work_dir.mkdir(parents=True, exist_ok=True)
        self._resume(job)
        if job.eval_due():
            self._start_eval(job)  # the baseline at step 0, or an eval the job was removed (or died) in
        self._jobs[job_id] = job
        self._reattach()
        logger.info("job %s joined at step %d/%d (%d targets, %d adapter params)", job_id, job.step,
                    job.max_steps, len(adapter.targets), sum(p.numel() for p in adapter.parameters()))
        return job.step

    def remove_job(self, job_id: str) -> None:
        """Drop a job between steps (checkpoint it first if its progress matters)."""
        self._jobs.pop(job_id)
        self._reattach()

    def is_done(self, job_id: str) -> bool:
        """All steps trained and its final eval (if any) reported."""
        job = self._jobs[job_id]
        return job.step >= job.max_steps and not job.evaluating

    def evaluating(self, job_id: str) -> bool:
        """Its eval is running: it does not step until the eval is done."""
        return self._jobs[job_id].evaluating

    def training_job_ids(self) -> list[str]:
        """Jobs the next :meth:`step` steps."""
        return [j.job_id for j in self._jobs.values() if j.step < j.max_steps and not j.evaluating]

    def job_step(self, job_id: str) -> int:
        return self._jobs[job_id].step

    def adapter(self, job_id: str) -> Adapter:
        return self._jobs[job_id].adapter

    def _new_adapter(self, cfg: TrainConfig) -> tuple[Adapter, LoraSpec]:
        lora = cfg.lora
        if lora.init_from:
            adapter, spec = load_peft(lora.init_from, self.model, device=self.device)
            return adapter, spec
        spec = LoraSpec.from_config(lora)
        targets = find_targets(self.model, spec)
        return Adapter.create(targets, spec, seed=cfg.train.seed, device=self.device), spec

    def _reattach(self) -> None:
        # Router index i = i-th job in insertion order; re-hooking costs microseconds.
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        if self._jobs:
            self._handle = attach(self.model, [j.adapter for j in self._jobs.values()], router=self.router)

    # ---- the packed step ----
    def step(self, job_ids: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
        """One optimizer step of every job that is not done (of ``job_ids`` only, when given).

        Returns per-job metrics.
        """
        t0 = time.perf_counter()
        index = {job_id: k for k, job_id in enumerate(self._jobs)}  # router adapter index
        active = [j for j in self._jobs.values() if j.step < j.max_steps and not j.evaluating
                  and (job_ids is None or j.job_id in job_ids)]
        if not active:
            return {}
        samples: list[tuple[int, Example]] = []  # (position in `active`, example), job by job
        tokens = [0] * len(active)
        for a, job in enumerate(active):
            samples += [(a, e) for mb in job.batcher.batch_for_step(job.step) for e in mb]
            tokens[a] = sum(len(e.input_ids) for b, e in samples if b == a)
        bins = self._packer([len(e.input_ids) for _, e in samples])
        if sorted(i for b in bins for i in b) != list(range(len(samples))):
            raise RuntimeError("packer must return every sample index exactly once")
        for job in active:
            job.optimizer.zero_grad(set_to_none=True)
        loss_sums = [0.0] * len(active)
        padded_tokens = 0
        for rows in bins:
            rows = sorted(rows, key=lambda i: (samples[i][0], i))  # each job's rows contiguous
            if self.packing:
                padded_tokens += sum(len(samples[i][1].input_ids) for i in rows)  # one row, no padding
                sums = self._forward_backward_packed([samples[i] for i in rows], active, index)
            else:
                padded_tokens += len(rows) * max(len(samples[i][1].input_ids) for i in rows)
                sums = self._forward_backward([samples[i] for i in rows], active, index)
            for a, s in sums.items():
                loss_sums[a] += s
        out: dict[str, dict[str, float]] = {}
        for a, job in enumerate(active):
            out[job.job_id] = self._optimizer_step(job, loss_sums[a])
            out[job.job_id]["tokens"] = tokens[a]
        elapsed = time.perf_counter() - t0
        for metrics in out.values():
            metrics["step_time_s"] = elapsed
            metrics["num_microbatches"] = len(bins)
            metrics["padded_tokens"] = padded_tokens  # tokens the forwards computed, all jobs
            metrics["real_tokens"] = sum(tokens)
        return out

    def _forward_backward(self, rows: list[tuple[int, Example]], active: list[_Job],
                          index: dict[str, int]) -> dict[int, float]:
        """One microbatch: rows sorted by job. Returns {job position: sum of its per-sample losses}."""
        T = max(len(e.input_ids) for _, e in rows)
        segments, batches, start = [], [], 0
        for a in sorted({a for a, _ in rows}):
            examples = [e for b, e in rows if b == a]
            batches.append((a, start, collate(examples, pad_id=self.pad_id, pad_to=T).to(self.device)))
            segments.append((index[active[a].job_id], start, start + len(examples)))
            start += len(examples)
        input_ids = torch.cat([b.input_ids for _, _, b in batches])  # (B, T)
        attention_mask = torch.cat([b.attention_mask for _, _, b in batches])  # (B, T)
        with self._base_pass():
            return self._packed_loss_backward(segments, batches, input_ids, attention_mask, active, {})

    def _forward_backward_packed(self, rows: list[tuple[int, Example]], active: list[_Job],
                                 index: dict[str, int]) -> dict[int, float]:
        """One microbatch, its sequences end to end in ONE row (rows sorted by job).

        Each job's sequences are one contiguous token range, routed to its adapter; the loss is the
        same per-sample sum over the job's batch size as :meth:`_forward_backward`'s.
        """
        jobs = sorted({a for a, _ in rows})  # job positions in active
        input_ids, position_ids, segments, joined = self._join_jobs(
            [(index[active[a].job_id], collate_packed([e for b, e in rows if b == a], pad_id=self.pad_id)) for a in jobs])
        groups = list(zip(jobs, joined))
        sums: dict[int, float] = {}
        with self._base_pass(), self.router.route(segments, tokens=input_ids.numel()):  # open through backward
            hidden = self._forward_hidden(input_ids, None, position_ids)  # (1, N, C)
            loss = hidden.new_zeros((), dtype=torch.float32)
            for a, g in groups:
                per_sample = loss_per_sample(self._head(gather_packed(hidden, g.loss_positions)), g)  # (b,)
                loss = loss + per_sample.sum() / active[a].batcher.global_batch_size
                sums[a] = float(per_sample.detach().sum())
            loss.backward()
        return sums

    def _join_jobs(self, parts: list[tuple[int, Batch]]) -> tuple[torch.Tensor, torch.Tensor, list, list[Batch]]:
        """Several jobs' packed batches end to end in ONE row, each job's a contiguous token range for
        the router. ``parts``: (the job's router index, its packed batch). Returns (input_ids,
        position_ids, router segments, the batches re-based to the row), on the device."""
        input_ids, position_ids, joined = join_packed([b for _, b in parts])
        segments = [(i, g.spans[0][0], g.spans[-1][1]) for (i, _), g in zip(parts, joined)]
        return input_ids.to(self.device), position_ids.to(self.device), segments, [g.to(self.device) for g in joined]

    @contextlib.contextmanager
    def _base_pass(self, *, backward: bool = True):
        """A streamed base's pass of one packed step or eval forward (its outer block held until after
        backward; released as failed if the step raises); nothing for a resident base."""
        if self.engine is None:
            yield
            return
        self.engine.begin_step(1, backward=backward)
        try:
            yield
        except BaseException:
            self.engine.end_step(failed=True)
            raise
        self.engine.end_step()

    def _packed_loss_backward(self, segments, batches, input_ids, attention_mask, active, sums) -> dict[int, float]:
        with self.router.route(segments):  # open through backward: a recomputed layer needs the routing
            hidden = self._forward_hidden(input_ids, attention_mask)  # (B, T, C)
            loss = hidden.new_zeros((), dtype=torch.float32)
            for a, row0, batch in batches:
                h = gather_positions(hidden[row0:row0 + batch.batch_size], batch.loss_positions)  # (b, L, C)
                per_sample = loss_per_sample(self._head(h), batch)  # (b,)
                loss = loss + per_sample.sum() / active[a].batcher.global_batch_size
                sums[a] = float(per_sample.detach().sum())
            loss.backward()
        return sums

    def _optimizer_step(self, job: _Job, loss_sum: float) -> dict[str, float]:
        train = job.cfg.train
        lr = lr_at(job.step, train)
        for group in job.optimizer.param_groups:
            group["lr"] = lr
        params = list(job.adapter.parameters())
        if train.grad_clip is not None:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, train.grad_clip))
        else:
            grad_norm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])))
        job.optimizer.step()
        job.step += 1
        if job.eval_due():
            self._start_eval(job)
        return {"step": job.step, "loss": loss_sum / job.batcher.global_batch_size, "lr": lr,
                "grad_norm": grad_norm, "done": float(job.step >= job.max_steps and not job.evaluating),
                "evaluating": float(job.evaluating)}

    # ---- evaluation: forward-only microbatches between steps ----
    def _start_eval(self, job: _Job) -> None:
        """Queue the eval of the job's current weights: ``ferrytune eval``'s chunks, in file order."""
        mb = job.cfg.train.micro_batch_size or job.cfg.train.batch_size
        if self.eval_tokens:
            mb = min(mb, max(1, self.eval_tokens // job.cfg.data.max_length))
        job.eval_chunks = list(eval_batches(job.eval_examples, micro_batch_size=mb))
        job.eval_totals = torch.zeros(3, dtype=torch.float64)

    def evaluate_some(self, budget_s: float = 0.0, *, job_ids: Sequence[str] | None = None) -> dict[str, dict]:
        """Run eval forwards until ``budget_s`` has passed (at least one forward, if any eval is pending).

        Each forward takes the next chunk of every evaluating job (of ``job_ids`` only, when
        given) while they fit ``eval_tokens`` together. Returns, for each job whose eval
        completed, ``{"step", "eval_loss", "eval_accuracy", "eval_samples", "done"}``: the keys
        of the single-job ``metrics.jsonl``.
        """
        t0 = time.perf_counter()
        out = self._eval_done  # evals completed by a call that then raised are returned by the next one
        index = {job_id: k for k, job_id in enumerate(self._jobs)}
        while True:
            pending = [j for j in self._jobs.values() if j.evaluating and (job_ids is None or j.job_id in job_ids)]
            if not pending:
                break
            take, rows, longest = [], 0, 0
            for job in pending:
                chunk = job.eval_chunks[0]
                t = max(longest, max(len(e.input_ids) for e in chunk))
                if take and self.eval_tokens and (rows + len(chunk)) * t > self.eval_tokens:
                    continue
                take.append(job)
                rows, longest = rows + len(chunk), t
            sums = self._eval_forward([(job, job.eval_chunks[0]) for job in take], index)
            for job, (loss, correct, count) in zip(take, sums):
                job.eval_chunks.pop(0)
                job.eval_totals += torch.tensor([loss, correct, count], dtype=torch.float64)
                if not job.evaluating:
                    loss_sum, num_correct, n = job.eval_totals.tolist()
                    job.eval_done_step = job.step
                    out[job.job_id] = {"step": job.step, "eval_loss": loss_sum / n, "eval_accuracy": num_correct / n,
                                       "eval_samples": int(n), "done": float(job.step >= job.max_steps)}
                    logger.info("job %s: eval at step %d: loss %.4f accuracy %.4f on %d samples", job.job_id,
                                job.step, loss_sum / n, num_correct / n, int(n))
            if time.perf_counter() - t0 >= budget_s:
                break
        self._eval_done = {}
        return {job_id: r for job_id, r in out.items() if job_id in self._jobs}

    def _eval_forward(self, chunks: list[tuple[_Job, list[Example]]], index: dict[str, int]) -> list[tuple]:
        """One no-grad forward over the chunks (one segment each); per chunk (loss sum, correct, rows)."""
        if self.packing:
            return self._eval_forward_packed(chunks, index)
        T = max(len(e.input_ids) for _, chunk in chunks for e in chunk)
        if len(chunks) == 1:  # as ``ferrytune eval`` collates a chunk: padded to its own longest row
            batches = [collate(chunks[0][1], pad_id=self.pad_id)]
        else:
            batches = [collate(chunk, pad_id=self.pad_id, pad_to=T) for _, chunk in chunks]
        segments, start = [], 0
        for (job, _), b in zip(chunks, batches):
            segments.append((index[job.job_id], start, start + b.batch_size))
            start += b.batch_size
        batches = [b.to(self.device) for b in batches]
        input_ids = torch.cat([b.input_ids for b in batches])
        attention_mask = torch.cat([b.attention_mask for b in batches])
        out = []
        self.model.eval()  # no dropout, as ``ferrytune eval``
        try:
            with self._base_pass(backward=False), torch.no_grad(), self.router.route(segments):
                hidden = self._forward_hidden(input_ids, attention_mask)
                for (_, row0, row1), b in zip(segments, batches):
                    logits = self._head(gather_positions(hidden[row0:row1], b.loss_positions))
                    out.append((float(loss_per_sample(logits, b).sum()), float(correct_per_sample(logits, b).sum()),
                                b.batch_size))
        finally:
            self.model.train()
        return out

    def _eval_forward_packed(self, chunks: list[tuple[_Job, list[Example]]], index: dict[str, int]) -> list[tuple]:
        """:meth:`_eval_forward` with the chunks' sequences end to end in ONE row, each job's a
        contiguous token range routed to its adapter (as a packed training microbatch)."""
        input_ids, position_ids, segments, joined = self._join_jobs(
            [(index[job.job_id], collate_packed(c, pad_id=self.pad_id)) for job, c in chunks])
        out = []
        self.model.eval()
        try:
            with self._base_pass(backward=False), torch.no_grad(), \
                    self.router.route(segments, tokens=input_ids.numel()):
                hidden = self._forward_hidden(input_ids, None, position_ids)  # (1, N, C)
                for g in joined:
                    logits = self._head(gather_packed(hidden, g.loss_positions))
                    out.append((float(loss_per_sample(logits, g).sum()), float(correct_per_sample(logits, g).sum()),
                                g.batch_size))
        finally:
            self.model.train()
        return out

    # ---- checkpoints and export ----
    def checkpoint(self, job_id: str) -> Path:
        """Write ``work_dir/checkpoint.pt`` atomically (temp file, fsync, rename). Returns its path."""
        job = self._jobs[job_id]
        state = {
            "format": _CHECKPOINT_FORMAT, "job_id": job_id, "step": job.step,
            "adapter": job.adapter.state_dict(), "optimizer": job.optimizer.state_dict(),
            "config": job.cfg.to_dict(), "eval_done_step": job.eval_done_step,
        }
        final = job.work_dir / CHECKPOINT_NAME
        tmp = job.work_dir / f".{CHECKPOINT_NAME}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            with open(tmp, "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
        dir_fd = os.open(job.work_dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the rename itself must survive a crash
        finally:
            os.close(dir_fd)
        return final

    def _resume(self, job: _Job) -> None:
        path = job.work_dir / CHECKPOINT_NAME
        if not path.exists():
            return
        try:
            state = torch.load(path, map_location=self.device, weights_only=True)
            if state.get("format") != _CHECKPOINT_FORMAT:
                raise CheckpointError(f"{path}: unknown checkpoint format {state.get('format')!r}")
            job.adapter.load_state_dict(state["adapter"])
            load_optimizer_state(job.optimizer, state["optimizer"], job.cfg.train.optimizer, source=str(path))
            job.step = int(state["step"])
            job.eval_done_step = state.get("eval_done_step")
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001 - torch.load / load_state_dict raise many types
            first = " ".join(str(e).split())[:300] or type(e).__name__
            raise CheckpointError(f"{path}: cannot resume from it: {first}") from None
        job.resumed_from = job.step
        logger.info("job %s resumes from %s at step %d", job.job_id, path, job.step)

    def resumed_from(self, job_id: str) -> int:
        return self._jobs[job_id].resumed_from

    def export(self, job_id: str, out_dir: str | os.PathLike, *, base_model_name_or_path: str | None = None) -> Path:
        """Save the job's adapter as a PEFT LoRA folder (atomically)."""
        job = self._jobs[job_id]
        save_peft(job.adapter, out_dir, base_model_name_or_path=base_model_name_or_path or self.base_path,
                  spec=job.spec)
        return Path(out_dir)

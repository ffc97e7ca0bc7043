"""The worker: one base model, a changing set of LoRA jobs, driven tick by tick by the controller.

:class:`TrainWorker` is a plain class; the controller runs it as a Ray actor
(``ray.remote(TrainWorker)``, two concurrent calls so :meth:`TrainWorker.interrupt` can
reach a running tick), one per (base, dtype) group slot. The protocol is one method,
:meth:`TrainWorker.tick`: apply the controller's commands (jobs join or leave: this is
the only place they do, so always between steps), then train packed steps for about
``slice_s`` seconds, and report per-job progress. A tick always ends at a step boundary,
which is where preemption and cancellation take effect; :meth:`interrupt` ends the
running tick after its current step, so a cancel waits at most one step.

**Evaluation** (``data.eval``) runs between steps, never inside one: after each packed
step the worker runs the eval forwards that are pending (every evaluating job's next
chunk, packed together) for at most ``eval_slice_s`` seconds (at least one forward), so an
eval delays its neighbours' next step by about that much and not by the whole eval. A
job whose eval runs does not step (its weights are those of the evaluated step); when no
job has a step to train, eval runs for the rest of the tick. The numbers are reported as
``evals`` rows (``step, eval_loss, eval_accuracy, eval_samples, time``); a job finishes
once its final eval is reported.

A job that is added first has its dataset loaded and tokenised on a loader thread, while
the other jobs keep training; it joins the packed step once its data is ready.

Each job is checkpointed every ``checkpoint_every_steps`` of its steps, when it is
removed with ``checkpoint=True`` (preemption) and when it finishes; a finished job is
exported in PEFT format to its adapter dir and leaves the worker. When the actor dies,
its jobs resume elsewhere from their last checkpoints (the trainer's ``add_job`` does
that by itself).

**One job's failure is that job's alone.** Whatever one job's data load, step,
checkpoint or export raises fails that job, and the worker and its other jobs go on: a
packed step that raises is retried job by job, and only the jobs that fail alone fail.
The tenant sees one clean line (:func:`~ferrytune.service._public.public_message`: no
server path, no other job); the traceback goes to the worker's log.
"""

from __future__ import annotations

import concurrent.futures
import logging
import math
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

from ferrytune.service._public import public_message

logger = logging.getLogger(__name__)

__all__ = ["TrainWorker", "add_command", "remove_command"]


def add_command(job_id: str, *, config: dict, train_path: str, work_dir: str, adapter_dir: str,
                base_name: str) -> dict:
    """Command: train this job (resuming from ``work_dir`` if it has a checkpoint)."""
    return {"op": "add", "job_id": job_id, "config": config, "train_path": train_path, "work_dir": work_dir,
            "adapter_dir": adapter_dir, "base_name": base_name}


def remove_command(job_id: str, *, checkpoint: bool) -> dict:
    """Command: drop this job at the step boundary, checkpointing it first if asked (preemption)."""
    return {"op": "remove", "job_id": job_id, "checkpoint": checkpoint}


def _own_dirs(cmd: dict) -> tuple[str, ...]:
    """The job's folder and its tenant's area: paths a job's error may show, made relative."""
    job_dir = Path(cmd["work_dir"]).parent
    return str(job_dir), str(job_dir.parent.parent)


class TrainWorker:
    """Holds one :class:`~ferrytune.engine._multi_lora.MultiLoraTrainer` (built on the first tick)."""

    def __init__(self, worker_id: str, base_path: str, *, dtype: str, token_capacity: int,
                 checkpoint_every_steps: int, num_threads: int, seed: int = 0, offload: dict | None = None,
                 store_dtype: str = "auto", eval_slice_s: float = 0.05, packing: bool = False):
        os.umask(0o077)  # checkpoints and adapters are the tenant's: private to the service's user
        self.worker_id = worker_id
        self.base_path = base_path
        self.dtype = dtype
        self.token_capacity = token_capacity
        self.checkpoint_every_steps = checkpoint_every_steps
        self.num_threads = num_threads
        self.seed = seed
        self.offload = offload
        self.store_dtype = store_dtype
        self.eval_slice_s = eval_slice_s
        self.packing = packing
        self._trainer = None
        self._jobs: dict[str, dict] = {}  # job id -> its add command (jobs on the trainer)
        self._loading: dict[str, tuple[dict, concurrent.futures.Future]] = {}  # job id -> (command, its data)
        self._loader = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ferrytune-data")
        self._interrupt = threading.Event()

    def ping(self) -> dict[str, Any]:
        return {"worker_id": self.worker_id, "pid": os.getpid(), "host": socket.gethostname()}

    def interrupt(self) -> None:
        """End the running tick after its current step (a cancel or preemption is waiting)."""
        self._interrupt.set()

    def close(self) -> None:
        self._loader.shutdown(wait=False, cancel_futures=True)
        if self._trainer is not None:
            self._trainer.close()

    def _ensure_trainer(self):
        if self._trainer is None:
            import functools

            import torch
            import transformers

            from ferrytune.engine import MultiLoraTrainer
            from ferrytune.service._policy import pack_microbatches

            transformers.utils.logging.disable_progress_bar()
            torch.set_num_threads(self.num_threads)
            packer = functools.partial(pack_microbatches, capacity_tokens=self.token_capacity, packed=self.packing)
            offload = None
            if self.offload:
                from ferrytune.config import OffloadConfig
                offload = OffloadConfig(**self.offload)
            self._trainer = MultiLoraTrainer(self.base_path, dtype=self.dtype, seed=self.seed, packer=packer,
                                             offload=offload, store_dtype=self.store_dtype,
                                             eval_tokens=self.token_capacity, packing=self.packing)
            logger.info("worker %s loaded %s (%s)", self.worker_id, self.base_path, self.dtype)
        return self._trainer

    def tick(self, commands: list[dict], *, slice_s: float) -> dict[str, Any]:
        """Apply ``commands``, then train until ``slice_s`` has passed, no job is left, or an interrupt."""
        t0 = time.monotonic()
        self._interrupt.clear()
        jobs: dict[str, dict[str, Any]] = {}
        if self._trainer is None:
            # The first tick only loads the base and adds its jobs, then reports: jobs the
            # controller admitted while this actor was starting join the very first packed step.
            slice_s = 0.0
        trainer = self._ensure_trainer()
        for cmd in commands:
            if cmd["op"] == "add":
                self._add(trainer, cmd, jobs)
            elif cmd["op"] == "remove":
                self._remove(trainer, cmd, jobs)
        if slice_s == 0.0 and self._loading:
            # first tick: small datasets are ready in moments; let them join the first step
            concurrent.futures.wait([f for _, f in self._loading.values()], timeout=2.0)
        num_steps = 0
        while True:
            self._join_loaded(trainer, jobs)
            if time.monotonic() - t0 >= slice_s or self._interrupt.is_set():
                break
            if not self._jobs:
                if not self._loading:
                    break
                left = slice_s - (time.monotonic() - t0)
                concurrent.futures.wait([f for _, f in self._loading.values()], timeout=max(0.0, left),
                                        return_when=concurrent.futures.FIRST_COMPLETED)
                continue
            if trainer.training_job_ids():
                self._step(trainer, jobs)
                num_steps += 1
            # a neighbour waits about eval_slice_s for its next step; with no step to train, the loop
            # goes on evaluating until the tick ends (or an interrupt: a cancel waits one slice)
            self._eval(trainer, jobs, self.eval_slice_s)
        for job_id in self._jobs:
            jobs.setdefault(job_id, self._entry(trainer, job_id, "running"))
        for job_id in self._loading:
            jobs.setdefault(job_id, {"state": "running", "metrics": [], "evals": [], "error": None,
                                     "checkpoint_step": None, "loading": True})
        return {"worker_id": self.worker_id, "pid": os.getpid(), "num_steps": num_steps, "jobs": jobs,
                "elapsed_s": time.monotonic() - t0}

    def _entry(self, trainer, job_id: str, state: str, **extra: Any) -> dict[str, Any]:
        entry = {"state": state, "metrics": [], "evals": [], "error": None, "checkpoint_step": None}
        if job_id in self._jobs:
            entry["step"] = trainer.job_step(job_id)
        entry.update(extra)
        return entry

    def _fail(self, trainer, job_id: str, jobs: dict, what: str, e: BaseException, cmd: dict) -> None:
        """Fail this job alone: a clean line for its tenant, the traceback for the log."""
        logger.warning("worker %s: job %s: %s", self.worker_id, job_id, what, exc_info=e)
        entry = jobs.setdefault(job_id, self._entry(trainer, job_id, "running"))
        entry.update(state="failed", error=f"{what}: {public_message(e, own_dirs=_own_dirs(cmd), job_id=job_id)}")
        if job_id in self._jobs:
            del self._jobs[job_id]
            try:
                trainer.remove_job(job_id)
            except Exception:  # noqa: BLE001 - it is failed either way; the others must go on
                logger.exception("worker %s: removing failed job %s", self.worker_id, job_id)

    # ---- jobs join: data loaded on the loader thread, joined at a step boundary ----
    def _add(self, trainer, cmd: dict, jobs: dict) -> None:
        job_id = cmd["job_id"]
        if job_id in self._jobs or job_id in self._loading:
            return
        self._loading[job_id] = (cmd, self._loader.submit(self._load, trainer, cmd))

    @staticmethod
    def _load(trainer, cmd: dict):
        from ferrytune.config import config_from_dict
        from ferrytune.data import load_examples

        cfg = config_from_dict(cmd["config"], source=f"job {cmd['job_id']}", check_device=False)
        data = cfg.data.model_copy(update={"train": cmd["train_path"]})  # data.eval: the job's own copy
        return (cfg, *load_examples(data, trainer.tokenizer))

    def _join_loaded(self, trainer, jobs: dict) -> None:
        for job_id, (cmd, future) in list(self._loading.items()):
            if not future.done():
                continue
            del self._loading[job_id]
            try:
                cfg, examples, eval_examples = future.result()
                step = trainer.add_job(job_id, cfg, train_path=cmd["train_path"], work_dir=cmd["work_dir"],
                                       examples=examples, eval_examples=eval_examples)
            except Exception as e:  # noqa: BLE001 - a bad job must not take the worker (and its other jobs) down
                self._fail(trainer, job_id, jobs, "cannot start", e, cmd)
                continue
            self._jobs[job_id] = cmd
            jobs[job_id] = self._entry(trainer, job_id, "running", resumed_from=step)
            if trainer.is_done(job_id):  # died after its last step, before the controller heard of it
                self._finish(trainer, job_id, jobs[job_id], jobs)

    def _remove(self, trainer, cmd: dict, jobs: dict) -> None:
        job_id = cmd["job_id"]
        if job_id in self._loading:  # not on the trainer yet: nothing to checkpoint
            self._loading.pop(job_id)[1].cancel()
            jobs[job_id] = {"state": "removed", "metrics": [], "error": None, "checkpoint_step": None}
            return
        if job_id not in self._jobs:
            jobs[job_id] = {"state": "removed", "metrics": [], "error": None, "checkpoint_step": None}
            return
        entry = jobs.setdefault(job_id, self._entry(trainer, job_id, "running"))
        if cmd["checkpoint"]:
            try:
                trainer.checkpoint(job_id)
            except Exception as e:  # noqa: BLE001 - its progress since the last checkpoint cannot be kept
                self._fail(trainer, job_id, jobs, "cannot checkpoint", e, self._jobs[job_id])
                return
            entry["checkpoint_step"] = trainer.job_step(job_id)
        trainer.remove_job(job_id)
        del self._jobs[job_id]
        entry["state"] = "removed"

    # ---- the packed step ----
    def _step(self, trainer, jobs: dict) -> None:
        before = {job_id: trainer.job_step(job_id) for job_id in self._jobs}
        try:
            results = trainer.step()
        except Exception:  # noqa: BLE001 - find the job(s) at fault: retry each alone
            logger.exception("packed step failed on worker %s; retrying its jobs one by one", self.worker_id)
            results = {}
            for job_id in list(self._jobs):
                if trainer.job_step(job_id) != before[job_id]:
                    continue  # its optimizer stepped before the failure: that step is done
                try:
                    results.update(trainer.step(job_ids=[job_id]))
                except Exception as e:  # noqa: BLE001
                    self._fail(trainer, job_id, jobs, "training step failed", e, self._jobs[job_id])
        now = time.time()
        for job_id, m in results.items():
            entry = jobs.setdefault(job_id, self._entry(trainer, job_id, "running"))
            entry["step"] = int(m["step"])
            entry["metrics"].append({"step": int(m["step"]), "loss": float(m["loss"]), "lr": float(m["lr"]),
                                     "tokens": int(m["tokens"]), "time": now})
            if not math.isfinite(m["loss"]):
                entry.update(state="failed", error=f"loss is {m['loss']} at step {int(m['step'])}; lower train.lr")
                trainer.remove_job(job_id)
                del self._jobs[job_id]
            elif m["done"]:
                self._finish(trainer, job_id, entry, jobs)
            elif int(m["step"]) % self.checkpoint_every_steps == 0:
                try:
                    trainer.checkpoint(job_id)
                except Exception as e:  # noqa: BLE001
                    self._fail(trainer, job_id, jobs, "cannot checkpoint", e, self._jobs[job_id])
                    continue
                entry["checkpoint_step"] = int(m["step"])

    def _eval(self, trainer, jobs: dict, budget_s: float) -> None:
        """The pending eval forwards for about ``budget_s``; a failing one is retried job by job."""
        try:
            results = trainer.evaluate_some(budget_s)
        except Exception:  # noqa: BLE001 - find the job(s) at fault, as for a packed step
            logger.exception("packed eval failed on worker %s; retrying its jobs one by one", self.worker_id)
            results = {}
            for job_id in [j for j in self._jobs if trainer.evaluating(j)]:
                try:
                    results.update(trainer.evaluate_some(0.0, job_ids=[job_id]))
                except Exception as e:  # noqa: BLE001
                    self._fail(trainer, job_id, jobs, "evaluation failed", e, self._jobs[job_id])
        now = time.time()
        for job_id, r in results.items():
            if job_id not in self._jobs:
                continue
            entry = jobs.setdefault(job_id, self._entry(trainer, job_id, "running"))
            if not math.isfinite(r["eval_loss"]):  # JSON has no inf / NaN: say so instead of storing it
                entry.update(state="failed", error=f"eval_loss is {r['eval_loss']} at step {int(r['step'])}; "
                                                   "lower train.lr (or use compute_dtype float32)")
                trainer.remove_job(job_id)
                del self._jobs[job_id]
                continue
            entry["evals"].append({"step": int(r["step"]), "eval_loss": float(r["eval_loss"]),
                                   "eval_accuracy": float(r["eval_accuracy"]), "eval_samples": int(r["eval_samples"]),
                                   "time": now})
            if trainer.is_done(job_id):
                self._finish(trainer, job_id, entry, jobs)

    def _finish(self, trainer, job_id: str, entry: dict, jobs: dict) -> None:
        cmd = self._jobs[job_id]
        try:
            trainer.checkpoint(job_id)
            entry["checkpoint_step"] = trainer.job_step(job_id)
            trainer.export(job_id, cmd["adapter_dir"], base_model_name_or_path=cmd["base_name"])
            os.chmod(cmd["adapter_dir"], 0o700)  # the export makes it 0755; a tenant's folders are 0700
        except Exception as e:  # noqa: BLE001 - reported as the job's error
            self._fail(trainer, job_id, jobs, "cannot save the adapter", e, cmd)
            return
        entry["state"] = "finished"
        trainer.remove_job(job_id)
        del self._jobs[job_id]

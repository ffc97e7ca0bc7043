"""The worker: one base model, a changing set of LoRA jobs, driven tick by tick by the controller.

:class:`TrainWorker` is a plain class; the controller runs it as a Ray actor
(``ray.remote(TrainWorker)``), one per (base, dtype) group slot. The protocol is one
method, :meth:`TrainWorker.tick`: apply the controller's commands (jobs join or leave:
this is the only place they do, so always between steps), then train packed steps for
about ``slice_s`` seconds, and report per-job progress. A tick always ends at a step
boundary, which is where preemption and cancellation take effect.

Each job is checkpointed every ``checkpoint_every_steps`` of its steps, when it is
removed with ``checkpoint=True`` (preemption) and when it finishes; a finished job is
exported in PEFT format to its adapter dir and leaves the worker. When the actor dies,
its jobs resume elsewhere from their last checkpoints (the trainer's ``add_job`` does
that by itself).
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
from typing import Any

from ferrytune.errors import FerrytuneError

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


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text if isinstance(e, FerrytuneError) and text else f"{type(e).__name__}: {text}"[:500]


class TrainWorker:
    """Holds one :class:`~ferrytune.engine._multi_lora.MultiLoraTrainer` (built on the first tick)."""

    def __init__(self, worker_id: str, base_path: str, *, dtype: str, token_capacity: int,
                 checkpoint_every_steps: int, num_threads: int, seed: int = 0, offload: dict | None = None,
                 store_dtype: str = "auto"):
        self.worker_id = worker_id
        self.base_path = base_path
        self.dtype = dtype
        self.token_capacity = token_capacity
        self.checkpoint_every_steps = checkpoint_every_steps
        self.num_threads = num_threads
        self.seed = seed
        self.offload = offload
        self.store_dtype = store_dtype
        self._trainer = None
        self._jobs: dict[str, dict] = {}  # job id -> its add command

    def ping(self) -> dict[str, Any]:
        return {"worker_id": self.worker_id, "pid": os.getpid(), "host": socket.gethostname()}

    def _ensure_trainer(self):
        if self._trainer is None:
            import functools

            import torch
            import transformers

            from ferrytune.engine._multi_lora import MultiLoraTrainer
            from ferrytune.service._policy import pack_microbatches

            transformers.utils.logging.disable_progress_bar()
            torch.set_num_threads(self.num_threads)
            packer = functools.partial(pack_microbatches, capacity_tokens=self.token_capacity)
            offload = None
            if self.offload:
                from ferrytune.config import OffloadConfig
                offload = OffloadConfig(**self.offload)
            self._trainer = MultiLoraTrainer(self.base_path, dtype=self.dtype, seed=self.seed, packer=packer,
                                             offload=offload, store_dtype=self.store_dtype)
            logger.info("worker %s loaded %s (%s)", self.worker_id, self.base_path, self.dtype)
        return self._trainer

    def tick(self, commands: list[dict], *, slice_s: float) -> dict[str, Any]:
        """Apply ``commands``, then train until ``slice_s`` has passed or no job is left."""
        t0 = time.monotonic()
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
        num_steps = 0
        while self._jobs and time.monotonic() - t0 < slice_s:
            self._step(trainer, jobs)
            num_steps += 1
        for job_id in self._jobs:
            jobs.setdefault(job_id, self._entry(trainer, job_id, "running"))
        return {"worker_id": self.worker_id, "pid": os.getpid(), "num_steps": num_steps, "jobs": jobs,
                "elapsed_s": time.monotonic() - t0}

    def _entry(self, trainer, job_id: str, state: str, **extra: Any) -> dict[str, Any]:
        entry = {"state": state, "metrics": [], "error": None, "checkpoint_step": None}
        if job_id in self._jobs:
            entry["step"] = trainer.job_step(job_id)
        entry.update(extra)
        return entry

    def _add(self, trainer, cmd: dict, jobs: dict) -> None:
        job_id = cmd["job_id"]
        try:
            step = trainer.add_job(job_id, cmd["config"], train_path=cmd["train_path"], work_dir=cmd["work_dir"])
        except Exception as e:  # noqa: BLE001 - a bad job must not take the worker (and its other jobs) down
            logger.warning("job %s cannot start: %s", job_id, _one_line(e))
            jobs[job_id] = self._entry(trainer, job_id, "failed", error=_one_line(e))
            return
        self._jobs[job_id] = cmd
        jobs[job_id] = self._entry(trainer, job_id, "running", resumed_from=step)
        if trainer.is_done(job_id):  # died after its last step, before the controller heard of it
            self._finish(trainer, job_id, jobs[job_id])

    def _remove(self, trainer, cmd: dict, jobs: dict) -> None:
        job_id = cmd["job_id"]
        if job_id not in self._jobs:
            jobs[job_id] = {"state": "removed", "metrics": [], "error": None, "checkpoint_step": None}
            return
        entry = jobs.setdefault(job_id, self._entry(trainer, job_id, "running"))
        if cmd["checkpoint"]:
            trainer.checkpoint(job_id)
            entry["checkpoint_step"] = trainer.job_step(job_id)
        trainer.remove_job(job_id)
        del self._jobs[job_id]
        entry["state"] = "removed"

    def _step(self, trainer, jobs: dict) -> None:
        try:
            results = trainer.step()
        except Exception as e:  # the packed step failed: no job of it can go on here
            logger.exception("packed step failed on worker %s", self.worker_id)
            for job_id in list(self._jobs):
                jobs[job_id] = self._entry(trainer, job_id, "failed", error=f"training step failed: {_one_line(e)}")
                trainer.remove_job(job_id)
                del self._jobs[job_id]
            return
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
                self._finish(trainer, job_id, entry)
            elif int(m["step"]) % self.checkpoint_every_steps == 0:
                trainer.checkpoint(job_id)
                entry["checkpoint_step"] = int(m["step"])

    def _finish(self, trainer, job_id: str, entry: dict) -> None:
        cmd = self._jobs[job_id]
        try:
            trainer.checkpoint(job_id)
            entry["checkpoint_step"] = trainer.job_step(job_id)
            trainer.export(job_id, cmd["adapter_dir"], base_model_name_or_path=cmd["base_name"])
            entry["state"] = "finished"
        except Exception as e:  # noqa: BLE001 - reported as the job's error
            entry.update(state="failed", error=f"cannot save the adapter: {_one_line(e)}")
        trainer.remove_job(job_id)
        del self._jobs[job_id]

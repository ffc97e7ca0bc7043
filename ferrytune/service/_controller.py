"""The controller: builds snapshots, asks the policies, executes their decisions on Ray.

One round (every ``tick_s``):

1. **collect** the reports of worker ticks that finished (progress, metrics, checkpoints,
   finished / failed / removed jobs); a tick that raised ``RayActorError`` means the
   worker died;
2. **snapshot** the store (queued and running jobs, tenants) and the workers;
3. **decide**: :func:`~ferrytune.service._policy.schedule` (pure);
4. **execute** each decision: job state transitions go through the store (each one is an
   event of the job and a log line), commands are queued for the worker's next tick;
5. **dispatch** the next tick to every worker that has work and no tick in flight.

The controller is the only writer of job states. It keeps no state that matters across
restarts: on start it re-queues every job the store says is running (its worker died with
the previous service process; non-detached Ray actors share their owner's fate).

What it writes into a job's ``error`` and events is for that job's tenant: one line, no
server path, no other tenant's name or job id (details go to the server log). A cancel
or preemption interrupts the worker's running tick, so it takes effect after one step.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray

import ferrytune
from ferrytune.service._limits import TenantLimits
from ferrytune.service._paths import StateLayout
from ferrytune.service._policy import (
    Admit,
    CancelJob,
    Decision,
    FailJob,
    JobView,
    Limits,
    Preempt,
    Requeue,
    RetireWorker,
    Snapshot,
    StartWorker,
    StopWorker,
    TenantView,
    WorkerView,
    adapter_state_bytes,
    schedule,
)
from ferrytune.service._public import scrub
from ferrytune.service._spec import BaseCatalog
from ferrytune.service._states import JobState, WorkerState
from ferrytune.service._store import JobRecord, JobStore
from ferrytune.service._worker import TrainWorker, add_command, remove_command

logger = logging.getLogger(__name__)

__all__ = ["Controller", "ControllerSettings"]

RAY_NAMESPACE = "ferrytune"


@dataclass(frozen=True)
class ControllerSettings:
    worker_memory_gib: float = 8.0
    """memory one worker may use: base + activations + adapters (the admission model)"""
    max_workers: int = 1
    """workers alive at once"""
    max_jobs_per_worker: int = 8
    """adapters trained together on one worker"""
    token_capacity: int = 4096
    """padded tokens of one packed microbatch"""
    packing: bool = False
    """pack each microbatch's sequences end to end, no padding (the trainer's ``packing``); capacity = real tokens"""
    min_slice_s: float = 300.0
    """a job runs at least this long before a fair-share preemption"""
    checkpoint_every_steps: int = 20
    """per-job checkpoint period, in that job's steps"""
    worker_num_cpus: float = 1.0
    """Ray CPUs each worker actor reserves (and torch threads it uses, at least 1)"""
    worker_slice_s: float = 1.0
    """training time per tick; cancels and preemptions wait at most this long"""
    tick_s: float = 0.2
    """pause between controller rounds"""
    eval_slice_s: float = 0.05
    """eval forwards a worker runs between two packed steps (at least one): what a job's eval delays its neighbours"""
    base_offload: dict | None = None
    """``offload`` section (tier, nvme_dir, host_budget_gib, ...) for streaming the base; None = resident"""
    base_store_dtype: str = "auto"
    """dtype of the streamed base's blocks (bfloat16 halves the bytes read per step)"""
    tenant_limits: TenantLimits = field(default_factory=TenantLimits)
    """service-wide defaults of the per-tenant limits (``max_running_jobs`` is applied here)"""

    def limits(self) -> Limits:
        return Limits(worker_memory_bytes=int(self.worker_memory_gib * 2**30), max_workers=self.max_workers,
                      max_jobs_per_worker=self.max_jobs_per_worker, token_capacity=self.token_capacity,
                      min_slice_s=self.min_slice_s)


def _worker_offload(offload: dict | None, worker_id: str) -> dict | None:
    """Each worker streams from its own block store under the configured NVMe directory."""
    if not offload:
        return None
    out = dict(offload)
    if out.get("nvme_dir"):
        out["nvme_dir"] = str(Path(out["nvme_dir"]) / worker_id)
    return out


@dataclass
class _Worker:
    worker_id: str
    group: tuple[str, str]
    actor: Any
    state: WorkerState = WorkerState.STARTING
    inflight: Any = None  # ObjectRef of the running tick
    pending: list[dict] = field(default_factory=list)  # commands for the next tick
    job_ids: set[str] = field(default_factory=set)
    pid: int | None = None


class Controller:
    def __init__(self, store: JobStore, catalog: BaseCatalog, layout: StateLayout, settings: ControllerSettings):
        self.store = store
        self.catalog = catalog
        self.layout = layout
        self.settings = settings
        self.service_id = uuid.uuid4().hex[:8]
        self.workers: dict[str, _Worker] = {}
        self._next_worker_seq = 0
        self._removal: dict[str, str] = {}  # job id -> "preempt" | "cancel", sent and not confirmed
        self._running_since: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._round_lock = threading.Lock()

    # ---- lifecycle ----
    def start(self) -> None:
        for job in self.store.jobs(states=[JobState.RUNNING]):
            self._transition(job.id, JobState.RUNNING, JobState.QUEUED,
                             f"service restarted; resumes from step {job.checkpoint_step}", worker_id=None)
        self._thread = threading.Thread(target=self._loop, name="ferrytune-controller", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        for worker in list(self.workers.values()):
            self._kill(worker)
        self.workers.clear()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_round()
            except Exception:  # keep serving; the next round re-reads everything
                logger.exception("controller round failed")
            self._stop.wait(self.settings.tick_s)

    def run_round(self) -> list[Decision]:
        with self._round_lock:
            self._collect()
            decisions = schedule(self._snapshot())
            for decision in decisions:
                self._execute(decision)
            self._dispatch()
            return decisions

    # ---- 1. collect ----
    def _collect(self) -> None:
        inflight = {w.inflight: w for w in self.workers.values() if w.inflight is not None}
        if not inflight:
            return
        ready, _ = ray.wait(list(inflight), num_returns=len(inflight), timeout=0)
        for ref in ready:
            worker = inflight[ref]
            worker.inflight = None
            try:
                report = ray.get(ref)
            except ray.exceptions.RayActorError as e:
                logger.warning("worker %s died: %s", worker.worker_id, " ".join(str(e).split())[:300])
                worker.state = WorkerState.DEAD
                continue
            except Exception as e:  # noqa: BLE001 - the tick itself raised (e.g. the base failed to load)
                # The details are the operator's (server paths, other jobs): the log has them,
                # the tenants get a line that names neither.
                logger.error("worker %s failed: %s", worker.worker_id, e)
                self._fail_worker_jobs(worker, f"the worker for base {worker.group[0]!r} failed (a server-side "
                                               "error; the service log has the details); resubmit the job")
                self._kill(worker)
                worker.state = WorkerState.DEAD
                continue
            if worker.state == WorkerState.STARTING:
                worker.state = WorkerState.READY
            worker.pid = report.get("pid")
            for job_id, entry in report["jobs"].items():
                self._apply(worker, job_id, entry)

    def _apply(self, worker: _Worker, job_id: str, entry: dict) -> None:
        if entry.get("step") is not None:
            ckpt = entry.get("checkpoint_step")
            record = self.store.job(job_id)
            self.store.record_progress(job_id, step=entry["step"], metrics=entry["metrics"],
                                       evals=entry.get("evals", []),
                                       checkpoint_step=ckpt if ckpt is not None else record.checkpoint_step)
        if entry.get("resumed_from"):
            self.store.add_event(job_id, f"resumed from its checkpoint at step {entry['resumed_from']} "
                                         f"on worker {worker.worker_id}")
        state = entry["state"]
        if state == "running":
            return
        worker.job_ids.discard(job_id)
        self._running_since.pop(job_id, None)
        kind = self._removal.pop(job_id, None)
        if state == "finished":
            self._transition(job_id, JobState.RUNNING, JobState.SUCCEEDED,
                             f"finished on worker {worker.worker_id}", finished_at=time.time(), worker_id=None)
        elif state == "failed":
            error = scrub(entry["error"] or "failed", job_id=job_id)  # the worker's line, scrubbed once more
            self._transition(job_id, JobState.RUNNING, JobState.FAILED, error, error=error,
                             finished_at=time.time(), worker_id=None)
        elif state == "removed" and kind == "cancel":
            self._transition(job_id, JobState.RUNNING, JobState.CANCELLED, "cancelled by its tenant",
                             finished_at=time.time(), worker_id=None)
        elif state == "removed":
            ckpt = entry.get("checkpoint_step")
            if ckpt is None:  # removed while its data was still loading: nothing trained here
                ckpt = self.store.job(job_id).checkpoint_step
            self._transition(job_id, JobState.RUNNING, JobState.QUEUED,
                             f"preempted at step {ckpt}; checkpointed", worker_id=None)

    def _fail_worker_jobs(self, worker: _Worker, reason: str) -> None:
        for job_id in list(worker.job_ids):
            self._transition(job_id, JobState.RUNNING, JobState.FAILED, reason, error=reason,
                             finished_at=time.time(), worker_id=None)
        worker.job_ids.clear()

    # ---- 2. snapshot ----
    def _snapshot(self) -> Snapshot:
        jobs = self.store.jobs(states=[JobState.QUEUED, JobState.RUNNING])
        tokens = self.store.tokens_by_tenant()
        defaults = self.settings.tenant_limits
        tenants = {t.name: TenantView(t.name, t.weight, tokens.get(t.name, 0),
                                      max_running=defaults.with_overrides(t.overrides).max_running_jobs)
                   for t in self.store.tenants()}
        groups = {(j.base, j.dtype) for j in jobs} | {w.group for w in self.workers.values()}
        costs = {g: self.catalog.cost(*g) for g in groups if g[0] in self.catalog.paths}
        return Snapshot(
            now_s=time.time(), jobs=tuple(self._view(j) for j in jobs),
            workers=tuple(WorkerView(w.worker_id, w.group, w.state) for w in self.workers.values()),
            tenants=tenants, costs=costs, limits=self.settings.limits(), next_worker_seq=self._next_worker_seq)

    def _view(self, job: JobRecord) -> JobView:
        memory = job.memory_bytes if job.memory_bytes is not None else adapter_state_bytes(job.adapter_params)
        return JobView(job.id, job.tenant, (job.base, job.dtype), job.state, job.priority, job.seq,
                       memory, job.max_length, worker_id=job.worker_id,
                       cancel_requested=job.cancel_requested, removal_pending=job.id in self._removal,
                       running_since_s=self._running_since.get(job.id))

    # ---- 4. execute ----
    def _execute(self, d: Decision) -> None:
        if isinstance(d, RetireWorker):
            self.workers.pop(d.worker_id, None)
        elif isinstance(d, StartWorker):
            self._start_worker(d.worker_id, d.group)
        elif isinstance(d, StopWorker):
            worker = self.workers[d.worker_id]
            logger.info("stopping worker %s (%s)", d.worker_id, d.reason)
            worker.state = WorkerState.STOPPING
        elif isinstance(d, Admit):
            self._admit(d.job_id, self.workers[d.worker_id])
        elif isinstance(d, Preempt):
            self._removal[d.job_id] = "preempt"
            self.workers[d.worker_id].pending.append(remove_command(d.job_id, checkpoint=True))
            self._interrupt(self.workers[d.worker_id])
            logger.info("job %s: %s (for job %s)", d.job_id, d.reason, d.for_job_id)
            self.store.add_event(d.job_id, d.reason)
        elif isinstance(d, Requeue):
            self._running_since.pop(d.job_id, None)
            self._removal.pop(d.job_id, None)
            record = self.store.job(d.job_id)
            self._transition(d.job_id, JobState.RUNNING, JobState.QUEUED,
                             f"{d.reason}; resumes from step {record.checkpoint_step}", worker_id=None)
        elif isinstance(d, CancelJob) and d.worker_id is None:
            self._transition(d.job_id, JobState.QUEUED, JobState.CANCELLED, "cancelled by its tenant",
                             finished_at=time.time())
        elif isinstance(d, CancelJob):
            self._removal[d.job_id] = "cancel"
            self.workers[d.worker_id].pending.append(remove_command(d.job_id, checkpoint=False))
            self._interrupt(self.workers[d.worker_id])
        elif isinstance(d, FailJob):
            self._transition(d.job_id, JobState.QUEUED, JobState.FAILED, d.reason, error=d.reason,
                             finished_at=time.time())
        else:
            raise TypeError(f"unknown decision {d!r}")

    def _start_worker(self, worker_id: str, group: tuple[str, str]) -> None:
        self._next_worker_seq = max(self._next_worker_seq, int(worker_id[1:]) + 1)
        base, dtype = group
        s = self.settings
        root = str(Path(ferrytune.__file__).resolve().parent.parent)
        pythonpath = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
        actor = ray.remote(TrainWorker).options(
            name=f"ferrytune-{self.service_id}-{worker_id}", namespace=RAY_NAMESPACE, num_cpus=s.worker_num_cpus,
            max_restarts=0, max_concurrency=2,  # tick, and interrupt() beside it
            runtime_env={"env_vars": {"PYTHONPATH": pythonpath}},
        ).remote(worker_id, self.catalog.paths[base], dtype=dtype, token_capacity=s.token_capacity,
                 checkpoint_every_steps=s.checkpoint_every_steps, num_threads=max(1, int(s.worker_num_cpus)),
                 offload=_worker_offload(s.base_offload, worker_id), store_dtype=s.base_store_dtype,
                 eval_slice_s=s.eval_slice_s, packing=s.packing)
        self.workers[worker_id] = _Worker(worker_id, group, actor)
        logger.info("started worker %s for base %s (%s)", worker_id, base, dtype)

    def _admit(self, job_id: str, worker: _Worker) -> None:
        job = self.store.job(job_id)
        started = job.started_at or time.time()
        if not self._transition(job_id, JobState.QUEUED, JobState.RUNNING, f"admitted to worker {worker.worker_id}",
                                worker_id=worker.worker_id, started_at=started):
            return
        job_dir = Path(job.job_dir)
        worker.pending.append(add_command(
            job_id, config=job.config, train_path=str(job_dir / "train.jsonl"), work_dir=str(job_dir / "work"),
            adapter_dir=job.adapter_dir, base_name=job.base))
        worker.job_ids.add(job_id)
        self._running_since[job_id] = time.time()

    def _transition(self, job_id: str, old: JobState, new: JobState, reason: str, **values: Any) -> bool:
        done = self.store.transition(job_id, old, new, reason=reason, **values)
        if done:
            logger.info("job %s: %s -> %s (%s)", job_id, old.value, new.value, reason)
        else:
            logger.debug("job %s: not %s any more; %s -> %s skipped", job_id, old.value, old.value, new.value)
        return done

    # ---- 5. dispatch ----
    def _dispatch(self) -> None:
        for worker in list(self.workers.values()):
            if worker.inflight is not None or worker.state == WorkerState.DEAD:
                continue
            if worker.state == WorkerState.STOPPING:
                self._kill(worker)
                del self.workers[worker.worker_id]
                continue
            if worker.pending or worker.job_ids or worker.state == WorkerState.STARTING:
                commands, worker.pending = worker.pending, []
                worker.inflight = worker.actor.tick.remote(commands, slice_s=self.settings.worker_slice_s)

    def _interrupt(self, worker: _Worker) -> None:
        """End the worker's running tick after its current step, so a removal waits one step at most."""
        if worker.inflight is not None and worker.state == WorkerState.READY:
            worker.actor.interrupt.remote()  # fire and forget: a dead worker is found by the tick

    def _kill(self, worker: _Worker) -> None:
        try:
            ray.kill(worker.actor, no_restart=True)
        except Exception as e:  # noqa: BLE001 - already gone is fine
            logger.debug("ray.kill(%s): %s", worker.worker_id, e)

    # ---- for the API and tests ----
    def worker_info(self) -> list[dict[str, Any]]:
        return [{"worker_id": w.worker_id, "base": w.group[0], "dtype": w.group[1], "state": w.state.value,
                 "jobs": sorted(w.job_ids), "pid": w.pid} for w in list(self.workers.values())]

    def actor(self, worker_id: str):
        return self.workers[worker_id].actor

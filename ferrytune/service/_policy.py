"""Scheduling policies: pure functions from a :class:`Snapshot` to a list of decisions.

Nothing here touches Ray, the database or the clock; the controller builds a snapshot,
calls :func:`schedule`, and carries out the decisions in order (Ray Train v2's split:
policies *decide*, the controller *executes*). Every rule is unit-tested on hand-made
snapshots in ``tests/service/test_policy.py``.

The rules, in the order :func:`schedule` applies them:

1. **Dead workers.** Jobs on a dead worker go back to the queue; they resume from their
   last checkpoint wherever they are admitted next.
2. **Cancels.** A queued job is cancelled at once; a running one is removed from its
   worker at the next step boundary.
3. **Admission.** Jobs are grouped by (base model, dtype): only jobs of one group share
   a worker, because they share its one copy of the base. The memory model of a worker::

       base bytes (once) + activations for `token_capacity` tokens (one microbatch)
                         + sum over its jobs of adapter bytes (fp32 A, B, grads, optimizer state)

   must stay under ``worker_memory_bytes``. Queued jobs are taken in order of priority
   (higher first), then weighted fair share: the tenant with the fewest running jobs per
   unit of weight, then the fewest tokens trained per unit of weight, then submission
   order. A tenant at its ``max_running`` waits. Each is placed on the fullest worker of
   its group that still fits it (so jobs pack onto few workers and share base reads);
   else a new worker is started when ``max_workers`` allows. A job's bytes
   (``JobView.adapter_bytes``) are its adapter state plus its data on the worker, as
   estimated at submission; the optimizer's share is that of the job's ``train.optimizer``
   (AdamW: two fp32 moments per parameter; Adam-mini and SGD-SaI about half of that).
4. **Preemption** (only within a group, at most one pending per group): a queued job that
   fits nowhere may displace a running job of lower priority, or, at equal priority, a
   job of a tenant over its fair share that has run at least ``min_slice_s``. The victim
   is checkpointed at a step boundary and re-queued; it never loses a finished step. The
   reason it is given names neither the other job nor its tenant (it is shown to the victim's
   tenant); ``Preempt.for_job_id`` is for the server log.
5. **Idle workers** with no jobs and nothing queued for their group are stopped.

:func:`pack_microbatches` is the sample-level policy a worker uses inside one packed step:
first-fit-decreasing bin packing of samples into microbatches of at most
``capacity_tokens`` padded tokens (LoRAFusion's greedy packing, without its MILP pass).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from ferrytune.service._states import JobState, WorkerState

__all__ = [
    "ADAPTER_BYTES_PER_PARAM",
    "PARAM_GRAD_BYTES_PER_PARAM",
    "Admit",
    "BaseCost",
    "CancelJob",
    "Decision",
    "FailJob",
    "GroupKey",
    "JobView",
    "Limits",
    "Preempt",
    "Requeue",
    "RetireWorker",
    "Snapshot",
    "StartWorker",
    "StopWorker",
    "TenantView",
    "WorkerView",
    "adapter_state_bytes",
    "pack_microbatches",
    "schedule",
]

# fp32 parameter + fp32 gradient
PARAM_GRAD_BYTES_PER_PARAM = 8
# ... + AdamW's two fp32 moments: the most any ``train.optimizer`` keeps (the estimate without one)
ADAPTER_BYTES_PER_PARAM = PARAM_GRAD_BYTES_PER_PARAM + 8

GroupKey = tuple[str, str]
"""(served base name, dtype): the jobs that may share one worker."""


def adapter_state_bytes(num_params: int, optimizer_bytes: int | None = None) -> int:
    """Bytes one adapter holds on a worker while it trains: its fp32 parameters and gradients,
    and ``optimizer_bytes``, its optimizer's state (``ferrytune.engine.optimizer_state_bytes``
    for the job's ``train.optimizer``); None: AdamW's two moments per parameter, the largest."""
    if optimizer_bytes is None:
        return num_params * ADAPTER_BYTES_PER_PARAM
    return num_params * PARAM_GRAD_BYTES_PER_PARAM + optimizer_bytes


@dataclass(frozen=True)
class Limits:
    worker_memory_bytes: int
    """what one worker may hold: base + activations + adapters"""
    max_workers: int
    """workers alive at once, over all groups"""
    max_jobs_per_worker: int
    """adapters trained together on one worker"""
    token_capacity: int
    """padded tokens (rows x longest row) of one packed microbatch"""
    min_slice_s: float
    """a running job is not preempted for fair share before it ran this long"""


@dataclass(frozen=True)
class BaseCost:
    """What a base model costs a worker, from its config (see ``_spec.base_cost``)."""

    base_bytes: int
    act_bytes_per_token: int


@dataclass(frozen=True)
class JobView:
    job_id: str
    tenant: str
    group: GroupKey
    state: JobState
    priority: int
    seq: int
    """submission order (smaller = earlier)"""
    adapter_bytes: int
    """what the job holds on a worker: adapter state (+ its data, when known)"""
    max_length: int
    """longest sample, in tokens"""
    worker_id: str | None = None
    cancel_requested: bool = False
    removal_pending: bool = False
    """a preempt or cancel was sent to its worker and is not confirmed yet"""
    running_since_s: float | None = None


@dataclass(frozen=True)
class WorkerView:
    worker_id: str
    group: GroupKey
    state: WorkerState


@dataclass(frozen=True)
class TenantView:
    name: str
    weight: float = 1.0
    tokens_trained: int = 0
    max_running: int | None = None
    """jobs of this tenant on workers at once (None: no limit)"""


@dataclass(frozen=True)
class Snapshot:
    now_s: float
    jobs: tuple[JobView, ...]
    workers: tuple[WorkerView, ...]
    tenants: Mapping[str, TenantView]
    costs: Mapping[GroupKey, BaseCost]
    limits: Limits
    next_worker_seq: int = 0


# ---- decisions: records the controller executes, in list order ----

@dataclass(frozen=True)
class RetireWorker:
    worker_id: str  # dead: forget it


@dataclass(frozen=True)
class StartWorker:
    worker_id: str
    group: GroupKey


@dataclass(frozen=True)
class StopWorker:
    worker_id: str
    reason: str


@dataclass(frozen=True)
class Admit:
    job_id: str
    worker_id: str


@dataclass(frozen=True)
class Preempt:
    job_id: str
    worker_id: str
    reason: str
    for_job_id: str = field(default="", compare=False)


@dataclass(frozen=True)
class Requeue:
    job_id: str
    reason: str


@dataclass(frozen=True)
class CancelJob:
    job_id: str
    worker_id: str | None  # None: it is queued, cancel now


@dataclass(frozen=True)
class FailJob:
    job_id: str
    reason: str


Decision = RetireWorker | StartWorker | StopWorker | Admit | Preempt | Requeue | CancelJob | FailJob


@dataclass
class _Plan:
    """Mutable working state of one :func:`schedule` call (never escapes it)."""

    snap: Snapshot
    live: dict[str, WorkerView] = field(default_factory=dict)
    resident: dict[str, list[JobView]] = field(default_factory=dict)  # worker -> jobs it holds
    slots: Counter = field(default_factory=Counter)  # tenant -> resident jobs
    next_seq: int = 0

    def weight(self, tenant: str) -> float:
        view = self.snap.tenants.get(tenant)
        return view.weight if view is not None and view.weight > 0 else 1.0

    def share(self, tenant: str, extra: int = 0) -> float:
        return (self.slots[tenant] + extra) / self.weight(tenant)

    def at_max_running(self, tenant: str) -> bool:
        view = self.snap.tenants.get(tenant)
        return view is not None and view.max_running is not None and self.slots[tenant] >= view.max_running

    def usage(self, tenant: str) -> float:
        view = self.snap.tenants.get(tenant)
        return (view.tokens_trained if view is not None else 0) / self.weight(tenant)

    def used_bytes(self, worker_id: str) -> int:
        cost = self.snap.costs[self.live[worker_id].group]
        fixed = cost.base_bytes + cost.act_bytes_per_token * self.snap.limits.token_capacity
        return fixed + sum(j.adapter_bytes for j in self.resident[worker_id])

    def fits(self, worker_id: str, job: JobView, *, without: JobView | None = None) -> bool:
        jobs = [j for j in self.resident[worker_id] if j is not without]
        if len(jobs) >= self.snap.limits.max_jobs_per_worker:
            return False
        freed = without.adapter_bytes if without is not None else 0
        return self.used_bytes(worker_id) - freed + job.adapter_bytes <= self.snap.limits.worker_memory_bytes


def schedule(snap: Snapshot) -> list[Decision]:
    """All decisions for one controller round. Pure: same snapshot, same decisions."""
    plan = _Plan(snap, next_seq=snap.next_worker_seq)
    decisions: list[Decision] = []
    candidates = _dead_workers_and_cancels(plan, decisions)
    _admit(plan, candidates, decisions)
    _stop_idle(plan, candidates, decisions)
    return decisions


def _dead_workers_and_cancels(plan: _Plan, decisions: list[Decision]) -> list[JobView]:
    """Rules 1 and 2; fills the plan's live workers and residents; returns the admission candidates."""
    snap = plan.snap
    dead = set()
    for w in snap.workers:
        if w.state == WorkerState.DEAD:
            dead.add(w.worker_id)
            decisions.append(RetireWorker(w.worker_id))
        elif w.state != WorkerState.STOPPING:
            plan.live[w.worker_id] = w
            plan.resident[w.worker_id] = []
    candidates: list[JobView] = []
    for job in sorted(snap.jobs, key=lambda j: j.seq):
        if job.state == JobState.QUEUED:
            if job.cancel_requested:
                decisions.append(CancelJob(job.job_id, None))
            else:
                candidates.append(job)
        elif job.state == JobState.RUNNING:
            if job.worker_id is None or job.worker_id in dead or (
                    job.worker_id not in plan.live and not job.removal_pending):
                decisions.append(Requeue(job.job_id, f"worker {job.worker_id} is gone"))
                if job.cancel_requested:
                    continue  # re-queued now, cancelled next round
                candidates.append(replace(job, state=JobState.QUEUED, worker_id=None, running_since_s=None))
                continue
            if job.cancel_requested and not job.removal_pending:
                decisions.append(CancelJob(job.job_id, job.worker_id))
            if job.worker_id in plan.resident:
                plan.resident[job.worker_id].append(job)
                plan.slots[job.tenant] += 1
    return candidates


def _admit(plan: _Plan, candidates: list[JobView], decisions: list[Decision]) -> None:
    """Rules 3 and 4."""
    snap = plan.snap
    limits = snap.limits
    pending = list(candidates)
    preempting = {plan.live[j.worker_id].group for js in plan.resident.values() for j in js if j.removal_pending}
    while pending:
        job = min(pending, key=lambda j: (-j.priority, plan.share(j.tenant), plan.usage(j.tenant), j.seq))
        pending.remove(job)
        if plan.at_max_running(job.tenant):
            continue
        cost = snap.costs.get(job.group)
        if cost is None:
            decisions.append(FailJob(job.job_id, f"base {job.group[0]!r} is not served any more"))
            continue
        alone = cost.base_bytes + cost.act_bytes_per_token * limits.token_capacity + job.adapter_bytes
        if alone > limits.worker_memory_bytes:
            decisions.append(FailJob(job.job_id, (
                f"needs {alone / 2**30:.2f} GiB on a worker (base + activations + adapter + data) but a worker "
                f"has {limits.worker_memory_bytes / 2**30:.2f} GiB; lower lora.rank or data.max_length")))
            continue
        if job.max_length > limits.token_capacity:
            decisions.append(FailJob(job.job_id, (
                f"data.max_length {job.max_length} exceeds the microbatch capacity of "
                f"{limits.token_capacity} tokens; lower data.max_length")))
            continue
        worker_id = _best_fit(plan, job)
        if worker_id is None and len(plan.live) < limits.max_workers:
            worker_id = f"w{plan.next_seq}"
            plan.next_seq += 1
            plan.live[worker_id] = WorkerView(worker_id, job.group, WorkerState.STARTING)
            plan.resident[worker_id] = []
            decisions.append(StartWorker(worker_id, job.group))
        if worker_id is not None:
            decisions.append(Admit(job.job_id, worker_id))
            plan.resident[worker_id].append(job)
            plan.slots[job.tenant] += 1
        elif job.group not in preempting:
            victim = _victim(plan, job)
            if victim is not None:
                preempting.add(job.group)
                why = (f"a job of higher priority ({job.priority} vs {victim.priority})"
                       if job.priority > victim.priority else "fair share between tenants")
                decisions.append(Preempt(victim.job_id, victim.worker_id, f"preempted for {why}",
                                         for_job_id=job.job_id))


def _best_fit(plan: _Plan, job: JobView) -> str | None:
    fitting = [w for w, view in plan.live.items() if view.group == job.group and plan.fits(w, job)]
    if not fitting:
        return None
    # the fullest worker that still fits (best fit), ties to the lowest id
    return min(fitting, key=lambda w: (-plan.used_bytes(w), -len(plan.resident[w]), w))


def _victim(plan: _Plan, job: JobView) -> JobView | None:
    snap = plan.snap
    eligible = []
    for worker_id, jobs in plan.resident.items():
        if plan.live[worker_id].group != job.group or plan.live[worker_id].state != WorkerState.READY:
            continue
        for v in jobs:
            if v.removal_pending or v.cancel_requested or not plan.fits(worker_id, job, without=v):
                continue
            if v.priority < job.priority or (v.priority == job.priority and v.tenant != job.tenant
                  and plan.share(v.tenant) > plan.share(job.tenant, extra=1)
                  and v.running_since_s is not None and snap.now_s - v.running_since_s >= snap.limits.min_slice_s):
                eligible.append(v)
    if not eligible:
        return None
    # lowest priority first, then the tenant most over its share, then the most recently started
    return min(eligible, key=lambda v: (v.priority, -plan.share(v.tenant), -(v.running_since_s or 0.0), v.job_id))


def _stop_idle(plan: _Plan, candidates: list[JobView], decisions: list[Decision]) -> None:
    """Rule 5. Workers started in this round hold their admitted jobs, so they are never idle here."""
    admitted = {d.job_id for d in decisions if isinstance(d, Admit)}
    waiting_groups = {j.group for j in candidates if j.job_id not in admitted}
    for worker_id, view in plan.live.items():
        if not plan.resident[worker_id] and view.group not in waiting_groups:
            decisions.append(StopWorker(worker_id, "idle"))


def pack_microbatches(lengths: Sequence[int], *, capacity_tokens: int, packed: bool = False) -> list[list[int]]:
    """Sample indices grouped into microbatches of at most ``capacity_tokens`` padded tokens.

    First-fit-decreasing: samples sorted longest first; each goes into the first microbatch
    where ``(rows + 1) * longest_row <= capacity_tokens`` (the longest row of a microbatch is
    its first, because of the sort). ``packed`` (sequences end to end, no padding: the
    trainer's ``packing``): the cost is the sum of the lengths instead. Indices inside a
    microbatch are returned ascending, so a caller that lists samples job by job keeps each
    job's rows contiguous.
    """
    if capacity_tokens <= 0:
        raise ValueError(f"capacity_tokens must be > 0 (got {capacity_tokens})")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    longest: list[int] = []
    for i in order:
        n = lengths[i]
        if n > capacity_tokens:
            raise ValueError(f"sample {i} has {n} tokens, more than a microbatch holds ({capacity_tokens})")
        for b, rows in enumerate(bins):
            cost = sum(lengths[j] for j in rows) + n if packed else (len(rows) + 1) * longest[b]
            if cost <= capacity_tokens:
                rows.append(i)
                break
        else:
            bins.append([i])
            longest.append(n)
    return [sorted(rows) for rows in bins]

"""Scheduling policies on hand-made snapshots: no Ray, no database, no clock."""

import random

import pytest

from ferrytune.service._policy import (
    Admit,
    BaseCost,
    CancelJob,
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
    pack_microbatches,
    schedule,
)
from ferrytune.service._states import JobState, WorkerState

G = ("tiny", "float32")
H = ("other", "float32")
MiB = 2**20


def limits(**kw):
    base = {"worker_memory_bytes": 100 * MiB, "max_workers": 2, "max_jobs_per_worker": 4, "token_capacity": 1024,
                "min_slice_s": 60.0}
    base.update(kw)
    return Limits(**base)


def job(job_id, tenant="a", *, seq=0, state=JobState.QUEUED, priority=0, group=G, adapter_mib=10, worker=None,
        since=None, **kw):
    return JobView(job_id, tenant, group, state, priority, seq, adapter_mib * MiB, 128, worker_id=worker,
                   running_since_s=since, **kw)


def snap(jobs, workers=(), *, tenants=None, now=1000.0, **lim):
    # base 40 MiB + 1024 tokens x 10 KiB = 50 MiB fixed: 5 adapters of 10 MiB fit in 100 MiB
    costs = {G: BaseCost(40 * MiB, 10 * 1024), H: BaseCost(40 * MiB, 10 * 1024)}
    return Snapshot(now, tuple(jobs), tuple(workers), tenants or {}, costs, limits(**lim), next_worker_seq=7)


def ready(worker_id, group=G):
    return WorkerView(worker_id, group, WorkerState.READY)


def of(decisions, kind):
    return [d for d in decisions if isinstance(d, kind)]


def test_first_job_starts_a_worker_and_same_group_jobs_pack_onto_it():
    d = schedule(snap([job("j1", seq=1), job("j2", "b", seq=2), job("j3", seq=3, group=H)]))
    assert of(d, StartWorker) == [StartWorker("w7", G), StartWorker("w8", H)]
    assert of(d, Admit) == [Admit("j1", "w7"), Admit("j2", "w7"), Admit("j3", "w8")]


def test_memory_model_limits_adapters_per_worker():
    jobs = [job(f"j{i}", seq=i, adapter_mib=20) for i in range(5)]  # 50 fixed + 2 x 20 < 100 < 50 + 3 x 20
    d = schedule(snap(jobs, max_workers=1))
    assert [a.job_id for a in of(d, Admit)] == ["j0", "j1"]
    d = schedule(snap(jobs, max_workers=3))
    assert [a.worker_id for a in of(d, Admit)] == ["w7", "w7", "w8", "w8", "w9"]


def test_max_jobs_per_worker_and_best_fit():
    running = [job(f"r{i}", seq=i, state=JobState.RUNNING, worker="w1") for i in range(3)]
    d = schedule(snap(running + [job("q", seq=9)], [ready("w0"), ready("w1")], max_jobs_per_worker=4))
    assert of(d, Admit) == [Admit("q", "w1")]  # the fullest worker that fits
    assert of(d, StopWorker) == [StopWorker("w0", "idle")]
    d = schedule(snap(running + [job("q", seq=9)], [ready("w1")], max_jobs_per_worker=3, max_workers=1))
    assert of(d, Admit) == []


def test_job_too_big_for_any_worker_fails_with_the_setting_to_change():
    (fail,) = of(schedule(snap([job("big", adapter_mib=60)])), FailJob)
    assert fail.job_id == "big" and "lora.rank" in fail.reason
    tall = JobView("tall", "a", G, JobState.QUEUED, 0, 0, MiB, 4096)
    (fail,) = of(schedule(snap([tall])), FailJob)
    assert "data.max_length" in fail.reason


def test_priority_orders_admission():
    jobs = [job("low", seq=1, priority=0), job("high", seq=2, priority=5)]
    d = schedule(snap(jobs, max_workers=1, max_jobs_per_worker=1))
    assert of(d, Admit) == [Admit("high", "w7")]


def test_weighted_fair_share_interleaves_tenants():
    jobs = [job(f"a{i}", "a", seq=i) for i in range(4)] + [job(f"b{i}", "b", seq=10 + i) for i in range(4)]
    d = schedule(snap(jobs, max_workers=1))
    assert [a.job_id for a in of(d, Admit)] == ["a0", "b0", "a1", "b1"]
    tenants = {"a": TenantView("a", weight=3.0), "b": TenantView("b", weight=1.0)}
    d = schedule(snap(jobs, max_workers=1, tenants=tenants))
    assert [a.job_id for a in of(d, Admit)] == ["a0", "b0", "a1", "a2"]


def test_tokens_trained_break_ties_between_tenants():
    tenants = {"a": TenantView("a", tokens_trained=10_000), "b": TenantView("b", tokens_trained=10)}
    d = schedule(snap([job("a0", "a", seq=0), job("b0", "b", seq=1)], max_workers=1, max_jobs_per_worker=1,
                      tenants=tenants))
    assert of(d, Admit) == [Admit("b0", "w7")]


def test_higher_priority_preempts_at_most_one_victim_per_group():
    running = [job("r0", seq=0, state=JobState.RUNNING, worker="w1", since=999.0),
               job("r1", seq=1, state=JobState.RUNNING, worker="w1", priority=3, since=999.0)]
    queued = [job("hi", seq=5, priority=9), job("hi2", seq=6, priority=9)]
    d = schedule(snap(running + queued, [ready("w1")], max_workers=1, max_jobs_per_worker=2))
    assert of(d, Preempt)[0].job_id == "r0" and len(of(d, Preempt)) == 1
    pending = [job("r0", seq=0, state=JobState.RUNNING, worker="w1", removal_pending=True), running[1]]
    assert of(schedule(snap(pending + queued, [ready("w1")], max_workers=1, max_jobs_per_worker=2)), Preempt) == []


def test_fair_share_preemption_waits_for_min_slice():
    running = [job("a0", "a", seq=0, state=JobState.RUNNING, worker="w1", since=990.0),
               job("a1", "a", seq=1, state=JobState.RUNNING, worker="w1", since=900.0)]
    queued = [job("b0", "b", seq=5)]
    d = schedule(snap(running + queued, [ready("w1")], max_workers=1, max_jobs_per_worker=2, min_slice_s=60.0))
    assert of(d, Preempt) == [Preempt("a1", "w1", of(d, Preempt)[0].reason)]  # only a1 has run 60 s
    d = schedule(snap(running + queued, [ready("w1")], max_workers=1, max_jobs_per_worker=2, min_slice_s=200.0))
    assert of(d, Preempt) == []
    # one job each: b is not below its share, so no preemption (no thrashing)
    d = schedule(snap(running[1:] + queued, [ready("w1")], max_workers=1, max_jobs_per_worker=1, min_slice_s=0.0))
    assert of(d, Preempt) == []


def test_dead_worker_jobs_are_requeued_and_readmitted():
    running = [job("r0", seq=0, state=JobState.RUNNING, worker="w1"),
               job("r1", "b", seq=1, state=JobState.RUNNING, worker="w1")]
    d = schedule(snap(running, [WorkerView("w1", G, WorkerState.DEAD)], max_workers=1))
    assert of(d, RetireWorker) == [RetireWorker("w1")]
    assert [r.job_id for r in of(d, Requeue)] == ["r0", "r1"]
    assert of(d, StartWorker) == [StartWorker("w7", G)]
    assert of(d, Admit) == [Admit("r0", "w7"), Admit("r1", "w7")]
    # the order of execution matters: requeue before admit
    assert d.index(of(d, Requeue)[0]) < d.index(of(d, Admit)[0])


def test_cancels():
    jobs = [job("q", seq=0, cancel_requested=True),
            job("r", seq=1, state=JobState.RUNNING, worker="w1", cancel_requested=True),
            job("r2", seq=2, state=JobState.RUNNING, worker="w1", cancel_requested=True, removal_pending=True)]
    d = schedule(snap(jobs, [ready("w1")]))
    assert of(d, CancelJob) == [CancelJob("q", None), CancelJob("r", "w1")]
    assert of(d, Admit) == []


def test_idle_worker_stops_only_without_demand():
    assert of(schedule(snap([], [ready("w1")])), StopWorker) == [StopWorker("w1", "idle")]
    # group H waits for a worker slot: G's idle worker is stopped to make room
    d = schedule(snap([job("h", group=H)], [ready("w1")], max_workers=1))
    assert of(d, StopWorker) == [StopWorker("w1", "idle")] and of(d, Admit) == []
    d = schedule(snap([job("h", group=H)], [], max_workers=1))
    assert of(d, Admit) == [Admit("h", "w7")]


def test_schedule_is_deterministic():
    rng = random.Random(0)
    jobs = [job(f"j{i}", rng.choice("abc"), seq=i, priority=rng.randint(0, 2), adapter_mib=rng.randint(1, 20))
            for i in range(30)]
    assert schedule(snap(jobs)) == schedule(snap(list(reversed(jobs))))


def test_pack_microbatches_first_fit_decreasing():
    lengths = [100, 30, 60, 60, 20, 90, 10]
    bins = pack_microbatches(lengths, capacity_tokens=200)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))  # every sample exactly once
    for b in bins:
        assert len(b) * max(lengths[i] for i in b) <= 200
        assert b == sorted(b)
    assert bins[0] == [0, 5]  # the two longest share the first microbatch
    assert len(bins) == 3
    with pytest.raises(ValueError, match="more than a microbatch"):
        pack_microbatches([300], capacity_tokens=200)


def test_pack_microbatches_packed_bounds_real_tokens():
    """``packed``: sequences end to end, so a microbatch costs the sum of its lengths, not rows x longest."""
    lengths = [100, 30, 60, 60, 20, 90, 10]
    bins = pack_microbatches(lengths, capacity_tokens=200, packed=True)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 200 for b in bins)
    assert len(bins) == 2  # 370 tokens: two microbatches, where padding needs three
    assert len(pack_microbatches(lengths, capacity_tokens=200)) == 3


def test_pack_microbatches_balances_random_lengths():
    rng = random.Random(1)
    lengths = [rng.randint(5, 64) for _ in range(200)]
    bins = pack_microbatches(lengths, capacity_tokens=512)
    padded = [len(b) * max(lengths[i] for i in b) for b in bins]
    assert all(p <= 512 for p in padded)
    assert sum(padded[:-1]) / (512 * (len(bins) - 1)) > 0.85  # all but the last are nearly full

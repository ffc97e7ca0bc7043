"""Job store (real SQLite) and tenant-area paths, without Ray or HTTP."""

import sqlite3
import threading

import pytest

from ferrytune.service._paths import StateLayout, UnsafePathError, check_file_name, resolve_inside
from ferrytune.service._states import IllegalTransition, JobState
from ferrytune.service._store import JobStore, NewJob, TenantError, new_job_id


def new_job(tenant, **kw):
    values = {"id": new_job_id(), "tenant": tenant, "name": "", "base": "tiny", "dtype": "float32", "priority": 0, "max_steps": 10,
                  "spec_text": "model: tiny", "config": {"method": "lora"}, "job_dir": "/x", "adapter_dir": "/x/adapter",
                  "adapter_params": 100, "max_length": 32}
    values.update(kw)
    return NewJob(**values)


@pytest.fixture
def store(tmp_path):
    s = JobStore.open(StateLayout(tmp_path).default_db_url)
    yield s
    s.close()


def test_tokens_are_stored_only_hashed(store, tmp_path):
    token = store.add_tenant("alice")
    assert store.tenant_for_token(token).name == "alice"
    assert store.tenant_for_token(token[:-1] + ("A" if token[-1] != "A" else "B")) is None
    assert store.tenant_for_token("garbage") is None
    raw = (tmp_path / "ferrytune.db").read_bytes()
    assert token.encode() not in raw and token.split("_")[-1].encode() not in raw
    with pytest.raises(TenantError, match="already exists"):
        store.add_tenant("alice")
    with pytest.raises(TenantError, match="tenant name"):
        store.add_tenant("../evil")


def test_transitions_follow_the_state_machine_and_are_logged(store):
    store.add_tenant("alice")
    job = store.create_job(new_job("alice"))
    assert job.state == JobState.QUEUED
    assert store.transition(job.id, JobState.QUEUED, JobState.RUNNING, reason="admitted", worker_id="w0")
    assert not store.transition(job.id, JobState.QUEUED, JobState.RUNNING, reason="twice")  # not queued any more
    assert store.transition(job.id, JobState.RUNNING, JobState.SUCCEEDED, reason="finished")
    with pytest.raises(IllegalTransition):
        store.transition(job.id, JobState.SUCCEEDED, JobState.RUNNING, reason="zombie")
    messages = [m for _, m in store.events(job.id)]
    assert messages == ["submitted: queued", "queued -> running: admitted", "running -> succeeded: finished"]


def test_jobs_are_per_tenant_and_survive_reopening(store, tmp_path):
    store.add_tenant("alice")
    store.add_tenant("bob")
    a = store.create_job(new_job("alice"))
    assert store.job(a.id, tenant="bob") is None
    assert store.request_cancel(a.id, tenant="bob") is None
    assert not store.job(a.id).cancel_requested
    store.record_progress(a.id, step=3, checkpoint_step=2,
                          metrics=[{"step": s, "loss": 1.0 / s, "lr": 0.1, "tokens": 10, "time": 0.0} for s in (1, 2, 3)])
    store.close()
    again = JobStore.open(StateLayout(tmp_path).default_db_url)
    job = again.job(a.id, tenant="alice")
    assert (job.step, job.checkpoint_step, job.tokens, job.loss) == (3, 2, 30, pytest.approx(1 / 3))
    assert again.tokens_by_tenant() == {"alice": 30}
    assert [m["step"] for m in again.metrics(a.id)] == [1, 2, 3]
    assert again.jobs(tenant="bob") == []
    again.close()


def test_concurrent_writers_lose_nothing(store):
    store.add_tenant("alice")
    errors = []

    def create(n):
        try:
            for _ in range(n):
                store.create_job(new_job("alice"))
        except Exception as e:  # noqa: BLE001 - collected for the assert
            errors.append(e)

    threads = [threading.Thread(target=create, args=(20,)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(store.jobs(tenant="alice")) == 160


def test_sqlite_file_is_plain_sqlite(store, tmp_path):
    store.add_tenant("alice")
    with sqlite3.connect(tmp_path / "ferrytune.db") as conn:
        assert conn.execute("select name from tenants").fetchall() == [("alice",)]


def test_resolve_inside_refuses_escapes(tmp_path):
    root = tmp_path / "area"
    (root / "sub").mkdir(parents=True)
    (root / "ok.jsonl").write_text("x")
    assert resolve_inside(root, "ok.jsonl", field="data.train") == (root / "ok.jsonl").resolve()
    (tmp_path / "secret").write_text("s")
    (root / "link").symlink_to(tmp_path / "secret")
    (root / "dirlink").symlink_to(tmp_path)
    for bad in ("../../x", "../secret", "/etc/passwd", "sub/../../secret", "link", "dirlink/secret", "", "~/x", "a\\b"):
        with pytest.raises(UnsafePathError, match="data.train"):
            resolve_inside(root, bad, field="data.train")
    for name in ("..", ".hidden", "a/b", "", "x" * 300):
        with pytest.raises(UnsafePathError):
            check_file_name(name)
    assert check_file_name("train-01.jsonl") == "train-01.jsonl"

"""Job store and tenant-area paths, without Ray or HTTP.

Every store test runs on both backends (``db_url``, conftest.py): a real SQLite file and a
real PostgreSQL server (a throwaway one, a fresh database per test).
"""

import sqlite3
import threading

import pytest
import sqlalchemy as sa

from ferrytune.service._paths import StateLayout, UnsafePathError, check_file_name, resolve_inside
from ferrytune.service._states import IllegalTransition, JobState
from ferrytune.service._store import JobStore, NewJob, StoreError, TenantError, new_job_id


def new_job(tenant, **kw):
    values = {"id": new_job_id(), "tenant": tenant, "name": "", "base": "tiny", "dtype": "float32", "priority": 0, "max_steps": 10,
                  "spec_text": "model: tiny", "config": {"method": "lora"}, "job_dir": "/x", "adapter_dir": "/x/adapter",
                  "adapter_params": 100, "max_length": 32}
    values.update(kw)
    return NewJob(**values)


@pytest.fixture
def store(db_url):
    s = JobStore.open(db_url)
    yield s
    s.close()


def _everything_stored(url: str) -> str:
    """Every row of every table of the database, as text."""
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            tables = sa.inspect(conn).get_table_names()
            return "\n".join(str(row) for t in tables for row in conn.execute(sa.text(f'SELECT * FROM "{t}"')))
    finally:
        engine.dispose()


def test_tokens_are_stored_only_hashed(store, db_url, tmp_path):
    token = store.add_tenant("alice")
    assert store.tenant_for_token(token).name == "alice"
    assert store.tenant_for_token(token[:-1] + ("A" if token[-1] != "A" else "B")) is None
    assert store.tenant_for_token("garbage") is None
    secret = token.split("_", 2)[2]  # ftk_<key id>_<secret>; the url-safe secret may hold "_" itself
    stored = _everything_stored(db_url)
    assert "alice" in stored and token not in stored and secret not in stored
    if db_url.startswith("sqlite"):  # the bytes on disk too (the WAL holds the latest rows)
        raw = b"".join(p.read_bytes() for p in tmp_path.glob("ferrytune.db*"))
        assert token.encode() not in raw and secret.encode() not in raw
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


def test_jobs_are_per_tenant_and_survive_reopening(store, db_url):
    store.add_tenant("alice")
    store.add_tenant("bob")
    a = store.create_job(new_job("alice"))
    assert store.job(a.id, tenant="bob") is None
    assert store.request_cancel(a.id, tenant="bob") is None
    assert not store.job(a.id).cancel_requested
    store.record_progress(a.id, step=3, checkpoint_step=2,
                          metrics=[{"step": s, "loss": 1.0 / s, "lr": 0.1, "tokens": 10, "time": 0.0} for s in (1, 2, 3)])
    store.close()
    again = JobStore.open(db_url)
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


def test_racing_writers_of_one_row_apply_exactly_once(store):
    """What SQLite's single writer gave for free, PostgreSQL's row locks must give too."""
    store.add_tenant("alice")
    job = store.create_job(new_job("alice"))
    barrier = threading.Barrier(8)
    won, errors = [], []

    def race(i):
        try:
            barrier.wait()
            if store.transition(job.id, JobState.QUEUED, JobState.RUNNING, reason=f"admitted by {i}",
                                worker_id=f"w{i}"):
                won.append(i)
            store.record_progress(job.id, step=i, checkpoint_step=0,
                                  metrics=[{"step": i, "loss": 1.0, "lr": 0.1, "tokens": 7, "time": 0.0}])
            store.set_limits("alice", {"max_jobs" if i % 2 else "max_steps": 10 + i})
        except Exception as e:  # noqa: BLE001 - collected for the assert
            errors.append(e)

    threads = [threading.Thread(target=race, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(won) == 1, (errors, won)
    final = store.job(job.id)
    assert final.state == JobState.RUNNING and final.worker_id == f"w{won[0]}"
    assert final.tokens == 8 * 7 and len(store.metrics(job.id)) == 8  # no increment lost
    assert [m for _, m in store.events(job.id)].count(f"queued -> running: admitted by {won[0]}") == 1
    assert set(store.tenant("alice").overrides) == {"max_jobs", "max_steps"}  # neither merge lost the other


def test_a_new_database_opened_by_many_at_once_gets_one_schema(db_url):
    stores, errors = [], []
    barrier = threading.Barrier(6)

    def open_one():
        try:
            barrier.wait()
            stores.append(JobStore.open(db_url))
        except Exception as e:  # noqa: BLE001 - collected for the assert
            errors.append(e)

    threads = [threading.Thread(target=open_one) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert errors == [] and len(stores) == 6, errors
        stores[0].add_tenant("alice")
        with pytest.raises(TenantError, match="already exists"):
            stores[1].add_tenant("alice")
        assert [t.name for t in stores[-1].tenants()] == ["alice"]
    finally:
        for s in stores:
            s.close()


def test_missing_columns_are_added_on_open(db_url):
    """A store made by an older version (fewer columns, rows in it) gains the new columns on open."""
    from ferrytune.service import _store

    dropped = {"tenants": {"limits_json"}, "jobs": {"memory_bytes", "checkpoint_step", "cancel_requested"}}
    old = sa.MetaData()
    for table in _store._meta.sorted_tables:
        sa.Table(table.name, old, *[c._copy() for c in table.columns if c.name not in dropped.get(table.name, ())])
    engine = sa.create_engine(db_url, poolclass=sa.pool.NullPool)
    job = new_job("alice")
    try:
        old.create_all(engine)
        with engine.begin() as conn:
            conn.execute(old.tables["tenants"].insert().values(name="alice", key_id="0" * 12, salt="00" * 16,
                                                               token_hash="x", weight=1.0, created_at=1.0))
            conn.execute(old.tables["jobs"].insert().values(
                id=job.id, tenant="alice", name="", base="tiny", dtype="float32", priority=0, state="queued", step=0,
                max_steps=10, tokens=0, spec_text="", config_json="{}", job_dir="/x", adapter_dir="/x/a",
                adapter_params=1, max_length=8, created_at=1.0, updated_at=1.0))
        with engine.connect() as conn:
            assert "memory_bytes" not in {c["name"] for c in sa.inspect(conn).get_columns("jobs")}
    finally:
        engine.dispose()

    for _ in range(2):  # and opening it again changes nothing
        store = JobStore.open(db_url)
        try:
            got = store.job(job.id)
            # the old row reads back: nullable columns empty, NOT NULL ones at their default
            assert (got.memory_bytes, got.checkpoint_step, got.cancel_requested) == (None, 0, False)
            assert store.tenant("alice").overrides == {}
            assert store.set_limits("alice", {"max_jobs": 3}) == {"max_jobs": 3}
            store.update(job.id, memory_bytes=123, checkpoint_step=2)
            assert (store.job(job.id).memory_bytes, store.job(job.id).checkpoint_step) == (123, 2)
            store.update(job.id, memory_bytes=None, checkpoint_step=0)
            store.set_limits("alice", {"max_jobs": None})
        finally:
            store.close()
    engine = sa.create_engine(db_url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            columns = {c["name"]: c for c in sa.inspect(conn).get_columns("jobs")}
        assert {"memory_bytes", "checkpoint_step", "cancel_requested"} <= set(columns)
        assert not columns["checkpoint_step"]["nullable"] and columns["memory_bytes"]["nullable"]
    finally:
        engine.dispose()


def test_an_unreachable_or_unknown_database_is_one_clear_line(tmp_path):
    for url, want in (
        (f"postgresql+psycopg://someone:s3cret@/x?host={tmp_path}&port=1", "cannot open the job store"),
        ("nosuchdb://x/y", "nosuchdb"),
        ("not a url", "not a database URL"),
    ):
        with pytest.raises(StoreError) as e:
            JobStore.open(url)
        message = str(e.value)
        assert want in message and "\n" not in message and "s3cret" not in message, message


def test_sqlite_file_is_plain_sqlite(tmp_path):
    store = JobStore.open(StateLayout(tmp_path).default_db_url)
    try:
        store.add_tenant("alice")
    finally:
        store.close()
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


def test_set_limits_waits_for_a_concurrent_writer_of_the_tenant(store, db_url):
    """A merge that read the row before another transaction's write committed would lose that write."""
    import json

    store.add_tenant("alice")
    other = sa.create_engine(db_url, poolclass=sa.pool.NullPool)
    done = threading.Event()
    merged = {}

    def merge():
        merged.update(store.set_limits("alice", {"max_jobs": 5}))
        done.set()

    try:
        with other.connect() as conn:
            if db_url.startswith("sqlite"):
                conn.exec_driver_sql("BEGIN IMMEDIATE")  # SQLite: the one writer's lock
            else:
                conn.begin()
            tenants = sa.table("tenants", sa.column("name"), sa.column("limits_json"))
            conn.execute(sa.select(tenants.c.limits_json).where(tenants.c.name == "alice").with_for_update())
            conn.execute(tenants.update().where(tenants.c.name == "alice")
                         .values(limits_json=json.dumps({"max_steps": 7})))
            thread = threading.Thread(target=merge)
            thread.start()
            try:
                _wait_until_blocked(conn, db_url, thread)
            finally:
                conn.commit()
                thread.join(30)
    finally:
        other.dispose()
    assert done.is_set() and merged == {"max_jobs": 5, "max_steps": 7}
    assert store.tenant("alice").overrides == {"max_jobs": 5, "max_steps": 7}


def _wait_until_blocked(conn, db_url, thread, timeout_s=30.0):
    """Until ``thread``'s transaction waits on our lock (PostgreSQL: seen in pg_stat_activity)."""
    import time

    deadline = time.monotonic() + timeout_s
    if db_url.startswith("sqlite"):  # no view of waiters: give it time to reach the busy wait
        time.sleep(0.5)
        return
    watcher = sa.create_engine(db_url, poolclass=sa.pool.NullPool, isolation_level="AUTOCOMMIT")
    try:
        with watcher.connect() as w:
            while True:
                waiting = w.exec_driver_sql(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND wait_event_type = 'Lock'").scalar_one()
                if waiting:
                    return
                assert thread.is_alive() and time.monotonic() < deadline, "set_limits never waited for the lock"
                time.sleep(0.02)
    finally:
        watcher.dispose()

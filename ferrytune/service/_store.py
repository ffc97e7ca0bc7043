"""The job store: tenants, jobs, their transitions, events and metrics, in a real database.

SQLite (a file under the state dir) by default, or PostgreSQL:
``postgresql+psycopg://user:pw@host/db`` (``pip install 'ferrytune[postgres]'``; a plain
``postgresql://`` URL uses psycopg too). Both run the same tests. Everything the service
knows about a job lives here, so a restart of the service loses nothing: it re-reads
the jobs and re-queues those that were running (they resume from their checkpoints).

API tokens are never stored: a token is ``ftk_<key id>_<secret>``; the store keeps the
key id, a random salt and ``sha256(salt + secret)``. Tokens are 256-bit random strings,
so a salted fast hash is enough (a slow KDF protects low-entropy passwords, and would
cost every request tens of milliseconds). Every request looks its token up here, so
:meth:`JobStore.revoke_token` and :meth:`JobStore.rotate_token` (run by ``ferrytune
tenants revoke | rotate`` while the service runs) take effect on the next request.

A SQLite job store is created ``0600`` (its WAL and shared-memory files inherit that mode).
Tables missing a column that a later version added get it on open (``ALTER TABLE ... ADD
COLUMN``), so an existing state dir keeps working.

Concurrency. SQLite has one writer at a time (every transaction here is ``BEGIN
IMMEDIATE``; writers queue on the busy timeout). PostgreSQL runs transactions side by
side (READ COMMITTED), so nothing here may rely on a single writer: a state change is
one conditional ``UPDATE ... WHERE state = old`` (PostgreSQL re-checks the condition on
the locked row, so of two racing transitions exactly one applies), counters are
incremented in SQL (``tokens = tokens + n``), a read-modify-write (``set_limits``) locks
its row (``SELECT ... FOR UPDATE``), a duplicate tenant name is caught by its key, and
schema creation and migration run in one transaction under an advisory lock, so two
processes opening a new database at once (``serve`` and ``tenants add``) take turns.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import sqlite3
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, fields
from typing import Any

import sqlalchemy as sa

from ferrytune.errors import FerrytuneError
from ferrytune.service._limits import TenantLimits
from ferrytune.service._states import JobState, check_transition

logger = logging.getLogger(__name__)

__all__ = ["TENANT_NAME_RE", "JobRecord", "JobStore", "NewJob", "StoreError", "TenantError", "TenantRecord"]

TENANT_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
_TOKEN_RE = re.compile(r"ftk_([0-9a-f]{12})_([A-Za-z0-9_-]{20,})")
_SQLITE_BUSY_TIMEOUT_S = 30.0
_SCHEMA_LOCK_KEY = 0x66747374  # pg_advisory_xact_lock key of schema creation / migration ("ftst")

_meta = sa.MetaData()
_tenants = sa.Table(
    "tenants", _meta,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("key_id", sa.String(12), nullable=False, unique=True),
    sa.Column("salt", sa.String(32), nullable=False),
    sa.Column("token_hash", sa.String(64), nullable=False),
    sa.Column("weight", sa.Float, nullable=False, default=1.0),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("limits_json", sa.Text, nullable=True),  # per-tenant overrides of the service's limits
)
_jobs = sa.Table(
    "jobs", _meta,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("id", sa.String(40), nullable=False, unique=True),
    sa.Column("tenant", sa.String(64), sa.ForeignKey("tenants.name"), nullable=False, index=True),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("base", sa.String(200), nullable=False),
    sa.Column("dtype", sa.String(16), nullable=False),
    sa.Column("priority", sa.Integer, nullable=False),
    sa.Column("state", sa.String(16), nullable=False, index=True),
    sa.Column("step", sa.Integer, nullable=False, default=0),
    sa.Column("max_steps", sa.Integer, nullable=False),
    sa.Column("loss", sa.Float, nullable=True),
    sa.Column("tokens", sa.BigInteger, nullable=False, default=0),
    sa.Column("spec_text", sa.Text, nullable=False),
    sa.Column("config_json", sa.Text, nullable=False),
    sa.Column("job_dir", sa.Text, nullable=False),
    sa.Column("adapter_dir", sa.Text, nullable=False),
    sa.Column("adapter_params", sa.BigInteger, nullable=False),
    sa.Column("max_length", sa.Integer, nullable=False),
    sa.Column("memory_bytes", sa.BigInteger, nullable=True),  # the job's share of a worker (None: adapter only)
    sa.Column("worker_id", sa.String(40), nullable=True),
    sa.Column("error", sa.Text, nullable=True),
    sa.Column("cancel_requested", sa.Boolean, nullable=False, default=False),
    sa.Column("checkpoint_step", sa.Integer, nullable=False, default=0),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.Column("started_at", sa.Float, nullable=True),
    sa.Column("finished_at", sa.Float, nullable=True),
    # the job's last evaluation (data.eval): the step it evaluated and its numbers (None: none yet)
    sa.Column("eval_step", sa.Integer, nullable=True),
    sa.Column("eval_loss", sa.Float, nullable=True),
    sa.Column("eval_accuracy", sa.Float, nullable=True),
    sa.Column("eval_samples", sa.Integer, nullable=True),
)


def _job_log(name: str, *columns: sa.Column) -> sa.Table:
    """A per-job append-only table: rows in insertion order (``id``), looked up by ``job_id``."""
    return sa.Table(name, _meta, sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
                    sa.Column("job_id", sa.String(40), nullable=False, index=True), *columns)


_events = _job_log("events", sa.Column("time", sa.Float, nullable=False), sa.Column("message", sa.Text, nullable=False))
_metrics = _job_log(
    "metrics",
    sa.Column("step", sa.Integer, nullable=False),
    sa.Column("loss", sa.Float, nullable=False),
    sa.Column("lr", sa.Float, nullable=False),
    sa.Column("tokens", sa.Integer, nullable=False),
    sa.Column("time", sa.Float, nullable=False),
)
_evals = _job_log(  # one row per evaluation of a job: the keys of a single-job run's metrics.jsonl
    "evals",
    sa.Column("step", sa.Integer, nullable=False),
    sa.Column("eval_loss", sa.Float, nullable=False),
    sa.Column("eval_accuracy", sa.Float, nullable=False),
    sa.Column("eval_samples", sa.Integer, nullable=False),
    sa.Column("time", sa.Float, nullable=False),
)


class TenantError(FerrytuneError):
    """A tenant name is invalid or already taken."""


class StoreError(FerrytuneError):
    """The job store cannot be opened (no driver, no server, bad URL); one line, password hidden."""


@dataclass(frozen=True)
class TenantRecord:
    name: str
    weight: float
    created_at: float
    limits_json: str | None = None
    revoked: bool = False

    @property
    def overrides(self) -> dict:
        """The tenant's own limits (``TenantLimits`` field -> value); the service's defaults fill the rest."""
        return json.loads(self.limits_json) if self.limits_json else {}


def _tenant_record(row) -> TenantRecord:
    return TenantRecord(row.name, row.weight, row.created_at, row.limits_json, revoked=not row.token_hash)


@dataclass(frozen=True)
class NewJob:
    """What the API hands the store for a new job (all validated already)."""

    id: str
    tenant: str
    name: str
    base: str
    dtype: str
    priority: int
    max_steps: int
    spec_text: str
    config: dict
    job_dir: str
    adapter_dir: str
    adapter_params: int
    max_length: int
    memory_bytes: int | None = None


@dataclass(frozen=True)
class JobRecord:
    seq: int
    id: str
    tenant: str
    name: str
    base: str
    dtype: str
    priority: int
    state: JobState
    step: int
    max_steps: int
    loss: float | None
    tokens: int
    spec_text: str
    config_json: str
    job_dir: str
    adapter_dir: str
    adapter_params: int
    max_length: int
    memory_bytes: int | None
    worker_id: str | None
    error: str | None
    cancel_requested: bool
    checkpoint_step: int
    created_at: float
    updated_at: float
    started_at: float | None
    finished_at: float | None
    eval_step: int | None = None
    eval_loss: float | None = None
    eval_accuracy: float | None = None
    eval_samples: int | None = None

    @property
    def config(self) -> dict:
        return json.loads(self.config_json)

    def public(self) -> dict[str, Any]:
        """What a tenant may see of its own job (no server paths)."""
        return {
            "id": self.id, "name": self.name, "state": self.state.value, "step": self.step,
            "max_steps": self.max_steps, "loss": self.loss, "tokens": self.tokens, "base": self.base,
            "dtype": self.dtype, "priority": self.priority, "error": self.error,
            "cancel_requested": self.cancel_requested, "checkpoint_step": self.checkpoint_step,
            "created_at": self.created_at, "updated_at": self.updated_at,
            "started_at": self.started_at, "finished_at": self.finished_at,
            "eval_step": self.eval_step, "eval_loss": self.eval_loss, "eval_accuracy": self.eval_accuracy,
            "eval_samples": self.eval_samples,
        }


_JOB_FIELDS = [f.name for f in fields(JobRecord)]


def _job(row: sa.Row) -> JobRecord:
    values = dict(row._mapping)
    values["state"] = JobState(values["state"])
    values["cancel_requested"] = bool(values["cancel_requested"])
    return JobRecord(**{k: values[k] for k in _JOB_FIELDS})


def new_job_id() -> str:
    return "j-" + uuid.uuid4().hex[:16]


class JobStore:
    """Thread-safe (one SQLAlchemy engine, a connection per transaction)."""

    def __init__(self, engine: sa.Engine):
        self._engine = engine

    @classmethod
    def open(cls, url: str) -> JobStore:
        """Connect, create the tables that are missing and add the columns that are missing."""
        try:
            parsed = sa.engine.make_url(url)
        except sa.exc.ArgumentError:
            raise StoreError("--db: not a database URL (e.g. sqlite:///PATH or "
                             "postgresql+psycopg://user:pw@host/db)") from None
        shown = parsed.render_as_string(hide_password=True)
        if parsed.drivername == "postgresql":
            parsed = parsed.set(drivername="postgresql+psycopg")  # not SQLAlchemy's default, psycopg2
        try:
            if parsed.get_backend_name() == "sqlite":
                _private_sqlite_file(parsed)
                engine = sa.create_engine(
                    parsed, connect_args={"check_same_thread": False, "timeout": _SQLITE_BUSY_TIMEOUT_S})
                _sqlite_immediate_transactions(engine)
            else:
                engine = sa.create_engine(parsed, pool_pre_ping=True)
        except ModuleNotFoundError as e:
            extra = " (pip install 'ferrytune[postgres]')" if parsed.get_backend_name() == "postgresql" else ""
            raise StoreError(f"--db {shown}: the database driver is not installed: {e}{extra}") from None
        except sa.exc.ArgumentError as e:
            raise StoreError(f"--db {shown}: {' '.join(str(e).split())}") from None
        try:
            _create_schema(engine)
        except sa.exc.OperationalError as e:
            engine.dispose()
            first = str(e.orig).strip().splitlines()[0] if e.orig is not None else str(e).splitlines()[0]
            raise StoreError(f"--db {shown}: cannot open the job store: {first}") from None
        except BaseException:
            engine.dispose()
            raise
        return cls(engine)

    def close(self) -> None:
        self._engine.dispose()

    # ---- tenants ----
    def add_tenant(self, name: str, *, weight: float = 1.0) -> str:
        """Create a tenant; returns its API token (shown once, stored only hashed)."""
        if not TENANT_NAME_RE.fullmatch(name):
            raise TenantError(f"tenant name {name!r}: use 1-63 of a-z 0-9 _ - (starting with a letter or digit)")
        if not weight > 0:
            raise TenantError(f"--weight must be > 0 (got {weight})")
        key_id, secret, salt = _new_secret()
        try:
            with self._engine.begin() as conn:
                if conn.execute(sa.select(_tenants.c.name).where(_tenants.c.name == name)).first():
                    raise TenantError(f"tenant {name!r} already exists")
                conn.execute(_tenants.insert().values(
                    name=name, key_id=key_id, salt=salt, token_hash=_hash(salt, secret), weight=float(weight),
                    created_at=time.time()))
        except sa.exc.IntegrityError:  # PostgreSQL: another process added it between our check and insert
            raise TenantError(f"tenant {name!r} already exists") from None
        return f"ftk_{key_id}_{secret}"

    def rotate_token(self, name: str) -> str:
        """A new token for the tenant; the old one stops working at once. Returns the new token."""
        key_id, secret, salt = _new_secret()
        self._set_token(name, key_id=key_id, salt=salt, token_hash=_hash(salt, secret))
        return f"ftk_{key_id}_{secret}"

    def revoke_token(self, name: str) -> None:
        """The tenant's token stops working at once (its jobs and files stay; ``rotate`` issues a new one)."""
        self._set_token(name, key_id=secrets.token_hex(6), salt=secrets.token_hex(16), token_hash="")

    def _set_token(self, name: str, **values: str) -> None:
        with self._engine.begin() as conn:
            if not conn.execute(_tenants.update().where(_tenants.c.name == name).values(**values)).rowcount:
                raise TenantError(f"tenant {name!r}: no such tenant")

    def set_limits(self, name: str, overrides: dict[str, int | None]) -> dict:
        """Merge ``overrides`` (None removes one) into the tenant's limits; returns the tenant's overrides."""
        unknown = set(overrides) - set(TenantLimits.names())
        if unknown:
            raise TenantError(f"unknown limit(s) {', '.join(sorted(unknown))}; "
                              f"known: {', '.join(TenantLimits.names())}")
        with self._engine.begin() as conn:
            # FOR UPDATE: two concurrent merges on PostgreSQL apply one after the other (SQLite: no-op)
            row = conn.execute(sa.select(_tenants).where(_tenants.c.name == name).with_for_update()).first()
            if row is None:
                raise TenantError(f"tenant {name!r}: no such tenant")
            merged = {**(json.loads(row.limits_json) if row.limits_json else {}), **overrides}
            merged = {k: v for k, v in merged.items() if v is not None}
            TenantLimits().with_overrides(merged)  # validates the values
            conn.execute(_tenants.update().where(_tenants.c.name == name).values(
                limits_json=json.dumps(merged, sort_keys=True) if merged else None))
        return merged

    def tenant_for_token(self, token: str) -> TenantRecord | None:
        m = _TOKEN_RE.fullmatch(token.strip())
        if m is None:
            return None
        with self._engine.connect() as conn:
            row = conn.execute(sa.select(_tenants).where(_tenants.c.key_id == m.group(1))).first()
        if row is None or not row.token_hash or not hmac.compare_digest(row.token_hash, _hash(row.salt, m.group(2))):
            return None
        return _tenant_record(row)

    def tenants(self) -> list[TenantRecord]:
        with self._engine.connect() as conn:
            rows = conn.execute(sa.select(_tenants).order_by(_tenants.c.name)).all()
        return [_tenant_record(r) for r in rows]

    def tenant(self, name: str) -> TenantRecord | None:
        with self._engine.connect() as conn:
            row = conn.execute(sa.select(_tenants).where(_tenants.c.name == name)).first()
        return None if row is None else _tenant_record(row)

    # ---- jobs ----
    def create_job(self, new: NewJob) -> JobRecord:
        now = time.time()
        with self._engine.begin() as conn:
            conn.execute(_jobs.insert().values(
                id=new.id, tenant=new.tenant, name=new.name, base=new.base, dtype=new.dtype,
                priority=new.priority, state=JobState.QUEUED.value, step=0, max_steps=new.max_steps,
                tokens=0, spec_text=new.spec_text, config_json=json.dumps(new.config), job_dir=new.job_dir,
                adapter_dir=new.adapter_dir, adapter_params=new.adapter_params, max_length=new.max_length,
                memory_bytes=new.memory_bytes, cancel_requested=False, checkpoint_step=0, created_at=now,
                updated_at=now))
            conn.execute(_events.insert().values(job_id=new.id, time=now, message="submitted: queued"))
        return self.job(new.id)

    def job(self, job_id: str, *, tenant: str | None = None) -> JobRecord | None:
        """The job, or None when it does not exist or (with ``tenant``) belongs to someone else."""
        query = sa.select(_jobs).where(_jobs.c.id == job_id)
        if tenant is not None:
            query = query.where(_jobs.c.tenant == tenant)
        with self._engine.connect() as conn:
            row = conn.execute(query).first()
        return None if row is None else _job(row)

    def jobs(self, *, tenant: str | None = None, states: Iterable[JobState] | None = None) -> list[JobRecord]:
        query = sa.select(_jobs).order_by(_jobs.c.seq)
        if tenant is not None:
            query = query.where(_jobs.c.tenant == tenant)
        if states is not None:
            query = query.where(_jobs.c.state.in_([s.value for s in states]))
        with self._engine.connect() as conn:
            return [_job(r) for r in conn.execute(query).all()]

    def count_jobs(self, *, tenant: str, states: Iterable[JobState]) -> int:
        query = sa.select(sa.func.count()).select_from(_jobs).where(
            _jobs.c.tenant == tenant, _jobs.c.state.in_([s.value for s in states]))
        with self._engine.connect() as conn:
            return int(conn.execute(query).scalar_one())

    def job_ids(self) -> set[str]:
        with self._engine.connect() as conn:
            return {r.id for r in conn.execute(sa.select(_jobs.c.id)).all()}

    def request_cancel(self, job_id: str, *, tenant: str) -> JobRecord | None:
        """Flag the job for the controller to cancel; None if the tenant has no such job."""
        with self._engine.begin() as conn:
            done = conn.execute(_jobs.update().where(_jobs.c.id == job_id, _jobs.c.tenant == tenant).values(
                cancel_requested=True, updated_at=time.time()))
            if done.rowcount:
                conn.execute(_events.insert().values(job_id=job_id, time=time.time(), message="cancel requested"))
        return self.job(job_id, tenant=tenant)

    def transition(self, job_id: str, old: JobState, new: JobState, *, reason: str, **values: Any) -> bool:
        """Move the job from ``old`` to ``new`` (and set ``values``) if it is still in ``old``.

        Returns False, changing nothing, when the job is no longer in ``old``. The reason is
        kept as an event of the job.
        """
        check_transition(job_id, old, new)
        now = time.time()
        with self._engine.begin() as conn:
            done = conn.execute(_jobs.update().where(_jobs.c.id == job_id, _jobs.c.state == old.value).values(
                state=new.value, updated_at=now, **{k: _text(v) for k, v in values.items()}))
            if not done.rowcount:
                return False
            conn.execute(_events.insert().values(
                job_id=job_id, time=now, message=_text(f"{old.value} -> {new.value}: {reason}")))
        return True

    def update(self, job_id: str, **values: Any) -> None:
        with self._engine.begin() as conn:
            conn.execute(_jobs.update().where(_jobs.c.id == job_id).values(
                updated_at=time.time(), **{k: _text(v) for k, v in values.items()}))

    def record_progress(self, job_id: str, *, step: int, checkpoint_step: int,
                        metrics: list[dict[str, float]], evals: list[dict[str, float]] = ()) -> None:
        """New metric (and eval) rows of the job and its step, tokens, last loss and last eval, in one transaction."""
        now = time.time()
        with self._engine.begin() as conn:
            values: dict[str, Any] = {"step": step, "checkpoint_step": checkpoint_step, "updated_at": now}
            if metrics:
                conn.execute(_metrics.insert(), [dict(job_id=job_id, **m) for m in metrics])
                values["loss"] = metrics[-1]["loss"]
                values["tokens"] = _jobs.c.tokens + sum(int(m["tokens"]) for m in metrics)
            if evals:
                conn.execute(_evals.insert(), [dict(job_id=job_id, **e) for e in evals])
                values.update({f"eval_{k}" if k == "step" else k: evals[-1][k]
                               for k in ("step", "eval_loss", "eval_accuracy", "eval_samples")})
            conn.execute(_jobs.update().where(_jobs.c.id == job_id).values(**values))

    def add_event(self, job_id: str, message: str) -> None:
        with self._engine.begin() as conn:
            conn.execute(_events.insert().values(job_id=job_id, time=time.time(), message=_text(message)))

    def events(self, job_id: str) -> list[tuple[float, str]]:
        query = sa.select(_events.c.time, _events.c.message).where(_events.c.job_id == job_id).order_by(_events.c.id)
        with self._engine.connect() as conn:
            return [(r.time, r.message) for r in conn.execute(query).all()]

    def metrics(self, job_id: str) -> list[dict[str, float]]:
        query = (sa.select(_metrics.c.step, _metrics.c.loss, _metrics.c.lr, _metrics.c.tokens, _metrics.c.time)
                 .where(_metrics.c.job_id == job_id).order_by(_metrics.c.id))
        with self._engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(query).all()]

    def evals(self, job_id: str) -> list[dict[str, float]]:
        """The job's evaluations in order: ``{"step", "eval_loss", "eval_accuracy", "eval_samples", "time"}``."""
        c = _evals.c
        query = (sa.select(c.step, c.eval_loss, c.eval_accuracy, c.eval_samples, c.time)
                 .where(c.job_id == job_id).order_by(c.id))
        with self._engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(query).all()]

    def tokens_by_tenant(self) -> dict[str, int]:
        query = sa.select(_jobs.c.tenant, sa.func.sum(_jobs.c.tokens)).group_by(_jobs.c.tenant)
        with self._engine.connect() as conn:
            return {t: int(n or 0) for t, n in conn.execute(query).all()}


def _text(value: Any) -> Any:
    """Free text as PostgreSQL can keep it: a NUL character is stored as ``\\x00`` (text there holds none)."""
    return value.replace("\x00", "\\x00") if isinstance(value, str) else value


def _hash(salt: str, secret: str) -> str:
    return hashlib.sha256(bytes.fromhex(salt) + secret.encode()).hexdigest()


def _new_secret() -> tuple[str, str, str]:
    """(key id, secret, salt) of a new token."""
    return secrets.token_hex(6), secrets.token_urlsafe(32), secrets.token_hex(16)


def _private_sqlite_file(url: sa.URL) -> None:
    """Create the SQLite file 0600 (or tighten an existing one) before SQLite opens it.

    SQLite gives its -wal and -shm files the database file's mode, so they are 0600 too.
    """
    path = url.database
    if not path or path == ":memory:" or path.startswith("file:"):
        return
    # Never open (and close) an existing database file here: closing any descriptor of it
    # drops every POSIX lock this process holds on it, those of live SQLite connections too.
    for existing in (path, f"{path}-wal", f"{path}-shm"):
        if os.path.exists(existing):
            os.chmod(existing, 0o600)
    if not os.path.exists(path):
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:
            pass


def _create_schema(engine: sa.Engine) -> None:
    """Create missing tables and add missing columns, in one transaction.

    On PostgreSQL the transaction first takes an advisory lock, so two processes opening
    the same new database wait for each other instead of both creating a table (DDL is
    transactional there: a failed migration leaves the schema as it was). SQLite's
    ``BEGIN IMMEDIATE`` serialises them already.
    """
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _SCHEMA_LOCK_KEY})
        _meta.create_all(conn)
        _add_missing_columns(conn)


def _add_missing_columns(conn: sa.Connection) -> None:
    """Columns added after a store was created: ``ALTER TABLE ... ADD COLUMN``.

    A new column is nullable, or NOT NULL with a scalar default (which existing rows get).
    Names are quoted and types compiled for the database at hand.
    """
    inspector = sa.inspect(conn)
    quote = conn.dialect.identifier_preparer
    for table in _meta.sorted_tables:
        have = {c["name"] for c in inspector.get_columns(table.name)}
        for column in table.columns:
            if column.name in have:
                continue
            ddl = (f"ALTER TABLE {quote.format_table(table)} ADD COLUMN {quote.format_column(column)} "
                   f"{column.type.compile(dialect=conn.dialect)}")
            if not column.nullable:
                default = column.default
                if default is None or not default.is_scalar:
                    raise StoreError(f"job store: cannot add column {table.name}.{column.name} to an existing "
                                     "table: it is NOT NULL without a scalar default")
                literal = sa.literal(default.arg, column.type).compile(
                    dialect=conn.dialect, compile_kwargs={"literal_binds": True})
                ddl += f" NOT NULL DEFAULT {literal}"
            conn.exec_driver_sql(ddl)
            logger.info("job store: added column %s.%s", table.name, column.name)


def _sqlite_immediate_transactions(engine: sa.Engine) -> None:
    """Make every SQLite transaction ``BEGIN IMMEDIATE``.

    pysqlite begins transactions lazily (DEFERRED); two threads that both read and then
    write can then fail with "database is locked" at once, whatever the busy timeout.
    IMMEDIATE takes the write lock up front, so writers queue on the timeout instead.
    WAL lets readers proceed beside the one writer.
    """

    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record):
        dbapi_connection.isolation_level = None  # we emit BEGIN ourselves
        cursor = dbapi_connection.cursor()
        # Switching a new file to WAL takes its lock without SQLite's busy handler: processes that
        # open a new store at once get "database is locked" at once; retry within the busy timeout.
        deadline = time.monotonic() + _SQLITE_BUSY_TIMEOUT_S
        while True:
            try:
                cursor.execute("PRAGMA journal_mode=WAL")
                break
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) or time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @sa.event.listens_for(engine, "begin")
    def _on_begin(conn):
        conn.exec_driver_sql("BEGIN IMMEDIATE")

"""The HTTP API (FastAPI), under ``/v1/``; every route but ``/v1/health`` needs ``Authorization: Bearer TOKEN``.

A tenant sees only its own jobs and files: another tenant's job id answers 404, exactly
like an id that does not exist. The API never changes a job's state; it stores new jobs
(queued) and cancel requests, and the controller does the rest. Routes are listed in
``docs/service.md``.

Nothing a tenant sends costs more than its limits allow: request bodies are read as a
stream and refused (413) as soon as they pass their cap, before the rest arrives; a
client address that fails authentication too often is answered 429 for a while, before
its token is even looked at. A submission is checked completely (spec, limits, the
dataset's every line, the worker's memory) before it is stored, and a refused one leaves
nothing on disk.

Files stream in chunks through ``aiofiles`` (the event loop never waits on the disk): an
upload is written to a temporary file beside its target as it arrives, each line checked
as a dataset row (:class:`ferrytune.data.JsonlChecker`, the rules of the trainer's reader),
then fsynced and renamed over the target; a refused upload (413, a bad line's 400) leaves
nothing. Downloads (an uploaded file, an adapter archive) are read in chunks the same way.
"""

from __future__ import annotations

import collections
import hashlib
import io
import logging
import math
import os
import shutil
import tarfile
import tempfile
import threading
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated
from urllib.parse import quote

import aiofiles
import aiofiles.os
import anyio
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

import ferrytune
from ferrytune.atomic import fsync_dir
from ferrytune.data import JsonlChecker
from ferrytune.errors import DataError
from ferrytune.service._console import mount_console
from ferrytune.service._limits import TenantLimits
from ferrytune.service._paths import (
    StateLayout,
    UnsafePathError,
    check_file_name,
    copy_private,
    make_private_dir,
    resolve_inside,
    write_private,
)
from ferrytune.service._policy import Limits
from ferrytune.service._spec import (
    BaseCatalog,
    SpecError,
    check_dataset,
    check_init_from,
    job_memory_bytes,
    parse_spec_text,
    validate_spec,
)
from ferrytune.service._states import TERMINAL_STATES, JobState
from ferrytune.service._store import JobRecord, JobStore, NewJob, TenantRecord, new_job_id

logger = logging.getLogger(__name__)

__all__ = ["AuthLimiter", "create_app"]

MAX_SPEC_BYTES = 1 << 20
MAX_LINE_BYTES = 1 << 20
"""One line (row) of an uploaded dataset; a longer one is refused (400) as it passes this."""
_CHUNK_BYTES = 1 << 20  # a download's read size
_ACTIVE = (JobState.QUEUED, JobState.RUNNING)


class AuthLimiter:
    """At most ``max_failures`` failed authentications per client address in ``window_s`` seconds.

    Past that, the address is answered 429 (with Retry-After) before any token is looked at,
    until its oldest failure leaves the window: a guesser learns nothing, and a valid token
    from the same address waits too. Remembers at most ``max_addresses`` addresses.
    """

    def __init__(self, max_failures: int = 20, window_s: float = 60.0, max_addresses: int = 10_000):
        self.max_failures = max_failures
        self.window_s = window_s
        self.max_addresses = max_addresses
        self._failures: collections.OrderedDict[str, collections.deque] = collections.OrderedDict()
        self._lock = threading.Lock()

    def _recent(self, address: str, now: float) -> collections.deque:
        times = self._failures.get(address)
        if times is None:
            return collections.deque()
        while times and now - times[0] > self.window_s:
            times.popleft()
        if not times:
            del self._failures[address]
        return times

    def retry_after_s(self, address: str) -> int:
        """Seconds until ``address`` may try again; 0 when it may now."""
        now = time.monotonic()
        with self._lock:
            times = self._recent(address, now)
            if len(times) < self.max_failures:
                return 0
            return max(1, math.ceil(self.window_s - (now - times[0])))

    def failed(self, address: str) -> None:
        now = time.monotonic()
        with self._lock:
            times = self._failures.setdefault(address, collections.deque())
            times.append(now)
            while len(times) > self.max_failures:
                times.popleft()
            self._failures.move_to_end(address)
            while len(self._failures) > self.max_addresses:
                self._failures.popitem(last=False)


def _tenant(request: Request) -> TenantRecord:
    """The tenant whose token the request carries; 401 otherwise, 429 after too many failures."""
    limiter: AuthLimiter = request.app.state.auth_limiter
    address = request.client.host if request.client else "?"
    wait_s = limiter.retry_after_s(address)
    if wait_s:
        raise HTTPException(429, f"too many failed authentications from {address}; retry in {wait_s} s",
                            headers={"Retry-After": str(wait_s)})
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    store: JobStore = request.app.state.store
    record = store.tenant_for_token(token) if scheme.lower() == "bearer" and token else None
    if record is None:
        limiter.failed(address)
        raise HTTPException(401, "missing or invalid API token (send 'Authorization: Bearer TOKEN')",
                            headers={"WWW-Authenticate": "Bearer"})
    return record


Tenant = Annotated[TenantRecord, Depends(_tenant)]


async def _capped_chunks(request: Request, cap: int, what: str):
    """The request body's chunks as they arrive, refused with 413 the moment they pass ``cap`` bytes.

    A declared Content-Length over the cap is refused before a byte of the body is read.
    """
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > cap:
        raise HTTPException(413, f"{what}: {int(declared)} bytes is more than the {cap} bytes allowed")
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > cap:
            raise HTTPException(413, f"{what}: more than the {cap} bytes allowed")
        yield chunk


async def _read_capped(request: Request, cap: int, what: str) -> bytes:
    """The whole request body (at most ``cap`` bytes; 413 past it)."""
    return b"".join([chunk async for chunk in _capped_chunks(request, cap, what)])


async def _receive_dataset(request: Request, folder: Path, target: Path, cap: int, what: str,
                           checker: JsonlChecker) -> tuple[int, str]:
    """Stream the body into ``target`` atomically, checking each line as it arrives; (bytes, sha256).

    The bytes go to a temporary file beside the target (0600) with ``aiofiles``, then fsync,
    rename and fsync of the folder. A 413, a bad line (400) or a dropped connection removes
    the temporary file: ``target`` keeps what it held before, or stays absent.
    """
    digest, size, done = hashlib.sha256(), 0, False
    fd, tmp = await run_in_threadpool(tempfile.mkstemp, prefix=".upload-", dir=folder)
    try:
        try:
            f = await aiofiles.open(fd, "wb")
        except BaseException:
            os.close(fd)
            raise
        try:
            async for chunk in _capped_chunks(request, cap, what):
                checker.feed(chunk)
                digest.update(chunk)
                size += len(chunk)
                await f.write(chunk)
            checker.finish()
            await f.flush()
            await run_in_threadpool(os.fsync, f.fileno())
        finally:
            with anyio.CancelScope(shield=True):
                await f.close()
        await aiofiles.os.replace(tmp, target)
        done = True
        await run_in_threadpool(fsync_dir, folder)
    except DataError as e:
        raise HTTPException(400, str(e)) from None
    finally:
        if not done:
            with anyio.CancelScope(shield=True):  # also when the client went away mid-upload
                try:
                    await aiofiles.os.unlink(tmp)
                except FileNotFoundError:
                    pass
    return size, digest.hexdigest()


async def _file_response(path: str | os.PathLike, *, media_type: str, filename: str,
                         delete: bool = False) -> StreamingResponse:
    """``path`` streamed in chunks with ``aiofiles``; with ``delete`` it is unlinked once open (nothing stays)."""
    try:
        f = await aiofiles.open(path, "rb")
    except BaseException:
        if delete:
            await aiofiles.os.unlink(path)
        raise
    try:
        size = (await aiofiles.os.stat(path)).st_size
        if delete:
            await aiofiles.os.unlink(path)  # the open file stays readable; the disk space goes when it closes
    except BaseException:
        await f.close()
        raise

    async def chunks():
        try:
            while chunk := await f.read(_CHUNK_BYTES):
                yield chunk
        finally:
            with anyio.CancelScope(shield=True):  # closed also when the client went away
                await f.close()

    return StreamingResponse(chunks(), media_type=media_type, headers={
        "Content-Length": str(size), "Content-Disposition": f"attachment; filename*=UTF-8''{quote(filename)}"})


@dataclass(frozen=True)
class _Context:
    store: JobStore
    catalog: BaseCatalog
    layout: StateLayout
    defaults: TenantLimits
    worker: Limits
    locks: dict

    def limits(self, t: TenantRecord) -> TenantLimits:
        return self.defaults.with_overrides(t.overrides)

    def tenant_lock(self, tenant: str) -> threading.Lock:
        return self.locks.setdefault(tenant, threading.Lock())


def create_app(store: JobStore, catalog: BaseCatalog, layout: StateLayout, *, limits: TenantLimits | None = None,
               worker_limits: Limits | None = None, auth_limiter: AuthLimiter | None = None) -> FastAPI:
    app = FastAPI(title="ferrytune", version=ferrytune.__version__, docs_url=None, redoc_url=None)
    app.state.store = store
    app.state.auth_limiter = auth_limiter or AuthLimiter()
    ctx = _Context(store, catalog, layout, limits or TenantLimits(), worker_limits, {})

    def own_job(job_id: str, t: TenantRecord) -> JobRecord:
        job = store.job(job_id, tenant=t.name)
        if job is None:  # someone else's job looks exactly like a missing one
            raise HTTPException(404, f"job {job_id} not found")
        return job

    @app.exception_handler(SpecError)
    @app.exception_handler(UnsafePathError)
    async def _bad_request(_request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=400)

    @app.get("/v1/health")
    def health() -> dict:
        return {"ok": True, "version": ferrytune.__version__, "bases": catalog.names()}

    @app.get("/v1/bases")
    def bases(t: Tenant) -> dict:
        return {"bases": catalog.names()}

    @app.put("/v1/files/{name}", status_code=201)
    async def upload(name: str, request: Request, t: Tenant) -> dict:
        check_file_name(name)
        await run_in_threadpool(layout.ensure_tenant, t.name)
        folder = layout.files_dir(t.name)
        target = await run_in_threadpool(resolve_inside, folder, name, field="file name")
        limits = ctx.limits(t)
        disk_left = limits.max_disk_bytes - await run_in_threadpool(layout.disk_bytes, t.name)
        cap, what = limits.max_dataset_bytes, f"file {name!r} (max_dataset_bytes)"
        if disk_left < cap:
            cap, what = max(0, disk_left), f"file {name!r} (max_disk_bytes: {max(0, disk_left)} bytes left)"
        checker = JsonlChecker(name, max_line_bytes=MAX_LINE_BYTES)
        size, sha256 = await _receive_dataset(request, folder, target, cap, what, checker)
        return {"name": name, "bytes": size, "sha256": sha256, "rows": checker.num_rows}

    @app.get("/v1/files/{name}")
    async def download(name: str, t: Tenant) -> StreamingResponse:
        check_file_name(name)
        path = await run_in_threadpool(resolve_inside, layout.files_dir(t.name), name, field="file name")
        if not await aiofiles.os.path.isfile(path):
            raise HTTPException(404, f"file {name!r} not found; upload it first")
        return await _file_response(path, media_type="application/octet-stream", filename=name)

    @app.get("/v1/files")
    def files(t: Tenant) -> dict:
        folder = layout.files_dir(t.name)
        entries = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")) \
            if folder.is_dir() else []
        return {"files": [{"name": p.name, "bytes": p.stat().st_size} for p in entries]}

    @app.post("/v1/jobs", status_code=201)
    async def submit(request: Request, t: Tenant) -> dict:
        body = await _read_capped(request, MAX_SPEC_BYTES, "spec")
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            raise SpecError("spec: not UTF-8 text") from None
        job = await run_in_threadpool(_create_job, ctx, t, text)
        return {"id": job.id, "state": job.state.value}

    @app.get("/v1/jobs")
    def jobs(t: Tenant) -> dict:
        return {"jobs": [j.public() for j in store.jobs(tenant=t.name)]}

    @app.get("/v1/jobs/{job_id}")
    def status(job_id: str, t: Tenant) -> dict:
        return own_job(job_id, t).public()

    @app.get("/v1/jobs/{job_id}/spec", response_class=PlainTextResponse)
    def spec(job_id: str, t: Tenant) -> str:
        return own_job(job_id, t).spec_text

    @app.get("/v1/jobs/{job_id}/metrics")
    def metrics(job_id: str, t: Tenant) -> dict:
        job = own_job(job_id, t)
        return {"id": job.id, "state": job.state.value, "step": job.step, "max_steps": job.max_steps,
                "metrics": store.metrics(job.id), "evals": store.evals(job.id)}

    @app.get("/v1/jobs/{job_id}/logs", response_class=PlainTextResponse)
    def logs(job_id: str, t: Tenant) -> str:
        job = own_job(job_id, t)
        lines = [f"{time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(ts))}Z {msg}" for ts, msg in store.events(job.id)]
        return "\n".join(lines) + "\n"

    @app.get("/v1/jobs/{job_id}/plot.png")
    def plot(job_id: str, t: Tenant) -> Response:
        job = own_job(job_id, t)
        return Response(_loss_plot(job, store.metrics(job.id)), media_type="image/png")

    @app.post("/v1/jobs/{job_id}/cancel", status_code=202)
    def cancel(job_id: str, t: Tenant) -> dict:
        job = own_job(job_id, t)
        if job.state in TERMINAL_STATES:
            raise HTTPException(409, f"job {job_id} is already {job.state.value}")
        return store.request_cancel(job_id, tenant=t.name).public()

    @app.get("/v1/jobs/{job_id}/adapter")
    async def adapter(job_id: str, t: Tenant, format: str = "tar") -> StreamingResponse:
        job = await run_in_threadpool(own_job, job_id, t)
        if job.state != JobState.SUCCEEDED:
            raise HTTPException(409, f"job {job_id} is {job.state.value}; its adapter exists once it succeeded")
        if format not in ("tar", "zip"):
            raise HTTPException(400, f"format: must be 'tar' or 'zip' (got {format!r})")
        path = await run_in_threadpool(_archive, Path(job.adapter_dir), format)
        return await _file_response(path, media_type="application/zip" if format == "zip" else "application/x-tar",
                                    filename=f"{job.id}-adapter.{'zip' if format == 'zip' else 'tar'}", delete=True)

    mount_console(app)  # the web console at /ui/ (static files; it calls the routes above)
    return app


def _create_job(ctx: _Context, t: TenantRecord, text: str) -> JobRecord:
    """Validate everything, snapshot the dataset into the job's folder, then insert the job (queued).

    Any refusal after the folder exists removes it: a refused submission leaves nothing behind.
    """
    store, layout = ctx.store, ctx.layout
    layout.ensure_tenant(t.name)
    limits = ctx.limits(t)
    outputs = layout.outputs_dir(t.name)
    valid = validate_spec(parse_spec_text(text), catalog=ctx.catalog, files_root=layout.files_dir(t.name),
                          outputs_root=outputs, limits=limits)
    if ctx.worker is not None and valid.cfg.data.max_length > ctx.worker.token_capacity:
        raise SpecError(f"data.max_length: {valid.cfg.data.max_length} is more than a microbatch of this service holds "
                        f"({ctx.worker.token_capacity} tokens); lower data.max_length")
    with ctx.tenant_lock(t.name):  # the counts and the output_dir check hold until the job is stored
        active = store.count_jobs(tenant=t.name, states=_ACTIVE)
        if active >= limits.max_jobs:
            raise HTTPException(429, f"max_jobs: you have {active} jobs queued or running, the limit is "
                                     f"{limits.max_jobs}; wait for some to finish or cancel some")
        job_id = new_job_id()
        job_dir = layout.job_dir(t.name, job_id)
        adapter_dir = job_dir / "adapter"
        if valid.output_rel is not None:
            adapter_dir = resolve_inside(outputs, valid.output_rel, field="output_dir")
            _check_output_free(store, t.name, adapter_dir, valid.output_rel)
        parent = _init_from_job(ctx, t, valid)
        size = valid.train_file.stat().st_size
        if size > limits.max_dataset_bytes:
            raise HTTPException(413, f"data.train: {size} bytes is more than max_dataset_bytes "
                                     f"({limits.max_dataset_bytes})")
        if valid.eval_file is not None:
            eval_size = valid.eval_file.stat().st_size
            if eval_size > limits.max_dataset_bytes:
                raise HTTPException(413, f"data.eval: {eval_size} bytes is more than max_dataset_bytes "
                                         f"({limits.max_dataset_bytes})")
            size += eval_size
        used = layout.disk_bytes(t.name)
        if used + size > limits.max_disk_bytes:
            raise HTTPException(413, f"max_disk_bytes: your area holds {used} bytes; this job's copy of its "
                                     f"dataset ({size} bytes) would pass {limits.max_disk_bytes}; delete old "
                                     "files or jobs' outputs")
        make_private_dir(job_dir / "work")
        try:
            # a copy, so that a later upload under the same name cannot change a queued job's data;
            # the copy is what is checked, so what was checked is what trains
            copy_private(valid.train_file, job_dir / "train.jsonl")
            eval_copy = init_copy = None
            if valid.eval_file is not None:
                eval_copy = job_dir / "eval.jsonl"
                copy_private(valid.eval_file, eval_copy)
            if parent is not None:  # a copy too: the job continues the adapter as it was at submission
                init_copy = job_dir / "init_adapter"
                make_private_dir(init_copy)
                for f in sorted(p for p in Path(parent.adapter_dir).iterdir() if p.is_file()):
                    copy_private(f, init_copy / f.name)
            data = check_dataset(valid, ctx.catalog, job_dir / "train.jsonl",
                                 shown=valid.cfg.data.train.rsplit("/", 1)[-1], eval_path=eval_copy,
                                 eval_shown=(valid.cfg.data.eval or "").rsplit("/", 1)[-1])
            memory = job_memory_bytes(valid, data)
            _check_memory(ctx, valid, memory)
            write_private(job_dir / "spec.yaml", text.encode("utf-8"))
            config = valid.stored_config(train=str(job_dir / "train.jsonl"), output_dir=str(job_dir / "work"),
                                         eval=None if eval_copy is None else str(eval_copy),
                                         init_from=None if init_copy is None else str(init_copy))
            return store.create_job(NewJob(
                id=job_id, tenant=t.name, name=valid.name, base=valid.base, dtype=valid.cfg.model.compute_dtype,
                priority=valid.priority, max_steps=valid.cfg.train.steps, spec_text=text, config=config,
                job_dir=str(job_dir), adapter_dir=str(adapter_dir), adapter_params=valid.adapter_params,
                max_length=valid.cfg.data.max_length, memory_bytes=memory))
        except BaseException:
            shutil.rmtree(job_dir, ignore_errors=True)
            raise


def _init_from_job(ctx: _Context, t: TenantRecord, valid) -> JobRecord | None:
    """The tenant's own succeeded job that ``lora.init_from`` names (another tenant's answers 404)."""
    job_id = valid.init_from_job
    if job_id is None:
        return None
    parent = ctx.store.job(job_id, tenant=t.name)
    if parent is None:  # someone else's job looks exactly like a missing one
        raise HTTPException(404, f"lora.init_from: job {job_id} not found")
    if parent.state != JobState.SUCCEEDED:
        raise HTTPException(409, f"lora.init_from: job {job_id} is {parent.state.value}; a job continues from "
                                 "one that succeeded")
    if not Path(parent.adapter_dir).is_dir():
        raise HTTPException(410, f"lora.init_from: the adapter of job {job_id} is gone from the server")
    check_init_from(valid, ctx.catalog, job_id, parent.base, parent.config)
    return parent


def _check_output_free(store: JobStore, tenant: str, adapter_dir: Path, rel: str) -> None:
    """No two live jobs share an output folder, or nest one inside the other's."""
    for other in store.jobs(tenant=tenant):
        if other.state in (JobState.FAILED, JobState.CANCELLED):
            continue
        theirs = Path(other.adapter_dir)
        if theirs == adapter_dir or theirs in adapter_dir.parents or adapter_dir in theirs.parents:
            raise HTTPException(409, f"output_dir: {rel!r} overlaps the output folder of your job {other.id}")


def _check_memory(ctx: _Context, valid, memory: int) -> None:
    """The job must fit an empty worker of its base: base + one microbatch's activations + the job."""
    if ctx.worker is None:
        return
    cost = ctx.catalog.cost(valid.base, valid.cfg.model.compute_dtype)
    needs = cost.base_bytes + cost.act_bytes_per_token * ctx.worker.token_capacity + memory
    if needs > ctx.worker.worker_memory_bytes:
        raise SpecError(
            f"lora.rank: the job needs {needs / 2**30:.2f} GiB on a worker (base + activations + adapter + "
            f"data) but a worker has {ctx.worker.worker_memory_bytes / 2**30:.2f} GiB; lower lora.rank or "
            "train.batch_size, or use a smaller dataset")


def _archive(folder: Path, fmt: str) -> str:
    """The adapter folder's files, at the archive's top level, in a temp file."""
    if not folder.is_dir():
        raise HTTPException(410, "the adapter folder is gone from the server")
    files = sorted(p for p in folder.iterdir() if p.is_file())
    fd, path = tempfile.mkstemp(prefix=".ferrytune-adapter-", suffix=f".{fmt}")
    try:
        with os.fdopen(fd, "wb") as f:
            if fmt == "zip":
                with zipfile.ZipFile(f, "w", zipfile.ZIP_DEFLATED) as z:
                    for p in files:
                        z.write(p, p.name)
            else:
                with tarfile.open(fileobj=f, mode="w") as tar:
                    for p in files:
                        tar.add(p, arcname=p.name, recursive=False)
    except BaseException:
        os.unlink(path)
        raise
    return path


def _loss_plot(job: JobRecord, rows: list[dict]) -> bytes:
    from matplotlib.figure import Figure  # the OO API: no pyplot global state, safe across threads

    fig = Figure(figsize=(5, 3), dpi=100)
    ax = fig.subplots()
    if rows:
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    # usetex and mathtext off: a job's name is drawn as the characters it is, whatever they are
    ax.set_title(f"{job.name or job.id} ({job.state.value}, step {job.step}/{job.max_steps})", fontsize=9,
                 usetex=False, parse_math=False)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()

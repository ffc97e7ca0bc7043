"""The HTTP API (FastAPI), under ``/v1/``; every route but ``/v1/health`` needs ``Authorization: Bearer TOKEN``.

A tenant sees only its own jobs and files: another tenant's job id answers 404, exactly
like an id that does not exist. The API never changes a job's state; it stores new jobs
(queued) and cancel requests, and the controller does the rest. Routes are listed in
``docs/service.md``.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import shutil
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Annotated

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool

import ferrytune
from ferrytune.service._paths import StateLayout, UnsafePathError, check_file_name, resolve_inside
from ferrytune.service._spec import BaseCatalog, SpecError, parse_spec_text, validate_spec
from ferrytune.service._states import JobState
from ferrytune.service._store import JobRecord, JobStore, NewJob, TenantRecord, new_job_id

logger = logging.getLogger(__name__)

__all__ = ["create_app"]

MAX_SPEC_BYTES = 1 << 20
_UPLOAD_CHUNK = 1 << 20


def _tenant(request: Request) -> TenantRecord:
    """The tenant whose token the request carries; 401 otherwise."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    store: JobStore = request.app.state.store
    record = store.tenant_for_token(token) if scheme.lower() == "bearer" and token else None
    if record is None:
        raise HTTPException(401, "missing or invalid API token (send 'Authorization: Bearer TOKEN')",
                            headers={"WWW-Authenticate": "Bearer"})
    return record


Tenant = Annotated[TenantRecord, Depends(_tenant)]


def create_app(store: JobStore, catalog: BaseCatalog, layout: StateLayout, *, max_upload_bytes: int) -> FastAPI:
    app = FastAPI(title="ferrytune", version=ferrytune.__version__, docs_url=None, redoc_url=None)
    app.state.store = store

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
        layout.ensure_tenant(t.name)
        target = resolve_inside(layout.files_dir(t.name), name, field="file name")
        digest, size = hashlib.sha256(), 0
        fd, tmp = tempfile.mkstemp(prefix=".upload-", dir=layout.files_dir(t.name))
        try:
            with os.fdopen(fd, "wb") as f:
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > max_upload_bytes:
                        raise HTTPException(413, f"file {name!r}: larger than {max_upload_bytes} bytes")
                    digest.update(chunk)
                    f.write(chunk)
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return {"name": name, "bytes": size, "sha256": digest.hexdigest()}

    @app.get("/v1/files")
    def files(t: Tenant) -> dict:
        folder = layout.files_dir(t.name)
        entries = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")) \
            if folder.is_dir() else []
        return {"files": [{"name": p.name, "bytes": p.stat().st_size} for p in entries]}

    @app.post("/v1/jobs", status_code=201)
    async def submit(request: Request, t: Tenant) -> dict:
        body = await request.body()
        if len(body) > MAX_SPEC_BYTES:
            raise HTTPException(413, f"spec: larger than {MAX_SPEC_BYTES} bytes")
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            raise SpecError("spec: not UTF-8 text") from None
        job = await run_in_threadpool(_create_job, store, catalog, layout, t, text)
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
                "metrics": store.metrics(job.id)}

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
        if job.state in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED):
            raise HTTPException(409, f"job {job_id} is already {job.state.value}")
        return store.request_cancel(job_id, tenant=t.name).public()

    @app.get("/v1/jobs/{job_id}/adapter")
    def adapter(job_id: str, t: Tenant, format: str = "tar") -> FileResponse:
        job = own_job(job_id, t)
        if job.state != JobState.SUCCEEDED:
            raise HTTPException(409, f"job {job_id} is {job.state.value}; its adapter exists once it succeeded")
        if format not in ("tar", "zip"):
            raise HTTPException(400, f"format: must be 'tar' or 'zip' (got {format!r})")
        path = _archive(Path(job.adapter_dir), format)
        return FileResponse(path, media_type="application/zip" if format == "zip" else "application/x-tar",
                            filename=f"{job.id}-adapter.{'zip' if format == 'zip' else 'tar'}",
                            background=BackgroundTask(os.unlink, path))

    return app


def _create_job(store: JobStore, catalog: BaseCatalog, layout: StateLayout, t: TenantRecord, text: str) -> JobRecord:
    """Validate, snapshot the dataset into the job's folder, then insert the job (queued)."""
    layout.ensure_tenant(t.name)
    outputs = layout.tenant_root(t.name) / "outputs"
    valid = validate_spec(parse_spec_text(text), catalog=catalog, files_root=layout.files_dir(t.name),
                          outputs_root=outputs)
    job_id = new_job_id()
    job_dir = layout.job_dir(t.name, job_id)
    adapter_dir = job_dir / "adapter"
    if valid.output_rel is not None:
        adapter_dir = resolve_inside(outputs, valid.output_rel, field="output_dir")
        for other in store.jobs(tenant=t.name):
            if other.adapter_dir == str(adapter_dir) and other.state not in (JobState.FAILED, JobState.CANCELLED):
                raise HTTPException(409, f"output_dir: {valid.output_rel!r} is already used by job {other.id}")
    (job_dir / "work").mkdir(parents=True)
    # a copy, so that a later upload under the same name cannot change a queued job's data
    shutil.copyfile(valid.train_file, job_dir / "train.jsonl")
    (job_dir / "spec.yaml").write_text(text)
    config = dict(valid.config, output_dir=str(job_dir / "work"))
    config["data"] = dict(config["data"], train=str(job_dir / "train.jsonl"))
    return store.create_job(NewJob(
        id=job_id, tenant=t.name, name=valid.name, base=valid.base, dtype=valid.dtype, priority=valid.priority,
        max_steps=valid.max_steps, spec_text=text, config=config, job_dir=str(job_dir),
        adapter_dir=str(adapter_dir), adapter_params=valid.adapter_params, max_length=valid.max_length))


def _archive(folder: Path, fmt: str) -> str:
    """The adapter folder's files, at the archive's top level, in a temp file."""
    if not folder.is_dir():
        raise HTTPException(410, "the adapter folder is gone from the server")
    files = sorted(p for p in folder.iterdir() if p.is_file())
    fd, path = tempfile.mkstemp(suffix=f".{fmt}")
    with os.fdopen(fd, "wb") as f:
        if fmt == "zip":
            with zipfile.ZipFile(f, "w", zipfile.ZIP_DEFLATED) as z:
                for p in files:
                    z.write(p, p.name)
        else:
            with tarfile.open(fileobj=f, mode="w") as tar:
                for p in files:
                    tar.add(p, arcname=p.name, recursive=False)
    return path


def _loss_plot(job: JobRecord, rows: list[dict]) -> bytes:
    from matplotlib.figure import Figure  # the OO API: no pyplot global state, safe across threads

    fig = Figure(figsize=(5, 3), dpi=100)
    ax = fig.subplots()
    if rows:
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(f"{job.name or job.id} ({job.state.value}, step {job.step}/{job.max_steps})", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()

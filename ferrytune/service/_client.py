"""A thin HTTP client of the service API (``requests``), used by the CLI and the tests."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from pathlib import Path
from typing import Any

import requests
import yaml

from ferrytune.errors import FerrytuneError

__all__ = ["Client", "ClientError", "prepare_submission"]

_TIMEOUT_S = 60.0


class ClientError(FerrytuneError):
    """The service answered with an error, or could not be reached. The message is the server's."""

    def __init__(self, message: str, *, status: int | None = None):
        super().__init__(message)
        self.status = status


class Client:
    def __init__(self, url: str, token: str, *, timeout_s: float = _TIMEOUT_S):
        if not url:
            raise ClientError("no service URL: pass --url or set FERRYTUNE_URL")
        if not token:
            raise ClientError("no API token: pass --token or set FERRYTUNE_TOKEN")
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self._session = requests.Session()
        self._session.headers["Authorization"] = f"Bearer {token}"

    def _call(self, method: str, path: str, **kw: Any) -> requests.Response:
        try:
            r = self._session.request(method, f"{self.url}/v1{path}", timeout=self.timeout_s, **kw)
        except requests.RequestException as e:
            raise ClientError(f"cannot reach the service at {self.url}: {type(e).__name__}") from None
        if r.status_code >= 400:
            try:
                detail = r.json().get("detail")
            except ValueError:
                detail = r.text.strip()[:300]
            if isinstance(detail, list):  # FastAPI validation errors
                detail = "; ".join(str(d.get("msg", d)) for d in detail)
            raise ClientError(f"HTTP {r.status_code}: {detail}", status=r.status_code)
        return r

    def upload(self, local: Path, name: str) -> dict:
        with open(local, "rb") as f:
            return self._call("PUT", f"/files/{name}", data=f).json()

    def submit_text(self, text: str) -> dict:
        return self._call("POST", "/jobs", data=text.encode(), headers={"Content-Type": "application/yaml"}).json()

    def submit(self, spec_path: str | os.PathLike) -> dict:
        """Upload the datasets the spec names (``data.train``, ``data.eval``), then the spec; returns {id, state}."""
        spec, local = prepare_submission(Path(spec_path))
        files = {"train": local}
        if spec["data"].get("eval"):
            files["eval"] = _local_file(Path(spec_path), spec["data"]["eval"], "data.eval")
        for key, path in files.items():
            name = f"{_sha256(path)[:16]}-{path.name}"  # content-addressed: concurrent submits never clash
            self.upload(path, name)
            spec["data"][key] = name
        return self.submit_text(yaml.safe_dump(spec, sort_keys=False))

    def jobs(self) -> list[dict]:
        return self._call("GET", "/jobs").json()["jobs"]

    def status(self, job_id: str) -> dict:
        return self._call("GET", f"/jobs/{job_id}").json()

    def metrics(self, job_id: str) -> dict:
        return self._call("GET", f"/jobs/{job_id}/metrics").json()

    def logs(self, job_id: str) -> str:
        return self._call("GET", f"/jobs/{job_id}/logs").text

    def cancel(self, job_id: str) -> dict:
        return self._call("POST", f"/jobs/{job_id}/cancel").json()

    def fetch(self, job_id: str, out_dir: str | os.PathLike) -> list[Path]:
        """Write the job's PEFT adapter files into ``out_dir``; returns their paths."""
        data = self._call("GET", f"/jobs/{job_id}/adapter", params={"format": "tar"}).content
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        written = []
        with tarfile.open(fileobj=io.BytesIO(data), mode="r") as tar:
            for member in tar.getmembers():
                # only plain files at the top level: an archive cannot write outside out_dir
                if not member.isfile() or "/" in member.name or member.name in ("", ".", ".."):
                    raise ClientError(f"adapter archive of {job_id}: unexpected entry {member.name!r}")
                target = out / member.name
                with tar.extractfile(member) as src, open(target, "wb") as dst:
                    dst.write(src.read())
                written.append(target)
        return written


def prepare_submission(spec_path: Path) -> tuple[dict, Path]:
    """Read a local spec; return it and the local dataset file its ``data.train`` names.

    A relative ``data.train`` is looked up in the current directory, then beside the spec.
    """
    if not spec_path.is_file():
        raise ClientError(f"spec file not found: {spec_path}")
    try:
        spec = yaml.safe_load(spec_path.read_text())
    except yaml.YAMLError as e:
        raise ClientError(f"{spec_path}: not valid YAML: {getattr(e, 'problem', None) or e}") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("data"), dict) or not spec["data"].get("train"):
        raise ClientError(f"{spec_path}: data.train: required (the local dataset file to upload)")
    return spec, _local_file(spec_path, spec["data"]["train"], "data.train")


def _local_file(spec_path: Path, value, field: str) -> Path:
    """A relative path is looked up in the current directory, then beside the spec."""
    path = Path(str(value)).expanduser()
    candidates = [path] if path.is_absolute() else [Path.cwd() / path, spec_path.parent / path]
    local = next((c for c in candidates if c.is_file()), None)
    if local is None:
        raise ClientError(f"{spec_path}: {field}: file not found: {path}")
    return local


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()

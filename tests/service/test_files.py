"""Files over real HTTP: the real app (create_app) under uvicorn on 127.0.0.1, a real SQLite store, real files.

Uploads stream to disk in chunks (aiofiles), checked line by line as they arrive, and land
atomically; downloads stream the same way; the event loop never touches the disk.
"""

import hashlib
import io
import json
import os
import random
import socket
import stat
import sys
import tarfile
import tempfile
import threading
import time
from types import SimpleNamespace

import pytest
import requests

pytest.importorskip("fastapi")
pytest.importorskip("aiofiles")

from service_testlib import free_port

from ferrytune.service._api import MAX_LINE_BYTES, create_app
from ferrytune.service._limits import TenantLimits
from ferrytune.service._paths import StateLayout
from ferrytune.service._spec import BaseCatalog
from ferrytune.service._states import JobState
from ferrytune.service._store import JobStore, NewJob, new_job_id

CAP = 4 << 20  # max_dataset_bytes of these tests

# ---- which thread touches which file: Python's audit events (open, rename, remove, listdir, ...) ----
_FS_EVENTS = {"open", "os.rename", "os.remove", "os.rmdir", "os.mkdir", "os.listdir", "os.scandir", "os.chmod",
              "os.truncate", "os.chown", "os.link", "os.symlink", "shutil.rmtree", "shutil.copyfile"}
_watch = {"roots": (), "seen": []}


def _audit(event, args):
    roots = _watch["roots"]
    if not roots or event not in _FS_EVENTS or not args:
        return
    path = args[0]
    if isinstance(path, int) or path is None:
        return
    path = os.fsdecode(path) if isinstance(path, bytes) else str(path)
    if path.startswith(roots):
        _watch["seen"].append((threading.get_ident(), event, path))


sys.addaudithook(_audit)  # for the process's lifetime; it records only while a test sets roots


def rows(n, *, seed=0, width=40):
    rng = random.Random(seed)
    return "".join(json.dumps({"text": "".join(rng.choice("abcdefgh ") for _ in range(width)),
                               "label": rng.randint(0, 1)}) + "\n" for _ in range(n)).encode()


@pytest.fixture
def api(tiny, tmp_path, monkeypatch):
    from ferrytune.service._service import _server_class

    _, base = tiny
    spool = tmp_path / "tmp"
    spool.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spool))  # where adapter archives are built, to look for leftovers
    layout = StateLayout(tmp_path / "state")
    layout.ensure_root()
    store = JobStore.open(layout.default_db_url)
    token = store.add_tenant("alice")
    other = store.add_tenant("bob")
    layout.ensure_tenant("alice")
    app = create_app(store, BaseCatalog({"tiny": str(base)}), layout, limits=TenantLimits(max_dataset_bytes=CAP))
    import uvicorn

    server = _server_class()(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning",
                                            access_log=False))
    thread = threading.Thread(target=server.run, name="test-http", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "the HTTP server did not start"
            time.sleep(0.02)
        yield SimpleNamespace(url=f"http://127.0.0.1:{server.config.port}", headers={"Authorization": f"Bearer {token}"},
                              other={"Authorization": f"Bearer {other}"}, token=token, store=store, layout=layout,
                              files=layout.files_dir("alice"), spool=spool, loop_thread=thread.ident)
    finally:
        server.should_exit = True
        thread.join(30)
        store.close()
    assert not thread.is_alive()


def leftovers(s) -> list[str]:
    """Temporary files of uploads and archives that stayed behind."""
    return sorted(p.name for p in [*s.files.glob(".upload-*"), *s.spool.iterdir()])


def upload(s, name, data: bytes, *, piece=64 << 10):
    """PUT with a chunked body of ``piece``-byte chunks (a generator: requests streams it)."""
    def body():
        for i in range(0, len(data), piece):
            yield data[i:i + piece]

    return requests.put(f"{s.url}/v1/files/{name}", data=body(), headers=s.headers, timeout=60)


def test_an_upload_in_many_chunks_comes_back_byte_identical(api):
    s = api
    data = rows(60_000, seed=1)  # ~3.4 MiB in 64 KiB chunks: dozens of chunks, lines across their edges
    assert len(data) > 3 << 20
    r = upload(s, "train.jsonl", data)
    assert r.status_code == 201, r.text
    assert r.json() == {"name": "train.jsonl", "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                        "rows": 60_000}
    stored = s.files / "train.jsonl"
    assert stored.read_bytes() == data and stat.S_IMODE(stored.stat().st_mode) == 0o600
    got = requests.get(f"{s.url}/v1/files/train.jsonl", headers=s.headers, timeout=60)
    assert got.status_code == 200 and got.content == data
    assert int(got.headers["content-length"]) == len(data)
    assert got.headers["content-disposition"] == "attachment; filename*=UTF-8''train.jsonl"
    assert requests.get(f"{s.url}/v1/files/train.jsonl", headers=s.other, timeout=10).status_code == 404
    assert requests.get(f"{s.url}/v1/files/missing.jsonl", headers=s.headers, timeout=10).status_code == 404
    listed = requests.get(f"{s.url}/v1/files", headers=s.headers, timeout=10).json()
    assert listed == {"files": [{"name": "train.jsonl", "bytes": len(data)}]}
    assert leftovers(s) == []


def test_an_oversize_upload_is_refused_as_it_passes_the_cap_and_leaves_nothing(api):
    s = api
    (s.files / "keep.jsonl").write_bytes(rows(3))
    for name in ("big.jsonl", "keep.jsonl"):
        r = upload(s, name, rows(90_000, seed=2))  # ~5 MiB > the 4 MiB cap
        assert r.status_code == 413 and "max_dataset_bytes" in r.json()["detail"], r.text
    assert not (s.files / "big.jsonl").exists()
    assert (s.files / "keep.jsonl").read_bytes() == rows(3)  # a refused re-upload keeps the old content
    assert leftovers(s) == []


BAD_LINES = [  # (line number, the bad line, what the message must say)
    (1, b'{"text": "a", "label": 0', "not valid JSON"),
    (4_000, b"not json at all", "not valid JSON"),
    (25_001, b'{"sentence": "a", "y": 1}', "missing key 'text'"),
    (9_999, b'{"text": "a", "label": "one"}', "'label' must be an integer"),
    (5, b'{"text": "\xff\xfe", "label": 0}', "not valid UTF-8"),
    (30_000, b'{"text": "' + b"x" * MAX_LINE_BYTES + b'", "label": 0}', f"line longer than {MAX_LINE_BYTES} bytes"),
    (2, b'{"prompt": "q", "completion": "a"}', "missing key 'text'"),  # a completion row in a classification file
]


@pytest.mark.parametrize("lineno,bad,want", BAD_LINES, ids=[f"line{n}" for n, _, _ in BAD_LINES])
def test_a_bad_line_is_a_400_naming_it_and_nothing_is_stored(api, lineno, bad, want):
    s = api
    good = rows(40_000, seed=3).splitlines(keepends=True)
    data = b"".join(good[:lineno - 1]) + bad + b"\n" + b"".join(good[lineno - 1:])
    r = upload(s, "train.jsonl", data)
    detail = r.json()["detail"]
    assert r.status_code == 400 and detail.startswith(f"train.jsonl:{lineno}: ") and want in detail, (r.status_code,
                                                                                                    detail)
    assert "\n" not in detail
    assert not (s.files / "train.jsonl").exists() and leftovers(s) == []


def test_an_empty_upload_is_refused(api):
    r = upload(api, "empty.jsonl", b"\n\n")
    assert r.status_code == 400 and r.json()["detail"] == "empty.jsonl: empty file (no rows)"
    assert not (api.files / "empty.jsonl").exists() and leftovers(api) == []


def _adapter_job(s, tmp_path):
    """A succeeded job of alice's whose adapter folder holds a few MiB of random bytes."""
    folder = tmp_path / "adapter"
    folder.mkdir()
    payload = {"adapter_config.json": b'{"peft_type": "LORA"}', "adapter_model.safetensors": os.urandom(3 << 20)}
    for name, data in payload.items():
        (folder / name).write_bytes(data)
    job = s.store.create_job(NewJob(
        id=new_job_id(), tenant="alice", name="", base="tiny", dtype="float32", priority=0, max_steps=1,
        spec_text="", config={}, job_dir=str(tmp_path), adapter_dir=str(folder), adapter_params=1, max_length=8))
    assert s.store.transition(job.id, JobState.QUEUED, JobState.RUNNING, reason="test")
    assert s.store.transition(job.id, JobState.RUNNING, JobState.SUCCEEDED, reason="test")
    return job.id, payload


def test_an_adapter_download_streams_the_archive_and_leaves_no_temp_file(api, tmp_path):
    s = api
    job_id, payload = _adapter_job(s, tmp_path)
    r = requests.get(f"{s.url}/v1/jobs/{job_id}/adapter", headers=s.headers, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"] == "application/x-tar"
    assert int(r.headers["content-length"]) == len(r.content)
    with tarfile.open(fileobj=io.BytesIO(r.content)) as tar:
        assert {m.name: tar.extractfile(m).read() for m in tar.getmembers()} == payload
    z = requests.get(f"{s.url}/v1/jobs/{job_id}/adapter?format=zip", headers=s.headers, timeout=60)
    assert z.status_code == 200 and z.content.startswith(b"PK")
    # a client that stops reading after the first bytes: the archive still goes
    with requests.get(f"{s.url}/v1/jobs/{job_id}/adapter", headers=s.headers, timeout=60, stream=True) as partial:
        assert partial.status_code == 200 and len(next(partial.iter_content(4096))) > 0
    deadline = time.monotonic() + 10
    while leftovers(s) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert leftovers(s) == []
    assert requests.get(f"{s.url}/v1/jobs/{job_id}/adapter", headers=s.other, timeout=10).status_code == 404


def _open_chunked_put(s, name) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", int(s.url.rsplit(":", 1)[1])), timeout=30)
    sock.sendall(f"PUT /v1/files/{name} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {s.token}\r\n"
                 "Transfer-Encoding: chunked\r\n\r\n".encode())
    return sock


def _send_chunk(sock, data: bytes) -> None:
    sock.sendall(b"%x\r\n%s\r\n" % (len(data), data))


def _answer(sock) -> tuple[int, dict]:
    data = b""
    while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < int(
            [h for h in data.split(b"\r\n") if h.lower().startswith(b"content-length:")][0].split(b":")[1]):
        more = sock.recv(65536)
        assert more, data
        data += more
    head, body = data.split(b"\r\n\r\n", 1)
    return int(head.split()[1]), json.loads(body)


def test_the_event_loop_serves_others_while_files_stream_and_never_touches_the_disk(api, tmp_path):
    """An upload held open mid-stream does not stop /v1/health; no file call runs on the loop's thread.

    Deterministic: the upload waits at a known point (half sent, the connection open) while
    other requests are answered, then completes. Python's audit events show which thread
    opened, renamed or removed each file under the state dir: never the event loop's.
    """
    s = api
    job_id, _ = _adapter_job(s, tmp_path)
    data = rows(40_000, seed=5)
    half = len(data) // 2
    _watch["roots"], _watch["seen"] = (str(s.layout.root), str(s.spool)), []
    try:
        sock = _open_chunked_put(s, "slow.jsonl")
        try:
            for i in range(0, half, 64 << 10):
                _send_chunk(sock, data[i:min(i + (64 << 10), half)])
            # the upload is mid-stream (half its bytes in, the rest not sent): others are served meanwhile
            for _ in range(3):
                health = requests.get(f"{s.url}/v1/health", timeout=10)
                assert health.status_code == 200 and health.json()["ok"]
            listed = requests.get(f"{s.url}/v1/files", headers=s.headers, timeout=10).json()["files"]
            assert [f["name"] for f in listed] == []  # nothing visible under the name until it is complete
            got = requests.get(f"{s.url}/v1/jobs/{job_id}/adapter", headers=s.headers, timeout=30)
            assert got.status_code == 200
            for i in range(half, len(data), 64 << 10):
                _send_chunk(sock, data[i:i + (64 << 10)])
            sock.sendall(b"0\r\n\r\n")
            status, body = _answer(sock)
        finally:
            sock.close()
        assert status == 201 and body["bytes"] == len(data), body
        back = requests.get(f"{s.url}/v1/files/slow.jsonl", headers=s.headers, timeout=30)
        assert back.content == data
        seen = list(_watch["seen"])
    finally:
        _watch["roots"] = ()
    assert (s.files / "slow.jsonl").read_bytes() == data
    on_loop = [(event, path) for ident, event, path in seen if ident == s.loop_thread]
    assert on_loop == [], on_loop
    # the hook saw the files' calls (elsewhere): the upload's temp file, its rename, the archive's removal
    events = {(event, os.path.basename(path).split("-")[0]) for _, event, path in seen}
    assert {("open", ".upload"), ("os.rename", ".upload"), ("open", "slow.jsonl"), ("os.remove", ".ferrytune")} \
        <= events, sorted(events)

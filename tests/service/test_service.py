"""The service end to end: real Ray (one session, conftest.py), real HTTP on 127.0.0.1, a real job store.

Covers: two tenants packed on one worker, isolation, malformed specs, a worker killed
mid-job, a service restart, a burst of 100 submissions, and the `serve` command itself.

Every test runs on both job stores (``db_url``: a SQLite file, a PostgreSQL database; the
tenants commands, the service and the `serve` subprocess all get it as ``--db``).
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
import torch
import yaml
from service_testlib import free_port, job_spec, lora_config, succeeded, wait_for, wait_until_healthy

ray = pytest.importorskip("ray")

from ferrytune.service._client import Client, ClientError
from ferrytune.service._controller import ControllerSettings
from ferrytune.service._service import Service, ServiceConfig
from ferrytune.service.cli import main as cli_main

REPO = Path(__file__).resolve().parents[2]
WAIT_S = 120.0


def settings(**kw):
    base = {"worker_memory_gib": 1.0, "max_workers": 1, "max_jobs_per_worker": 4, "token_capacity": 512,
                "checkpoint_every_steps": 2, "worker_num_cpus": 1.0, "worker_slice_s": 0.3, "tick_s": 0.05}
    base.update(kw)
    return ControllerSettings(**base)


def start_service(state_dir, base, db_url, **kw) -> Service:
    config = ServiceConfig(state_dir=str(state_dir), bases={"tiny": str(base)}, port=free_port(), db_url=db_url,
                           controller=settings(**kw))
    return Service(config).start()


def add_tenant(state_dir, name, capsys, db_url) -> str:
    assert cli_main(["tenants", "add", name, "--state-dir", str(state_dir), "--db", db_url]) == 0
    return capsys.readouterr().out.strip()


def write_spec(path: Path, spec: dict) -> Path:
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path





def test_two_tenants_packed_on_one_worker_end_to_end(ray_session, tiny, tmp_path, db_url, capsys, monkeypatch):
    d, base = tiny
    state = tmp_path / "state"
    tok_a, tok_b = add_tenant(state, "alice", capsys, db_url), add_tenant(state, "bob", capsys, db_url)
    svc = start_service(state, base, db_url)
    try:
        url = svc.url
        spec_a = write_spec(tmp_path / "a.yaml", {**job_spec("tiny", str(d / "cls.jsonl"), steps=30, rank=4),
                                                  "name": "alice-cls"})
        spec_b = write_spec(tmp_path / "b.yaml", job_spec("tiny", str(d / "cmp.jsonl"), steps=30, rank=8,
                                                          targets=("o_proj", "up_proj")))
        # the CLI, as an external tool runs it: --url/--token for alice, the environment for bob
        assert cli_main(["submit", str(spec_a), "--url", url, "--token", tok_a]) == 0
        id_a = capsys.readouterr().out.strip()
        monkeypatch.setenv("FERRYTUNE_URL", url)
        monkeypatch.setenv("FERRYTUNE_TOKEN", tok_b)
        assert cli_main(["submit", str(spec_b)]) == 0
        id_b = capsys.readouterr().out.strip()
        alice, bob = Client(url, tok_a), Client(url, tok_b)
        wait_for(alice, id_a, succeeded)
        wait_for(bob, id_b, succeeded)

        assert cli_main(["status", id_b, "--json"]) == 0
        status = json.loads(capsys.readouterr().out)
        assert status["id"] == id_b and status["state"] == "succeeded" and status["step"] == 30
        assert cli_main(["jobs", "--json"]) == 0
        assert [j["id"] for j in json.loads(capsys.readouterr().out)] == [id_b]

        # concurrently on one worker: same worker, and their training steps interleave in time
        logs_a, logs_b = alice.logs(id_a), bob.logs(id_b)
        assert "admitted to worker w0" in logs_a and "admitted to worker w0" in logs_b
        times_a = [m["time"] for m in alice.metrics(id_a)["metrics"]]
        times_b = [m["time"] for m in bob.metrics(id_b)["metrics"]]
        assert len(times_a) == 30 and len(times_b) == 30
        assert max(times_a[0], times_b[0]) < min(times_a[-1], times_b[-1]), "the two jobs did not overlap"
        # the first tick only loads the base, so both joined the first packed step together
        assert len(set(times_a) & set(times_b)) >= 20

        headers = {"Authorization": f"Bearer {tok_a}"}
        png = requests.get(f"{url}/v1/jobs/{id_a}/plot.png", headers=headers, timeout=30)
        assert png.status_code == 200 and png.content.startswith(b"\x89PNG")

        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        for tok, job_id in ((tok_a, id_a), (tok_b, id_b)):
            out = tmp_path / f"fetched-{job_id}"
            assert cli_main(["fetch", job_id, str(out), "--url", url, "--token", tok]) == 0
            config = json.loads((out / "adapter_config.json").read_text())
            assert config["base_model_name_or_path"] == "tiny" and config["peft_type"] == "LORA"
            model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out)
            lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
            assert lora_b and any(p.abs().max() > 0 for p in lora_b)  # trained, not the zero init
        zipped = requests.get(f"{url}/v1/jobs/{id_a}/adapter?format=zip", headers=headers, timeout=30)
        assert zipped.status_code == 200 and zipped.content.startswith(b"PK")
    finally:
        svc.stop()


def test_tenant_isolation_and_malformed_specs(ray_session, tiny, tmp_path, db_url, capsys):
    d, base = tiny
    state = tmp_path / "state"
    tok_a, tok_b = add_tenant(state, "alice", capsys, db_url), add_tenant(state, "bob", capsys, db_url)
    svc = start_service(state, base, db_url, max_workers=0)  # nothing runs: these jobs stay queued
    try:
        alice, bob = Client(svc.url, tok_a), Client(svc.url, tok_b)
        job_a = alice.submit(write_spec(tmp_path / "a.yaml", job_spec("tiny", str(d / "cls.jsonl"))))["id"]
        for call in (bob.status, bob.metrics, bob.logs, bob.cancel, lambda j: bob.fetch(j, tmp_path / "x")):
            with pytest.raises(ClientError) as e:
                call(job_a)
            assert e.value.status in (403, 404)
        assert bob.jobs() == [] and [j["id"] for j in alice.jobs()] == [job_a]
        assert alice.status(job_a)["state"] == "queued"
        with pytest.raises(ClientError) as e:
            Client(svc.url, "ftk_000000000000_" + "x" * 43).jobs()
        assert e.value.status == 401
        assert requests.get(f"{svc.url}/v1/jobs", timeout=10).status_code == 401

        # paths that leave the tenant's area, a server path, and a symlink out
        alice.upload(d / "cls.jsonl", "train.jsonl")
        outside = tmp_path / "secret.jsonl"
        outside.write_text('{"text": "x", "label": 0}\n')
        (state / "tenants" / "alice" / "files" / "link.jsonl").symlink_to(outside)
        good = job_spec("tiny", "train.jsonl")
        assert alice.submit_text(json.dumps(good))["state"] == "queued"  # JSON works as well as YAML
        bad = {
            "data.train": [{"data": {"train": "../../x"}}, {"data": {"train": "/etc/passwd"}},
                           {"data": {"train": "link.jsonl"}}, {"data": {"train": "missing.jsonl"}}],
            "model.path": [{"model": {"path": str(base)}}],
            "output_dir": [{"output_dir": "../bob/outputs/x"}],
            "model": [{"model": "gpt-17"}],
            "train.lr": [{"train": {**good["train"], "lr": -1}}],
            "lora.rank": [{"lora": {"rank": "eight"}}],
            "lora.target_modules": [{"lora": {"target_modules": ["no_such_proj"]}}],
            "train.lrr": [{"train": {**good["train"], "lrr": 1}}],
            "offload": [{"offload": {"tier": "nvme"}}],
            "priority": [{"priority": "high"}],
            "method": [{"method": "zo"}],
            "lora.init_from": [{"lora": {"init_from": "/some/server/adapter"}}],
        }
        for field, changes in bad.items():
            for change in changes:
                with pytest.raises(ClientError) as e:
                    alice.submit_text(yaml.safe_dump({**good, **change}))
                message = str(e.value)  # one line that names the field
                assert e.value.status == 400 and field in message and "\n" not in message, (field, message)
        for text, field in (("model: [unclosed", "spec"), ("- a list", "spec")):
            with pytest.raises(ClientError) as e:
                alice.submit_text(text)
            assert e.value.status == 400 and f"HTTP 400: {field}" in str(e.value)
        with pytest.raises(ClientError) as e:
            alice.upload(d / "cls.jsonl", "..")
        assert e.value.status in (400, 404, 405)
        assert len(alice.jobs()) == 2  # nothing malformed was stored
    finally:
        svc.stop()


def test_killed_worker_jobs_resume_from_checkpoints(ray_session, tiny, tmp_path, db_url, capsys, torch_threads):
    from ferrytune.engine._multi_lora import MultiLoraTrainer

    d, base = tiny
    state = tmp_path / "state"
    token = add_tenant(state, "alice", capsys, db_url)
    svc = start_service(state, base, db_url, checkpoint_every_steps=3)
    try:
        client = Client(svc.url, token)
        # long enough that the job is still running when its worker is killed, even on a quiet machine
        spec = job_spec("tiny", str(d / "cls.jsonl"), steps=300, rank=4)
        job_id = client.submit(write_spec(tmp_path / "a.yaml", spec))["id"]
        wait_for(client, job_id, lambda j: j["checkpoint_step"] >= 6)
        (worker,) = svc.controller.worker_info()
        os.kill(worker["pid"], signal.SIGKILL)  # the worker process dies mid-job
        job = wait_for(client, job_id, succeeded)
        assert job["step"] == 300
        logs = client.logs(job_id)
        assert "is gone; resumes from step" in logs and "admitted to worker w1" in logs, logs
        resumed = [int(line.split("at step ")[1].split()[0]) for line in logs.splitlines() if "resumed from" in line]
        assert resumed and resumed[0] >= 6

        # resuming replays exactly: the adapter equals one trained without interruption
        client.fetch(job_id, tmp_path / "fetched")
        ref = MultiLoraTrainer(base)
        ref.add_job("ref", lora_config(str(base), str(d / "cls.jsonl"), steps=300, rank=4), work_dir=tmp_path / "ref")
        with torch_threads(1):  # the worker's thread count (worker_num_cpus = 1)
            while not ref.is_done("ref"):
                ref.step()
        ref.export("ref", tmp_path / "ref-adapter")
        from safetensors.torch import load_file

        got = load_file(tmp_path / "fetched" / "adapter_model.safetensors")
        want = load_file(tmp_path / "ref-adapter" / "adapter_model.safetensors")
        assert got.keys() == want.keys()
        for key in want:
            torch.testing.assert_close(got[key], want[key], atol=0, rtol=0)
    finally:
        svc.stop()


def test_higher_priority_preempts_at_a_step_boundary(ray_session, tiny, tmp_path, db_url, capsys):
    d, base = tiny
    state = tmp_path / "state"
    tok_a, tok_b = add_tenant(state, "alice", capsys, db_url), add_tenant(state, "bob", capsys, db_url)
    svc = start_service(state, base, db_url, max_jobs_per_worker=1)
    try:
        alice, bob = Client(svc.url, tok_a), Client(svc.url, tok_b)
        # long enough that it cannot finish before the urgent job is admitted, even on a quiet machine
        low = alice.submit(write_spec(tmp_path / "low.yaml", job_spec("tiny", str(d / "cls.jsonl"), steps=400)))["id"]
        wait_for(alice, low, lambda j: j["checkpoint_step"] >= 2)
        urgent = {**job_spec("tiny", str(d / "cmp.jsonl"), steps=10), "priority": 5}
        high = bob.submit(write_spec(tmp_path / "high.yaml", urgent))["id"]
        high_job = wait_for(bob, high, succeeded)
        low_job = wait_for(alice, low, succeeded)
        assert high_job["finished_at"] < low_job["finished_at"]
        logs = alice.logs(low)
        # the victim's tenant learns why, not whose job (nor its id) took the slot
        assert "preempted for a job of higher priority" in logs and "checkpointed" in logs, logs
        assert high not in logs and "bob" not in logs, logs
        preempted_at = int(logs.split("preempted at step ")[1].split(";")[0])
        assert f"resumed from its checkpoint at step {preempted_at}" in logs  # no finished step was lost
        assert logs.count("admitted to worker") == 2
    finally:
        svc.stop()


def _serve_subprocess(state, base, port, ray_address, db_url) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "ferrytune.service.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--state-dir", str(state), "--base", f"tiny={base}", "--address", ray_address, "--max-workers", "0",
           "--db", db_url]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_restart_keeps_every_job_and_a_burst_loses_none(ray_session, tiny, tmp_path, db_url, capsys):
    d, base = tiny
    state = tmp_path / "state"
    token = add_tenant(state, "alice", capsys, db_url)
    svc = start_service(state, base, db_url)
    try:
        client = Client(svc.url, token)
        done = client.submit(write_spec(tmp_path / "a.yaml", job_spec("tiny", str(d / "cls.jsonl"), steps=4)))["id"]
        wait_for(client, done, succeeded)
        long = client.submit(write_spec(tmp_path / "b.yaml", job_spec("tiny", str(d / "cls.jsonl"), steps=100_000)))
        wait_for(client, long["id"], lambda j: j["checkpoint_step"] >= 2)
    finally:
        svc.stop()

    # the real `serve` command, in its own process, joined to this module's Ray cluster
    port = free_port()
    proc = _serve_subprocess(state, base, port, ray_session, db_url)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_healthy(url, proc, WAIT_S)
        client = Client(url, token)
        assert client.status(done)["state"] == "succeeded"
        restarted = wait_for(client, long["id"], lambda j: j["state"] == "queued")
        assert restarted["checkpoint_step"] >= 2
        assert "service restarted; resumes from step" in client.logs(long["id"])

        client.upload(d / "cls.jsonl", "train.jsonl")
        text = yaml.safe_dump(job_spec("tiny", "train.jsonl"))
        ids, errors = [], []

        def submit_some(n):
            c = Client(url, token)
            for _ in range(n):
                try:
                    ids.append(c.submit_text(text)["id"])
                except ClientError as e:
                    errors.append(str(e))

        threads = [threading.Thread(target=submit_some, args=(10,)) for _ in range(10)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == [] and len(ids) == 100 and len(set(ids)) == 100
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out

    svc = start_service(state, base, db_url, max_workers=0)
    try:
        client = Client(svc.url, token)
        jobs = {j["id"]: j for j in client.jobs()}
        assert set(ids) | {done, long["id"]} == set(jobs)
        assert all(jobs[i]["state"] == "queued" for i in ids)
        assert jobs[done]["state"] == "succeeded"
        client.fetch(done, tmp_path / "fetched")
        assert (tmp_path / "fetched" / "adapter_model.safetensors").is_file()
        client.cancel(long["id"])
        deadline = time.monotonic() + 30
        while client.status(long["id"])["state"] != "cancelled":
            assert time.monotonic() < deadline
            time.sleep(0.1)
    finally:
        svc.stop()

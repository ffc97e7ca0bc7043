"""Load test of the multi-tenant service under a hostile neighbour and a crash (issue 8, section 2).

    python benchmarks/bench_service_load.py --scratch /tmp/ft-load
    python benchmarks/bench_service_load.py --scratch /tmp/ft-load --submissions 200 --polls 1000 \\
        --out bench-out/service_load.json

Against the real service (``ferrytune serve`` in a subprocess, embedded Ray, SQLite) on
127.0.0.1 only, with a tiny random LLaMA base built under ``--scratch``:

* two tenants: ``alice`` (the neighbour: every job should succeed) and ``mallory``, every
  one of whose jobs is made to fail from outside: a third have their work folder replaced
  by a file (fails when the job joins its worker), a third lose their dataset copy (fails
  in the loader), a third have their work folder replaced once they have trained a step
  (the next checkpoint fails);
* ``--submissions`` jobs (half each) and ``--polls`` status requests in one burst, from a
  bounded thread pool, every request with a timeout and the whole burst with a deadline;
* halfway through the submissions the service is SIGKILLed and restarted on the same
  state dir and port; clients retry a request that found no service (bounded).

Each submission carries a unique ``name``, so a submission whose answer was lost in the
crash and was retried shows up as a duplicate rather than as a loss. Reported: jobs lost
(answered 201, absent or not terminal at the end: target 0), neighbour jobs failed
(alice's jobs not succeeded: target 0), mallory's jobs failed, p50/p99 status latency,
the service process's RSS (fresh, at the kill, at the end) and the Ray processes of the
killed service still alive 10 s after the kill (target 0).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import requests  # noqa: E402
import yaml  # noqa: E402
from _common import machine, print_table, write_json  # noqa: E402

TERMINAL = {"succeeded", "failed", "cancelled"}
REQUEST_TIMEOUT_S = 30.0


def build_tiny_base(out: Path) -> Path:
    """A random 2-layer LLaMA (hidden 32) and a BPE tokenizer trained on the demo data."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from ferrytune.data import demo_data_path

    if (out / "config.json").exists():
        return out
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=["<|endoftext|>", "<s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    lines = [json.loads(x)["text"] for x in demo_data_path("train").read_text().splitlines() if x.strip()]
    bpe.train_from_iterator(lines + [" It was terrible. It was great."] * 20, trainer)
    bpe.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="<|endoftext|>")
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=128,
                         bos_token_id=1, eos_token_id=0, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def cli(*args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "ferrytune.service.cli", *args], capture_output=True, text=True,
                         check=True, cwd=ROOT)
    return out.stdout.strip()


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def descendants(pid: int) -> list[tuple[int, str]]:
    """(pid, start time) of every descendant, from /proc."""
    table = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(entry.path, "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rfind(")") + 2:].split()
            table[int(entry.name)] = (int(fields[1]), fields[19])
    out, stack = [], [pid]
    while stack:
        parent = stack.pop()
        for child, (ppid, start) in table.items():
            if ppid == parent:
                out.append((child, start))
                stack.append(child)
    return out


def alive(procs: list[tuple[int, str]]) -> list[int]:
    left = []
    for pid, start in procs:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        if fields[19] == start and fields[0] != "Z":
            left.append(pid)
    return left


class Server:
    def __init__(self, args, base: Path, port: int):
        self.cmd = [sys.executable, "-m", "ferrytune.service.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
                    "--state-dir", str(args.scratch / "state"), "--base", f"tiny={base}",
                    "--ray-cpus", str(args.ray_cpus), "--max-workers", "1", "--max-jobs-per-worker", "8",
                    "--max-running-jobs", "6", "--worker-memory-gib", "2", "--token-capacity", "512",
                    "--checkpoint-every-steps", "4", "--max-jobs", str(args.submissions)]
        self.url = f"http://127.0.0.1:{port}"
        self.log = open(args.scratch / "serve.log", "ab")
        self.proc: subprocess.Popen | None = None

    def start(self) -> float:
        t0 = time.monotonic()
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        self.proc = subprocess.Popen(self.cmd, cwd=ROOT, env=dict(env, PYTHONPATH=str(ROOT)), stdout=self.log,
                                     stderr=subprocess.STDOUT)
        deadline = t0 + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"serve exited with {self.proc.returncode}; see {self.log.name}")
            try:
                if requests.get(f"{self.url}/v1/health", timeout=2).ok:
                    return time.monotonic() - t0
            except requests.RequestException:
                pass
            time.sleep(0.2)
        raise SystemExit("serve did not come up within 180 s")

    def kill(self) -> list[tuple[int, str]]:
        procs = descendants(self.proc.pid)
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        return procs

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def request(session: requests.Session, method: str, url: str, deadline: float, **kw) -> requests.Response | None:
    """One request; retried (bounded by ``deadline``) only while no service answers."""
    while time.monotonic() < deadline:
        try:
            return session.request(method, url, timeout=REQUEST_TIMEOUT_S, **kw)
        except requests.ConnectionError:
            time.sleep(0.25)
    return None


def sabotage_at_submit(state: Path, tenant: str, job_id: str, how: str) -> None:
    job_dir = state / "tenants" / tenant / "jobs" / job_id
    if how == "work-file":  # rename first: atomic, whatever the worker is writing in it right now
        trash = job_dir / f".work-gone-{time.monotonic_ns()}"
        try:
            os.rename(job_dir / "work", trash)
        except FileNotFoundError:
            pass
        (job_dir / "work").write_bytes(b"")
        shutil.rmtree(trash, ignore_errors=True)
    elif how == "no-data":
        (job_dir / "train.jsonl").unlink(missing_ok=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scratch", type=Path, required=True, help="scratch folder (state dir, base, logs); wiped first")
    ap.add_argument("--out", type=Path, default=ROOT / "bench-out" / "service_load.json")
    ap.add_argument("--submissions", type=int, default=200)
    ap.add_argument("--polls", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=8, help="train.steps of every job")
    ap.add_argument("--threads", type=int, default=8, help="client threads of the burst")
    ap.add_argument("--ray-cpus", type=int, default=2)
    ap.add_argument("--deadline-s", type=float, default=900.0, help="the whole run, burst and drain")
    ap.add_argument("--port", type=int, default=0)
    args = ap.parse_args()
    t_start = time.monotonic()
    deadline = t_start + args.deadline_s
    shutil.rmtree(args.scratch, ignore_errors=True)
    args.scratch.mkdir(parents=True)
    base = build_tiny_base(args.scratch / "base")
    data = args.scratch / "train.jsonl"
    from ferrytune.data import demo_data_path

    shutil.copyfile(demo_data_path("train"), data)
    state = args.scratch / "state"
    tokens = {t: cli("tenants", "add", t, "--state-dir", str(state)) for t in ("alice", "mallory")}
    if not args.port:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            args.port = s.getsockname()[1]
    server = Server(args, base, args.port)
    result: dict = {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                    "machine": machine()}
    try:
        result["start_s"] = server.start()
        time.sleep(2.0)
        rss_fresh = rss_mib(server.proc.pid)
        url = server.url
        sessions = threading.local()

        def session(tenant: str) -> requests.Session:
            key = f"s_{tenant}"
            if not hasattr(sessions, key):
                s = requests.Session()
                s.headers["Authorization"] = f"Bearer {tokens[tenant]}"
                setattr(sessions, key, s)
            return getattr(sessions, key)

        for tenant in tokens:
            r = request(session(tenant), "PUT", f"{url}/v1/files/train.jsonl", deadline, data=data.read_bytes())
            assert r is not None and r.status_code == 201, r and r.text
        submitted: dict[str, dict] = {}  # name -> {"tenant", "ids", "statuses"}
        lock = threading.Lock()
        kinds = ["work-file", "no-data", "mid-run"]
        mid_run: list[str] = []

        def submit(i: int) -> None:
            tenant = "alice" if i % 2 == 0 else "mallory"
            name = f"bench-{tenant}-{i:04d}"
            how = kinds[(i // 2) % 3] if tenant == "mallory" else None
            steps = args.steps * 50 if how == "mid-run" else args.steps  # still running when it is hit
            spec = {"model": "tiny", "name": name, "data": {"train": "train.jsonl", "max_length": 32},
                    "train": {"steps": steps, "batch_size": 4, "lr": 1e-2, "seed": i},
                    "lora": {"rank": 4, "alpha": 8.0, "target_modules": ["q_proj", "v_proj"]}}
            with lock:
                submitted[name] = {"tenant": tenant, "ids": [], "statuses": []}
            r = request(session(tenant), "POST", f"{url}/v1/jobs", deadline, data=yaml.safe_dump(spec))
            with lock:
                submitted[name]["statuses"].append(None if r is None else r.status_code)
            if r is None or r.status_code != 201:
                return
            job_id = r.json()["id"]
            with lock:
                submitted[name]["ids"].append(job_id)
            if tenant == "mallory":
                if how == "mid-run":
                    with lock:
                        mid_run.append(job_id)
                else:
                    sabotage_at_submit(state, tenant, job_id, how)

        latencies: list[float] = []
        poll_errors = {"no_service": 0, "http": 0}

        def poll(_: int) -> None:
            with lock:
                ids = [(v["tenant"], j) for v in submitted.values() for j in v["ids"]]
            if not ids:
                time.sleep(0.01)
                return
            tenant, job_id = random.choice(ids)
            t0 = time.perf_counter()
            try:
                r = session(tenant).get(f"{url}/v1/jobs/{job_id}", timeout=REQUEST_TIMEOUT_S)
            except requests.ConnectionError:
                with lock:
                    poll_errors["no_service"] += 1
                time.sleep(0.05)
                return
            dt = time.perf_counter() - t0
            with lock:
                if r.status_code == 200:
                    latencies.append(dt)
                else:
                    poll_errors["http"] += 1

        stop_watch = threading.Event()

        def watch_mid_run() -> None:
            """mallory's 'mid-run' jobs: replace their work folder once they have trained a step."""
            s = requests.Session()
            s.headers["Authorization"] = f"Bearer {tokens['mallory']}"
            done: set[str] = set()
            while not stop_watch.is_set():
                with lock:
                    todo = [j for j in mid_run if j not in done]
                for job_id in todo:
                    try:
                        job = s.get(f"{url}/v1/jobs/{job_id}", timeout=REQUEST_TIMEOUT_S).json()
                        if job.get("step", 0) >= 1 or job.get("state") in TERMINAL:
                            sabotage_at_submit(state, "mallory", job_id, "work-file")
                            done.add(job_id)
                    except (requests.RequestException, ValueError, OSError):
                        continue
                stop_watch.wait(0.1)

        watcher = threading.Thread(target=watch_mid_run, daemon=True)
        watcher.start()
        kill_info: dict = {}
        t_burst = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(args.threads) as pool:
            half = args.submissions // 2
            work = [pool.submit(submit, i) for i in range(half)]
            work += [pool.submit(poll, i) for i in range(args.polls // 2)]
            concurrent.futures.wait(work)
            kill_info["rss_at_kill_mib"] = rss_mib(server.proc.pid)
            procs = server.kill()
            t_kill = time.monotonic()
            work = [pool.submit(submit, i) for i in range(half, args.submissions)]
            work += [pool.submit(poll, i) for i in range(args.polls // 2, args.polls)]
            kill_info["restart_s"] = server.start()
            kill_info["left_after_kill_10s"] = None
            while time.monotonic() - t_kill < 10:
                time.sleep(0.5)
            kill_info["left_after_kill_10s"] = len(alive(procs))
            kill_info["killed_processes"] = len(procs)
            concurrent.futures.wait(work)
        result["burst_s"] = time.monotonic() - t_burst

        # drain: every stored job reaches a terminal state (bounded)
        final: dict[str, dict] = {}
        while time.monotonic() < deadline:
            final = {}
            for tenant in tokens:
                r = request(session(tenant), "GET", f"{url}/v1/jobs", deadline)
                for j in (r.json()["jobs"] if r is not None and r.ok else []):
                    final[j["id"]] = j
            if all(j["state"] in TERMINAL for j in final.values()):
                break
            time.sleep(1.0)
        stop_watch.set()
        watcher.join(timeout=10)
        result["drain_done_s"] = time.monotonic() - t_burst
        time.sleep(2.0)
        rss_after = rss_mib(server.proc.pid)

        answered = {n: v for n, v in submitted.items() if v["ids"]}
        lost = [j for v in answered.values() for j in v["ids"] if j not in final]
        unfinished = [j for j in final.values() if j["state"] not in TERMINAL]
        names = [j["name"] for j in final.values()]
        duplicates = sum(names.count(n) - 1 for n in set(names))
        never = [n for n, v in submitted.items() if not v["ids"]]
        by_tenant = {t: [final[j] for v in answered.values() if v["tenant"] == t for j in v["ids"] if j in final]
                     for t in tokens}
        alice_bad = [j for j in by_tenant["alice"] if j["state"] != "succeeded"]
        mallory_failed = [j for j in by_tenant["mallory"] if j["state"] == "failed"]
        alice_ids = {j["id"] for j in by_tenant["alice"]}
        leaks = [j for j in mallory_failed + alice_bad if j["error"] and (
            str(args.scratch) in j["error"] or str(ROOT) in j["error"]
            or ("alice" in j["error"] and j in mallory_failed) or ("mallory" in j["error"] and j in alice_bad)
            or (j in mallory_failed and any(a in j["error"] for a in alice_ids)))]
        lat = sorted(latencies)
        p = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] * 1e3 if lat else float("nan")  # noqa: E731
        result.update({
            "submissions": args.submissions, "answered_201": sum(len(v["ids"]) for v in answered.values()),
            "not_stored_gave_up": len(never), "duplicates_after_retry": duplicates,
            "jobs_lost": len(lost), "lost_ids": lost, "not_terminal_at_deadline": len(unfinished),
            "neighbour_jobs": len(by_tenant["alice"]), "neighbour_jobs_failed": len(alice_bad),
            "neighbour_failures": [{"id": j["id"], "state": j["state"], "error": j["error"]} for j in alice_bad],
            "injected_jobs": len(by_tenant["mallory"]), "injected_jobs_failed": len(mallory_failed),
            "injected_errors_sample": sorted({j["error"] for j in mallory_failed})[:6],
            "errors_with_a_path_or_other_tenant": len(leaks),
            "polls_ok": len(lat), "poll_errors": poll_errors,
            "status_p50_ms": p(0.50), "status_p99_ms": p(0.99),
            "status_mean_ms": statistics.fmean(lat) * 1e3 if lat else float("nan"),
            "rss_fresh_mib": rss_fresh, "rss_after_mib": rss_after, **kill_info,
        })
    finally:
        server.stop()
    result["total_s"] = time.monotonic() - t_start
    print_table(["metric", "value", "target"], [
        ["submissions (answered 201)", f"{result['submissions']} ({result['answered_201']})", ""],
        ["jobs lost (201, then gone)", result["jobs_lost"], 0],
        ["jobs not finished by the deadline", result["not_terminal_at_deadline"], 0],
        ["neighbour jobs failed", f"{result['neighbour_jobs_failed']} of {result['neighbour_jobs']}", 0],
        ["injected jobs failed", f"{result['injected_jobs_failed']} of {result['injected_jobs']}", "all"],
        ["errors naming a path / another tenant", result["errors_with_a_path_or_other_tenant"], 0],
        ["duplicates after a retried submission", result["duplicates_after_retry"], ""],
        ["status polls ok (no service / http errors)",
         f"{result['polls_ok']} ({result['poll_errors']['no_service']} / {result['poll_errors']['http']})", ""],
        ["status p50 / p99 ms", f"{result['status_p50_ms']:.1f} / {result['status_p99_ms']:.1f}", ""],
        ["service RSS fresh / at kill / after restart+drain MiB",
         f"{result['rss_fresh_mib']:.0f} / {result['rss_at_kill_mib']:.0f} / {result['rss_after_mib']:.0f}", ""],
        ["Ray processes of the killed service alive 10 s later",
         f"{result['left_after_kill_10s']} of {result['killed_processes']}", 0],
        ["restart to healthy s", f"{result['restart_s']:.1f}", ""],
        ["burst / burst+drain s", f"{result['burst_s']:.0f} / {result['drain_done_s']:.0f}", ""],
    ], title="service load test: 2 tenants, one failing by injection, one kill -9 and restart")
    write_json(args.out, result)


if __name__ == "__main__":
    main()

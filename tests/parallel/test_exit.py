"""A torchrun run that trained exits 0: no process group, thread or pool outlives ``main``."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from dist_testlib import REPO, config_dict, free_port, rank_env, write_config

LORA = {"method": "lora", "train": {"steps": 2, "batch_size": 4, "micro_batch_size": 2, "seed": 5, "lr": 1e-2},
        "lora": {"rank": 4, "target_modules": ["q_proj", "v_proj"]}}
ZO = {"train": {"steps": 2, "batch_size": 4, "micro_batch_size": 2, "seed": 5, "lr": 1e-3}}
REPEATS = 10


@pytest.fixture(scope="module")
def model(tiny_models):
    return tiny_models("llama", layers=2, hidden=32)


def _torchrun(script_args: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()), *script_args]
    return subprocess.run(cmd, cwd=REPO, env=rank_env(), capture_output=True, text=True, timeout=180, check=False)


@pytest.mark.parametrize("method", ["lora", "zo"])
def test_no_native_thread_outlives_a_data_parallel_run(model, tmp_path, method):
    d = config_dict(model, tmp_path / "run", **(LORA if method == "lora" else ZO), parallel={"data": 2})
    cfg = write_config(d, tmp_path / "cfg.yaml")
    probe = str(REPO / "tests" / "parallel" / "exit_probe.py")
    proc = _torchrun([probe, str(tmp_path), str(cfg)])
    assert proc.returncode == 0, proc.stderr[-4000:]
    for rank in range(2):
        report = json.loads((tmp_path / f"threads-{rank}.json").read_text())
        assert report["rc"] == 0
        # the interpreter's own thread only: no gloo loop (pt_gloo_runloop, gloo_tcp_loop), no
        # TCPStore client loop, no loader/writer pool of the streamer
        assert report["threads"] == ["python"], (rank, report["threads"])


def test_repeated_data_parallel_runs_all_exit_zero(model, tmp_path):
    """The abort at exit was intermittent: ten LoRA and ten ZO launches in a row, every one exits 0."""
    configs = {m: write_config(config_dict(model, tmp_path / m, **(LORA if m == "lora" else ZO),
                                           parallel={"data": 2}), tmp_path / f"{m}.yaml") for m in ("lora", "zo")}
    failed = []
    for i in range(REPEATS):
        for method, cfg in configs.items():
            proc = _torchrun(["-m", "ferrytune.launch.train", str(cfg), "--set", f"output_dir={tmp_path / method / str(i)}"])
            if proc.returncode != 0:
                failed.append((method, i, proc.returncode, proc.stderr[-1500:]))
    assert not failed, failed

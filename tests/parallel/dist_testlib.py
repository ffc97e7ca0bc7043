"""Helpers for the distributed tests: configs as YAML files, torchrun launches, result readers.

A plain module (not conftest.py) with a unique name: test folders have no __init__.py.
Every rank runs with one thread (``OMP_NUM_THREADS=1``: two shared cores), and so does the
in-process reference (``run_single``), whatever the suite's own thread count: a GEMM may sum in
another order with another thread count, and these tests compare bit for bit.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from ferrytune.config import config_from_dict
from ferrytune.data import demo_data_path

REPO = Path(__file__).resolve().parents[2]
LAUNCH_TIMEOUT_S = 180


def config_dict(model_path: str, output_dir: Path, **sections) -> dict:
    """A small ZO job on the demo data (batch 8 in micro-batches of 2); ``sections`` merge over it."""
    d = {
        "method": "zo",
        "model": {"path": model_path},
        "data": {"train": str(demo_data_path("train")), "max_length": 32},
        "train": {"steps": 3, "batch_size": 8, "micro_batch_size": 2, "seed": 5, "lr": 1e-3},
        "zo": {"eps": 1e-3},
        "offload": {"tier": "host"},
        "output_dir": str(output_dir),
        "resume": "never",
    }
    for key, val in sections.items():
        if isinstance(val, dict) and isinstance(d.get(key), dict):
            d[key] = {**d[key], **copy.deepcopy(val)}
        else:
            d[key] = copy.deepcopy(val)
    return d


def write_config(d: dict, path: Path) -> Path:
    config_from_dict(d)  # validate here: a bad test config should fail in the test, not in a rank
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(**extra: str) -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    env.update(extra)
    return env


def torchrun(cfg_path: Path, nproc: int, *args: str, timeout_s: float = LAUNCH_TIMEOUT_S,
             check: bool = True) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --nproc-per-node N -m ferrytune.launch.train CFG ARGS``."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
           "-m", "ferrytune.launch.train", str(cfg_path), *args]
    proc = subprocess.run(cmd, cwd=REPO, env=rank_env(), capture_output=True, text=True, timeout=timeout_s,
                          check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def start_rank(cfg_path: Path, *, rank: int, world: int, port: int, args: tuple[str, ...] = (),
               log: Path | None = None) -> subprocess.Popen:
    """One rank started by hand (the env:// rendezvous torchrun would set up), for per-rank configs and kills."""
    env = rank_env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cmd = [sys.executable, "-m", "ferrytune.launch.train", str(cfg_path), *args]
    if log is None:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    with open(log, "w") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)


def run_single(d: dict):
    """The 1-process reference, in this process, with the ranks' one thread."""
    from ferrytune.launch.train import run

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run(config_from_dict(d), progress=False)
    finally:
        torch.set_num_threads(before)


def weights(folder: Path) -> dict[str, torch.Tensor]:
    files = sorted(Path(folder).glob("*.safetensors"))
    assert files, f"no safetensors in {folder}"
    out = {}
    for f in files:
        out.update(load_file(str(f)))
    return out


def metric_losses(output_dir: Path) -> list[float]:
    lines = (Path(output_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(ln)["loss"] for ln in lines if ln.strip() and "loss" in json.loads(ln)]


def metrics(output_dir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (Path(output_dir) / "metrics.jsonl").read_text().splitlines() if ln.strip()]


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    diff = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not diff, f"{len(diff)} tensors differ, e.g. {diff[:3]}: max |Δ| " \
                     f"{max((wa[k] - wb[k]).abs().max().item() for k in diff):.3e}"


def max_abs_diff(a: Path, b: Path) -> float:
    wa, wb = weights(a), weights(b)
    return max((wa[k].double() - wb[k].double()).abs().max().item() for k in wa)

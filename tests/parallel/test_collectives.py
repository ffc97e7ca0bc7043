"""Every collective takes its tensor where the backend wants it (nccl: the GPU), through one function."""

from __future__ import annotations

import ast
import os
import sys
from pathlib import Path

import pytest
import torch

from ferrytune.parallel import Mesh, placed

ROOT = Path(__file__).resolve().parents[2] / "ferrytune"
COLLECTIVES = {"all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "broadcast_object_list",
               "reduce_scatter", "reduce_scatter_tensor", "all_to_all", "gather", "scatter", "reduce"}


def test_gloo_collectives_use_the_tensor_itself():
    t = torch.ones(3, dtype=torch.float64)
    assert placed(t, Mesh(world_size=2, comm_device="cpu")) is t


def test_nccl_collectives_move_a_cpu_tensor_to_the_gpu():
    mesh = Mesh(world_size=2, comm_device="cuda:0")
    if torch.cuda.is_available():
        assert placed(torch.ones(3), mesh).device == torch.device("cuda:0")
    else:  # the move is attempted: without CUDA it is the move that fails, not nccl on a CPU tensor
        with pytest.raises((AssertionError, RuntimeError), match="CUDA|cuda"):
            placed(torch.ones(3), mesh)


def test_only_the_mesh_and_the_sliced_home_issue_collectives():
    """Trainers, engines and the agreement check go through parallel/_mesh.py's functions (which place
    their tensors); the sliced home gathers into device buffers of its own."""
    found = []
    for path in sorted(ROOT.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in COLLECTIVES and isinstance(node.func.value, ast.Name)
                    and node.func.value.id == "dist"):
                found.append(str(path.relative_to(ROOT)))
    assert found and set(found) <= {"parallel/_mesh.py", "parallel/_sliced.py"}, found


NCCL_SCRIPT = """
import os, torch
from ferrytune.config import ParallelConfig
from ferrytune.parallel import init_mesh, all_reduce_sum_, all_gather_tensor, broadcast_object, shutdown
mesh = init_mesh(ParallelConfig(data=2, backend="nccl"), device="cuda")
assert mesh.comm_device.startswith("cuda")
t = torch.tensor([1.0 + mesh.rank], dtype=torch.float64)  # a CPU loss table, as the trainers build it
all_reduce_sum_(t, mesh)
assert t.device.type == "cpu" and t.item() == 3.0
g = all_gather_tensor(torch.tensor([mesh.rank]), mesh)
assert [int(x) for x in g] == [0, 1] and g[0].device.type == "cpu"
assert broadcast_object({"a": mesh.rank}, mesh) == {"a": 0}
shutdown(mesh)
"""


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices for an nccl group of 2")
def test_nccl_collectives_on_cpu_tables(tmp_path):
    import subprocess

    script = tmp_path / "nccl.py"
    script.write_text(NCCL_SCRIPT)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", str(script)],
                          capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr[-3000:]

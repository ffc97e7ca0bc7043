"""Shared fixtures: tiny real HF models (random weights, a trained BPE tokenizer) and configs."""

from __future__ import annotations

import contextlib
import copy
import os

import pytest
import torch

from ferrytune.config import config_from_dict
from ferrytune.data import demo_data_path

# No thread count is pinned here: the suite runs with whatever OMP_NUM_THREADS says (unset, as a
# user runs it, and 1 in CI's second pass). Two runs compared bit for bit inside one process use the
# same count; a test that compares with another process (torchrun ranks, a Ray worker) runs its
# reference with that process's count through ``torch_threads``.


@contextlib.contextmanager
def _torch_threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def torch_threads():
    """``with torch_threads(1): ...`` runs a block with torch's intra-op threads set to ``n``."""
    return _torch_threads


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Build tiny models lazily, one folder per (arch, options), shared by the whole session."""
    from ferrytune.launch._demo import build_tiny_model

    root = tmp_path_factory.mktemp("models")
    cache: dict = {}

    def get(arch: str = "llama", **kw) -> str:
        key = (arch, tuple(sorted(kw.items())))
        if key not in cache:
            name = arch + "".join(f"-{k}{v}" for k, v in sorted(kw.items()))
            cache[key] = str(build_tiny_model(root / name, arch=arch, **kw))
        return cache[key]

    return get


def make_config(model_path: str, output_dir, **sections):
    """A small ZO config on the demo data; ``sections`` deep-merge over the defaults."""
    base = {
        "method": "zo",
        "model": {"path": model_path},
        "data": {"train": str(demo_data_path("train")), "eval": str(demo_data_path("dev")), "eval_samples": 16},
        "train": {"steps": 3, "batch_size": 4, "seed": 3, "lr": 1e-3},
        "zo": {"eps": 1e-3},
        "output_dir": str(output_dir),
        "resume": "never",
    }
    merged = copy.deepcopy(base)
    for key, val in sections.items():
        if isinstance(val, dict) and isinstance(merged.get(key), dict):
            merged[key].update(val)
        else:
            merged[key] = val
    return config_from_dict(merged)


@pytest.fixture
def cfg_factory(tmp_path):
    counter = iter(range(1000))

    def make(model_path: str, **sections):
        out = tmp_path / f"run{next(counter)}"
        if "offload" in sections and sections["offload"].get("tier") == "nvme":
            sections["offload"].setdefault("nvme_dir", str(out / "nvme"))
        return make_config(model_path, out, **sections)

    return make


def pytest_configure(config):
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    """``@pytest.mark.cuda`` tests skip, saying why, where there is no CUDA device: never faked on CPU."""
    if torch.cuda.is_available():
        return
    why = ("not built with CUDA" if torch.version.cuda is None else "built with CUDA, but no device is visible")
    skip = pytest.mark.skip(reason=f"needs a CUDA device: torch {torch.__version__} is {why}; "
                                   "benchmarks/gpu_check.sh runs these on a GPU machine")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)

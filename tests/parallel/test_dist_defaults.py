"""torchrun with no parallel setting, ``batch_size: 8`` and no ``micro_batch_size``: data parallel over
the 2 processes (4 rows per rank), equal to one process.

Bit for bit against one process with ``micro_batch_size: 4`` (the same arithmetic: every unit runs on
the same 4-row slices; ZO's loss table gets each entry from exactly one rank, LoRA's all-reduce adds
the same two gradients the single process accumulates, a + b == b + a). Against one process with
the default micro-batch (one forward of all 8 rows) the matmul shapes differ, so the bound of
``test_dist_zo.py`` applies: losses within relative 1e-5, weights within 1e-5 after 3 steps.
"""

from __future__ import annotations

import pytest
from dist_testlib import (assert_same_weights, config_dict, max_abs_diff, metric_losses, metrics, run_single, torchrun,
                          write_config)

DEFAULTS = {"steps": 3, "batch_size": 8, "seed": 5, "lr": 1e-3}  # no micro_batch_size, and no parallel section


@pytest.fixture(scope="module")
def model(tiny_models):
    return tiny_models("llama", layers=2, hidden=32)


def _no_parallel(d: dict) -> dict:
    d["train"].pop("micro_batch_size", None)
    assert "parallel" not in d
    return d


def test_zo_torchrun_without_parallel_settings_is_data_parallel(model, tmp_path):
    d = _no_parallel(config_dict(model, tmp_path / "dp", train=DEFAULTS))
    torchrun(write_config(d, tmp_path / "dp.yaml"), 2)
    ref = config_dict(model, tmp_path / "ref", train={**DEFAULTS, "micro_batch_size": 4})
    run_single(ref)
    assert_same_weights(tmp_path / "ref" / "final", tmp_path / "dp" / "final")
    assert metric_losses(tmp_path / "dp") == metric_losses(tmp_path / "ref")
    resolved = __import__("json").loads((tmp_path / "dp" / "config.json").read_text())
    assert (resolved["parallel"]["data"], resolved["train"]["micro_batch_size"]) == (2, 4)

    whole = _no_parallel(config_dict(model, tmp_path / "whole", train=DEFAULTS))
    run_single(whole)
    assert metric_losses(tmp_path / "dp") == pytest.approx(metric_losses(tmp_path / "whole"), rel=1e-5, abs=0)
    assert max_abs_diff(tmp_path / "dp" / "final", tmp_path / "whole" / "final") < 1e-5


def test_lora_torchrun_without_parallel_settings_is_data_parallel(model, tmp_path):
    lora = {"method": "lora", "train": {**DEFAULTS, "lr": 1e-2}, "lora": {"rank": 4, "target_modules": ["q_proj", "v_proj"]}}
    d = _no_parallel(config_dict(model, tmp_path / "ddp", **lora))
    torchrun(write_config(d, tmp_path / "ddp.yaml"), 2)
    ref = config_dict(model, tmp_path / "ref", **{**lora, "train": {**lora["train"], "micro_batch_size": 4}})
    run_single(ref)
    assert_same_weights(tmp_path / "ref" / "final", tmp_path / "ddp" / "final")
    assert metric_losses(tmp_path / "ddp") == metric_losses(tmp_path / "ref")
    assert all(r.get("tokens_per_s", 1) > 0 for r in metrics(tmp_path / "ddp"))

    # LoRA with one forward of 8 rows: other matmul shapes and loss sums, so equal within float32
    # rounding of the gradients, carried through 3 AdamW steps of lr 1e-2 (a step moves a weight
    # by about lr whatever the gradient's last bits, so the bound is loose on purpose).
    whole = _no_parallel(config_dict(model, tmp_path / "whole", **lora))
    run_single(whole)
    assert metric_losses(tmp_path / "ddp") == pytest.approx(metric_losses(tmp_path / "whole"), rel=1e-5, abs=0)
    assert max_abs_diff(tmp_path / "ddp" / "final", tmp_path / "whole" / "final") < 1e-3


def test_explicit_settings_that_contradict_the_world_size_keep_their_error(model, tmp_path):
    d = config_dict(model, tmp_path / "bad", train=DEFAULTS, parallel={"data": 1})
    d["train"].pop("micro_batch_size", None)
    proc = torchrun(write_config(d, tmp_path / "bad.yaml"), 2, check=False)
    assert proc.returncode != 0
    assert "parallel.data x parallel.perturbation = 1 x 1 = 1 but 2 process(es) were started" in proc.stderr

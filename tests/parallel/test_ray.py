"""``ferrytune train CONFIG --ray``: Ray Train starts the ranks; the result equals the single-process run."""

from __future__ import annotations

import pytest
from dist_testlib import assert_same_weights, config_dict, metric_losses, run_single

pytest.importorskip("ray.train")


def test_two_ray_workers_perturbation_parallel_equal_single_process(tiny_models, tmp_path):
    from ferrytune.config import config_from_dict
    from ferrytune.launch import run_on_ray

    model = tiny_models("llama", layers=2, hidden=32)
    ref = config_dict(model, tmp_path / "ref")
    run_single(ref)
    d = config_dict(model, tmp_path / "ray", parallel={"perturbation": 2, "check_every_steps": 1})
    assert run_on_ray(config_from_dict(d)) == 0  # an embedded local Ray, started and stopped here
    assert_same_weights(tmp_path / "ref" / "final", tmp_path / "ray" / "final")
    assert metric_losses(tmp_path / "ray") == metric_losses(tmp_path / "ref")

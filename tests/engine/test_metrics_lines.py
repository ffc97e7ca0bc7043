"""metrics.jsonl as a time-to-accuracy record: a zero-shot eval line at step 0, wall_s on every line."""

from __future__ import annotations

import json

import pytest

from ferrytune.launch.train import run


def _lines(cfg) -> list[dict]:
    return [json.loads(ln) for ln in open(f"{cfg.output_dir}/metrics.jsonl")]


@pytest.mark.parametrize("method", ["zo", "lora"])
def test_step_zero_eval_and_wall_clock(tiny_models, cfg_factory, method):
    path = tiny_models("llama", layers=2, hidden=32)
    cfg = cfg_factory(path, method=method, train={"steps": 4, "eval_every_steps": 2, "checkpoint_every_steps": 2,
                                                  "lr": 1e-3 if method == "zo" else 1e-2})
    res = run(cfg, progress=False)
    lines = _lines(cfg)
    evals = [r for r in lines if "eval_accuracy" in r]
    assert [r["step"] for r in evals] == [0, 2, 4]  # zero-shot, the cadence, the final evaluation
    assert evals[0]["eval_samples"] == 16 and evals[-1]["eval_accuracy"] == res.eval["eval_accuracy"]
    walls = [r["wall_s"] for r in lines]
    assert walls == sorted(walls) and walls[0] >= 0

    # A resumed run continues the clock: its lines come after the kept ones.
    kept_until = next(r["wall_s"] for r in lines if r["step"] == 2 and "loss" in r)
    run(cfg.model_copy(update={"resume": f"{cfg.output_dir}/checkpoints/step-000002"}), progress=False)
    again = _lines(cfg)
    assert [r["step"] for r in again if "eval_accuracy" in r] == [0, 2, 4]  # no second zero-shot line
    assert all(r["wall_s"] > kept_until for r in again if r["step"] > 2)

"""Ranks that diverge or die: loud, clean failures, an intact checkpoint, and resume on another world size."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
from dist_testlib import assert_same_weights, config_dict, free_port, metrics, run_single, start_rank, write_config

from ferrytune.engine._checkpoint import list_checkpoints, read_state
from ferrytune.parallel import disagreeing_ranks

TIMEOUT_S = 20  # the collective timeout given to the ranks (--collective-timeout-s)


@pytest.fixture(scope="module")
def model(tiny_models):
    return tiny_models("llama", layers=2, hidden=32)


def test_disagreeing_ranks_names_every_rank_that_differs_from_rank_0():
    assert disagreeing_ranks([[4, 7], [4, 7], [4, 7]]) == []
    assert disagreeing_ranks([[4, 7], [4, 8], [4, 7], [5, 7]]) == [1, 3]


def test_a_rank_with_another_eps_is_caught_at_the_next_check(model, tmp_path):
    """Rank 1 gets its own config file (zo.eps differs): both ranks stop at step 2 and name rank 1."""
    par = {"data": 2, "check_every_steps": 2}
    good = config_dict(model, tmp_path / "run", parallel=par, train={"steps": 6})
    bad = config_dict(model, tmp_path / "run", parallel=par, train={"steps": 6}, zo={"eps": 2e-3})
    port = free_port()
    procs = [start_rank(write_config(c, tmp_path / f"rank{r}.yaml"), rank=r, world=2, port=port,
                        log=tmp_path / f"rank{r}.log") for r, c in enumerate([good, bad])]
    codes = [p.wait(timeout=180) for p in procs]
    logs = [(tmp_path / f"rank{r}.log").read_text() for r in range(2)]
    assert codes == [2, 2], logs
    for log in logs:
        err = [ln for ln in log.splitlines() if ln.startswith("ferrytune: error:")]
        assert len(err) == 1 and "ranks disagree at step 2" in err[0] and "rank(s) 1 differ" in err[0], log
    assert not list_checkpoints(tmp_path / "run")  # stopped before any checkpoint of the diverged state


def _wait_for_checkpoint(output_dir, proc, *, min_step: int, timeout_s: float = 120) -> int:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        ck = list_checkpoints(output_dir)
        if ck and ck[-1][0] >= min_step:
            return ck[-1][0]
        assert proc.poll() is None, "rank 0 ended before the kill"
        time.sleep(0.05)
    raise AssertionError("no checkpoint in time")


def test_killed_rank_fails_the_job_cleanly_and_resume_on_one_process_matches(model, tmp_path):
    """SIGKILL rank 1 of 2 mid-run: rank 0 exits non-zero within the collective timeout with one error
    line; the latest checkpoint loads; resuming it on 1 process equals the uninterrupted run."""
    out = tmp_path / "run"
    d = config_dict(model, out, parallel={"data": 2}, train={"steps": 5000, "checkpoint_every_steps": 2})
    cfg = write_config(d, tmp_path / "job.yaml")
    port = free_port()
    args = ("--collective-timeout-s", str(TIMEOUT_S))
    procs = [start_rank(cfg, rank=r, world=2, port=port, args=args, log=tmp_path / f"rank{r}.log") for r in range(2)]
    try:
        _wait_for_checkpoint(out, procs[0], min_step=4)
        os.kill(procs[1].pid, signal.SIGKILL)
        killed_at = time.monotonic()
        code = procs[0].wait(timeout=TIMEOUT_S + 60)
        waited = time.monotonic() - killed_at
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    log = (tmp_path / "rank0.log").read_text()
    assert code == 2, log
    assert waited < TIMEOUT_S + 15, waited  # gloo sees the closed socket at once; the timeout is the backstop
    assert any(ln.startswith("ferrytune: error: rank 0:") for ln in log.splitlines()), log

    step, ckpt = list_checkpoints(out)[-1]
    assert read_state(ckpt)["step"] == step and read_state(ckpt)["world_size"] == 2
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(ckpt)  # an intact HF folder

    target = step + 2
    resumed = config_dict(model, out, resume="auto", train={"steps": target})
    run_single(resumed)
    ref = config_dict(model, tmp_path / "ref", train={"steps": target})
    run_single(ref)
    assert_same_weights(tmp_path / "ref" / "final", out / "final")
    losses = {r["step"]: r["loss"] for r in metrics(out) if "loss" in r and r["step"] > step}
    ref_losses = {r["step"]: r["loss"] for r in metrics(tmp_path / "ref") if "loss" in r and r["step"] > step}
    assert losses == ref_losses and len(losses) == 2
    log_steps = [json.loads(ln)["step"] for ln in (out / "zo_log.jsonl").read_text().splitlines()]
    assert log_steps == list(range(target))  # the (seed, g) log has one line per step, none twice

"""Distributed ZO under real torchrun + gloo equals the single-process run, bit for bit.

Why bit-identity is expected (docs/distributed.md): each entry of the (2q, M) table
of per-micro-batch loss sums is computed by exactly one rank, with the same row
arithmetic as a single process whose ``micro_batch_size`` is the per-rank one, and
all other ranks contribute exact zeros to its SUM all-reduce; z is counter-based.
"""

from __future__ import annotations

import pytest
import torch
from dist_testlib import (
    assert_same_weights,
    config_dict,
    max_abs_diff,
    metric_losses,
    run_single,
    torchrun,
    write_config,
)

from ferrytune.errors import ConfigError
from ferrytune.parallel import init_mesh

CHECK = {"check_every_steps": 1}  # the rank-agreement check runs (and must pass) after every step


@pytest.fixture(scope="module")
def model(tiny_models):
    return tiny_models("llama", layers=2, hidden=32)


def test_perturbation_parallel_two_ranks_equals_single_process(model, tmp_path):
    zo = {"eps": 1e-3, "num_perturbations": 2}
    ref = config_dict(model, tmp_path / "ref", zo=zo)
    run_single(ref)
    d = config_dict(model, tmp_path / "pertp", zo=zo, parallel={"perturbation": 2, **CHECK})
    torchrun(write_config(d, tmp_path / "pertp.yaml"), 2)
    assert_same_weights(tmp_path / "ref" / "final", tmp_path / "pertp" / "final")
    assert metric_losses(tmp_path / "pertp") == metric_losses(tmp_path / "ref")
    assert (tmp_path / "pertp" / "zo_log.jsonl").read_text() == (tmp_path / "ref" / "zo_log.jsonl").read_text()


def test_data_parallel_two_ranks_equals_single_process_batch_2b(model, tmp_path):
    # per rank: B = 4 rows (2 micro-batches of 2); single process: batch 2B = 8, micro_batch_size 2
    ref = config_dict(model, tmp_path / "ref")
    run_single(ref)
    d = config_dict(model, tmp_path / "dp", parallel={"data": 2, **CHECK})
    torchrun(write_config(d, tmp_path / "dp.yaml"), 2)
    assert_same_weights(tmp_path / "ref" / "final", tmp_path / "dp" / "final")
    assert metric_losses(tmp_path / "dp") == metric_losses(tmp_path / "ref")

    # With the default micro_batch_size (one forward of all 8 rows) the arithmetic differs
    # (matmul blocking over more rows, loss sums in another order): equal within float32 rounding.
    whole = config_dict(model, tmp_path / "whole", train={"micro_batch_size": None})
    run_single(whole)
    losses_dp, losses_whole = metric_losses(tmp_path / "dp"), metric_losses(tmp_path / "whole")
    assert losses_dp == pytest.approx(losses_whole, rel=1e-5, abs=0)
    # Bound: |Δg| <= rel 1e-5 * L / (2 eps) per step, times lr * |z| (< 6): < 1e-5 over 3 steps here.
    assert max_abs_diff(tmp_path / "dp" / "final", tmp_path / "whole" / "final") < 1e-5


def test_2d_four_ranks_equals_single_process(model, tmp_path):
    ref = config_dict(model, tmp_path / "ref")
    run_single(ref)
    d = config_dict(model, tmp_path / "2d", parallel={"data": 2, "perturbation": 2, **CHECK})
    torchrun(write_config(d, tmp_path / "2d.yaml"), 4)
    assert_same_weights(tmp_path / "ref" / "final", tmp_path / "2d" / "final")
    assert metric_losses(tmp_path / "2d") == metric_losses(tmp_path / "ref")


@pytest.mark.parametrize("parallel", [{"perturbation": 2}, {"data": 2}], ids=["pertp", "dp"])
def test_sparse_zo_two_ranks_equals_single_process(model, tmp_path, parallel):
    # zo.block_fraction: every rank draws the same blocks from (seed, step); zo.mask_fraction: every rank
    # takes the same thresholds from the same initial weights. PertP and DP still hold the single
    # process's weights bit for bit.
    zo = {"block_fraction": 0.5, "mask_fraction": 0.5}
    ref = config_dict(model, tmp_path / "ref", zo=zo)
    run_single(ref)
    d = config_dict(model, tmp_path / "dist", zo=zo, parallel={**parallel, **CHECK})
    torchrun(write_config(d, tmp_path / "dist.yaml"), 2)
    assert_same_weights(tmp_path / "ref" / "final", tmp_path / "dist" / "final")
    assert metric_losses(tmp_path / "dist") == metric_losses(tmp_path / "ref")


def test_fzoo_data_parallel_two_ranks_equals_single_process(model, tmp_path):
    # zo.estimator fzoo: the (1+N, M) table of f(θ) and f(θ+εz_k) sums is filled and all-reduced like
    # MeZO's; σ and the coefficients are computed from it on every rank alike.
    zo = {"estimator": "fzoo", "distribution": "rademacher", "num_perturbations": 3, "eps": 1e-2}
    ref = config_dict(model, tmp_path / "ref", zo=zo)
    run_single(ref)
    d = config_dict(model, tmp_path / "dp", zo=zo, parallel={"data": 2, **CHECK})
    torchrun(write_config(d, tmp_path / "dp.yaml"), 2)
    assert_same_weights(tmp_path / "ref" / "final", tmp_path / "dp" / "final")
    assert metric_losses(tmp_path / "dp") == metric_losses(tmp_path / "ref")
    assert (tmp_path / "dp" / "zo_log.jsonl").read_text() == (tmp_path / "ref" / "zo_log.jsonl").read_text()


def test_hizoo_data_parallel_two_ranks_equals_single_process(model, tmp_path):
    # zo.estimator hizoo on the full model: the (2q+1, M) table (f(θ) in the last row) is all-reduced
    # like MeZO's; every rank streams its own H and updates it from the same D_k alike.
    zo = {"estimator": "hizoo", "eps": 1e-2, "hessian_smooth": 0.3}
    ref = config_dict(model, tmp_path / "ref", zo=zo)
    run_single(ref)
    d = config_dict(model, tmp_path / "dp", zo=zo, parallel={"data": 2, **CHECK})
    torchrun(write_config(d, tmp_path / "dp.yaml"), 2)
    assert_same_weights(tmp_path / "ref" / "final", tmp_path / "dp" / "final")
    assert metric_losses(tmp_path / "dp") == metric_losses(tmp_path / "ref")
    assert (tmp_path / "dp" / "zo_log.jsonl").read_text() == (tmp_path / "ref" / "zo_log.jsonl").read_text()


@pytest.mark.parametrize("optimizer", ["adamw", "adam_mini", "sgd_sai"])
def test_lora_data_parallel_two_ranks_equals_single_process(model, tmp_path, optimizer):
    # batch 4 in micro-batches of 2: one micro-batch per rank, so the gradient all-reduce adds
    # the same two tensors the single process accumulates (a + b == b + a): bit-identical; every
    # rank then steps its own optimizer on the same reduced gradient (SGD-SaI: the same scales).
    lr = 1e-3 if optimizer == "sgd_sai" else 1e-2
    lora = {"method": "lora", "train": {"steps": 3, "batch_size": 4, "micro_batch_size": 2, "seed": 5, "lr": lr,
                                        "optimizer": optimizer},
            "lora": {"rank": 4, "target_modules": ["q_proj", "v_proj"]}}
    ref = config_dict(model, tmp_path / "ref", **lora)
    run_single(ref)
    d = config_dict(model, tmp_path / "ddp", **lora, parallel={"data": 2, **CHECK})
    torchrun(write_config(d, tmp_path / "ddp.yaml"), 2)
    a = tmp_path / "ref" / "final" / "adapter_model.safetensors"
    b = tmp_path / "ddp" / "final" / "adapter_model.safetensors"
    assert_same_weights(a.parent, b.parent)
    assert metric_losses(tmp_path / "ddp") == metric_losses(tmp_path / "ref")
    # the adapters moved: a broken all-reduce (or none) would not give the reference's values
    from safetensors.torch import load_file
    assert any(t.abs().sum() > 0 for k, t in load_file(str(a)).items() if "lora_B" in k)


def test_init_mesh_rejects_a_world_size_that_does_not_match(model, tmp_path):
    from ferrytune.config import config_from_dict

    cfg = config_from_dict(config_dict(model, tmp_path / "x", parallel={"data": 2}))
    with pytest.raises(ConfigError, match="torchrun --nproc-per-node 2"):
        init_mesh(cfg.parallel, device="cpu")
    assert torch.distributed.is_initialized() is False

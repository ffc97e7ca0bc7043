"""Layer-wise sparse ZO (LeZO, ``zo.block_fraction``) against a plain loop, across tiers, resume and replay."""

from __future__ import annotations

import json
import random
import re

import pytest
import torch
from safetensors.torch import load_file

from mezo_testlib import PlainSetup, assert_resume_and_replay_rebuild

from ferrytune.engine import active_blocks
from ferrytune.errors import ConfigError
from ferrytune.kernels import PerturbKey, add_perturbation_
from ferrytune.launch.train import run

LAYERS = 4
BLOCKS = ["outer"] + [f"layer.{i}" for i in range(LAYERS)]


def _drawn(seed: int, step: int, fraction: float) -> set[str]:
    """The draw as documented (docs/config.md, zo.block_fraction), written out plainly."""
    n = max(1, round(fraction * len(BLOCKS)))
    return set(random.Random(f"ferrytune-block-sparsity:{seed}:{step}").sample(sorted(BLOCKS), n))


def _block_of(name: str) -> str:
    m = re.search(r"\.layers\.(\d+)\.", name)
    return f"layer.{m.group(1)}" if m else "outer"


def _reference_lezo(cfg) -> tuple[dict[str, torch.Tensor], list[float]]:
    """MeZO's loop where each step perturbs and updates only the drawn blocks' parameters."""
    ref = PlainSetup(cfg)
    t, zc = cfg.train, cfg.zo

    def perturb(p, step, i, alpha):
        add_perturbation_(p, PerturbKey(t.seed, step, 0, i), alpha=alpha, dist=zc.distribution)

    losses = []
    with torch.no_grad():
        for step in range(t.steps):
            batch = ref.batch(step)
            drawn = [(i, p) for i, (n, p) in enumerate(ref.params)
                     if _block_of(n) in _drawn(t.seed, step, zc.block_fraction)]
            for i, p in drawn:
                perturb(p, step, i, zc.eps)
            lp = ref.loss(batch)
            for i, p in drawn:
                perturb(p, step, i, -2 * zc.eps)
            lm = ref.loss(batch)
            for i, p in drawn:
                perturb(p, step, i, zc.eps)
            g = (lp - lm) / (2 * zc.eps)
            losses.append((lp + lm) / 2)
            for i, p in drawn:
                if t.weight_decay and p.dim() >= 2:
                    p.mul_(1.0 - t.lr * t.weight_decay)
                perturb(p, step, i, -t.lr * g)
    return ref.weights(), losses


def _weights(cfg) -> dict[str, torch.Tensor]:
    return load_file(f"{cfg.output_dir}/final/model.safetensors")


def _lines(cfg) -> list[dict]:
    return [json.loads(ln) for ln in open(f"{cfg.output_dir}/metrics.jsonl") if "loss" in json.loads(ln)]


@pytest.fixture(scope="module")
def model(tiny_models):
    return tiny_models("llama", layers=LAYERS, hidden=32)  # tied embedding: the outer block's two units share it


def test_the_draw_is_a_pure_function_of_seed_and_step():
    a = active_blocks(BLOCKS, seed=3, step=7, fraction=0.4)
    assert a == active_blocks(list(reversed(BLOCKS)), seed=3, step=7, fraction=0.4) == _drawn(3, 7, 0.4)
    assert len(a) == 2
    assert active_blocks(BLOCKS, seed=3, step=7, fraction=1.0) == set(BLOCKS)
    assert len(active_blocks(BLOCKS, seed=0, step=0, fraction=0.01)) == 1
    draws = {active_blocks(BLOCKS, seed=3, step=s, fraction=0.4) for s in range(30)}
    assert len(draws) > 3  # a new draw per step


@pytest.mark.parametrize("train", [{}, {"weight_decay": 0.1, "lr": 1e-2}])
def test_block_sparse_step_equals_plain_loop(model, cfg_factory, train):
    cfg = cfg_factory(model, data={"eval": None}, zo={"block_fraction": 0.4}, train={"steps": 5, **train})
    ref_w, ref_l = _reference_lezo(cfg)
    run(cfg, progress=False)
    got = _weights(cfg)
    assert [r["loss"] for r in _lines(cfg)] == ref_l
    for name, w in ref_w.items():
        assert torch.equal(got[name], w), name
    base = load_file(f"{model}/model.safetensors")
    untouched = set(BLOCKS) - set().union(*(_drawn(cfg.train.seed, s, 0.4) for s in range(5)))
    for name in got:  # a block never drawn keeps its initial bits; a drawn one moved
        assert torch.equal(got[name], base[name]) == (_block_of(name) in untouched), name


@pytest.mark.parametrize("store", ["float32", "bfloat16"])
def test_streamed_tiers_equal_resident_and_clean_blocks_are_not_written(model, cfg_factory, store):
    from ferrytune.models import load_layout

    results = {}
    for tier in ("resident", "host", "nvme"):
        cfg = cfg_factory(model, model={"store_dtype": store}, offload={"tier": tier, "prefetch_depth": 1},
                          zo={"block_fraction": 0.4, "momentum": 0.5}, train={"steps": 4, "lr": 1e-2},
                          data={"eval": None})
        run(cfg, progress=False)
        results[tier] = (_weights(cfg), [r["loss"] for r in _lines(cfg)], _lines(cfg))
    ref_w, ref_l, _ = results["resident"]
    for tier in ("host", "nvme"):
        w, losses, _ = results[tier]
        assert losses == ref_l, tier
        assert all(torch.equal(w[k], ref_w[k]) for k in ref_w), tier
    # A step writes back exactly the blocks it perturbed or applied the previous step's update to.
    layout = load_layout(model)
    es = 2 if store == "bfloat16" else 4
    seed = cfg.train.seed
    for step, line in enumerate(results["nvme"][2]):
        touched = _drawn(seed, step, 0.4) | (_drawn(seed, step - 1, 0.4) if step else set())
        assert line["bytes_written_nvme"] == sum(layout.blocks[b].numel * es for b in touched), step
        assert line["bytes_written_nvme"] < sum(s.numel * es for s in layout.blocks.values())


def test_resume_and_replay_rebuild_a_block_sparse_run(model, cfg_factory):
    assert_resume_and_replay_rebuild(cfg_factory, model, zo={"block_fraction": 0.4, "momentum": 0.9},
                                     train={"steps": 6, "checkpoint_every_steps": 2}, data={"eval": None},
                                     offload={"tier": "nvme"})


def test_block_fraction_with_lora_trainable_is_refused(model, cfg_factory):
    with pytest.raises(ConfigError, match="zo.block_fraction"):
        cfg_factory(model, zo={"block_fraction": 0.5, "trainable": "lora"})

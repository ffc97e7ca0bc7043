"""Sparse MeZO (``zo.mask_fraction``): z masked to small-magnitude weights, against a plain loop, tiers, resume, replay."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from mezo_testlib import PlainSetup, resumed_and_replayed

from ferrytune.kernels import PerturbKey, perturbation
from ferrytune.launch.train import run


def _reference(cfg) -> tuple[dict[str, torch.Tensor], list[float]]:
    """MeZO's loop with z multiplied by m = (|θ| <= h): h per tensor, the mask_fraction quantile of the
    initial |θ|; m from the weights at the start of the step's chain and again at the update."""
    ref = PlainSetup(cfg)
    params = ref.params
    t, zc = cfg.train, cfg.zo
    h = []
    for _, p in params:
        a = p.detach().abs().reshape(-1).sort().values
        h.append(float(a[max(1, round(zc.mask_fraction * a.numel())) - 1]))

    def z(step, i, p):
        return perturbation(PerturbKey(t.seed, step, 0, i), p.shape, dist=zc.distribution)

    losses = []
    with torch.no_grad():
        for step in range(t.steps):
            batch = ref.batch(step)
            ez = [z(step, i, p).mul_(zc.eps).mul_((p.abs() <= h[i]).float()) for i, (_, p) in enumerate(params)]
            chain = []
            for mult in (1, -2, 1):  # θ+εz·m, θ-εz·m, θ restored (in place, as MeZO)
                for (_, p), e in zip(params, ez):
                    p.add_(e, alpha=mult)
                chain.append(ref.loss(batch) if len(chain) < 2 else None)
            lp, lm = chain[0], chain[1]
            g = (lp - lm) / (2 * zc.eps)
            losses.append((lp + lm) / 2)
            for i, (_, p) in enumerate(params):
                m = (p.abs() <= h[i]).float()
                p.add_(z(step, i, p).mul_(-t.lr * g).mul_(m))
    return ref.weights(), losses


@pytest.fixture(scope="module")
def model(tiny_models):
    return tiny_models("llama", layers=2, hidden=32)  # tied embedding


def _losses(cfg) -> list[float]:
    import json
    return [json.loads(ln)["loss"] for ln in open(f"{cfg.output_dir}/metrics.jsonl") if '"loss"' in ln]


def test_masked_step_equals_plain_loop(model, cfg_factory):
    cfg = cfg_factory(model, data={"eval": None}, zo={"mask_fraction": 0.3}, train={"steps": 4, "lr": 1e-2})
    ref_w, ref_l = _reference(cfg)
    run(cfg, progress=False)
    got = load_file(f"{cfg.output_dir}/final/model.safetensors")
    assert _losses(cfg) == ref_l
    base = load_file(f"{model}/model.safetensors")
    for name, w in ref_w.items():
        assert torch.equal(got[name], w), name
        if w.dim() >= 2:  # (a norm's weights are all 1.0 at init: ties, so the quantile keeps all of them)
            moved = (got[name] != base[name]).float().mean().item()
            assert 0.2 < moved < 0.4, (name, moved)  # about 30% of each matrix moves


def test_masked_tiers_resume_and_replay_agree(model, cfg_factory):
    opts = dict(zo={"mask_fraction": 0.3, "momentum": 0.5}, data={"eval": None},
                train={"steps": 4, "lr": 1e-2, "checkpoint_every_steps": 2})
    results = {}
    for tier in ("resident", "nvme"):
        cfg = cfg_factory(model, offload={"tier": tier}, **opts)
        run(cfg, progress=False)
        results[tier] = load_file(f"{cfg.output_dir}/final/model.safetensors")
    ref = results["resident"]
    assert all(torch.equal(results["nvme"][k], ref[k]) for k in ref)

    resumed, replayed = resumed_and_replayed(cfg_factory(model, **opts))  # thresholds from the checkpoint
    assert all(torch.equal(resumed[k], ref[k]) for k in ref)
    assert all(torch.equal(replayed[k], ref[k]) for k in ref)

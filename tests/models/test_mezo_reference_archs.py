"""The ZO step equals a plain MeZO loop bit for bit on BLOOM (ALiBi, built from the whole batch) and on
Mixtral (Mixture-of-Experts, one tensor per expert on disk, fused per layer in the module).

Why bits are expected: the engine runs every unit once per (stream, micro-batch) slice, with the same
shapes as the plain loop's forward, on 64-byte-aligned buffers like the reference's
(``load_resident_model``); BLOOM's ALiBi rows of a slice are the rows a forward of that slice builds
(``ferrytune.engine`` slices a ``(batch x heads, ...)`` tensor by heads); the fused expert tensors
ferrytune builds from the file are transformers' own conversion (stack, then concatenate).
With a broken slice BLOOM fails outright (a shape error) or its losses differ; with experts fused
in another order Mixtral's weights and losses differ.
"""

from __future__ import annotations

import json

import pytest
import torch
from arch_testlib import build_arch
from mezo_testlib import PlainSetup

from ferrytune.kernels import PerturbKey, add_perturbation_
from ferrytune.launch.train import run
from ferrytune.models import load_resident_model


def _plain_mezo(cfg) -> tuple[dict[str, torch.Tensor], list[float]]:
    """MeZO (Malladi et al. 2023, Algorithm 1) on a resident transformers model, q perturbations."""
    ref = PlainSetup(cfg)
    params, loss = ref.params, ref.loss
    t, zc = cfg.train, cfg.zo

    def perturb(p, step, k, i, alpha):
        add_perturbation_(p, PerturbKey(t.seed, step, k, i), alpha=alpha, dist=zc.distribution)

    losses = []
    with torch.no_grad():
        for step in range(t.steps):
            batch = ref.batch(step)
            grads = []
            for k in range(zc.num_perturbations):
                for i, (_, p) in enumerate(params):
                    perturb(p, step, k, i, zc.eps)
                lp = loss(batch)
                for i, (_, p) in enumerate(params):
                    perturb(p, step, k, i, -2 * zc.eps)
                lm = loss(batch)
                for i, (_, p) in enumerate(params):
                    perturb(p, step, k, i, zc.eps)
                grads.append((lp - lm) / (2 * zc.eps))
                if k == 0:
                    losses.append((lp + lm) / 2)
            for i, (_, p) in enumerate(params):
                for k, g in enumerate(grads):
                    perturb(p, step, k, i, -t.lr * g / zc.num_perturbations)
    return {n: p.detach().clone() for n, p in params}, losses


@pytest.mark.parametrize("arch", ["bloom", "mixtral"])
@pytest.mark.parametrize("q", [1, 2])
def test_zo_step_equals_plain_mezo_loop(tiny_models, cfg_factory, tmp_path_factory, arch, q):
    path = str(build_arch(tmp_path_factory.mktemp(arch) / arch, arch, tiny_models("llama", layers=1, hidden=16)))
    cfg = cfg_factory(path, data={"eval": None, "max_length": 32}, train={"steps": 2, "batch_size": 4, "lr": 1e-2},
                      zo={"eps": 1e-3, "num_perturbations": q}, offload={"tier": "nvme", "prefetch_depth": 1})
    ref_weights, ref_losses = _plain_mezo(cfg)
    run(cfg, progress=False)
    got_losses = [json.loads(ln)["loss"] for ln in open(f"{cfg.output_dir}/metrics.jsonl")]
    assert got_losses == ref_losses
    got = dict(load_resident_model(f"{cfg.output_dir}/final").named_parameters())  # through transformers' loader
    assert got.keys() == ref_weights.keys()
    for name, w in ref_weights.items():
        assert torch.equal(got[name], w), name
    # the weights moved
    base = dict(load_resident_model(path).named_parameters())
    assert all(not torch.equal(base[n], w) for n, w in ref_weights.items())

"""``zo.estimator``: FZOO against a plain loop written out here, bit for bit, on the tiers; resume, replay
and the refused combinations."""

from __future__ import annotations

import json
import statistics
import threading

import pytest
import torch
from safetensors.torch import load_file

from mezo_testlib import PlainSetup, assert_resume_and_replay_rebuild

from ferrytune.errors import CheckpointError, ConfigError
from ferrytune.kernels import PerturbKey, add_perturbation_
from ferrytune.launch.train import run

FZOO = {"estimator": "fzoo", "distribution": "rademacher", "num_perturbations": 3, "eps": 1e-2}


def _weights(cfg) -> dict[str, torch.Tensor]:
    return load_file(f"{cfg.output_dir}/final/model.safetensors")


def _metrics(cfg) -> list[dict]:
    return [json.loads(ln) for ln in open(f"{cfg.output_dir}/metrics.jsonl") if "loss" in json.loads(ln)]


def _plain_fzoo(cfg) -> tuple[dict[str, torch.Tensor], list[float], list[float]]:
    """FZOO (Dang et al. 2025) on a resident model: per step f(θ), then for each of N Rademacher z_i
    f(θ+εz_i) (perturbed in place, restored from a saved copy); g_i = (f_i - f(θ)) / ε, σ the sample
    std of the f_i, θ ← θ(1 - lr·wd) - (lr/σ)(1/N) Σ g_i z_i. Returns (weights, f(θ) per step, σ per step)."""
    s = PlainSetup(cfg)
    t, z = cfg.train, cfg.zo
    n, eps = z.num_perturbations, z.eps
    losses, sigmas = [], []
    with torch.no_grad():
        for step in range(t.steps):
            batch = s.batch(step)
            l0 = s.loss(batch)
            perturbed = []
            for k in range(n):
                saved = [p.clone() for _, p in s.params]
                for i, (_, p) in enumerate(s.params):
                    add_perturbation_(p, PerturbKey(t.seed, step, k, i), alpha=eps, dist="rademacher")
                perturbed.append(s.loss(batch))
                for (_, p), v in zip(s.params, saved):
                    p.copy_(v)
            mean = sum(perturbed) / n
            sigma = (sum((x - mean) ** 2 for x in perturbed) / (n - 1)) ** 0.5
            assert sigma == pytest.approx(statistics.stdev(perturbed), rel=1e-9)  # the definition, independently
            coef = [((x - l0) / eps) / sigma for x in perturbed]
            for i, (_, p) in enumerate(s.params):
                if t.weight_decay and p.dim() >= 2:
                    p.mul_(1.0 - t.lr * t.weight_decay)
                for k, c in enumerate(coef):
                    add_perturbation_(p, PerturbKey(t.seed, step, k, i), alpha=-t.lr * c / n, dist="rademacher")
            losses.append(l0)
            sigmas.append(sigma)
    return s.weights(), losses, sigmas


@pytest.mark.parametrize("arch,tier,train", [
    ("llama", "resident", {}),  # tied embedding = head
    ("gpt2", "resident", {"weight_decay": 0.1}),
    ("llama", "nvme", {"weight_decay": 0.1}),
    ("llama", "host", {}),
])
def test_fzoo_equals_plain_loop(tiny_models, cfg_factory, arch, tier, train):
    path = tiny_models(arch, layers=2, hidden=32)
    cfg = cfg_factory(path, data={"eval": None}, zo=FZOO, offload={"tier": tier, "prefetch_depth": 1},
                      train={"steps": 3, "lr": 1e-3, **train})
    ref_w, ref_losses, ref_sigmas = _plain_fzoo(cfg)
    run(cfg, progress=False)
    got = _weights(cfg)
    assert [m["loss"] for m in _metrics(cfg)] == ref_losses  # the step's loss is f(θ)
    log = [json.loads(ln) for ln in open(f"{cfg.output_dir}/zo_log.jsonl")]
    assert [e["sigma"] for e in log] == ref_sigmas and all(len(e["grads"]) == 3 for e in log)
    base = load_file(f"{path}/model.safetensors")
    for name, w in ref_w.items():
        assert torch.equal(got[name], w), name
        assert not torch.equal(w, base[name]), name  # the weights moved


def test_fzoo_forwards_leave_blocks_clean(tiny_models, cfg_factory):
    """FZOO perturbs out-of-place copies: a step with no pending update writes nothing back (MeZO's
    in-place chain writes every block), and one with an update writes each block once, as MeZO does."""
    path = tiny_models("llama", layers=3, hidden=32)
    written = {}
    for est, zo in (("fzoo", FZOO), ("mezo", {})):
        cfg = cfg_factory(path, data={"eval": None}, zo=zo, offload={"tier": "nvme", "prefetch_depth": 1},
                          train={"steps": 2})
        run(cfg, progress=False)
        written[est] = [r["bytes_written_nvme"] for r in _metrics(cfg)]
    assert written["fzoo"][0] == 0 < written["mezo"][0]
    assert written["fzoo"][1] == written["mezo"][0]


@pytest.mark.parametrize("zo", [{}, {"momentum": 0.9}, {"update": "sign"}])
def test_fzoo_resume_and_replay_are_exact(tiny_models, cfg_factory, zo):
    path = tiny_models("llama", layers=2, hidden=32)
    assert_resume_and_replay_rebuild(cfg_factory, path, zo={**FZOO, **zo}, data={"eval": None},
                                     train={"steps": 5, "checkpoint_every_steps": 1, "lr": 1e-4},
                                     offload={"tier": "nvme"})


@pytest.mark.parametrize("zo,parallel,key", [
    ({"distribution": "gaussian"}, {}, "zo.distribution"),
    ({"num_perturbations": 1}, {}, "zo.num_perturbations"),
    ({"trainable": "lora"}, {}, "zo.trainable"),
    ({"block_fraction": 0.5}, {}, "zo.block_fraction"),
    ({"mask_fraction": 0.5}, {}, "zo.mask_fraction"),
    ({}, {"perturbation": 2}, "parallel.perturbation"),
])
def test_fzoo_refuses_what_it_does_not_support(tiny_models, cfg_factory, zo, parallel, key):
    path = tiny_models("llama", layers=2, hidden=32)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        cfg_factory(path, zo={**FZOO, **zo}, parallel=parallel)


# ------------------------------------------------------------------------------------------ HiZOO
LORA = {"rank": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}
HIZOO = {"estimator": "hizoo", "trainable": "lora", "eps": 1e-2, "hessian_smooth": 0.3}


def _plain_hessian_update(hess: list[torch.Tensor], zs: list[list[torch.Tensor]], curv: list[float], a: float) -> None:
    """H_i ← (1-α) H_i + Σ_k (α D_k / q) (H_i z_k,i²), from the H the step perturbed with."""
    q = len(curv)
    for i, h in enumerate(hess):
        new = h * (1 - a)
        for k, d in enumerate(curv):
            new = new + (a * d / q) * (h * zs[k][i] * zs[k][i])
        h.copy_(new)


def _plain_hizoo(cfg) -> tuple[list[torch.Tensor], list[torch.Tensor], list[float]]:
    """HiZOO (Zhao et al. 2024) on the adapter of a resident model: H = 1 at the start; per step
    L0 = f(θ), and per perturbation k, u = z_k / sqrt(H): θ += εu, L+, θ -= 2εu, L-, θ += εu (MeZO's
    in-place chain); then θ -= lr·g_k/q·u_k, and H ← (1-α)H + Σ_k α D_k/q · H z_k², with
    g_k = (L+ - L-)/2ε and D_k = |L+ + L- - 2 L0| / 2ε². Returns (adapter params, H after each step,
    L0 per step)."""
    from ferrytune.kernels import perturbation
    from ferrytune.lora import Adapter, LoraSpec, attach, find_targets

    s = PlainSetup(cfg)
    t, zc = cfg.train, cfg.zo
    spec = LoraSpec(**LORA)
    adapter = Adapter.create(find_targets(s.model, spec), spec, seed=t.seed)
    attach(s.model, [adapter])
    theta = [p for pth in adapter.paths for p in (adapter.a(pth), adapter.b(pth))]
    hess = [torch.ones_like(p) for p in theta]
    q, eps, a = zc.num_perturbations, zc.eps, zc.hessian_smooth
    losses, history = [], []
    with torch.no_grad():
        for step in range(t.steps):
            batch = s.batch(step)
            zs = [[perturbation(PerturbKey(t.seed, step, k, i), p.shape) for i, p in enumerate(theta)]
                  for k in range(q)]
            us = [[z / h.sqrt() for z, h in zip(zk, hess)] for zk in zs]
            l0 = s.loss(batch)
            grads, curv = [], []
            for k in range(q):
                for p, u in zip(theta, us[k]):
                    p.add_(u, alpha=eps)
                lp = s.loss(batch)
                for p, u in zip(theta, us[k]):
                    p.add_(u, alpha=-2 * eps)
                lm = s.loss(batch)
                for p, u in zip(theta, us[k]):
                    p.add_(u, alpha=eps)
                grads.append((lp - lm) / (2 * eps))
                curv.append(abs(lp + lm - 2 * l0) / (2 * eps * eps))
            for i, p in enumerate(theta):
                for k, g in enumerate(grads):
                    p.add_(us[k][i], alpha=-t.lr * g / q)
            _plain_hessian_update(hess, zs, curv, a)
            losses.append(l0)
            history.append([h.clone() for h in hess])
    return theta, history, losses


def _adapter(cfg, folder="final") -> dict[str, torch.Tensor]:
    return load_file(f"{cfg.output_dir}/{folder}/adapter_model.safetensors")


@pytest.mark.parametrize("q,tier", [(1, "resident"), (2, "nvme")])
def test_hizoo_equals_plain_loop(tiny_models, cfg_factory, q, tier):
    path = tiny_models("llama", layers=2, hidden=32)
    cfg = cfg_factory(path, zo={**HIZOO, "num_perturbations": q}, lora=LORA, data={"eval": None},
                      train={"steps": 3, "lr": 1e-2, "checkpoint_every_steps": 2}, offload={"tier": tier})
    res = run(cfg, progress=False)
    theta, history, losses = _plain_hizoo(cfg)
    assert res.losses == losses
    got = sorted(_adapter(cfg).values(), key=lambda v: v.shape)  # compare as a multiset of tensors
    from ferrytune.engine._zo_lora_trainer import HESSIAN_NAME
    saved_h = torch.load(f"{cfg.output_dir}/checkpoints/step-000002/{HESSIAN_NAME}")  # H after steps 0 and 1
    assert len(saved_h) == len(history[1]) and all(torch.equal(x, y) for x, y in zip(saved_h, history[1]))
    assert any(not torch.equal(h, torch.ones_like(h)) for h in history[1])  # H moved
    assert len(got) == len(theta)
    assert all(any(torch.equal(g, p) for p in theta) for g in got)


@pytest.mark.parametrize("zo", [{}, {"momentum": 0.9, "num_perturbations": 2}])
def test_hizoo_resume_is_exact(tiny_models, cfg_factory, zo):
    """H is saved with each checkpoint: stopped at step 3 and resumed = uninterrupted, bit for bit."""
    path = tiny_models("llama", layers=2, hidden=32)
    opts = dict(zo={**HIZOO, **zo}, lora=LORA, data={"eval": None}, train={"steps": 5, "checkpoint_every_steps": 1,
                                                                          "lr": 1e-2})
    full = cfg_factory(path, **opts)
    full_res = run(full, progress=False)
    part = cfg_factory(path, **opts)
    run(part.model_copy(update={"train": part.train.model_copy(update={"steps": 3})}), progress=False)
    part_res = run(part.model_copy(update={"resume": "auto"}), progress=False)
    n = len(part_res.losses)  # resumed from the last checkpoint the 3-step run wrote
    assert n >= 2 and part_res.losses == full_res.losses[-n:]
    a, b = _adapter(full), _adapter(part)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("zo", [{"trainable": "lora"}, {**HIZOO, "momentum": 0.9, "num_perturbations": 2}])
def test_zo_lora_replay_rebuilds_the_adapter(tiny_models, cfg_factory, tmp_path, zo):
    """MeZO and HiZOO on the adapter log every step; ``ferrytune replay`` rebuilds the final adapter
    from the initial one and the log (trimmed and rewritten by a resume), bit for bit."""
    import yaml

    from ferrytune.launch.cli import main as cli_main

    path = tiny_models("llama", layers=2, hidden=32)
    cfg = cfg_factory(path, zo=zo, lora=LORA, data={"eval": None},
                      train={"steps": 5, "checkpoint_every_steps": 2, "lr": 1e-2})
    run(cfg.model_copy(update={"train": cfg.train.model_copy(update={"steps": 3})}), progress=False)
    run(cfg.model_copy(update={"resume": "auto"}), progress=False)  # from step 2: step 2's line is logged again
    lines = [json.loads(x) for x in open(f"{cfg.output_dir}/zo_log.jsonl")]
    assert [e["step"] for e in lines] == list(range(5)) and all(("curv" in e) == ("estimator" in zo) for e in lines)
    spec = tmp_path / "replay.yaml"
    spec.write_text(yaml.safe_dump({**cfg.model_dump(mode="json"), "output_dir": str(tmp_path / "rp")}))
    assert cli_main(["replay", str(spec), "--log", f"{cfg.output_dir}/zo_log.jsonl"]) == 0
    want, got = _adapter(cfg), load_file(f"{tmp_path}/rp/replayed/adapter_model.safetensors")
    assert want.keys() == got.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert any(v.abs().sum() > 0 for k, v in want.items() if "lora_B" in k)  # it trained
    assert cli_main(["replay", str(spec), "--log", f"{cfg.output_dir}/zo_log.jsonl", "--to-step", "2"]) == 0
    early = load_file(f"{tmp_path}/rp/replayed/adapter_model.safetensors")
    assert any(not torch.equal(early[k], want[k]) for k in want)  # two steps are not five


def test_hizoo_resume_from_a_mezo_checkpoint_is_refused(tiny_models, cfg_factory):
    path = tiny_models("llama", layers=2, hidden=32)
    opts = dict(lora=LORA, data={"eval": None}, train={"steps": 3, "checkpoint_every_steps": 1})
    mezo = cfg_factory(path, zo={"trainable": "lora"}, **opts)
    run(mezo.model_copy(update={"train": mezo.train.model_copy(update={"steps": 2})}), progress=False)
    hizoo = mezo.model_copy(update={"zo": mezo.zo.model_copy(update={"estimator": "hizoo"}), "resume": "auto",
                                    "offload": mezo.offload.model_copy(update={"tier": "nvme", "prefetch_depth": 1,
                                                                               "nvme_dir": mezo.output_dir + "-nvme"})})
    threads_before = {t.ident for t in threading.enumerate()}
    with pytest.raises(CheckpointError, match="zo_hessian"):
        run(hizoo, progress=False)  # refused in setup, after its streamer opened (threads, store files)
    assert {t.ident for t in threading.enumerate()} <= threads_before, "the half-set-up trainer was not closed"


@pytest.mark.parametrize("zo,parallel,key", [
    ({"block_fraction": 0.5}, {}, "zo.block_fraction"),
    ({}, {"perturbation": 2}, "parallel.perturbation"),
    ({}, {"data": 2}, "parallel.data"),
    ({"trainable": "all"}, {"perturbation": 2}, "parallel.perturbation"),
    ({"trainable": "all", "block_fraction": 0.5}, {}, "zo.block_fraction"),
    ({"trainable": "all", "mask_fraction": 0.5}, {}, "zo.mask_fraction"),
    ({"trainable": "all"}, {"sliced_loading": True, "data": 2}, "parallel.sliced_loading"),
])
def test_hizoo_refuses_what_it_does_not_support(tiny_models, cfg_factory, zo, parallel, key):
    path = tiny_models("llama", layers=2, hidden=32)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        cfg_factory(path, zo={**HIZOO, **zo}, parallel=parallel, lora=LORA)


# ------------------------------------------------------------------- HiZOO on the full model
HIZOO_ALL = {"estimator": "hizoo", "eps": 1e-2, "hessian_smooth": 0.3}


def _plain_hizoo_all(cfg) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]], list[float]]:
    """HiZOO on every parameter of a resident model (a tied weight once): H = 1; per step L0 = f(θ),
    per k with u = z_k / sqrt(H): θ += εu, L+, θ -= 2εu, L-, θ += εu; then weight decay on matrices,
    d = Σ_k g_k u_k / q (with momentum m ← βm + d), θ -= lr·d (plain SGD: θ += (-lr·g_k/q)·u_k per k),
    and H ← (1-α)H + Σ_k α D_k/q · H z_k². Returns (weights, H by name after each step, L0 per step)."""
    from ferrytune.kernels import perturbation

    s = PlainSetup(cfg)
    t, zc = cfg.train, cfg.zo
    q, eps, a = zc.num_perturbations, zc.eps, zc.hessian_smooth
    hess = [torch.ones_like(p) for _, p in s.params]
    mom = [torch.zeros_like(p) for _, p in s.params] if zc.momentum else None
    losses, history = [], []
    with torch.no_grad():
        for step in range(t.steps):
            batch = s.batch(step)
            zs = [[perturbation(PerturbKey(t.seed, step, k, i), p.shape) for i, (_, p) in enumerate(s.params)]
                  for k in range(q)]
            us = [[z / h.sqrt() for z, h in zip(zk, hess)] for zk in zs]
            l0 = s.loss(batch)
            grads, curv = [], []
            for k in range(q):
                for (_, p), u in zip(s.params, us[k]):
                    p.add_(u, alpha=eps)
                lp = s.loss(batch)
                for (_, p), u in zip(s.params, us[k]):
                    p.add_(u, alpha=-2 * eps)
                lm = s.loss(batch)
                for (_, p), u in zip(s.params, us[k]):
                    p.add_(u, alpha=eps)
                grads.append((lp - lm) / (2 * eps))
                curv.append(abs(lp + lm - 2 * l0) / (2 * eps * eps))
            for i, (_, p) in enumerate(s.params):
                if t.weight_decay and p.dim() >= 2:
                    p.mul_(1.0 - t.lr * t.weight_decay)
                if mom is None:
                    for k, g in enumerate(grads):
                        p.add_(us[k][i], alpha=-t.lr * g / q)
                else:
                    d = torch.zeros_like(p)
                    for k, g in enumerate(grads):
                        d.add_(us[k][i], alpha=g / q)
                    p.add_(mom[i].mul_(zc.momentum).add_(d), alpha=-t.lr)
            _plain_hessian_update(hess, zs, curv, a)
            losses.append(l0)
            history.append({n: h.clone() for (n, _), h in zip(s.params, hess)})
    return s.weights(), history, losses


@pytest.mark.parametrize("arch,tier,zo,train", [
    ("llama", "resident", {}, {}),  # tied embedding = head: f(θ) of the head unit reads a copy
    ("llama", "nvme", {"num_perturbations": 2, "momentum": 0.9}, {}),
    ("gpt2", "host", {}, {"weight_decay": 0.1}),
])
def test_hizoo_full_model_equals_plain_loop(tiny_models, cfg_factory, arch, tier, zo, train):
    path = tiny_models(arch, layers=2, hidden=32)
    cfg = cfg_factory(path, data={"eval": None}, zo={**HIZOO_ALL, **zo}, offload={"tier": tier, "prefetch_depth": 1},
                      train={"steps": 3, "lr": 1e-3, "checkpoint_every_steps": 2, **train})
    ref_w, history, ref_losses = _plain_hizoo_all(cfg)
    run(cfg, progress=False)
    assert [m["loss"] for m in _metrics(cfg)] == ref_losses  # the step's loss is f(θ)
    log = [json.loads(ln) for ln in open(f"{cfg.output_dir}/zo_log.jsonl")]
    assert all(len(e["curv"]) == len(e["grads"]) == cfg.zo.num_perturbations for e in log)
    got, base = _weights(cfg), load_file(f"{path}/model.safetensors")
    for name, w in ref_w.items():
        assert torch.equal(got[name], w), name
        assert not torch.equal(w, base[name]), name  # the weights moved
    saved = load_file(f"{cfg.output_dir}/checkpoints/step-000002/zo_hessian.safetensors")  # after steps 0, 1
    assert set(saved) == set(history[1])
    assert all(torch.equal(saved[n], h) for n, h in history[1].items())
    assert any(not torch.equal(h, torch.ones_like(h)) for h in history[1].values())  # H moved


@pytest.mark.parametrize("zo", [{}, {"momentum": 0.9, "num_perturbations": 2}])
def test_hizoo_full_model_resume_and_replay_are_exact(tiny_models, cfg_factory, zo):
    path = tiny_models("llama", layers=2, hidden=32)
    a = assert_resume_and_replay_rebuild(cfg_factory, path, zo={**HIZOO_ALL, **zo}, data={"eval": None},
                                         train={"steps": 5, "checkpoint_every_steps": 1, "lr": 1e-3},
                                         offload={"tier": "nvme"})
    assert any(not torch.equal(a[k], v) for k, v in load_file(f"{path}/model.safetensors").items())


def test_hizoo_full_model_resume_from_a_mezo_checkpoint_is_refused(tiny_models, cfg_factory):
    path = tiny_models("llama", layers=2, hidden=32)
    mezo = cfg_factory(path, data={"eval": None}, train={"steps": 2, "checkpoint_every_steps": 1})
    run(mezo, progress=False)
    hizoo = mezo.model_copy(update={"zo": mezo.zo.model_copy(update={"estimator": "hizoo"}), "resume": "auto",
                                    "train": mezo.train.model_copy(update={"steps": 3})})
    threads_before = {t.ident for t in threading.enumerate()}
    with pytest.raises(CheckpointError, match="zo_hessian"):
        run(hizoo, progress=False)
    assert {t.ident for t in threading.enumerate()} <= threads_before, "the half-set-up trainer was not closed"


def test_hessian_smooth_without_hizoo_is_refused(tiny_models, cfg_factory):
    with pytest.raises(ConfigError, match=r"zo\.hessian_smooth"):
        cfg_factory(tiny_models("llama", layers=2, hidden=32), zo={"hessian_smooth": 0.1})

"""train.optimizer: Adam-mini and SGD-SaI on real LoRA training of a tiny model.

* each optimizer equals its reference step for step (the PyPI packages ``adam-mini`` 1.1.1 and
  ``sgd-sai`` 1.0.3, ``torch.optim.AdamW``), stepping a shadow copy of the adapter on the very
  gradients the trainer hands its optimizer (after clipping, at the scheduled lr);
* SGD-SaI's one deviation from the package (a LoRA ``A`` with an all-zero first gradient gets its
  scale at its first non-zero gradient) against the formula written out here;
* a run stopped and resumed equals an uninterrupted one bit for bit, for every optimizer;
* the state each keeps, counted from the real optimizer, is what ``optimizer_state_bytes`` says,
  and the lean ones keep less than AdamW.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from ferrytune.engine import LoraTrainer, list_checkpoints, optimizer_state_bytes
from ferrytune.errors import ConfigError
from ferrytune.launch.train import run

OPTIMIZERS = ("adamw", "adam_mini", "sgd_sai")
LORA = {"rank": 4, "alpha": 8, "dropout": 0.1, "target_modules": "all-linear"}
# SGD-SaI's step is lr * ||g|| / std(g) ~ lr * sqrt(numel) per tensor: it wants a smaller lr than Adam
LR = {"adamw": 1e-2, "adam_mini": 1e-2, "sgd_sai": 1e-3}


def _cfg(cfg_factory, path, optimizer, **train):
    train = {"steps": 4, "lr": LR[optimizer], "micro_batch_size": 2, "optimizer": optimizer, "weight_decay": 0.1,
             "lr_schedule": "cosine", "warmup_steps": 1, **train}
    return cfg_factory(path, method="lora", train=train, lora=LORA, data={"eval": None})


def _reference(name: str, params: list[torch.Tensor], train):
    """The reference implementation over shadow copies of ``params``."""
    if name == "adamw":
        return torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay)
    if name == "adam_mini":
        import adam_mini  # the [test] extra pins it: a missing reference fails here, it is not skipped
        # The package partitions by name: "mlp" selects its one-second-moment-per-output-row branch
        # (the partition ferrytune uses for LoRA factors); 1.1.1's default eps is 1e-8 as ours.
        return adam_mini.Adam_mini([(f"mlp.{i}", p) for i, p in enumerate(params)], lr=train.lr,
                                   weight_decay=train.weight_decay, eps=1e-8, verbose=False)
    import sgd_sai
    return sgd_sai.SGD_sai(params, lr=train.lr, momentum=0.9, eps=1e-8, weight_decay=train.weight_decay)


def _trainer(cfg) -> LoraTrainer:
    tr = LoraTrainer(cfg)
    tr.setup()
    return tr


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_matches_reference_step_for_step(tiny_models, cfg_factory, name, capsys):
    path = tiny_models("llama", layers=2, hidden=32)
    # grad_clip far below the gradient norm: every step is clipped before the optimizer sees it
    cfg = _cfg(cfg_factory, path, name, steps=5, grad_clip=1e-2)
    tr = _trainer(cfg)
    try:
        with torch.no_grad():  # a non-zero B: every gradient is non-zero from step 0 (see the SGD-SaI test)
            g = torch.Generator().manual_seed(0)
            for pth in tr.adapter.paths:
                tr.adapter.b(pth).copy_(torch.randn(tr.adapter.b(pth).shape, generator=g) * 0.01)
        shadow = [p.detach().clone().requires_grad_(True) for p in tr.params]
        start = [p.detach().clone() for p in tr.params]
        ref = _reference(name, shadow, cfg.train)
        real_step, seen = tr.optim.step, []

        def checked_step():
            lr = tr.optim.param_groups[0]["lr"]
            seen.append((lr, float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in tr.params])))))
            for s, p in zip(shadow, tr.params):
                s.grad = p.grad.detach().clone()
            for group in ref.param_groups:
                group["lr"] = lr
            ref.step()
            real_step()
            for i, (s, p) in enumerate(zip(shadow, tr.params)):
                assert torch.equal(s, p), f"step {len(seen) - 1}: parameter {i} differs from the reference"

        tr.optim.step = checked_step
        tr.train(progress=False)
    finally:
        tr.close()
    capsys.readouterr()  # the packages print
    assert len(seen) == 5
    lrs = [lr for lr, _ in seen]
    assert len(set(lrs)) >= 4 and lrs[-1] < max(lrs)  # warmup then cosine: the schedule reached the optimizer
    assert all(norm == pytest.approx(1e-2, rel=1e-4) for _, norm in seen)  # clipped before stepping
    assert all(not torch.equal(s, s0) for s, s0 in zip(shadow, start))  # every tensor trained


def test_sgd_sai_scales_a_lora_A_at_its_first_nonzero_gradient(tiny_models, cfg_factory):
    """Under B = 0 the first gradient of A is exactly zero; its scale comes from the next one."""
    path = tiny_models("llama", layers=2, hidden=32)
    cfg = _cfg(cfg_factory, path, "sgd_sai", steps=3, lr=0.05, weight_decay=0.0, lr_schedule="constant",
               warmup_steps=0)
    tr = _trainer(cfg)
    try:
        a_params = [tr.adapter.a(p) for p in tr.adapter.paths]
        a0 = [a.detach().clone() for a in a_params]
        tr.train_step(0)
        assert all(torch.equal(a.grad, torch.zeros_like(a)) for a in a_params)
        assert all(torch.equal(a, b) for a, b in zip(a_params, a0))  # no scale yet: untouched
        assert all("gsnr" not in tr.optim.state[a] for a in a_params)
        before = [a.detach().clone() for a in a_params]
        grads = {}
        real_step = tr.optim.step

        def capture():
            grads.update({id(a): a.grad.detach().clone() for a in a_params})
            real_step()

        tr.optim.step = capture
        tr.train_step(1)
        for a, b in zip(a_params, before):
            g = grads[id(a)]
            assert g.abs().sum() > 0
            gsnr = g.norm() / (g.std() + 1e-8)  # the paper's g-SNR of the first non-zero gradient
            assert torch.equal(tr.optim.state[a]["gsnr"], gsnr)
            # first update of A: momentum buffer = g, p <- p - lr * gsnr * g
            assert torch.equal(a.detach(), b.add(g, alpha=-(cfg.train.lr * gsnr)))
        assert all(not torch.equal(a.detach(), b) for a, b in zip(a_params, before))  # A trains from step 1
    finally:
        tr.close()


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_resume_equals_uninterrupted(tiny_models, cfg_factory, name):
    path = tiny_models("llama", layers=2, hidden=32)
    full = _cfg(cfg_factory, path, name, steps=5, checkpoint_every_steps=2)
    want = run(full, progress=False)
    part = _cfg(cfg_factory, path, name, steps=5, checkpoint_every_steps=2)
    run(part.model_copy(update={"train": part.train.model_copy(update={"steps": 3})}), progress=False)
    got = run(part.model_copy(update={"resume": "auto"}), progress=False)  # resumes from step 2
    a = load_file(f"{full.output_dir}/final/adapter_model.safetensors")
    b = load_file(f"{part.output_dir}/final/adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert got.losses == want.losses[2:]
    # the adapter trained (B left zero), and the checkpoint holds this optimizer's state
    assert any(v.abs().max() > 0 for k, v in a.items() if "lora_B" in k)
    (_, ckpt), = [c for c in list_checkpoints(part.output_dir) if c[0] == 2]
    state = torch.load(ckpt / "optimizer.pt")["state"]
    keys = {"adamw": {"step", "exp_avg", "exp_avg_sq"}, "adam_mini": {"step", "m", "v"},
            "sgd_sai": {"gsnr", "momentum_buffer"}}[name]
    assert all(set(s) == keys for s in state.values()) and len(state) == len(a)


def _state_bytes(optim: torch.optim.Optimizer) -> int:
    return sum(v.numel() * v.element_size() for s in optim.state.values() for v in s.values()
               if isinstance(v, torch.Tensor))


def test_state_bytes_counted_from_the_real_optimizer(tiny_models, cfg_factory):
    path = tiny_models("llama", layers=2, hidden=32)
    measured = {}
    for name in OPTIMIZERS:
        tr = _trainer(_cfg(cfg_factory, path, name))
        try:
            for step in range(2):  # SGD-SaI's A tensors take their state at step 1 (B = 0 at step 0)
                tr.train_step(step)
            assert len(tr.optim.state) == len(tr.params)
            measured[name] = _state_bytes(tr.optim)
            assert measured[name] == optimizer_state_bytes(name, [p.shape for p in tr.params])
            numel = sum(p.numel() for p in tr.params)
        finally:
            tr.close()
    assert measured["adam_mini"] < measured["adamw"] and measured["sgd_sai"] < measured["adamw"]
    # about half: one full-size tensor per parameter instead of two
    assert measured["adam_mini"] < 0.6 * measured["adamw"] and measured["sgd_sai"] < 0.6 * measured["adamw"]
    assert measured["adamw"] >= 8 * numel


@pytest.mark.parametrize("zo", [{}, {"trainable": "lora"}])
def test_zo_refuses_a_backprop_optimizer(tiny_models, cfg_factory, zo):
    path = tiny_models("llama", layers=2, hidden=32)
    with pytest.raises(ConfigError, match=r"train\.optimizer: 'adam_mini' applies to method: lora only"):
        cfg_factory(path, train={"optimizer": "adam_mini"}, zo=zo, lora=LORA)
    assert cfg_factory(path, train={"optimizer": "adamw"}, zo=zo).train.optimizer == "adamw"


def test_resume_with_another_optimizer_is_refused(tiny_models, cfg_factory):
    from ferrytune.errors import CheckpointError

    path = tiny_models("llama", layers=2, hidden=32)
    cfg = _cfg(cfg_factory, path, "adamw", steps=3, checkpoint_every_steps=1)
    run(cfg.model_copy(update={"train": cfg.train.model_copy(update={"steps": 2})}), progress=False)  # ckpt at 1
    other = cfg.model_copy(update={"resume": "auto", "train": cfg.train.model_copy(update={"optimizer": "sgd_sai"})})
    with pytest.raises(CheckpointError, match=r"optimizer\.pt: train\.optimizer: the checkpoint holds the state of "
                                              r"'adamw', this run uses 'sgd_sai'"):
        run(other, progress=False)

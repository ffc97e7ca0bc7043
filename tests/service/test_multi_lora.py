"""MultiLoraTrainer: packed training equals solo training, resume is exact, adapters load in PEFT."""

import functools

import pytest
import torch
from service_testlib import lora_config, make_tiny_base, write_classification, write_completion

from ferrytune.engine._multi_lora import MultiLoraTrainer
from ferrytune.errors import CheckpointError, ConfigError
from ferrytune.service._policy import pack_microbatches

NUM_STEPS = 5
# Packed and solo runs add the same numbers in a different order (other padding, other
# microbatch split), so the weights agree to float32 rounding, amplified a little by Adam.
ATOL, RTOL = 2e-6, 1e-4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("ml")
    base = make_tiny_base(d / "base")
    a = write_classification(d / "a.jsonl", 30, seed=1)
    b = write_completion(d / "b.jsonl", 30, seed=2)
    c = write_classification(d / "c.jsonl", 30, seed=3)
    configs = {  # different ranks, alphas, targets, formats, batch sizes, lr schedules
        "a": lora_config(str(base), str(a), rank=4, targets=("q_proj", "v_proj"), batch_size=4),
        "b": lora_config(str(base), str(b), rank=8, targets=("o_proj", "up_proj", "down_proj"), batch_size=6,
                         rank_pattern={"down_proj": 2}),
        "c": lora_config(str(base), str(c), rank=2, targets=("q_proj", "gate_proj"), batch_size=3, seed=7,
                         use_rslora=True),
    }
    configs["c"]["train"].update(lr_schedule="cosine", warmup_steps=2)
    for cfg in configs.values():
        cfg["train"]["steps"] = NUM_STEPS
    return d, base, configs


def _train(base, configs, work, *, packer=None, steps=NUM_STEPS):
    trainer = MultiLoraTrainer(base, packer=packer)
    for job_id, cfg in configs.items():
        trainer.add_job(job_id, cfg, work_dir=work / job_id)
    history = [trainer.step() for _ in range(steps)]
    return trainer, history


def test_packed_equals_solo_and_loads_in_peft(setup, tmp_path):
    _, base, configs = setup
    # capacity 96 tokens: each step's 13 samples are split over several microbatches, mixing jobs
    packer = functools.partial(pack_microbatches, capacity_tokens=96)
    packed, history = _train(base, configs, tmp_path / "packed", packer=packer)
    assert all(set(h) == set(configs) and h[j]["num_microbatches"] > 1 for h in history for j in h)
    for job_id, cfg in configs.items():
        solo, solo_history = _train(base, {job_id: cfg}, tmp_path / f"solo-{job_id}")
        got, want = packed.adapter(job_id).state_dict(), solo.adapter(job_id).state_dict()
        assert got.keys() == want.keys()
        for key in want:
            torch.testing.assert_close(got[key], want[key], atol=ATOL, rtol=RTOL, msg=f"{job_id} {key}")
        # the adapter trained: B moved away from its zero init
        assert any(v.abs().max() > 1e-4 for k, v in got.items() if k.startswith("lora_B"))
        for step in range(NUM_STEPS):
            assert history[step][job_id]["loss"] == pytest.approx(solo_history[step][job_id]["loss"], rel=1e-5)
            assert history[step][job_id]["tokens"] == solo_history[step][job_id]["tokens"]
        assert packed.is_done(job_id)
    assert packed.step() == {}  # every job is done

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[1, 5, 9, 17, 33, 2, 70]])
    for job_id in configs:
        out = packed.export(job_id, tmp_path / "export" / job_id, base_model_name_or_path="tiny")
        peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out).eval()
        solo = MultiLoraTrainer(base)
        solo.add_job(job_id, configs[job_id], work_dir=tmp_path / "reload" / job_id)
        solo.adapter(job_id).load_state_dict(packed.adapter(job_id).state_dict())
        solo.model.eval()
        with torch.no_grad(), solo.router.route([(0, 0, 1)]):
            ours = solo.model(ids).logits
            theirs = peft_model(ids).logits
            plain = AutoModelForCausalLM.from_pretrained(base)(ids).logits
        torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(plain, ours, atol=1e-4)  # the adapter changes the output


def test_packed_in_one_microbatch_equals_solo_within_gemm_rounding(setup, tmp_path):
    # One microbatch per step: every adapter's rows get the same per-row arithmetic as alone and the
    # loss is the sum of per-job means (ANCHORS), so the math is the same. The GEMMs are not: the
    # packed batch has 13 rows padded to the longest of all jobs, a solo batch 3-6 rows padded to its
    # own, and BLAS picks its kernel (and so the summation order inside a dot product) by shape and
    # CPU. That differs by float32 rounding (~1e-7 relative) per product; Adam's update
    # lr * m / (sqrt(v) + eps) is scale-free, so it moves each weight by ~lr * 1e-5 at most per step
    # (seen: 3e-8 after 3 steps on AMD EPYC, 0 on Intel Xeon). A routing or loss-weighting mistake
    # moves weights by ~lr = 1e-2 per step: ATOL sits five orders of magnitude below that.
    _, base, configs = setup
    steps = 3
    assert {cfg["train"]["lr"] for cfg in configs.values()} == {1e-2}
    atol = steps * 1e-2 * 1e-5
    packed, _ = _train(base, configs, tmp_path / "packed", steps=steps)
    for job_id, cfg in configs.items():
        solo, _ = _train(base, {job_id: cfg}, tmp_path / f"solo-{job_id}", steps=steps)
        for key, value in solo.adapter(job_id).state_dict().items():
            torch.testing.assert_close(packed.adapter(job_id).state_dict()[key], value, atol=atol, rtol=0)
        # the bound is tight against what training moved: B left its zero init by far more than atol
        assert max(v.abs().max() for k, v in solo.adapter(job_id).state_dict().items() if "lora_B" in k) > 100 * atol


def test_resume_from_checkpoint_is_exact(setup, tmp_path):
    _, base, configs = setup
    cfgs = {k: configs[k] for k in ("a", "c")}
    straight, _ = _train(base, cfgs, tmp_path / "straight")

    first = MultiLoraTrainer(base)
    for job_id, cfg in cfgs.items():
        first.add_job(job_id, cfg, work_dir=tmp_path / "resumed" / job_id)
    for _ in range(2):
        first.step()
    first.checkpoint("a")
    first.checkpoint("c")
    first.step()  # progress after the checkpoint is lost, as when a worker dies
    del first

    second = MultiLoraTrainer(base)
    for job_id, cfg in cfgs.items():
        assert second.add_job(job_id, cfg, work_dir=tmp_path / "resumed" / job_id) == 2
    while not all(second.is_done(j) for j in cfgs):
        second.step()
    for job_id in cfgs:
        for key, value in straight.adapter(job_id).state_dict().items():
            torch.testing.assert_close(second.adapter(job_id).state_dict()[key], value, atol=0, rtol=0)


def test_jobs_join_and_leave_between_steps(setup, tmp_path):
    _, base, configs = setup
    trainer = MultiLoraTrainer(base)
    trainer.add_job("a", configs["a"], work_dir=tmp_path / "a")
    assert set(trainer.step()) == {"a"}
    trainer.add_job("b", configs["b"], work_dir=tmp_path / "b")
    assert set(trainer.step()) == {"a", "b"}
    trainer.remove_job("a")
    assert set(trainer.step()) == {"b"}
    assert trainer.job_step("b") == 2
    with pytest.raises(ConfigError, match="already"):
        trainer.add_job("b", configs["b"], work_dir=tmp_path / "b")


def test_bad_inputs_raise_one_line_errors(setup, tmp_path):
    _, base, configs = setup
    trainer = MultiLoraTrainer(base)
    with pytest.raises(ConfigError, match="lora.target_modules"):
        trainer.add_job("x", {**configs["a"], "lora": {"target_modules": ["nope"]}}, work_dir=tmp_path / "x")
    (tmp_path / "y").mkdir()
    (tmp_path / "y" / "checkpoint.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="checkpoint.pt"):
        trainer.add_job("y", configs["a"], work_dir=tmp_path / "y")
    assert trainer.job_ids == []


@pytest.mark.parametrize("tier", ["host", "nvme"])
def test_streamed_base_equals_resident_base(setup, tmp_path, tier):
    """One streamed copy of the base serves every packed adapter, with the resident base's numbers."""
    from ferrytune.config import OffloadConfig

    _, base, configs = setup
    packer = functools.partial(pack_microbatches, capacity_tokens=96)
    resident, res_hist = _train(base, configs, tmp_path / "res", packer=packer, steps=2)
    offload = OffloadConfig(tier=tier, nvme_dir=str(tmp_path / "nvme"), prefetch_depth=1)
    streamed = MultiLoraTrainer(base, packer=packer, offload=offload)
    for job_id, cfg in configs.items():
        streamed.add_job(job_id, cfg, work_dir=tmp_path / "str" / job_id)
    before = streamed.runtime.streamer.stats.snapshot()
    str_hist = [streamed.step() for _ in range(2)]
    after = streamed.runtime.streamer.stats.snapshot()
    for job_id in configs:
        for a, b in zip(res_hist, str_hist):
            assert a[job_id]["loss"] == b[job_id]["loss"]
        got, want = streamed.adapter(job_id).state_dict(), resident.adapter(job_id).state_dict()
        for key in want:
            assert torch.equal(got[key], want[key]), (job_id, key)
    # the base is only read: nothing is written back during training
    assert all(after["bytes_written"][t] == before["bytes_written"][t] for t in after["bytes_written"])
    if tier == "host":  # fp32 host masters on a CPU device serve in place: nothing moves
        assert after["bytes_read"][tier] == before["bytes_read"][tier]
    else:
        assert after["bytes_read"][tier] > before["bytes_read"][tier]


def test_worker_builds_a_streamed_base_from_its_offload_settings(setup, tmp_path):
    """`ferrytune serve --base-tier nvme` reaches the worker: its trainer streams the base."""
    from ferrytune.service._controller import _worker_offload
    from ferrytune.service._worker import TrainWorker

    _, base, _ = setup
    offload = _worker_offload({"tier": "nvme", "nvme_dir": str(tmp_path / "nv"), "host_budget_gib": 1.0}, "w3")
    worker = TrainWorker("w3", str(base), dtype="float32", token_capacity=256, checkpoint_every_steps=5,
                         num_threads=1, offload=offload, store_dtype="bfloat16")
    trainer = worker._ensure_trainer()
    assert trainer.engine is not None
    assert (tmp_path / "nv" / "w3" / "store.json").exists()
    assert trainer.runtime.store_dtype == torch.bfloat16


# SGD-SaI steps ~ lr * sqrt(numel) per tensor (its g-SNR scale): a smaller lr than Adam's
LEAN = {"a": ("adam_mini", 1e-2), "b": ("sgd_sai", 1e-3), "c": ("adamw", 1e-2)}


def _lean_configs(configs):
    out = {}
    for job_id, (optimizer, lr) in LEAN.items():
        cfg = {**configs[job_id], "train": {**configs[job_id]["train"], "optimizer": optimizer, "lr": lr,
                                            "weight_decay": 0.05}}
        out[job_id] = cfg
    return out


def test_jobs_with_different_optimizers_packed_equal_solo_and_resume_exactly(setup, tmp_path):
    """Each job steps its own train.optimizer (three different ones in one packed step)."""
    _, base, configs = setup
    configs = _lean_configs(configs)
    packer = functools.partial(pack_microbatches, capacity_tokens=96)
    packed, history = _train(base, configs, tmp_path / "packed", packer=packer)
    assert all(h[j]["num_microbatches"] > 1 for h in history for j in h)
    keys = {"adamw": {"step", "exp_avg", "exp_avg_sq"}, "adam_mini": {"step", "m", "v"},
            "sgd_sai": {"gsnr", "momentum_buffer"}}
    for job_id, cfg in configs.items():
        solo, solo_history = _train(base, {job_id: cfg}, tmp_path / f"solo-{job_id}")
        got, want = packed.adapter(job_id).state_dict(), solo.adapter(job_id).state_dict()
        for key in want:
            torch.testing.assert_close(got[key], want[key], atol=ATOL, rtol=RTOL, msg=f"{job_id} {key}")
        assert any(v.abs().max() > 1e-4 for k, v in got.items() if k.startswith("lora_B"))
        for step in range(NUM_STEPS):
            assert history[step][job_id]["loss"] == pytest.approx(solo_history[step][job_id]["loss"], rel=1e-5)
        # the job's checkpoint holds the state of the optimizer its config names
        state = torch.load(packed.checkpoint(job_id), weights_only=True)["optimizer"]["state"]
        assert state and all(set(s) == keys[cfg["train"]["optimizer"]] for s in state.values())

    # resume: two steps, checkpoint, a lost third step, a new trainer finishes; equals straight
    first = MultiLoraTrainer(base, packer=packer)
    for job_id, cfg in configs.items():
        first.add_job(job_id, cfg, work_dir=tmp_path / "resumed" / job_id)
    for _ in range(2):
        first.step()
    for job_id in configs:
        first.checkpoint(job_id)
    first.step()
    del first
    second = MultiLoraTrainer(base, packer=packer)
    for job_id, cfg in configs.items():
        assert second.add_job(job_id, cfg, work_dir=tmp_path / "resumed" / job_id) == 2
    while not all(second.is_done(j) for j in configs):
        second.step()
    for job_id in configs:
        for key, value in packed.adapter(job_id).state_dict().items():
            torch.testing.assert_close(second.adapter(job_id).state_dict()[key], value, atol=0, rtol=0)
    # a job resumed with another optimizer than its checkpoint's is refused, naming the key
    switched = {**configs["a"], "train": {**configs["a"]["train"], "optimizer": "adamw"}}
    with pytest.raises(CheckpointError, match=r"train\.optimizer: the checkpoint holds the state of 'adam_mini', "
                                              r"this run uses 'adamw'"):
        MultiLoraTrainer(base).add_job("a", switched, work_dir=tmp_path / "resumed" / "a")


@pytest.mark.parametrize("optimizer", ["adamw", "adam_mini", "sgd_sai"])
def test_spec_memory_estimate_is_the_optimizer_state_a_job_holds(setup, tmp_path, optimizer):
    """The service's adapter bytes for a job = fp32 parameters + gradients + the real state of its optimizer."""
    from service_testlib import job_spec

    from ferrytune.service._spec import BaseCatalog, validate_spec

    d, base, configs = setup
    files = tmp_path / "files"
    files.mkdir()
    (files / "a.jsonl").write_bytes((d / "a.jsonl").read_bytes())
    spec = job_spec("tiny", "a.jsonl", rank=4, targets=("q_proj", "v_proj", "down_proj"))
    spec["train"].update(optimizer=optimizer, steps=2)
    valid = validate_spec(spec, catalog=BaseCatalog({"tiny": str(base)}), files_root=files,
                          outputs_root=tmp_path / "out")
    cfg = {**spec, "model": {"path": str(base)}, "data": {**spec["data"], "train": str(files / "a.jsonl")}}
    trainer, _ = _train(base, {"j": cfg}, tmp_path / "job", steps=2)
    opt = trainer._jobs["j"].optimizer
    params = list(trainer.adapter("j").parameters())
    held = sum(p.numel() * p.element_size() + p.grad.numel() * p.grad.element_size() for p in params)
    held += sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
                if isinstance(v, torch.Tensor))
    assert len(opt.state) == len(params) and valid.adapter_params == sum(p.numel() for p in params)
    assert valid.adapter_bytes == held
    adamw = validate_spec({**spec, "train": {**spec["train"], "optimizer": "adamw"}},
                          catalog=BaseCatalog({"tiny": str(base)}), files_root=files, outputs_root=tmp_path / "out")
    if optimizer != "adamw":
        assert valid.adapter_bytes < 0.8 * adamw.adapter_bytes

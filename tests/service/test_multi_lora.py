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


def _train(base, configs, work, *, packer=None, steps=NUM_STEPS, packing=False):
    trainer = MultiLoraTrainer(base, packer=packer, packing=packing)
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


def test_packing_without_padding_equals_solo_within_gemm_rounding(setup, tmp_path):
    """``packing``: each microbatch's sequences of all three jobs end to end in one row, routed to
    their adapters by token range; every job trains as alone (unpacked, padded, one microbatch).

    Bound as in the test above, for the same reason: the same arithmetic per sequence, GEMMs of
    other shapes (one row of up to 96 tokens instead of 3-6 padded rows; attention over a
    block-diagonal mask of the whole row), so float32 rounding differs per product; Adam's scale-free
    update turns a rounding-level gradient difference into up to ~lr * 1e-4 per step (seen: 8e-7
    after 3 steps). A token routed to the wrong adapter, or attention across a boundary, moves
    weights by ~lr = 1e-2 per step: ATOL sits four orders of magnitude below that.
    """
    _, base, configs = setup
    steps = 3
    atol = steps * 1e-2 * 1e-4
    packer = functools.partial(pack_microbatches, capacity_tokens=96, packed=True)
    packed, history = _train(base, configs, tmp_path / "packed", packer=packer, steps=steps, packing=True)
    for h in history:
        m = next(iter(h.values()))
        assert m["num_microbatches"] > 1  # the capacity splits the step: jobs mix inside microbatches
        assert m["real_tokens"] == sum(h[j]["tokens"] for j in h)
        assert m["padded_tokens"] / m["real_tokens"] <= 1.05
    padded, padded_history = _train(base, configs, tmp_path / "padded", steps=steps,
                                    packer=functools.partial(pack_microbatches, capacity_tokens=96))
    assert all(padded_history[0][j]["padded_tokens"] > history[0][j]["padded_tokens"] for j in configs)
    for job_id, cfg in configs.items():
        solo, solo_history = _train(base, {job_id: cfg}, tmp_path / f"solo-{job_id}", steps=steps)
        for key, value in solo.adapter(job_id).state_dict().items():
            err = float((packed.adapter(job_id).state_dict()[key] - value).abs().max())
            assert err <= atol, f"{job_id} {key}: max|packed - solo| = {err:.3g} > {atol:.3g}"
        assert max(v.abs().max() for k, v in solo.adapter(job_id).state_dict().items() if "lora_B" in k) > 100 * atol
        for step in range(steps):
            assert history[step][job_id]["loss"] == pytest.approx(solo_history[step][job_id]["loss"], rel=1e-5)


def test_resume_from_checkpoint_is_exact(setup, tmp_path):
    _, base, configs = setup
    cfgs = {k: configs[k] for k in ("a", "c")}
    straight, _ = _train(base, cfgs, tmp_path / "straight")

    _resume_equals(base, cfgs, straight, tmp_path / "resumed")


def _resume_equals(base, configs, straight, work, **trainer_kw):
    """Two steps, a checkpoint of every job, a third step that is lost (as when a worker dies); a new
    trainer resumes from the checkpoints at step 2, finishes, and equals ``straight`` bit for bit."""
    first = MultiLoraTrainer(base, **trainer_kw)
    for job_id, cfg in configs.items():
        first.add_job(job_id, cfg, work_dir=work / job_id)
    for _ in range(2):
        first.step()
    for job_id in configs:
        first.checkpoint(job_id)
    first.step()
    del first
    second = MultiLoraTrainer(base, **trainer_kw)
    for job_id, cfg in configs.items():
        assert second.add_job(job_id, cfg, work_dir=work / job_id) == 2
    while not all(second.is_done(j) for j in configs):
        second.step()
    for job_id in configs:
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
    streamed.close()
    if tier == "host":  # fp32 host masters on a CPU device serve in place: nothing moves
        assert after["bytes_read"][tier] == before["bytes_read"][tier]
    else:
        assert after["bytes_read"][tier] > before["bytes_read"][tier]


def test_packing_on_a_streamed_base_equals_the_resident_base(setup, tmp_path):
    """position_ids (and the rotary embeddings / packed mask the model derives) pass through the
    engine's intercepted layers: NVMe-streamed packed training = resident packed, bit for bit."""
    from ferrytune.config import OffloadConfig

    _, base, configs = setup
    packer = functools.partial(pack_microbatches, capacity_tokens=96, packed=True)
    resident, res_hist = _train(base, configs, tmp_path / "res", packer=packer, steps=2, packing=True)
    offload = OffloadConfig(tier="nvme", nvme_dir=str(tmp_path / "nvme"), prefetch_depth=1)
    streamed = MultiLoraTrainer(base, packer=packer, offload=offload, packing=True)
    for job_id, cfg in configs.items():
        streamed.add_job(job_id, cfg, work_dir=tmp_path / "str" / job_id)
    str_hist = [streamed.step() for _ in range(2)]
    for job_id in configs:
        for a, b in zip(res_hist, str_hist):
            assert a[job_id]["loss"] == b[job_id]["loss"]
        got, want = streamed.adapter(job_id).state_dict(), resident.adapter(job_id).state_dict()
        for key in want:
            assert torch.equal(got[key], want[key]), (job_id, key)
    streamed.close()


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


def test_serve_packing_reaches_the_worker_and_its_packer(setup, tmp_path):
    """`ferrytune serve --packing` (ControllerSettings.packing): the worker's trainer packs without
    padding, its packer counts real tokens."""
    from ferrytune.service._worker import TrainWorker

    _, base, configs = setup
    worker = TrainWorker("w4", str(base), dtype="float32", token_capacity=64, checkpoint_every_steps=5,
                         num_threads=1, packing=True)
    trainer = worker._ensure_trainer()
    assert trainer.packing
    assert trainer._packer([30, 30, 4]) == [[0, 1, 2]]  # 64 real tokens fit one microbatch
    assert len(TrainWorker("w5", str(base), dtype="float32", token_capacity=64, checkpoint_every_steps=5,
                           num_threads=1)._ensure_trainer()._packer([30, 30, 4])) == 2  # padded: 3 x 30 > 64
    trainer.add_job("a", configs["a"], work_dir=tmp_path / "a")
    m = trainer.step()["a"]
    assert m["padded_tokens"] == m["real_tokens"] == m["tokens"]


def _with_eval(cfg, eval_file, **train):
    cfg = {**cfg, "data": {**cfg["data"], "eval": str(eval_file)}, "train": {**cfg["train"], **train}}
    return cfg


def _drain_evals(trainer, results):
    while any(trainer.evaluating(j) for j in trainer.job_ids):
        for job_id, r in trainer.evaluate_some(0.0).items():
            results.setdefault(job_id, []).append(r)


def _train_with_evals(trainer, configs, work):
    """Step all jobs, running every pending eval at each step boundary; {job: [eval results]}."""
    results = {}
    for job_id, cfg in configs.items():
        trainer.add_job(job_id, cfg, work_dir=work / job_id)
    _drain_evals(trainer, results)
    while not all(trainer.is_done(j) for j in configs):
        trainer.step()
        _drain_evals(trainer, results)
    return results


def test_eval_equals_ferrytune_eval_alone_exactly_and_packed_within_rounding(setup, tmp_path):
    from ferrytune.config import config_from_dict
    from ferrytune.launch.train import run_eval

    d, base, configs = setup
    ev_a = write_classification(d / "ev-a.jsonl", 21, seed=11)  # 6 chunks of 4 (the last short)
    ev_b = write_completion(d / "ev-b.jsonl", 17, seed=12)  # 3 chunks of 6
    cfgs = {"a": _with_eval(configs["a"], ev_a, eval_every_steps=2), "b": _with_eval(configs["b"], ev_b)}

    def reference(job_id, trainer):
        out = trainer.export(job_id, tmp_path / f"export-{job_id}-{len(trainer.job_ids)}")
        cfg = config_from_dict({**cfgs[job_id], "output_dir": str(tmp_path / "unused")}, source="test")
        return run_eval(cfg, checkpoint=str(out))

    # alone: the same chunks through the same arithmetic as `ferrytune eval`: equal bit for bit
    alone = MultiLoraTrainer(base, eval_tokens=512)
    evals = _train_with_evals(alone, {"a": cfgs["a"]}, tmp_path / "alone")["a"]
    assert [e["step"] for e in evals] == [0, 2, 4, 5] and evals[-1]["done"] == 1.0
    ref = reference("a", alone)
    assert (evals[-1]["eval_loss"], evals[-1]["eval_accuracy"], evals[-1]["eval_samples"]) == (
        ref["loss"], ref["accuracy"], ref["samples"])

    # packed: both jobs' final evals are pending at once and share forwards (other padding and GEMM
    # shapes): accuracy is a count of argmax hits and stays equal; the loss agrees to float32 rounding
    packed = MultiLoraTrainer(base, eval_tokens=512)
    forwards = []
    real = packed._eval_forward
    packed._eval_forward = lambda chunks, index: forwards.append(len(chunks)) or real(chunks, index)
    results = _train_with_evals(packed, cfgs, tmp_path / "packed")
    assert [e["step"] for e in results["b"]] == [0, 5] and max(forwards) == 2  # a and b shared forwards
    for job_id in cfgs:
        ref = reference(job_id, packed)
        got = results[job_id][-1]
        assert got["eval_accuracy"] == ref["accuracy"] and got["eval_samples"] == ref["samples"]
        assert got["eval_loss"] == pytest.approx(ref["loss"], rel=1e-5, abs=0)


def test_packing_evaluates_without_padding_like_ferrytune_eval(setup, tmp_path):
    """``packing=True``: eval forwards put the pending chunks' sequences end to end in one row too
    (each job's range routed to its adapter); accuracy and sample count equal ``ferrytune eval`` of
    the exported adapter, the loss within float32 rounding (other GEMM shapes)."""
    from ferrytune.config import config_from_dict
    from ferrytune.launch.train import run_eval

    d, base, configs = setup
    ev_a = write_classification(d / "evp-a.jsonl", 21, seed=21)
    ev_b = write_completion(d / "evp-b.jsonl", 17, seed=22)
    cfgs = {"a": _with_eval(configs["a"], ev_a, eval_every_steps=2), "b": _with_eval(configs["b"], ev_b)}
    trainer = MultiLoraTrainer(base, eval_tokens=512, packing=True)
    rows = []
    real = trainer._forward_hidden
    trainer._forward_hidden = lambda ids, mask, pos=None: rows.append((ids.shape[0], mask is None and pos is not None)) \
        or real(ids, mask, pos)
    results = _train_with_evals(trainer, cfgs, tmp_path / "packed")
    assert rows and all(r == (1, True) for r in rows), "every forward (training and eval) is one packed row"
    for job_id in cfgs:
        out = trainer.export(job_id, tmp_path / f"export-{job_id}")
        cfg = config_from_dict({**cfgs[job_id], "output_dir": str(tmp_path / "unused")}, source="test")
        ref, got = run_eval(cfg, checkpoint=str(out)), results[job_id][-1]
        assert got["eval_accuracy"] == ref["accuracy"] and got["eval_samples"] == ref["samples"]
        assert got["eval_loss"] == pytest.approx(ref["loss"], rel=1e-5, abs=0)


def test_an_eval_runs_in_slices_between_a_neighbours_steps(setup, tmp_path):
    """With eval_slice_s = 0 a worker runs ONE eval forward between two packed steps: a neighbour's
    step waits one forward for another job's eval, never the whole eval."""
    from ferrytune.service._worker import TrainWorker, add_command

    d, base, configs = setup
    ev = write_classification(d / "ev-big.jsonl", 120, seed=13)  # 30 chunks of 4
    worker = TrainWorker("w0", str(base), dtype="float32", token_capacity=512, checkpoint_every_steps=1000,
                         num_threads=1, eval_slice_s=0.0)
    cfg_a = _with_eval({**configs["a"], "train": {**configs["a"]["train"], "steps": 1}}, ev)
    cfg_b = {**configs["b"], "train": {**configs["b"]["train"], "steps": 200}}
    commands = [add_command(job_id, config=cfg, train_path=cfg["data"]["train"], work_dir=str(tmp_path / job_id),
                            adapter_dir=str(tmp_path / f"{job_id}-adapter"), base_name="tiny")
                for job_id, cfg in (("b", cfg_b), ("a", cfg_a))]
    worker.tick(commands, slice_s=0.0)  # loads the base, adds both jobs
    assert worker._trainer.evaluating("a")  # its step-0 baseline
    b_times, a_eval = [], None
    for _ in range(100):
        report = worker.tick([], slice_s=0.5)
        b_times += [m["time"] for m in report["jobs"]["b"]["metrics"]]
        if report["jobs"].get("a", {}).get("evals"):
            a_eval = report["jobs"]["a"]["evals"][0]
            break
    assert a_eval is not None and a_eval["step"] == 0 and a_eval["eval_samples"] == 120
    # b stepped once per eval forward while a's 30-chunk eval ran (all at once, b would have waited)
    assert sum(t <= a_eval["time"] for t in b_times) >= 30, (len(b_times), a_eval)
    worker.close()


def test_a_job_removed_mid_eval_redoes_that_eval_when_it_resumes(setup, tmp_path):
    d, base, configs = setup
    ev = write_classification(d / "ev-resume.jsonl", 21, seed=14)
    cfg = _with_eval(configs["a"], ev, eval_every_steps=2)
    first = MultiLoraTrainer(base)
    first.add_job("a", cfg, work_dir=tmp_path / "a")
    results = {}
    _drain_evals(first, results)
    first.step()
    first.step()
    assert first.evaluating("a") and first.step() == {}  # its step-2 eval is due: it does not step
    first.evaluate_some(0.0)  # one chunk of six, then it is preempted (checkpoint, removed)
    first.checkpoint("a")
    want = _train_with_evals(MultiLoraTrainer(base), {"a": cfg}, tmp_path / "straight")["a"]

    second = MultiLoraTrainer(base)
    assert second.add_job("a", cfg, work_dir=tmp_path / "a") == 2 and second.evaluating("a")
    _drain_evals(second, results)
    assert [r["step"] for r in results["a"]] == [0, 2] and results["a"][1] == want[1]
    second.checkpoint("a")  # after the eval: resuming does not evaluate step 2 again
    third = MultiLoraTrainer(base)
    assert third.add_job("a", cfg, work_dir=tmp_path / "a") == 2 and not third.evaluating("a")


def test_a_streamed_base_evaluates_like_the_resident_one(setup, tmp_path):
    """Eval forwards run through the streamed base's engine (no backward) with the resident base's bits."""
    from ferrytune.config import OffloadConfig

    d, base, configs = setup
    ev = write_classification(d / "ev-stream.jsonl", 13, seed=15)
    cfg = _with_eval({**configs["a"], "train": {**configs["a"]["train"], "steps": 2}}, ev)
    offload = OffloadConfig(tier="nvme", nvme_dir=str(tmp_path / "nvme"), prefetch_depth=1)
    resident = _train_with_evals(MultiLoraTrainer(base), {"a": cfg}, tmp_path / "res")["a"]
    streamed = MultiLoraTrainer(base, offload=offload)
    try:
        got = _train_with_evals(streamed, {"a": cfg}, tmp_path / "str")["a"]
    finally:
        streamed.close()
    assert [r["step"] for r in got] == [0, 2] and got == resident


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
    _resume_equals(base, configs, packed, tmp_path / "resumed", packer=packer)
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

"""The command line: one clear error line and a non-zero exit for bad input; plan; final folder loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from ferrytune.launch.cli import main


def _write_cfg(tmp_path, model_path, **extra) -> str:
    from ferrytune.data import demo_data_path

    cfg = {"method": "zo", "model": {"path": model_path},
           "data": {"train": str(demo_data_path("train"))},
           "train": {"steps": 2, "batch_size": 4, "lr": 1e-4}, "output_dir": str(tmp_path / "out")}
    for k, v in extra.items():
        cfg.setdefault(k, {}).update(v) if isinstance(v, dict) else cfg.__setitem__(k, v)
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return str(p)


def _cli(args, capsys) -> tuple[int, str]:
    code = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    return code, err[-1] if err else ""


def test_minimal_yaml_trains_and_final_loads_in_transformers(tiny_models, tmp_path, capsys):
    """A config with only method, model.path, data.train (prompt/completion) and train.* runs."""
    from transformers import AutoModelForCausalLM

    data = tmp_path / "pc.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i} plus 1 is", "completion": f" {i + 1}"}) + "\n"
                            for i in range(20)))
    p = tmp_path / "min.yaml"
    p.write_text(yaml.safe_dump({"method": "zo", "model": {"path": tiny_models("llama", layers=2, hidden=32)},
                                 "data": {"train": str(data)}, "train": {"steps": 2, "batch_size": 4}}))
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert main(["train", str(p), "--no-progress"]) == 0
    finally:
        os.chdir(cwd)
    out = tmp_path / "runs" / "ferrytune"
    recs = [json.loads(x) for x in open(out / "metrics.jsonl") if "loss" in json.loads(x)]
    for key in ("step", "loss", "tokens_per_s", "host_rss_gib", "bytes_read_device", "read_s", "wall_s"):
        assert key in recs[0]
    AutoModelForCausalLM.from_pretrained(out / "final")


def test_bad_config_key_is_one_line(tiny_models, tmp_path, capsys):
    cfg = _write_cfg(tmp_path, tiny_models("llama", layers=2, hidden=32), train={"lrr": 1})
    code, line = _cli(["train", cfg], capsys)
    assert code == 2 and "train.lrr" in line and line.startswith("ferrytune: error:")


def test_missing_dataset_is_one_line(tiny_models, tmp_path, capsys):
    cfg = _write_cfg(tmp_path, tiny_models("llama", layers=2, hidden=32), data={"train": str(tmp_path / "nope.jsonl")})
    code, line = _cli(["train", cfg], capsys)
    assert code == 2 and "nope.jsonl" in line


def test_truncated_safetensors_is_one_line(tiny_models, tmp_path, capsys):
    import shutil

    src = tiny_models("llama", layers=2, hidden=32)
    broken = tmp_path / "broken"
    shutil.copytree(src, broken)
    f = broken / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    code, line = _cli(["train", _write_cfg(tmp_path, str(broken))], capsys)
    assert code == 2 and "truncated" in line and "model.safetensors" in line


def test_budget_too_small_names_the_budget(tiny_models, tmp_path, capsys):
    cfg = _write_cfg(tmp_path, tiny_models("llama", layers=2, hidden=32),
                     offload={"tier": "nvme", "nvme_dir": str(tmp_path / "nv"), "host_budget_gib": 1e-6})
    code, line = _cli(["train", cfg], capsys)
    assert code == 2 and "offload.host_budget_gib" in line


def test_corrupt_nvme_record_is_detected(tiny_models, cfg_factory, capsys):
    """Flip a byte of a block record on disk mid-run: the next read reports that block."""
    from ferrytune.engine._zo_trainer import ZOTrainer
    from ferrytune.errors import CorruptRecordError

    cfg = cfg_factory(tiny_models("llama", layers=2, hidden=32), offload={"tier": "nvme"}, data={"eval": None})
    tr = ZOTrainer(cfg)
    tr.setup()
    try:
        store = tr.rt.streamer.nvme_store
        rec = store.record("layer.1")
        path = sorted(store.directory.glob("store-*.bin"))[rec.file]
        off = rec.offset
        with open(path, "r+b") as f:
            f.seek(off + 4096 + 10)
            b = f.read(1)
            f.seek(off + 4096 + 10)
            f.write(bytes([b[0] ^ 0xFF]))
        with pytest.raises(CorruptRecordError, match="layer.1"):
            tr.train(progress=False)
    finally:
        try:
            tr.close()
        except Exception:
            pass


def test_plan_prints_placement(tiny_models, tmp_path, capsys):
    cfg = _write_cfg(tmp_path, tiny_models("llama", layers=2, hidden=32),
                     offload={"tier": "nvme", "nvme_dir": str(tmp_path / "nv")})
    assert main(["plan", cfg]) == 0
    out = capsys.readouterr().out
    assert "nvme=3" in out and "host staging" in out


def test_entry_point_exit_code(tmp_path):
    r = subprocess.run([sys.executable, "-m", "ferrytune.launch.cli", "train", str(tmp_path / "missing.yaml")],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("ferrytune: error:")
    assert "Traceback" not in r.stderr


def test_eval_command_on_a_trained_adapter(tiny_models, tmp_path, capsys):
    """`ferrytune eval --checkpoint final/` scores a LoRA run's PEFT adapter."""
    from ferrytune.data import demo_data_path

    cfg = _write_cfg(tmp_path, tiny_models("llama", layers=2, hidden=32), method="lora",
                     data={"eval": str(demo_data_path("dev")), "eval_samples": 8},
                     train={"lr": 1e-2}, lora={"rank": 2})
    assert main(["train", cfg, "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["eval", cfg, "--checkpoint", str(tmp_path / "out" / "final")]) == 0
    out = capsys.readouterr().out
    assert "accuracy=" in out and "samples=8" in out


def test_plan_prints_the_backward_choice_for_lora(tiny_models, tmp_path, capsys):
    cfg = _write_cfg(tmp_path, tiny_models("llama", layers=2, hidden=32), method="lora",
                     offload={"tier": "host", "activation_budget_gib": 0})
    assert main(["plan", cfg]) == 0
    out = capsys.readouterr().out
    assert "backward: keep activations of 0 layers, recompute 2" in out
    assert "MiB per layer per micro-batch" in out and "activation budget 0.000 GiB" in out


def test_plan_prints_the_accumulation_order(tiny_models, tmp_path, capsys):
    path = tiny_models("llama", layers=2, hidden=32)
    for budget, want in ((None, "accumulation: layer_major (2 micro-batches per layer visit"),
                         (0, "accumulation: micro_major (train.accumulation=auto: the hidden states between layers")):
        cfg = _write_cfg(tmp_path, path, method="lora", offload={"tier": "host", "activation_budget_gib": budget},
                         train={"micro_batch_size": 2, "accumulation": "auto"})
        assert main(["plan", cfg]) == 0
        assert want in capsys.readouterr().out


def test_the_embedded_demo_learns(tmp_path, capsys, monkeypatch):
    """The quick start's `ferrytune train` (no config) prints eval accuracy before and after, and
    after is clearly better: MeZO on the demo model's adapters learns the toy task (0.515 -> 0.81
    on this repo's machines; the bound leaves room for another CPU's rounding to steer ZO elsewhere)."""
    import re

    monkeypatch.chdir(tmp_path)
    assert main(["train", "--no-progress"]) == 0
    out = capsys.readouterr().out
    m = re.search(r"eval accuracy: ([0-9.]+) at step 0 -> ([0-9.]+) at step 4000 \(200 samples\)", out)
    assert m, out
    before, after = float(m.group(1)), float(m.group(2))
    assert before < 0.6 and after >= before + 0.12, (before, after)
    assert (tmp_path / "ferrytune-demo" / "run" / "final" / "adapter_model.safetensors").exists()

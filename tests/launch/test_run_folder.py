"""A run's folder belongs to its training: evaluation leaves it byte for byte as it was, and a fresh
start over a finished run is refused unless overwriting is asked for."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml

from ferrytune.data import demo_data_path
from ferrytune.launch.cli import main

LORA = {"rank": 4, "target_modules": ["q_proj", "v_proj"]}


def _config(tmp_path: Path, model: str, method: str, trainable: str = "all") -> Path:
    out = tmp_path / "run"
    cfg = {"method": method, "model": {"path": model},
           "data": {"train": str(demo_data_path("train")), "eval": str(demo_data_path("dev")), "eval_samples": 8},
           "train": {"steps": 2, "batch_size": 4, "lr": 1e-3, "checkpoint_every_steps": 1},
           # the store inside the run folder: an evaluation must not rebuild (delete) it either
           "offload": {"tier": "nvme", "nvme_dir": str(out / "nvme")},
           "output_dir": str(out)}
    if method == "lora" or trainable == "lora":
        cfg["lora"] = LORA
    if trainable == "lora":
        cfg["zo"] = {"trainable": "lora", "eps": 1e-2}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    """Every file and folder under ``folder``: a file's content hash and mtime (ns), a folder's name.
    (A folder's own mtime is left out: the evaluation's scratch store comes and goes in nvme_dir.)"""
    snap = {}
    for p in sorted(folder.rglob("*")):
        snap[str(p.relative_to(folder))] = (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns) \
            if p.is_file() else ("dir", 0)
    return snap


def _cli(args, capsys) -> tuple[int, str]:
    code = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    return code, err[-1] if err else ""


@pytest.mark.parametrize("method,trainable", [("lora", "all"), ("zo", "all"), ("zo", "lora")])
def test_eval_of_final_leaves_the_run_folder_byte_identical(tiny_models, tmp_path, capsys, method, trainable):
    cfg = _config(tmp_path, tiny_models("llama", layers=2, hidden=32), method, trainable)
    run = tmp_path / "run"
    assert main(["train", str(cfg), "--no-progress"]) == 0
    assert (run / "metrics.jsonl").exists() and (run / "final").is_dir()
    before = _snapshot(run)
    result = tmp_path / "elsewhere" / "eval.json"
    result.parent.mkdir()
    capsys.readouterr()
    assert main(["eval", str(cfg), "--checkpoint", str(run / "final"), "--output", str(result)]) == 0
    printed = capsys.readouterr().out
    assert "accuracy=" in printed
    assert _snapshot(run) == before  # nothing written, nothing removed, not even the NVMe store
    written = json.loads(result.read_text())
    assert written["checkpoint"] == str(run / "final") and 0.0 <= written["accuracy"] <= 1.0
    assert sorted(p.name for p in result.parent.iterdir()) == ["eval.json"]  # no temporary left


def test_fresh_start_over_a_finished_run_is_refused_unless_overwrite(tiny_models, tmp_path, capsys):
    cfg = _config(tmp_path, tiny_models("llama", layers=2, hidden=32), "zo")
    run = tmp_path / "run"
    assert main(["train", str(cfg), "--no-progress"]) == 0
    before = _snapshot(run)
    code, line = _cli(["train", str(cfg), "--no-progress", "--set", "resume=never"], capsys)
    assert code == 2
    assert "output_dir" in line and "already holds a run" in line and "overwrite: true" in line, line
    assert _snapshot(run) == before
    # asked for explicitly: the previous run's files are replaced, not mixed with the new run's
    (run / "checkpoints" / "step-000099").mkdir()  # a checkpoint only the old run could have
    (run / "checkpoints" / "step-000099" / "trainer_state.json").write_text('{"method": "zo", "step": 99}')
    (run / "notes.txt").write_text("mine")  # not a run file: kept
    assert main(["train", str(cfg), "--no-progress", "--set", "resume=never", "--set", "overwrite=true"]) == 0
    assert not (run / "checkpoints" / "step-000099").exists()
    assert (run / "notes.txt").read_text() == "mine"
    records = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == [1, 2]

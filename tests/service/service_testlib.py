"""Helpers for the service tests: a tiny random LLaMA base + tokenizer on disk, tiny datasets, specs.

A plain module with a unique name (test folders have no __init__.py)."""

from __future__ import annotations

import json
import random
import socket
from pathlib import Path

WORDS = ["good", "bad", "great", "terrible", "movie", "film", "plot", "actor", "scene", "boring", "funny", "sad", "long", "short", "story", "music", "love", "hate", "best", "worst", "fine", "dull", "fresh", "smart"]
CORPUS = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))] + [" It was terrible. It was great."] * 20


def make_tiny_base(out: Path) -> Path:
    """A random 2-layer LLaMA (hidden 32) saved with save_pretrained, with a BPE tokenizer beside it."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = Path(out)
    if (out / "config.json").exists():
        return out
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(CORPUS, trainer)
    bpe.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="<|endoftext|>")
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=128,
                         bos_token_id=1, eos_token_id=0, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def write_classification(path: Path, num_rows: int, *, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(num_rows):
            words = rng.choices(WORDS, k=rng.randint(2, 12))
            f.write(json.dumps({"text": " ".join(words), "label": rng.randint(0, 1)}) + "\n")
    return path


def write_completion(path: Path, num_rows: int, *, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(num_rows):
            prompt = " ".join(rng.choices(WORDS, k=rng.randint(1, 6)))
            completion = " " + " ".join(rng.choices(WORDS, k=rng.randint(1, 6)))
            f.write(json.dumps({"prompt": prompt, "completion": completion}) + "\n")
    return path


def lora_config(base: str, train: str, *, rank=4, targets=("q_proj", "v_proj"), steps=4, batch_size=4,
                lr=1e-2, seed=0, **lora) -> dict:
    """A method-lora TrainConfig dict (as config_from_dict takes it)."""
    return {
        "method": "lora",
        "model": {"path": base},
        "data": {"train": train, "max_length": 32},
        "train": {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "grad_clip": 1.0},
        "lora": {"rank": rank, "alpha": 2.0 * rank, "target_modules": list(targets), **lora},
    }


def job_spec(base_name: str, train_name: str, **kw) -> dict:
    """A service job spec: the LoRA config with ``model: NAME`` and a dataset named relative to the tenant."""
    spec = lora_config("unused", train_name, **kw)
    spec["model"] = base_name
    return spec


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_healthy(url: str, proc, wait_s: float) -> None:
    """Poll ``url``/v1/health until the service started as ``proc`` answers; fail if it exits or ``wait_s`` passes."""
    import time

    import requests

    deadline = time.monotonic() + wait_s
    while True:
        try:
            if requests.get(f"{url}/v1/health", timeout=2).ok:
                return
        except requests.ConnectionError:
            pass
        out = proc.stdout.read() if proc.poll() is not None and proc.stdout else "timeout"
        assert proc.poll() is None and time.monotonic() < deadline, out
        time.sleep(0.2)


def succeeded(job: dict) -> bool:
    return job["state"] == "succeeded"


def wait_for(client, job_id: str, predicate=succeeded, *, timeout_s: float = 120.0, poll_s: float = 0.1) -> dict:
    """Poll ``client.status(job_id)`` until ``predicate(job)``; returns that status.

    Fails with the job's status and log tail when the time runs out, or as soon as the job ends
    (failed/cancelled) without meeting ``predicate``: a wait for ``state == "failed"`` is met
    before that check, so it still works."""
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        job = client.status(job_id)
        if predicate(job):
            return job
        if job["state"] in ("failed", "cancelled") or time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} never got there: {job}\n{client.logs(job_id)}")
        time.sleep(poll_s)


def add_tenant(state_dir, name: str) -> str:
    """``ferrytune tenants add NAME --state-dir DIR`` run in-process; returns the token it prints."""
    import contextlib
    import io

    from ferrytune.service.cli import main as cli_main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        assert cli_main(["tenants", "add", name, "--state-dir", str(state_dir)]) == 0
    return out.getvalue().strip()

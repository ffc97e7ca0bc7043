"""Datasets, prompt templates and verbalizers, deterministic resumable batching.

Pipeline: ``load_jsonl`` (validate rows; ``JsonlChecker``: the same rules on a stream) -> ``encode`` (tokens, loss positions)
-> ``Batcher.batches_for_step`` (micro-batches of step s) -> model ->
``gather_positions`` -> ``loss_per_sample`` / ``correct_per_sample``.
``collate_packed`` / ``gather_packed`` are the padding-free form (``data.packing``): a micro-batch's
sequences end to end in a row, ``position_ids`` restarting at 0 per sequence.
``load_examples(cfg.data, tokenizer)`` runs the first two steps from a config.
"""

from pathlib import Path

from ferrytune.data._batch import (Batch, PackedBatch, collate, collate_packed, correct_per_sample, gather_packed,
                                   gather_positions, join_packed, loss_per_sample, pad_positions)
from ferrytune.data._batcher import Batcher, eval_batches, shard
from ferrytune.data._encode import Example, encode, load_examples, load_tokenizer, pad_id_for, verbalizer_token_ids
from ferrytune.data._jsonl import ClassificationRow, CompletionRow, Dataset, JsonlChecker, load_jsonl

DEMO_DIR = Path(__file__).resolve().parent / "demo"
"""Packaged demo data: ``train.jsonl`` (200 rows) and ``dev.jsonl`` (100 rows) of rt-polarity."""


def demo_data_path(split: str) -> Path:
    """Path of the packaged rt-polarity demo split: ``"train"`` or ``"dev"``."""
    if split not in ("train", "dev"):
        raise ValueError(f"split must be 'train' or 'dev' (got {split!r})")
    return DEMO_DIR / f"{split}.jsonl"


__all__ = [
    "Batch",
    "Batcher",
    "PackedBatch",
    "ClassificationRow",
    "CompletionRow",
    "DEMO_DIR",
    "Dataset",
    "Example",
    "JsonlChecker",
    "collate",
    "collate_packed",
    "correct_per_sample",
    "demo_data_path",
    "encode",
    "eval_batches",
    "gather_packed",
    "gather_positions",
    "join_packed",
    "load_examples",
    "load_jsonl",
    "load_tokenizer",
    "loss_per_sample",
    "pad_id_for",
    "pad_positions",
    "shard",
    "verbalizer_token_ids",
]

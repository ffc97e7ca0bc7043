from collections import Counter

import pytest
import torch

from ferrytune.data import Batcher, Example, eval_batches, shard
from ferrytune.errors import ConfigError


def examples(n, length=lambda i: 1 + i % 5):
    # input_ids[0] is the example's index, so batches can be traced back.
    return [Example((i,) + (0,) * (length(i) - 1), (0,), (i,)) for i in range(n)]


def ids(micro_batches):
    return [e.input_ids[0] for mb in micro_batches for e in mb]


def test_step_is_a_pure_function_of_seed_and_step():
    a = Batcher(examples(37), global_batch_size=8, micro_batch_size=2, seed=3)
    b = Batcher(examples(37), global_batch_size=8, micro_batch_size=2, seed=3)
    forward = [ids(a.batch_for_step(s)) for s in range(12)]
    backward = [ids(b.batch_for_step(s)) for s in reversed(range(12))][::-1]
    assert forward == backward  # no hidden cursor: any visiting order gives the same batches
    assert ids(Batcher(examples(37), global_batch_size=8, seed=4).batch_for_step(0)) != forward[0]


def test_order_follows_the_documented_generator():
    n, seed = 10, 5
    b = Batcher(examples(n), global_batch_size=5, seed=seed)
    for epoch in range(3):
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()
        assert ids(b.batch_for_step(2 * epoch)) + ids(b.batch_for_step(2 * epoch + 1)) == perm


def test_epochs_cover_the_data_and_partial_batches_wrap():
    b = Batcher(examples(10), global_batch_size=4, micro_batch_size=2, seed=0)
    stream = [i for s in range(5) for i in ids(b.batch_for_step(s))]  # 20 items = 2 epochs
    assert all(len(b.batch_for_step(s)) == 2 and len(ids(b.batch_for_step(s))) == 4 for s in range(5))
    assert Counter(stream[:10]) == Counter(range(10)) and Counter(stream[10:]) == Counter(range(10))
    assert b.epoch_at(5) == 2.0
    seq = Batcher(examples(10), global_batch_size=4, shuffle=False)
    assert ids(seq.batch_for_step(2)) == [8, 9, 0, 1]


def test_global_batch_larger_than_the_dataset():
    b = Batcher(examples(3), global_batch_size=7, seed=1)
    assert Counter(ids(b.batch_for_step(0)) + ids(b.batch_for_step(1)) + ids(b.batch_for_step(2))) == Counter({0: 7, 1: 7, 2: 7})


def test_ranks_share_micro_batches_evenly_round_robin():
    n_ranks = 2
    full = Batcher(examples(50), global_batch_size=12, micro_batch_size=3, seed=9)
    ranks = [Batcher(examples(50), global_batch_size=12, micro_batch_size=3, seed=9, rank=r, world_size=n_ranks) for r in range(n_ranks)]
    for step in range(4):
        all_mb = full.batch_for_step(step)
        local = [r.local_batch_for_step(step) for r in ranks]
        assert [len(x) for x in local] == [2, 2]
        assert local[0] == [all_mb[0], all_mb[2]] and local[1] == [all_mb[1], all_mb[3]]
    assert shard([1, 2, 3, 4, 5, 6], 2, 3) == [3, 6]


def test_uneven_split_is_a_config_error_naming_micro_batch_size():
    with pytest.raises(ConfigError, match=r"^train\.micro_batch_size: 3 micro-batches per step cannot be shared evenly by 2"):
        Batcher(examples(20), global_batch_size=6, micro_batch_size=2, world_size=2)
    with pytest.raises(ConfigError, match=r"^train\.micro_batch_size: must divide train\.batch_size"):
        Batcher(examples(20), global_batch_size=6, micro_batch_size=4)


def test_every_micro_batch_of_a_step_has_the_same_shape_on_every_rank():
    exs = examples(40, length=lambda i: 1 + (i * 7) % 13)
    shapes = set()
    for r in range(2):
        b = Batcher(exs, global_batch_size=8, micro_batch_size=2, seed=1, rank=r, world_size=2)
        batches = b.batches_for_step(3, pad_id=0)
        longest = max(len(e.input_ids) for mb in b.batch_for_step(3) for e in mb)
        assert len(batches) == 2
        shapes |= {tuple(x.input_ids.shape) for x in batches}
    assert shapes == {(2, longest)}


def test_eval_batches_cover_everything_once_in_order():
    exs = examples(11)
    assert ids(eval_batches(exs, micro_batch_size=4)) == list(range(11))
    parts = [list(eval_batches(exs, micro_batch_size=4, rank=r, world_size=2)) for r in range(2)]
    assert sorted(ids(parts[0]) + ids(parts[1])) == list(range(11)) and len(parts[0]) == 2

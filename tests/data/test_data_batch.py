import math

import pytest
import torch

from ferrytune.data import Example, collate, correct_per_sample, gather_positions, loss_per_sample

CLASS_IDS = (5, 9, 2)


def cls_example(n, label):
    return Example(tuple(range(10, 10 + n)), (n - 1,), (label,), label, CLASS_IDS)


def comp_example(ids, first):
    """Completion starting at index ``first`` of ``ids``."""
    return Example(tuple(ids), tuple(range(first - 1, len(ids) - 1)), tuple(ids[first:]))


def test_collate_classification_shapes_and_padding():
    b = collate([cls_example(3, 0), cls_example(5, 2)], pad_id=7)
    assert b.input_ids.shape == (2, 5) and b.attention_mask.shape == (2, 5)
    assert b.input_ids[0].tolist() == [10, 11, 12, 7, 7]
    assert b.attention_mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert b.loss_positions.tolist() == [[2], [4]] and b.loss_targets.tolist() == [[0], [2]]
    assert b.loss_mask.dtype == torch.float32 and b.loss_mask.tolist() == [[1.0], [1.0]]
    assert b.labels.tolist() == [0, 2] and b.class_token_ids.tolist() == list(CLASS_IDS)
    assert b.num_classes == 3 and b.is_classification and b.batch_size == 2
    assert collate([cls_example(3, 0)], pad_id=7, pad_to=8).input_ids.shape == (1, 8)
    with pytest.raises(ValueError, match="pad_to=2 is shorter"):
        collate([cls_example(3, 0)], pad_id=7, pad_to=2)


def test_collate_completion_pads_positions_with_mask():
    b = collate([comp_example([1, 2, 3, 4], 2), comp_example([1, 2, 3, 4, 5, 6], 5)], pad_id=0)
    assert b.loss_positions.tolist() == [[1, 2], [4, 0]]
    assert b.loss_targets.tolist() == [[3, 4], [6, 0]]
    assert b.loss_mask.tolist() == [[1.0, 1.0], [1.0, 0.0]]
    assert b.labels is None and b.class_token_ids is None and b.num_classes == 0
    with pytest.raises(ValueError, match="cannot mix"):
        collate([comp_example([1, 2], 1), cls_example(2, 0)], pad_id=0)


def test_gather_positions_matches_indexing():
    x = torch.randn(2, 6, 4)
    pos = torch.tensor([[1, 5], [0, 3]])
    out = gather_positions(x, pos)
    assert out.shape == (2, 2, 4)
    assert torch.equal(out[1, 1], x[1, 3]) and torch.equal(out[0, 1], x[0, 5])


def test_classification_loss_equals_handwritten_cross_entropy():
    torch.manual_seed(0)
    b = collate([cls_example(3, 0), cls_example(4, 2), cls_example(2, 1)], pad_id=0)
    logits = torch.randn(3, 1, 16, dtype=torch.bfloat16)
    loss = loss_per_sample(logits, b)
    assert loss.dtype == torch.float32 and loss.shape == (3,)
    for i in range(3):
        z = [float(logits[i, 0, c]) for c in CLASS_IDS]
        expect = -z[b.labels[i]] + math.log(sum(math.exp(v) for v in z))
        assert loss[i].item() == pytest.approx(expect, rel=1e-6)
    correct = correct_per_sample(logits, b)
    assert correct.tolist() == [max(range(3), key=lambda c: float(logits[i, 0, CLASS_IDS[c]])) == int(b.labels[i]) for i in range(3)]


def test_completion_loss_is_mean_over_the_samples_own_tokens():
    torch.manual_seed(0)
    b = collate([comp_example([1, 2, 3, 4], 2), comp_example([1, 2, 3, 4, 5, 6], 5)], pad_id=0)
    logits = torch.randn(2, 2, 8)
    loss = loss_per_sample(logits, b)

    def ce(v, t):
        return -v[t].item() + math.log(sum(math.exp(x) for x in v.tolist()))

    assert loss[0].item() == pytest.approx((ce(logits[0, 0], 3) + ce(logits[0, 1], 4)) / 2, rel=1e-6)
    assert loss[1].item() == pytest.approx(ce(logits[1, 0], 6), rel=1e-6)  # padded slot ignored


def test_oracle_logits_give_zero_loss_only_if_positions_are_right():
    """Logits that put all mass on the next real token: right positions -> ~0 loss, all correct."""
    b = collate([comp_example([3, 1, 4, 1, 5], 2), comp_example([2, 7, 1], 1)], pad_id=0, pad_to=7)
    B, T, V = b.input_ids.shape[0], b.input_ids.shape[1], 8
    full = torch.zeros(B, T, V)
    nxt = torch.roll(b.input_ids, -1, dims=1)  # token at t+1
    full.scatter_(2, nxt.unsqueeze(-1), 50.0)
    h = gather_positions(full, b.loss_positions)
    assert loss_per_sample(h, b).max().item() < 1e-6
    assert correct_per_sample(h, b).all()
    shifted = gather_positions(full, (b.loss_positions + 1).clamp_max(T - 1))
    assert loss_per_sample(shifted, b).min().item() > 1.0


def test_batch_to_moves_every_tensor():
    b = collate([cls_example(3, 0)], pad_id=0).to("cpu")
    assert b.class_token_ids.device.type == "cpu" and b.labels is not None

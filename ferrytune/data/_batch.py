"""Padded tensor batches and the per-sample loss that every trainer shares.

The engine and any plain reference loop compute the loss with the same two calls::

    h = gather_positions(logits_or_hidden, batch.loss_positions)   # (B, L, V)
    loss = loss_per_sample(h, batch)                                 # (B,) fp32

so their losses match bit for bit. Gathering before the head (on hidden states) is
cheaper: only L positions per row go through the ``(H, V)`` matmul.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from ferrytune.data._encode import Example


@dataclass
class Batch:
    """One micro-batch. B rows, T tokens (right-padded), L scored positions per row."""

    input_ids: torch.Tensor  # (B, T) long, right-padded with pad_id
    attention_mask: torch.Tensor  # (B, T) long, 1 = real token
    loss_positions: torch.Tensor  # (B, L) long, positions whose logits are scored (0 where padded)
    loss_targets: torch.Tensor  # (B, L) long, next-token ids; class indices for classification
    loss_mask: torch.Tensor  # (B, L) float32, 0 for padded positions
    labels: torch.Tensor | None = None  # (B,) long, classification only
    class_token_ids: torch.Tensor | None = None  # (C,) long, verbalizer first tokens, classification only

    @property
    def batch_size(self) -> int:
        return self.input_ids.shape[0]

    @property
    def is_classification(self) -> bool:
        return self.class_token_ids is not None

    @property
    def num_classes(self) -> int:
        return 0 if self.class_token_ids is None else self.class_token_ids.numel()

    def to(self, device: torch.device | str, *, non_blocking: bool = False) -> "Batch":
        """A copy with every tensor on ``device``."""
        moved = {
            f.name: None if (t := getattr(self, f.name)) is None else t.to(device, non_blocking=non_blocking)
            for f in fields(self)
        }
        return Batch(**moved)


def collate(examples: list[Example], *, pad_id: int, pad_to: int | None = None) -> Batch:
    """Stack examples into a right-padded :class:`Batch`.

    ``pad_to`` pads to a fixed T (must be >= the longest example) so that every
    micro-batch of a step has the same shape; None pads to the longest in ``examples``.
    """
    if not examples:
        raise ValueError("collate needs at least one example")
    classification = examples[0].class_token_ids is not None
    if any((e.class_token_ids is not None) != classification for e in examples):
        raise ValueError("cannot mix classification and completion examples in one batch")
    if classification and any(e.class_token_ids != examples[0].class_token_ids for e in examples):
        raise ValueError("classification examples in one batch must share the verbalizer")
    longest = max(len(e.input_ids) for e in examples)
    T = longest if pad_to is None else pad_to
    if T < longest:
        raise ValueError(f"pad_to={pad_to} is shorter than the longest example ({longest} tokens)")
    B, L = len(examples), max(len(e.loss_positions) for e in examples)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    positions = torch.zeros((B, L), dtype=torch.long)
    targets = torch.zeros((B, L), dtype=torch.long)
    mask = torch.zeros((B, L), dtype=torch.float32)
    for i, e in enumerate(examples):
        n, m = len(e.input_ids), len(e.loss_positions)
        input_ids[i, :n] = torch.tensor(e.input_ids, dtype=torch.long)
        attention_mask[i, :n] = 1
        positions[i, :m] = torch.tensor(e.loss_positions, dtype=torch.long)
        targets[i, :m] = torch.tensor(e.loss_targets, dtype=torch.long)
        mask[i, :m] = 1.0
    labels = class_ids = None
    if classification:
        labels = torch.tensor([e.label for e in examples], dtype=torch.long)
        class_ids = torch.tensor(examples[0].class_token_ids, dtype=torch.long)
    return Batch(input_ids, attention_mask, positions, targets, mask, labels, class_ids)


def gather_positions(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``x[b, positions[b, l]]``: (B, T, D) and (B, L) -> (B, L, D)."""
    index = positions.unsqueeze(-1).expand(-1, -1, x.shape[-1])  # (B, L, D)
    return torch.gather(x, 1, index)


def loss_per_sample(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Per-sample loss (B,) in fp32 from logits at the scored positions (B, L, V).

    Classification (MeZO): cross-entropy over the C verbalizer logits at the last
    prompt position against the label. Completion: mean cross-entropy over the
    sample's completion tokens (padded positions excluded).
    """
    if batch.class_token_ids is not None:
        class_logits = logits[:, 0, :].index_select(-1, batch.class_token_ids).float()  # (B, C)
        return F.cross_entropy(class_logits, batch.labels, reduction="none")
    # fp32 copy of (B, L, V): the price of an exact loss; callers bound B*L per micro-batch.
    B, L, V = logits.shape
    ce = F.cross_entropy(logits.float().reshape(B * L, V), batch.loss_targets.reshape(B * L), reduction="none")
    ce = ce.view(B, L) * batch.loss_mask  # (B, L)
    return ce.sum(dim=1) / batch.loss_mask.sum(dim=1).clamp_min(1.0)


def correct_per_sample(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """(B,) bool. Classification: argmax over the verbalizer == label.
    Completion: exact match, every completion token is the argmax prediction."""
    if batch.class_token_ids is not None:
        class_logits = logits[:, 0, :].index_select(-1, batch.class_token_ids)  # (B, C)
        return class_logits.argmax(dim=-1) == batch.labels
    hit = (logits.argmax(dim=-1) == batch.loss_targets) | (batch.loss_mask == 0)  # (B, L)
    return hit.all(dim=1)


def pad_positions(batches: list[Batch]) -> list[Batch]:
    """Give every micro-batch the same number L of scored positions (stacking needs it)."""
    L = max(b.loss_positions.shape[1] for b in batches)
    out = []
    for b in batches:
        extra = L - b.loss_positions.shape[1]
        if extra:
            pad = lambda t, v=0: torch.cat([t, torch.full((t.shape[0], extra), v, dtype=t.dtype)], dim=1)
            b = Batch(b.input_ids, b.attention_mask, pad(b.loss_positions), pad(b.loss_targets),
                      pad(b.loss_mask), b.labels, b.class_token_ids)
        out.append(b)
    return out

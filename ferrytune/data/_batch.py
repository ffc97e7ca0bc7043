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


@dataclass
class PackedBatch:
    """Sequences packed end to end, no padding between them (``data.packing``).

    ``R`` rows of ``T`` tokens each hold whole sequences back to back; ``position_ids`` restart
    at 0 at every sequence, which is how transformers marks packed sequences
    (``DataCollatorWithFlattening``'s convention): given ``position_ids`` and no attention mask,
    ``masking_utils.create_causal_mask`` finds the boundaries (``find_packed_sequence_indices``)
    and no token attends across one (sdpa / eager / flex masks; flash-attention runs varlen).
    Only a row's tail is padding (its positions restart too, so it is a sequence of its own that
    no real token sees). ``S`` sequences; ``loss_positions`` index the flattened ``R * T`` tokens,
    so :func:`loss_per_sample` / :func:`correct_per_sample` give the (S,) per-sequence values of
    the unpacked :class:`Batch` of the same examples.
    """

    input_ids: torch.Tensor  # (R, T) long
    position_ids: torch.Tensor  # (R, T) long, 0.. per sequence
    loss_positions: torch.Tensor  # (S, L) long, flat indices into R*T (0 where padded)
    loss_targets: torch.Tensor  # (S, L) long
    loss_mask: torch.Tensor  # (S, L) float32
    spans: tuple[tuple[int, int], ...]  # per sequence: [start, end) in the flattened R*T tokens
    labels: torch.Tensor | None = None  # (S,) long, classification only
    class_token_ids: torch.Tensor | None = None  # (C,) long

    @property
    def batch_size(self) -> int:
        """Sequences (not rows)."""
        return self.loss_positions.shape[0]

    @property
    def real_tokens(self) -> int:
        return sum(e - s for s, e in self.spans)

    @property
    def padded_tokens(self) -> int:
        """Tokens the forward computes: rows x row length."""
        return self.input_ids.numel()

    @property
    def is_classification(self) -> bool:
        return self.class_token_ids is not None

    def to(self, device: torch.device | str, *, non_blocking: bool = False) -> "PackedBatch":
        moved = {f.name: t.to(device, non_blocking=non_blocking) if isinstance(t := getattr(self, f.name), torch.Tensor)
                 else t for f in fields(self)}
        return PackedBatch(**moved)


def collate_packed(examples: list[Example], *, pad_id: int, capacity: int | None = None) -> PackedBatch:
    """Pack ``examples`` end to end, in order, into rows of at most ``capacity`` tokens.

    A sequence never spans two rows: the next one opens a new row when it does not fit.
    ``capacity`` None: one row. Rows are as long as the fullest (the others end in padding).
    """
    if not examples:
        raise ValueError("collate_packed needs at least one example")
    classification = examples[0].class_token_ids is not None
    if any((e.class_token_ids is not None) != classification for e in examples):
        raise ValueError("cannot mix classification and completion examples in one batch")
    if classification and any(e.class_token_ids != examples[0].class_token_ids for e in examples):
        raise ValueError("classification examples in one batch must share the verbalizer")
    rows: list[list[Example]] = [[]]
    fill = [0]
    for e in examples:
        n = len(e.input_ids)
        if capacity is not None and n > capacity:
            raise ValueError(f"an example has {n} tokens, more than a packed row holds ({capacity})")
        if rows[-1] and capacity is not None and fill[-1] + n > capacity:
            rows.append([])
            fill.append(0)
        rows[-1].append(e)
        fill[-1] += n
    R, T = len(rows), max(fill)
    S, L = len(examples), max(len(e.loss_positions) for e in examples)
    input_ids = torch.full((R, T), pad_id, dtype=torch.long)
    position_ids = torch.zeros((R, T), dtype=torch.long)
    positions = torch.zeros((S, L), dtype=torch.long)
    targets = torch.zeros((S, L), dtype=torch.long)
    mask = torch.zeros((S, L), dtype=torch.float32)
    spans: list[tuple[int, int]] = []
    s = 0
    for r, row in enumerate(rows):
        t = 0
        for e in row:
            n, m = len(e.input_ids), len(e.loss_positions)
            input_ids[r, t:t + n] = torch.tensor(e.input_ids, dtype=torch.long)
            position_ids[r, t:t + n] = torch.arange(n)
            positions[s, :m] = torch.tensor(e.loss_positions, dtype=torch.long) + r * T + t
            targets[s, :m] = torch.tensor(e.loss_targets, dtype=torch.long)
            mask[s, :m] = 1.0
            spans.append((r * T + t, r * T + t + n))
            t += n
            s += 1
        position_ids[r, t:] = torch.arange(T - t)  # the tail: a padding "sequence" of its own
    labels = class_ids = None
    if classification:
        labels = torch.tensor([e.label for e in examples], dtype=torch.long)
        class_ids = torch.tensor(examples[0].class_token_ids, dtype=torch.long)
    return PackedBatch(input_ids, position_ids, positions, targets, mask, tuple(spans), labels, class_ids)


def gather_packed(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``x.flatten(0, 1)[positions]``: (R, T, D) and (S, L) flat positions -> (S, L, D)."""
    return x.reshape(-1, x.shape[-1])[positions]


def join_packed(batches: list[PackedBatch]) -> tuple[torch.Tensor, torch.Tensor, list[PackedBatch]]:
    """One row of several single-row packed batches end to end (jobs of other formats, each its own loss).

    Returns the joined ``(1, N)`` input ids and position ids, and each batch with its
    ``loss_positions`` and ``spans`` shifted to where its tokens now sit (its own ids unchanged).
    """
    if not batches or any(b.input_ids.shape[0] != 1 for b in batches):
        raise ValueError("join_packed needs single-row packed batches")
    out, offset = [], 0
    for b in batches:
        shifted = b.loss_positions + offset * (b.loss_mask > 0).long()  # padded positions stay at 0
        out.append(PackedBatch(b.input_ids, b.position_ids, shifted, b.loss_targets, b.loss_mask,
                               tuple((s + offset, e + offset) for s, e in b.spans), b.labels, b.class_token_ids))
        offset += b.input_ids.shape[1]
    ids = torch.cat([b.input_ids for b in batches], dim=1)
    pos = torch.cat([b.position_ids for b in batches], dim=1)
    return ids, pos, out

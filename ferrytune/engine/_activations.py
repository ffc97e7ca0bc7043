"""How many bytes one decoder layer keeps for backward: the planner's activation estimate.

An upper estimate from the model config and the micro-batch shape, per token of a
``rows x tokens`` micro-batch in the compute dtype (LLaMA-style layers: norm, attention with
grouped KV heads, gated MLP, plus the LoRA hooks):

* two RMS norms: input and normalised output each (4 H);
* attention: q, k, v before and after rotary, the repeated K/V heads, the output and its
  reshaped copy (3 q + 4 kv + 2 q, +q for the repeat); eager attention adds the T x T
  probabilities per head;
* gated MLP: gate, act(gate), up, product (4 I) and the input (H);
* each LoRA target: its A output (r) and, with dropout, the dropped input (in) and its mask.

``tests/engine/test_activations.py`` checks it against the bytes the engine actually keeps
(``FOEngine.kept_bytes``): never below, and within 2x.
"""

from __future__ import annotations

import torch

from ferrytune.lora import LoraSpec, find_targets
from ferrytune.models import ModelLayout


def layer_activation_bytes(layout: ModelLayout, spec: LoraSpec, *, rows: int, tokens: int,
                           dtype: torch.dtype) -> int:
    """Estimated bytes the largest decoder layer keeps for backward, for one ``rows x tokens`` micro-batch."""
    c = layout.model.config
    c = getattr(c, "get_text_config", lambda: c)()
    h = int(c.hidden_size)
    heads = int(getattr(c, "num_attention_heads"))
    kv_heads = int(getattr(c, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(c, "head_dim", None) or h // heads)
    inter = int(getattr(c, "intermediate_size", None) or getattr(c, "ffn_dim", None) or 4 * h)
    q, kv = heads * head_dim, kv_heads * head_dim
    e = torch.empty((), dtype=dtype).element_size()
    per_token = 5 * h + 6 * q + 4 * kv + 4 * inter + heads
    if getattr(c, "_attn_implementation", None) == "eager":
        per_token += 2 * heads * tokens  # probabilities and their dropout/softmax output
    targets = find_targets(layout.model, spec)
    per_layer: dict[str, int] = {}
    for path, t in targets.items():
        layer = _layer_of(path)
        extra = t.rank + (t.in_features * (1 + 1 / e) if spec.dropout > 0 else 0)
        per_layer[layer] = per_layer.get(layer, 0) + int(extra)
    per_token += max(per_layer.values(), default=0)
    return int(per_token * e * rows * tokens)


def _layer_of(path: str) -> str:
    parts = path.split(".")
    for i, p in enumerate(parts):
        if p.isdigit():
            return ".".join(parts[: i + 1])
    return path


def boundary_activation_bytes(layout: ModelLayout, *, rows: int, tokens: int, dtype: torch.dtype) -> int:
    """Bytes of one ``rows x tokens`` micro-batch's hidden state between two decoder layers (what a
    layer-major step holds per layer per micro-batch besides the kept activations: the layer's input
    and, until its backward, the gradient flowing into its output)."""
    c = layout.model.config
    c = getattr(c, "get_text_config", lambda: c)()
    return 2 * int(c.hidden_size) * rows * tokens * torch.empty((), dtype=dtype).element_size()


def lora_boundary_estimate(cfg):
    """The ``boundary_estimate`` of ``build_runtime`` for a run config (method lora)."""
    rows, tokens = cfg.train.effective_micro_batch_size, cfg.data.max_length

    def estimate(layout: ModelLayout, dtype: torch.dtype) -> int:
        return boundary_activation_bytes(layout, rows=rows, tokens=tokens, dtype=dtype)

    return estimate


def lora_activation_estimate(cfg):
    """The ``activation_estimate`` of ``build_runtime`` for a run config (method lora): one
    micro-batch of ``train.micro_batch_size`` rows of ``data.max_length`` tokens; with
    ``data.packing`` one row of all of them (eager attention's T x T term grows with the row)."""
    spec = LoraSpec.from_config(cfg.lora)
    rows, tokens = cfg.train.effective_micro_batch_size, cfg.data.max_length
    if cfg.data.packing:
        rows, tokens = 1, rows * tokens

    def estimate(layout: ModelLayout, dtype: torch.dtype) -> int:
        return layer_activation_bytes(layout, spec, rows=rows, tokens=tokens, dtype=dtype)

    return estimate


def lora_runtime_args(cfg) -> dict:
    """``build_runtime``'s keyword arguments for a backward (method lora): the activation and
    hidden-state estimates, and ``train.accumulation`` with this rank's micro-batches per step."""
    return {"activation_estimate": lora_activation_estimate(cfg), "accumulation": cfg.train.accumulation,
            "num_micro": cfg.train.num_micro_batches // cfg.parallel.data,
            "boundary_estimate": lora_boundary_estimate(cfg)}

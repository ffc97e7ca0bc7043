"""Logits from hidden states through the model's own head code.

The engines run the base model (``model.base_model``), gather the hidden states at the scored
positions, and only then compute logits, so the head never runs on every position of the batch.
But a causal LM's ``forward`` does more than ``lm_head``: Gemma 2 caps the logits
(``final_logit_softcapping``), Cohere scales them (``logit_scale``), Granite divides them
(``logits_scaling``). ``logits_at`` therefore calls the model's own ``forward`` with its base
model answering with the given hidden states, so every architecture's head code runs as in
transformers, on the gathered positions only. The module answering is the owner of the decoder
layers (what the head's forward calls: ``model.model``, or ``model.model.decoder`` for OPT).
"""

from __future__ import annotations

import functools

import torch
from torch import nn


def logits_at(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """``model``'s logits (B, L, V) for hidden states (B, L, C) that its base model produced."""
    trunk = _trunk(model)

    def answer(*args, **kwargs):
        return _hidden_only_class()(last_hidden_state=hidden)

    before = trunk.__dict__.get("forward")  # an engine's interception, if the trunk is a unit itself
    trunk.forward = answer  # on the instance: __call__ and its hooks still run
    try:
        ids = torch.zeros(hidden.shape[:2], dtype=torch.long, device=hidden.device)  # only its shape is read
        out = model(input_ids=ids, use_cache=False, logits_to_keep=0, return_dict=True)
    finally:
        if before is None:
            del trunk.forward
        else:
            trunk.forward = before
    return out.logits


def _trunk(model: nn.Module) -> nn.Module:
    """The module the causal LM's forward calls for its hidden states: the owner of the decoder layers
    (``model.model`` for LLaMA, ``model.model.decoder`` for OPT, ``model.transformer`` for GPT-2)."""
    cached = model.__dict__.get("_ferrytune_trunk")
    if cached is not None:
        return cached
    from ferrytune.models._layout import find_layers

    name, _ = find_layers(model)
    parent = name.rpartition(".")[0]
    if not parent:
        raise TypeError(f"{type(model).__name__}: the decoder layers have no owning module, so no head to call")
    trunk = model.get_submodule(parent)
    model.__dict__["_ferrytune_trunk"] = trunk  # not a submodule: kept out of _modules
    return trunk


@functools.lru_cache(maxsize=None)
def _hidden_only_class():  # built on first use: transformers is a heavy import
    from transformers.modeling_outputs import BaseModelOutputWithPast

    class HiddenOnly(BaseModelOutputWithPast):
        """The trunk's output with only hidden states; every other field a head may read is None."""

        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return None

    return HiddenOnly

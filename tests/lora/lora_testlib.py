"""Helpers for the LoRA tests: tiny random-weight causal LMs (2 layers, hidden 32, vocab 128).

A plain module (not conftest.py) with a unique name: test folders have no __init__.py."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, OPTConfig, Qwen2Config

from ferrytune.lora import Adapter

VOCAB = 128


def _config(arch: str):
    # every dropout of the base model is 0 so that only LoRA dropout draws random numbers
    if arch == "llama":
        return LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64)
    if arch == "qwen2":
        return Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64)
    if arch == "opt":
        return OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB,
                         max_position_embeddings=64, word_embed_proj_dim=32, dropout=0.0, attention_dropout=0.0,
                         pad_token_id=1, bos_token_id=2, eos_token_id=2)
    if arch == "gpt2":
        return GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64, resid_pdrop=0.0,
                          embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    raise ValueError(arch)


def build_model(arch: str, *, seed: int = 0, device: str | None = None):
    """A randomly initialised ``*ForCausalLM`` with frozen weights, in train mode."""
    torch.manual_seed(seed)
    if device == "meta":
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(_config(arch))
    else:
        model = AutoModelForCausalLM.from_config(_config(arch))
    model.requires_grad_(False)
    return model.train()


def randomize_b(adapter: Adapter, *, seed: int, std: float = 0.2) -> None:
    """Non-zero B so that gradients reach A too (B = 0 at init makes dL/dA = 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, _, b in adapter.named_pairs():
            b.copy_(torch.randn(b.shape, generator=g) * std)


def token_batch(num_rows: int, num_tokens: int, *, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (num_rows, num_tokens), generator=torch.Generator().manual_seed(seed))


def causal_lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy over all rows of ``logits`` (rows, T, V)."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def lora_grads(adapter: Adapter) -> dict[str, torch.Tensor]:
    out = {}
    for path, a, b in adapter.named_pairs():
        assert a.grad is not None and b.grad is not None, path
        out[f"{path}.lora_A"] = a.grad.clone()
        out[f"{path}.lora_B"] = b.grad.clone()
    return out


# Computations the math makes identical (packed vs solo, checkpointed vs plain, Parameter vs plain
# tensor) are bitwise equal on this CPU; tests assert |diff| <= NEAR_BITWISE_RTOL * max|want|
# and print whether they were bitwise, because BLAS does not promise bit-reproducibility across
# different batch shapes or memory alignment. Any routing, mask or wiring bug moves the
# compared tensors by O(1) relative, far above this bound.
NEAR_BITWISE_RTOL = 1e-5


def assert_near_bitwise(got: torch.Tensor, want: torch.Tensor, what: str) -> bool:
    """Assert |got - want| <= NEAR_BITWISE_RTOL * max|want|; return whether they are bitwise equal."""
    bound = NEAR_BITWISE_RTOL * want.abs().max().item()
    diff = (got - want).abs().max().item()
    assert diff <= bound, f"{what}: max |diff| {diff:.3e} > {bound:.3e}"
    return torch.equal(got, want)

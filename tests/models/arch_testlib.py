"""Tiny random-weight checkpoints of 22 Hugging Face causal-LM architectures, saved the way a user
gets them: ``AutoModelForCausalLM.from_config(...).save_pretrained(dest)`` by the installed
transformers, so the files carry transformers' *checkpoint* names (one tensor per expert for
Mixtral / Qwen3-MoE, ``embed_out`` for GPT-NeoX), not the module names.

A plain module (not conftest.py) with a unique name: test folders have no __init__.py."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

# hidden 32, 2 layers, 4 heads (2 KV heads where the architecture has GQA), tiny MLPs: each model
# trains a step in well under a second on one core.
H, L, NH, KV, FF = 32, 2, 4, 2, 64

ARCHS = ["llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "gemma3_text", "phi", "phi3", "olmo2",
         "granite", "stablelm", "falcon", "gptj", "gpt_bigcode", "opt", "gpt2", "cohere",
         "mixtral", "qwen3_moe", "gpt_neox", "bloom"]


def _kwargs(arch: str) -> dict:
    rope = dict(hidden_size=H, intermediate_size=FF, num_hidden_layers=L, num_attention_heads=NH,
                num_key_value_heads=KV, max_position_embeddings=128)
    if arch in ("llama", "qwen2", "mistral", "olmo2", "granite", "cohere", "phi3", "stablelm"):
        return rope
    if arch == "qwen3":
        return {**rope, "head_dim": H // NH}
    if arch in ("gemma", "gemma2", "gemma3_text"):
        return {**rope, "head_dim": H // NH}
    if arch == "phi":
        return {**rope, "partial_rotary_factor": 0.5}
    if arch == "falcon":
        return dict(hidden_size=H, num_hidden_layers=L, num_attention_heads=NH, new_decoder_architecture=False,
                    multi_query=True, alibi=False, parallel_attn=True, bias=False)
    if arch == "gptj":
        return dict(n_embd=H, n_layer=L, n_head=NH, n_positions=128, rotary_dim=4)
    if arch == "gpt_bigcode":
        return dict(n_embd=H, n_layer=L, n_head=NH, n_positions=128, multi_query=True)
    if arch == "gpt2":
        return dict(n_embd=H, n_layer=L, n_head=NH, n_positions=128)
    if arch == "opt":
        return dict(hidden_size=H, ffn_dim=FF, num_hidden_layers=L, num_attention_heads=NH,
                    max_position_embeddings=128, word_embed_proj_dim=H)
    if arch == "mixtral":
        return {**rope, "num_local_experts": 4, "num_experts_per_tok": 2}
    if arch == "qwen3_moe":
        return {**rope, "head_dim": H // NH, "num_experts": 4, "num_experts_per_tok": 2,
                "moe_intermediate_size": 16, "decoder_sparse_step": 1, "mlp_only_layers": []}
    if arch == "gpt_neox":
        return dict(hidden_size=H, intermediate_size=FF, num_hidden_layers=L, num_attention_heads=NH,
                    max_position_embeddings=128, tie_word_embeddings=False)
    if arch == "bloom":
        return dict(hidden_size=H, n_layer=L, n_head=NH)
    raise ValueError(f"unknown architecture {arch!r}")


def _no_dropout(cfg) -> None:
    """Every dropout of the base 0: ZO runs in eval mode anyway; LoRA's parity with PEFT needs it."""
    for key, val in list(cfg.to_dict().items()):
        if isinstance(val, float) and ("dropout" in key or key.endswith("pdrop")):
            setattr(cfg, key, 0.0)


def build_arch(dest: Path, arch: str, tokenizer_dir: str | Path, *, seed: int = 0) -> Path:
    """Write a tiny ``arch`` checkpoint with ``save_pretrained`` and the tokenizer of ``tokenizer_dir``."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    dest = Path(dest)
    if (dest / "config.json").exists():
        return dest
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = AutoConfig.for_model(arch, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                               eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **_kwargs(arch))
    _no_dropout(cfg)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # some architectures initialise norms to 0 or 1 exactly: give every tensor a spread
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest)
    for f in Path(tokenizer_dir).iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "chat_template")):
            shutil.copyfile(f, dest / f.name)
    return dest

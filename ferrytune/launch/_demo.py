"""The embedded default: a tiny random-weight LLaMA and the packaged rt-polarity sample.

``ferrytune train`` with no config builds this model once (a BPE tokenizer
trained on the demo text, a 4-layer LLaMA config, ``save_pretrained``) into
``ferrytune-demo/model`` and trains it with zeroth-order steps: a two-minute
tour of the engine that needs no download. Tests use the same builder.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

logger = logging.getLogger(__name__)

DEMO_OUTPUT = "ferrytune-demo"


def build_tiny_model(dest: str | Path, *, arch: str = "llama", vocab_size: int = 512, hidden: int = 64,
                     layers: int = 4, seed: int = 0, dtype: str = "float32", tie: bool = True) -> Path:
    """Write a tiny random-weight HF causal LM with a real BPE tokenizer to ``dest``."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from ferrytune.data import demo_data_path

    dest = Path(dest)
    if (dest / "config.json").exists():
        return dest
    texts = [json.loads(line)["text"] for line in demo_data_path("train").read_text().splitlines() if line.strip()]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts + [" great", " terrible", " It was"], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")
    v = len(fast)
    cfg = _config(arch, v, hidden, layers, tie)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    model = model.to(getattr(torch, dtype))
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest)
    fast.save_pretrained(dest)
    logger.info("built tiny %s model (%d params) in %s", arch, sum(p.numel() for p in model.parameters()), dest)
    return dest


def _config(arch: str, vocab: int, hidden: int, layers: int, tie: bool):
    from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig, MistralConfig, OPTConfig, Qwen2Config

    heads = max(hidden // 16, 2)
    common = dict(vocab_size=vocab, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    if arch == "llama":
        return LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                           num_attention_heads=heads, num_key_value_heads=max(heads // 2, 1),
                           max_position_embeddings=512, tie_word_embeddings=tie, **common)
    if arch == "qwen2":
        return Qwen2Config(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                           num_attention_heads=heads, num_key_value_heads=max(heads // 2, 1),
                           max_position_embeddings=512, tie_word_embeddings=tie, **common)
    if arch == "mistral":
        return MistralConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                             num_attention_heads=heads, num_key_value_heads=max(heads // 2, 1),
                             max_position_embeddings=512, tie_word_embeddings=tie, **common)
    if arch == "opt":
        return OPTConfig(hidden_size=hidden, ffn_dim=2 * hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         max_position_embeddings=512, word_embed_proj_dim=hidden, tie_word_embeddings=tie, **common)
    if arch == "gpt2":
        return GPT2Config(n_embd=hidden, n_layer=layers, n_head=heads, n_positions=512, tie_word_embeddings=tie,
                          **common)
    if arch == "gpt_neox":
        return GPTNeoXConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                             num_attention_heads=heads, max_position_embeddings=512, tie_word_embeddings=tie,
                             **common)
    raise ValueError(f"unknown tiny architecture {arch!r}")


def demo_config_dict(output_dir: str = DEMO_OUTPUT) -> dict:
    """The embedded default config (ZO on the tiny model, host-tier streaming)."""
    from ferrytune.data import demo_data_path

    return {
        "method": "zo",
        "model": {"path": str(Path(output_dir) / "model")},
        "data": {"train": str(demo_data_path("train")), "eval": str(demo_data_path("dev"))},
        "train": {"steps": 60, "batch_size": 16, "seed": 0, "lr": 1e-4, "eval_every_steps": 30,
                  "checkpoint_every_steps": 30},
        "zo": {"eps": 1e-3},
        "offload": {"tier": "host", "host_budget_gib": 1.0},
        "output_dir": str(Path(output_dir) / "run"),
    }

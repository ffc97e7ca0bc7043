"""The embedded default: a tiny random-weight LLaMA that learns a toy sentiment task.

``ferrytune train`` with no config writes the toy task (short template reviews, each with one
polarity word: "The plot felt really clumsy." -> terrible) into ``ferrytune-demo/data``, builds a
tiny LLaMA once (a BPE tokenizer trained on the task's text, 2 layers of width 32,
``save_pretrained``) into ``ferrytune-demo/model``, and trains LoRA adapters on it with
zeroth-order (MeZO) steps, streaming the frozen base from the host tier: about a minute on two cores, no download, and the
accuracy before and after shows it learning (a random model cannot learn real rt-polarity reviews
in a minute). Tests use the same builders.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

logger = logging.getLogger(__name__)

DEMO_OUTPUT = "ferrytune-demo"


# The toy task: one polarity word per review decides the label; the frame around it varies.
TOY_POSITIVE = ("great", "wonderful", "brilliant", "moving", "funny", "charming", "superb", "delightful", "smart",
                "fresh")
TOY_NEGATIVE = ("awful", "boring", "dull", "clumsy", "tedious", "bland", "messy", "stale", "silly", "lifeless")
_TOY_SUBJECTS = ("the film", "the plot", "the acting", "the script", "the ending", "the cast", "the music",
                 "the story")
_TOY_VERBS = ("is", "was", "felt", "seems", "looks")
_TOY_ADVERBS = ("", "really ", "truly ", "rather ", "so ", "quite ")


def write_toy_task(dest: str | Path, *, train_rows: int = 2000, dev_rows: int = 200) -> tuple[Path, Path]:
    """Write the toy sentiment task's ``train.jsonl`` and ``dev.jsonl`` to ``dest`` (deterministic rows)."""
    import random

    from ferrytune.atomic import write_atomic_bytes

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for split, n, seed in (("train", train_rows, 0), ("dev", dev_rows, 1)):
        rng = random.Random(f"ferrytune-toy:{seed}")
        lines = []
        for _ in range(n):
            label = rng.randint(0, 1)
            word = rng.choice(TOY_POSITIVE if label else TOY_NEGATIVE)
            text = f"{rng.choice(_TOY_SUBJECTS).capitalize()} {rng.choice(_TOY_VERBS)} {rng.choice(_TOY_ADVERBS)}{word}."
            lines.append(json.dumps({"text": text, "label": label}))
        path = dest / f"{split}.jsonl"
        write_atomic_bytes(path, ("\n".join(lines) + "\n").encode())
        out.append(path)
    return out[0], out[1]


def build_tiny_model(dest: str | Path, *, arch: str = "llama", vocab_size: int = 512, hidden: int = 64,
                     layers: int = 4, seed: int = 0, dtype: str = "float32", tie: bool = True,
                     texts_from: str | Path | None = None) -> Path:
    """Write a tiny random-weight HF causal LM with a real BPE tokenizer to ``dest``.

    The tokenizer is trained on the texts of the JSONL file ``texts_from`` (default: the packaged
    rt-polarity sample)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from ferrytune.data import demo_data_path

    dest = Path(dest)
    if (dest / "config.json").exists():
        return dest
    source = Path(texts_from) if texts_from is not None else demo_data_path("train")
    texts = [json.loads(line)["text"] for line in source.read_text().splitlines() if line.strip()]
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


def prepare_demo(output_dir: str | Path = DEMO_OUTPUT) -> dict:
    """Write the toy task and build the demo model under ``output_dir`` (once); the demo's config dict."""
    out = Path(output_dir)
    train, _ = write_toy_task(out / "data")
    build_tiny_model(out / "model", hidden=DEMO_HIDDEN, layers=DEMO_LAYERS, texts_from=train)
    return demo_config_dict(output_dir)


DEMO_HIDDEN, DEMO_LAYERS = 32, 2


def demo_config_dict(output_dir: str | Path = DEMO_OUTPUT) -> dict:
    """The embedded default config: MeZO on LoRA adapters (v_proj, o_proj, r 4) of the demo model,
    its frozen base streamed from the host tier.

    4000 steps of batch 16, lr 0.3 with cosine decay, eps 1e-2: about 40 s on two idle cores (a
    ZO-LoRA step of this model takes ~8 ms). Dev accuracy 0.515 -> 0.81 (seed 0; 0.76 with seed 1);
    3000 steps reached 0.61-0.63 at lr 0.3-0.5. Full-parameter MeZO on the same model gets
    0.51 -> 0.62 in 1200 steps at lr 3e-3 (twice that lr diverges): its ~40k perturbed parameters
    dilute each step's projected gradient where the adapters' 512 do not."""
    out = Path(output_dir)
    return {
        "method": "zo",
        "model": {"path": str(out / "model")},
        "data": {"train": str(out / "data" / "train.jsonl"), "eval": str(out / "data" / "dev.jsonl")},
        "train": {"steps": 4000, "batch_size": 16, "seed": 0, "lr": 0.3, "lr_schedule": "cosine",
                  "eval_every_steps": 1000, "checkpoint_every_steps": 2000},
        "zo": {"trainable": "lora", "eps": 1e-2},
        "lora": {"rank": 4, "alpha": 4, "target_modules": ["v_proj", "o_proj"]},
        "offload": {"tier": "host", "host_budget_gib": 1.0},
        "output_dir": str(out / "run"),
    }

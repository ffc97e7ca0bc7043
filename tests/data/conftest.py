"""Tiny tokenizers for the data tests: a byte-level BPE trained in milliseconds, no downloads."""

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SAMPLE_TRAIN = REPO / "examples" / "data" / "rt-polarity-sample" / "train.jsonl"
TINY_COMPLETION = REPO / "examples" / "data" / "tiny-completion.jsonl"


def _train_bpe():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1000,
        special_tokens=["<|endoftext|>", "<s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = SAMPLE_TRAIN.read_text().splitlines() + TINY_COMPLETION.read_text().splitlines()
    corpus += [" It was terrible. It was great."] * 50
    tok.train_from_iterator(corpus, trainer)
    return tok


@pytest.fixture(scope="session")
def _bpe():
    return _train_bpe()


def _wrap(bpe, *, bos: bool, eos: bool):
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer.from_str(bpe.to_str())
    kwargs = {}
    if eos:
        kwargs["eos_token"] = "<|endoftext|>"
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
        kwargs["bos_token"] = "<s>"
    return PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)


@pytest.fixture(scope="session")
def gpt2_style(_bpe):
    """No BOS added, EOS = <|endoftext|> (id 0), no pad token: like SmolLM2 / GPT-2."""
    return _wrap(_bpe, bos=False, eos=True)


@pytest.fixture(scope="session")
def llama_style(_bpe):
    """Adds BOS <s> (id 1) on encode, EOS = <|endoftext|>: like LLaMA."""
    return _wrap(_bpe, bos=True, eos=True)


@pytest.fixture(scope="session")
def no_specials(_bpe):
    """Neither BOS nor EOS."""
    return _wrap(_bpe, bos=False, eos=False)


@pytest.fixture
def write_jsonl(tmp_path):
    """write_jsonl(text, name="train.jsonl") -> path of a file holding ``text``."""

    def write(text: str | bytes, name: str = "train.jsonl") -> str:
        path = tmp_path / name
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        return str(path)

    return write

"""Turn validated rows into token-id examples: prompt templates, verbalizers, truncation.

Classification follows MeZO (Malladi et al., 2023, arXiv:2305.17333): the prompt is
``template.format(text=...)`` and the loss is cross-entropy over the logits of the
verbalizer words' first tokens at the last prompt position. Completion examples are
``[BOS] prompt completion [EOS]`` with the loss on the completion tokens only.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

from ferrytune.data._jsonl import ClassificationRow, Dataset, load_jsonl
from ferrytune.errors import ConfigError, DataError

if TYPE_CHECKING:
    from ferrytune.config import DataConfig

logger = logging.getLogger(__name__)

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


@dataclass(frozen=True)
class Example:
    """One tokenized example. Lengths: T_i tokens, L_i scored positions."""

    input_ids: tuple[int, ...]  # (T_i,)
    loss_positions: tuple[int, ...]  # (L_i,) positions whose logits are scored
    loss_targets: tuple[int, ...]  # (L_i,) next-token ids (completion) or (label,) (classification)
    label: int | None = None  # classification label, else None
    class_token_ids: tuple[int, ...] | None = None  # (C,) verbalizer first tokens, classification only
    line: int = 0  # 1-based source line, for messages


def load_tokenizer(model_path: str | os.PathLike, *, trust_remote_code: bool = False) -> Any:
    """``AutoTokenizer`` from a local model folder (never the network). Raises ConfigError."""
    from transformers import AutoTokenizer  # heavy import, only when a tokenizer is needed

    path = os.fspath(model_path)
    if not os.path.isdir(path):
        raise ConfigError(f"model.path: folder not found: {path}")
    if not any(os.path.isfile(os.path.join(path, f)) for f in _TOKENIZER_FILES):
        raise ConfigError(f"model.path: no tokenizer files in {path} (expected one of {', '.join(_TOKENIZER_FILES)})")
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"model.path: cannot load the tokenizer in {path}: {first}") from None


def pad_id_for(tokenizer: Any) -> int:
    """The id padding uses: pad token, else EOS, else 0. Padded positions are masked anyway."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


def verbalizer_token_ids(tokenizer: Any, verbalizer: Sequence[str]) -> tuple[int, ...]:
    """The first token of each label word (encoded without special tokens), shape (C,)."""
    ids = []
    for word in verbalizer:
        toks = tokenizer.encode(word, add_special_tokens=False)
        if not toks:
            raise ConfigError(f"data.verbalizer: {word!r} encodes to no tokens")
        if len(toks) > 1:
            logger.info("verbalizer word %r is %d tokens; only the first (%d) is scored", word, len(toks), toks[0])
        ids.append(int(toks[0]))
    for i, tid in enumerate(ids):
        if tid in ids[:i]:
            other = verbalizer[ids.index(tid)]
            raise ConfigError(
                f"data.verbalizer: {other!r} and {verbalizer[i]!r} share their first token {tid}"
                f" ({tokenizer.convert_ids_to_tokens(tid)!r}); pick words whose first tokens differ"
            )
    return tuple(ids)


def encode(
    dataset: Dataset,
    tokenizer: Any,
    *,
    template: str = "{text} It was",
    verbalizer: Sequence[str] = (" terrible", " great"),
    max_length: int = 256,
) -> list[Example]:
    """Tokenize every row of ``dataset``; ``template``/``verbalizer`` are used for classification only."""
    if max_length < 2:
        raise ConfigError(f"data.max_length: must be >= 2 (got {max_length})")
    bos = _bos_prefix(tokenizer)
    if dataset.format == "classification":
        return _encode_classification(dataset, tokenizer, template, verbalizer, max_length, bos)
    eos = [] if tokenizer.eos_token_id is None else [int(tokenizer.eos_token_id)]
    return [_encode_completion(dataset.name, row, tokenizer, max_length, bos, eos) for row in dataset.rows]


def load_examples(data: "DataConfig", tokenizer: Any) -> tuple[list[Example], list[Example] | None]:
    """Read and encode ``data.train`` and ``data.eval`` (first ``data.eval_samples`` rows) as configured."""
    fmt = data.format
    train = load_jsonl(data.train, format=fmt, num_labels=len(data.verbalizer))
    args = dict(template=data.template, verbalizer=data.verbalizer, max_length=data.max_length)
    train_ex = encode(train, tokenizer, **args)
    if data.eval is None:
        return train_ex, None
    dev = load_jsonl(data.eval, format=train.format, num_labels=len(data.verbalizer)).head(data.eval_samples)
    return train_ex, encode(dev, tokenizer, **args)


def _bos_prefix(tokenizer: Any) -> list[int]:
    """[bos] when the tokenizer adds BOS by itself (LLaMA-style), else [] (GPT-2 style)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    with_special = tokenizer.encode("a", add_special_tokens=True)
    without = tokenizer.encode("a", add_special_tokens=False)
    return [int(bos)] if with_special[:1] == [bos] and without[:1] != [bos] else []


def _encode_classification(
    dataset: Dataset, tokenizer: Any, template: str, verbalizer: Sequence[str], max_length: int, bos: list[int]
) -> list[Example]:
    class_ids = verbalizer_token_ids(tokenizer, verbalizer)
    budget = max_length - len(bos)
    empty = tokenizer.encode(template.format(text=""), add_special_tokens=False)
    if len(empty) >= budget:
        raise ConfigError(
            f"data.max_length: {max_length} tokens cannot hold the template {template!r}"
            f" ({len(empty) + len(bos)} tokens) and any text; raise data.max_length"
        )
    prompts = [template.format(text=r.text) for r in dataset.rows]
    # One batched call: fast tokenizers parallelise it, and only over-long rows need more.
    all_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    out = []
    for row, ids in zip(dataset.rows, all_ids):
        assert isinstance(row, ClassificationRow)
        if row.label >= len(class_ids):
            raise DataError(f"{dataset.name}:{row.line}: label {row.label} out of range: data.verbalizer has {len(class_ids)} words")
        if len(ids) > budget:
            ids = _truncate_text_left(tokenizer, template, row.text, budget)
        ids = bos + list(ids)
        out.append(Example(tuple(ids), (len(ids) - 1,), (row.label,), row.label, class_ids, row.line))
    return out


def _truncate_text_left(tokenizer: Any, template: str, text: str, budget: int) -> list[int]:
    """Drop the start of ``text`` so the whole prompt fits ``budget`` tokens.

    Cutting characters and re-tokenizing (rather than slicing token ids) keeps the
    template's suffix tokenized exactly as in untruncated prompts. The cut is the
    smallest one that fits, found by bisection (O(log len(text)) encodes, long rows only),
    then moved to the next word start when that still fits.
    """

    def ids_from(cut: int) -> list[int]:
        return tokenizer.encode(template.format(text=text[cut:]), add_special_tokens=False)

    lo, hi = 0, len(text)  # ids_from(len(text)) fits: checked against the empty template
    while lo < hi:
        mid = (lo + hi) // 2
        if len(ids_from(mid)) <= budget:
            hi = mid
        else:
            lo = mid + 1
    cut = lo
    if 0 < cut < len(text) and not text[cut - 1].isspace():
        space = next((i for i in range(cut, len(text)) if text[i].isspace()), -1)
        if space != -1 and text[space + 1:].strip():
            cut = space + 1
    return ids_from(cut)


def _encode_completion(name: str, row: Any, tokenizer: Any, max_length: int, bos: list[int], eos: list[int]) -> Example:
    prompt = tokenizer.encode(row.prompt, add_special_tokens=False) if row.prompt else []
    completion = tokenizer.encode(row.completion, add_special_tokens=False) + eos
    room = max_length - len(bos)
    if len(prompt) + len(completion) > room:
        # Keep the end of the prompt (nearest the answer), then cut the completion's tail.
        keep = max(0 if bos else 1, room - len(completion))
        prompt = prompt[len(prompt) - keep:] if keep else []
        completion = completion[: room - len(prompt)]
    ids = bos + prompt + completion
    # The token at index i is predicted by the logits at position i - 1.
    first = max(len(bos) + len(prompt), 1)
    targets = ids[first:]
    if not targets:
        raise DataError(
            f"{name}:{row.line}: no completion token left to learn"
            " (empty prompt and a tokenizer without BOS, or data.max_length too small)"
        )
    return Example(tuple(ids), tuple(range(first - 1, len(ids) - 1)), tuple(targets), None, None, row.line)

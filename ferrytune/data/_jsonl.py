"""JSONL datasets: read and validate every row where the data enters.

Two row formats, one per line of the file:

* classification: ``{"text": str, "label": int}`` (label indexes ``data.verbalizer``)
* completion:     ``{"prompt": str, "completion": str}``

Other keys on a row are ignored. Blank lines are skipped. Every problem raises a
:class:`DataError` of one line that names the file and the 1-based line number.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Literal, Union

from ferrytune.errors import DataError

Format = Literal["classification", "completion"]
_KEYS: dict[str, tuple[str, str]] = {
    "classification": ("text", "label"),
    "completion": ("prompt", "completion"),
}


@dataclass(frozen=True)
class ClassificationRow:
    text: str
    label: int
    line: int  # 1-based line in the source file, for error messages


@dataclass(frozen=True)
class CompletionRow:
    prompt: str
    completion: str
    line: int  # 1-based line in the source file, for error messages


Row = Union[ClassificationRow, CompletionRow]


@dataclass(frozen=True)
class Dataset:
    """The validated rows of one JSONL file, all of one format."""

    path: str
    format: Format
    rows: tuple[Row, ...]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> Row:
        return self.rows[i]

    @property
    def name(self) -> str:
        """The file as error messages show it (the path as given)."""
        return self.path

    @property
    def num_labels(self) -> int:
        """1 + the largest label (classification only)."""
        if self.format != "classification":
            raise ValueError(f"{self.name}: a completion dataset has no labels")
        return 1 + max(r.label for r in self.rows)

    def head(self, n: int | None) -> "Dataset":
        """The first ``n`` rows (all when ``n`` is None); ``data.eval_samples`` uses this."""
        return self if n is None else Dataset(self.path, self.format, self.rows[:n])


def load_jsonl(path: str | os.PathLike, *, format: str = "auto", num_labels: int | None = None) -> Dataset:
    """Read and validate a JSONL dataset.

    ``format="auto"`` decides from the first row's keys (text/label -> classification,
    prompt/completion -> completion); every later row must then have the same keys.
    ``num_labels`` (the verbalizer's length), when given, bounds the labels.
    """
    path = os.fspath(path)
    name = path  # as the user wrote it, so the message points at the file they named
    if format not in ("auto", *_KEYS):
        raise ValueError(f"format must be 'auto', 'classification' or 'completion' (got {format!r})")
    if not os.path.exists(path):
        raise DataError(f"{name}: file not found")
    if not os.path.isfile(path):
        raise DataError(f"{name}: not a file")
    rows: list[Row] = []
    fmt = None if format == "auto" else format
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            obj = _parse_line(raw, name, lineno)
            if obj is None:
                continue
            if fmt is None:
                fmt = _detect_format(obj, name, lineno)
            rows.append(_make_row(obj, fmt, name, lineno, num_labels))
    if not rows:
        raise DataError(f"{name}: empty file (no rows)")
    return Dataset(path=path, format=fmt, rows=tuple(rows))


def _parse_line(raw: bytes, name: str, lineno: int) -> dict | None:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{name}:{lineno}: not valid UTF-8") from None
    if not text.strip():
        return None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{name}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{name}:{lineno}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _detect_format(obj: dict, name: str, lineno: int) -> Format:
    for fmt, keys in _KEYS.items():
        if all(k in obj for k in keys):
            return fmt  # type: ignore[return-value]
    got = ", ".join(repr(k) for k in sorted(obj)) or "no keys"
    raise DataError(
        f"{name}:{lineno}: cannot tell the format: expected keys 'text' and 'label' (classification)"
        f" or 'prompt' and 'completion' (completion), got {got}"
    )


def _make_row(obj: dict, fmt: str, name: str, lineno: int, num_labels: int | None) -> Row:
    for key in _KEYS[fmt]:
        if key not in obj:
            raise DataError(f"{name}:{lineno}: missing key {key!r} ({fmt} rows need {' and '.join(map(repr, _KEYS[fmt]))})")
    first, second = _KEYS[fmt]
    if not isinstance(obj[first], str):
        raise DataError(f"{name}:{lineno}: {first!r} must be a string (got {_short(obj[first])})")
    if fmt == "completion":
        if not isinstance(obj["completion"], str) or not obj["completion"]:
            raise DataError(f"{name}:{lineno}: 'completion' must be a non-empty string (got {_short(obj['completion'])})")
        return CompletionRow(prompt=obj["prompt"], completion=obj["completion"], line=lineno)
    label = obj["label"]
    if isinstance(label, bool) or not isinstance(label, int):
        raise DataError(f"{name}:{lineno}: 'label' must be an integer (got {_short(label)})")
    if label < 0 or (num_labels is not None and label >= num_labels):
        bound = f"0..{num_labels - 1} (one per data.verbalizer word)" if num_labels else ">= 0"
        raise DataError(f"{name}:{lineno}: label {label} out of range: must be {bound}")
    return ClassificationRow(text=obj["text"], label=label, line=lineno)


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."

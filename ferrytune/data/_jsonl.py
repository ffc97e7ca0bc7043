"""JSONL datasets: read and validate every row where the data enters.

Two row formats, one per line of the file:

* classification: ``{"text": str, "label": int}`` (label indexes ``data.verbalizer``)
* completion:     ``{"prompt": str, "completion": str}``

Other keys on a row are ignored. Blank lines are skipped. Every problem raises a
:class:`DataError` of one line that names the file and the 1-based line number.

:func:`load_jsonl` reads a file; :class:`JsonlChecker` applies the same rules to bytes as
they arrive (the service checks an upload while it streams in, with a cap on a line's length).
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
    checker = JsonlChecker(name, format=format, num_labels=num_labels, keep_rows=True)
    with open(path, "rb") as f:
        for raw in f:
            checker.line(raw)
    checker.finish()
    return Dataset(path=path, format=checker.format, rows=tuple(checker.rows))


class JsonlChecker:
    """The rows of a JSONL dataset checked one line at a time: :func:`load_jsonl`'s rules, fed as bytes arrive.

    ``feed(chunk)`` takes any piece of the file (lines may span pieces); ``line(raw)`` one
    whole line; ``finish()`` checks the last line and that there was a row, and returns the
    number of rows. Each raises :class:`DataError` at the first bad line, naming it.
    With ``max_line_bytes`` a line longer than that is refused as soon as it passes the cap,
    so a checker never buffers more than one line of at most that many bytes.
    """

    def __init__(self, name: str, *, format: str = "auto", num_labels: int | None = None,
                 max_line_bytes: int | None = None, keep_rows: bool = False):
        if format not in ("auto", *_KEYS):
            raise ValueError(f"format must be 'auto', 'classification' or 'completion' (got {format!r})")
        self.name = name
        self.format: Format | None = None if format == "auto" else format  # type: ignore[assignment]
        self.num_labels = num_labels
        self.max_line_bytes = max_line_bytes
        self.rows: list[Row] = []
        self.num_rows = 0
        self._keep = keep_rows
        self._lineno = 0
        self._partial = bytearray()

    def feed(self, chunk: bytes) -> None:
        start = 0
        while True:
            end = chunk.find(b"\n", start)
            if end < 0:
                self._partial += chunk[start:]
                self._check_length(len(self._partial))
                return
            if self._partial:
                self._partial += chunk[start:end + 1]
                raw, self._partial = bytes(self._partial), bytearray()
            else:
                raw = chunk[start:end + 1]
            self.line(raw)
            start = end + 1

    def line(self, raw: bytes) -> None:
        self._lineno += 1
        self._check_length(len(raw.rstrip(b"\r\n")), lineno=self._lineno)
        obj = _parse_line(raw, self.name, self._lineno)
        if obj is None:
            return
        if self.format is None:
            self.format = _detect_format(obj, self.name, self._lineno)
        row = _make_row(obj, self.format, self.name, self._lineno, self.num_labels)
        self.num_rows += 1
        if self._keep:
            self.rows.append(row)

    def finish(self) -> int:
        if self._partial:
            raw, self._partial = bytes(self._partial), bytearray()
            self.line(raw)
        if not self.num_rows:
            raise DataError(f"{self.name}: empty file (no rows)")
        return self.num_rows

    def _check_length(self, size: int, *, lineno: int | None = None) -> None:
        if self.max_line_bytes is not None and size > self.max_line_bytes:
            raise DataError(f"{self.name}:{lineno or self._lineno + 1}: line longer than {self.max_line_bytes} bytes; "
                            "shorten it (one row per line)")


def _parse_line(raw: bytes, name: str, lineno: int) -> dict | None:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{name}:{lineno}: not valid UTF-8 (save the file as UTF-8)") from None
    if not text.strip():
        return None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{name}:{lineno}: not valid JSON ({e.msg} at column {e.colno}); "
                        "write one JSON object per line") from None
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

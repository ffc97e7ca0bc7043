import json
import os

import pytest

from ferrytune.data import ClassificationRow, CompletionRow, JsonlChecker, demo_data_path, load_jsonl
from ferrytune.errors import DataError


def rows(*objs) -> str:
    return "".join(json.dumps(o) + "\n" for o in objs)


def test_auto_detects_both_formats_and_keeps_line_numbers(write_jsonl):
    cls = load_jsonl(write_jsonl(rows({"text": "a", "label": 0}) + "\n" + rows({"text": "b", "label": 1, "id": 7})))
    assert cls.format == "classification" and len(cls) == 2
    assert cls[1] == ClassificationRow(text="b", label=1, line=3)  # blank line 2 skipped, extra key ignored
    assert cls.num_labels == 2
    comp = load_jsonl(write_jsonl(rows({"prompt": "Q", "completion": " A"}), "c.jsonl"))
    assert comp.format == "completion" and comp[0] == CompletionRow("Q", " A", 1)
    assert comp.head(None) is comp and len(cls.head(1)) == 1


def test_packaged_demo_and_example_samples_load():
    train = load_jsonl(demo_data_path("train"))
    dev = load_jsonl(demo_data_path("dev"))
    assert (len(train), len(dev)) == (200, 100) and train.num_labels == 2
    root = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "data")
    assert len(load_jsonl(os.path.join(root, "rt-polarity-sample", "train.jsonl"))) == 256
    assert len(load_jsonl(os.path.join(root, "rt-polarity-sample", "dev.jsonl"))) == 128
    assert load_jsonl(os.path.join(root, "tiny-completion.jsonl")).format == "completion"


ERRORS = [
    (rows({"text": "a", "label": 0}, {"text": "b"}), {}, r"^train\.jsonl:2: missing key 'label'"),
    ('{"text": "a", "label": 0}\n{"text": "a", "label": 0\n', {}, r"^train\.jsonl:2: not valid JSON"),
    (rows([1, 2]), {}, r"^train\.jsonl:1: expected a JSON object, got list"),
    (rows({"foo": 1}), {}, r"^train\.jsonl:1: cannot tell the format"),
    ("", {}, r"^train\.jsonl: empty file \(no rows\)$"),
    ("\n\n", {}, r"^train\.jsonl: empty file"),
    (rows({"text": "a", "label": "1"}), {}, r"^train\.jsonl:1: 'label' must be an integer \(got '1'\)"),
    (rows({"text": "a", "label": True}), {}, r"^train\.jsonl:1: 'label' must be an integer"),
    (rows({"text": 3, "label": 0}), {}, r"^train\.jsonl:1: 'text' must be a string"),
    (rows({"text": "a", "label": -1}), {}, r"^train\.jsonl:1: label -1 out of range"),
    (rows({"text": "a", "label": 0}, {"text": "a", "label": 2}), {"num_labels": 2}, r"^train\.jsonl:2: label 2 out of range: must be 0\.\.1"),
    (rows({"prompt": "q", "completion": ""}), {}, r"^train\.jsonl:1: 'completion' must be a non-empty string"),
    (rows({"prompt": "q", "completion": "a"}, {"text": "a", "label": 0}), {}, r"^train\.jsonl:2: missing key 'prompt'"),
    (rows({"text": "a", "label": 0}), {"format": "completion"}, r"^train\.jsonl:1: missing key 'prompt'"),
    (b'{"text": "a", "label": 0}\n{"text": "\xff", "label": 0}\n', {}, r"^train\.jsonl:2: not valid UTF-8 \(save the file as UTF-8\)$"),
]


@pytest.mark.parametrize("content,kwargs,pattern", ERRORS)
def test_every_error_is_one_line_naming_file_and_line(tmp_path, monkeypatch, content, kwargs, pattern):
    monkeypatch.chdir(tmp_path)  # so the path as given is the bare "train.jsonl"
    (tmp_path / "train.jsonl").write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(DataError, match=pattern) as err:
        load_jsonl("train.jsonl", **kwargs)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("content,kwargs,pattern", ERRORS)
@pytest.mark.parametrize("piece", [1, 3, 64 << 10])
def test_a_stream_fed_in_any_pieces_gets_the_same_error(content, kwargs, pattern, piece):
    """JsonlChecker (the service's upload check) is load_jsonl's rules, whatever the pieces' boundaries."""
    data = content if isinstance(content, bytes) else content.encode()
    checker = JsonlChecker("train.jsonl", **kwargs)
    with pytest.raises(DataError, match=pattern):
        for i in range(0, len(data), piece):
            checker.feed(data[i:i + piece])
        checker.finish()


@pytest.mark.parametrize("piece", [1, 7, 1 << 20])
def test_a_stream_fed_in_pieces_keeps_the_rows_and_caps_a_line(piece):
    data = (rows({"text": "a", "label": 0}) + "\n" + rows({"text": "b" * 50, "label": 1})
            + '{"text": "no newline at the end", "label": 0}').encode()
    checker = JsonlChecker("t.jsonl", keep_rows=True, max_line_bytes=100)
    for i in range(0, len(data), piece):
        checker.feed(data[i:i + piece])
    assert checker.finish() == 3 and [r.line for r in checker.rows] == [1, 3, 4] and checker.format == "classification"
    long = rows({"text": "a", "label": 0}, {"text": "x" * 200, "label": 1}, {"text": "a", "label": 0})
    checker = JsonlChecker("t.jsonl", max_line_bytes=100)
    with pytest.raises(DataError, match=r"^t\.jsonl:2: line longer than 100 bytes; shorten it"):
        for i in range(0, len(long), piece):
            checker.feed(long[i:i + piece].encode())
        checker.finish()
    assert len(checker._partial) <= 100 + piece  # never more than one capped line held


def test_missing_file_and_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=r"^train\.jsonl: file not found$"):
        load_jsonl("train.jsonl")
    with pytest.raises(DataError, match=r"^\.: not a file$"):
        load_jsonl(".")

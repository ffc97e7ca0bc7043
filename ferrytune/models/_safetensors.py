"""Read and write HF safetensors checkpoints one tensor at a time.

The whole model is never materialised: the reader parses the shard headers and
reads single tensors with ``os.pread`` followed by ``POSIX_FADV_DONTNEED`` so
the page cache does not grow with the model; the writer knows every tensor's
shape up front, writes the header first and then streams tensors in order.
Format: https://github.com/huggingface/safetensors (8-byte little-endian header
length, a JSON header of ``name -> {dtype, shape, data_offsets}``, the data).
"""

from __future__ import annotations

import json
import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch

from ferrytune.errors import CheckpointError

logger = logging.getLogger(__name__)

_DTYPES = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_NAMES = {v: k for k, v in _DTYPES.items()}
SHARD_BYTES = 4 * 1024**3  # HF's default max_shard_size is 5 GB; stay under it.
INDEX_NAME = "model.safetensors.index.json"


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives inside a shard."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int


def _read_header(path: Path) -> dict[str, TensorEntry]:
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file (no header)")
            (hlen,) = struct.unpack("<Q", raw)
            if hlen > size - 8 or hlen > 100 * 1024**2:
                raise CheckpointError(f"{path}: corrupt safetensors header (length {hlen})")
            header = json.loads(f.read(hlen))
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read checkpoint shard ({e.strerror})") from e
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from e
    base = 8 + hlen
    out: dict[str, TensorEntry] = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        if meta["dtype"] not in _DTYPES:
            raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {meta['dtype']}")
        begin, end = meta["data_offsets"]
        if base + end > size:
            raise CheckpointError(
                f"{path}: truncated safetensors file: tensor {name} ends at byte {base + end} "
                f"but the file has {size} bytes; re-download or re-save the checkpoint"
            )
        out[name] = TensorEntry(path, _DTYPES[meta["dtype"]], tuple(meta["shape"]), base + begin, end - begin)
    return out


class SafetensorsReader:
    """Index of every tensor in an HF folder (single file or sharded)."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.entries: dict[str, TensorEntry] = {}
        index = self.folder / INDEX_NAME
        if index.exists():
            try:
                files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: corrupt shard index ({e})") from e
        elif (self.folder / "model.safetensors").exists():
            files = ["model.safetensors"]  # other *.safetensors beside it (optimizer state) are not weights
        else:
            files = sorted(p.name for p in self.folder.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{self.folder}: no *.safetensors weights found (is model.path an HF model folder?)")
        for name in files:
            path = self.folder / name
            if not path.exists():
                raise CheckpointError(f"{path}: shard listed in {INDEX_NAME} is missing")
            self.entries.update(_read_header(path))

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def read(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """Read one tensor (into ``out``'s storage when given; dtypes are cast)."""
        e = self.entries[name]
        raw = bytearray(e.nbytes)
        fd = os.open(e.file, os.O_RDONLY)
        try:
            view, done = memoryview(raw), 0
            while done < e.nbytes:
                n = os.preadv(fd, [view[done:]], e.start + done)
                if n == 0:
                    raise CheckpointError(f"{e.file}: truncated while reading {name}")
                done += n
            # Conversion is not the streaming path, but keep the page cache bounded anyway.
            os.posix_fadvise(fd, e.start, e.nbytes, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        t = torch.frombuffer(raw, dtype=e.dtype).reshape(e.shape) if e.nbytes else torch.empty(e.shape, dtype=e.dtype)
        if out is None:
            return t
        if tuple(out.shape) != e.shape:
            raise CheckpointError(f"{e.file}: tensor {name} has shape {e.shape}, model expects {tuple(out.shape)}")
        out.copy_(t)
        return out


class SafetensorsWriter:
    """Stream tensors into (sharded) safetensors files whose layout is fixed up front.

    ``specs`` is the ordered list of ``(name, shape, dtype)``; call :meth:`write`
    once per tensor in that order. Files are written into ``folder`` directly;
    atomicity is the caller's job (write into a temporary folder, then rename).
    """

    def __init__(self, folder: Path, specs: list[tuple[str, tuple[int, ...], torch.dtype]],
                 *, shard_bytes: int = SHARD_BYTES) -> None:
        self.folder = Path(folder)
        shards: list[list[tuple[str, tuple[int, ...], torch.dtype]]] = [[]]
        size = 0
        for spec in specs:
            nbytes = _numel(spec[1]) * _itemsize(spec[2])
            if shards[-1] and size + nbytes > shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(spec)
            size += nbytes
        n = len(shards)
        self._files: list[tuple[str, list]] = []
        for i, shard in enumerate(shards):
            fname = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            self._files.append((fname, shard))
        self._order = [(fi, s[0]) for fi, (_, shard) in enumerate(self._files) for s in shard]
        self._next = 0
        self._fh = None
        self._cur = -1

    def _open(self, fi: int) -> None:
        if self._fh is not None:
            self._finish_file()
        fname, shard = self._files[fi]
        header, offset = {}, 0
        for name, shape, dtype in shard:
            nbytes = _numel(shape) * _itemsize(dtype)
            header[name] = {"dtype": _NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        header["__metadata__"] = {"format": "pt"}
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # the spec asks for 8-byte alignment of the data
        self._fh = open(self.folder / fname, "wb")
        self._fh.write(struct.pack("<Q", len(blob)) + blob)
        self._cur = fi

    def _finish_file(self) -> None:
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        self._fh = None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        fi, expected = self._order[self._next]
        if name != expected:
            raise RuntimeError(f"SafetensorsWriter: expected {expected}, got {name}")
        if fi != self._cur:
            self._open(fi)
        t = tensor.detach().contiguous().cpu()
        if t.numel():
            self._fh.write(t.view(-1).view(torch.uint8).numpy().tobytes())
        self._next += 1

    def close(self) -> None:
        if self._next != len(self._order):
            raise RuntimeError(f"SafetensorsWriter: {len(self._order) - self._next} tensors not written")
        if self._fh is not None:
            self._finish_file()
        if len(self._files) > 1:
            weight_map = {s[0]: fname for fname, shard in self._files for s in shard}
            total = sum(_numel(s[1]) * _itemsize(s[2]) for _, shard in self._files for s in shard)
            (self.folder / INDEX_NAME).write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def _numel(shape: Iterable[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def iter_shard_files(folder: Path) -> Iterator[Path]:
    yield from sorted(Path(folder).glob("*.safetensors"))

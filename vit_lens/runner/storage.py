"""Shard files and the manifest of a dataset run: atomic writes, checksums, memory-mapped reads.

A shard is one safetensors file holding several named tensors (rows of every recorder, plus the
float64 partial sums of the reductions over the shard's images). It is written to a temporary file
in the same folder, flushed and fsync'ed, then renamed over its final name (``os.replace`` is
atomic on POSIX and Windows), so a shard file is whole or absent. After the rename, a small JSON
record (``shard_00003.json``, also written atomically) states its size and SHA-256: only a shard
with a record whose size and checksum it matches counts as done. Shards are read back by
memory-mapping the file at each tensor's offset, so a random row costs one page read.
"""

import hashlib
import json
import os
import struct
import sys
import threading
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

MANIFEST = "manifest.json"
REDUCTIONS = "reductions.safetensors"
TEMPORARY_SUFFIX = ".tmp"
FORMAT = "vit_lens.runner/1"

# safetensors dtype -> (numpy dtype to memory-map with, torch dtype to view it as)
_DTYPES = {
    "F64": (np.float64, torch.float64), "F32": (np.float32, torch.float32), "F16": (np.float16, torch.float16),
    "BF16": (np.int16, torch.bfloat16), "I64": (np.int64, torch.int64), "I32": (np.int32, torch.int32),
    "I16": (np.int16, torch.int16), "I8": (np.int8, torch.int8), "U8": (np.uint8, torch.uint8),
    "BOOL": (np.bool_, torch.bool),
}
_SAFETENSORS_NAMES = {torch_dtype: name for name, (_, torch_dtype) in _DTYPES.items()}


def shard_name(index: int) -> str:
    return f"shard_{index:06d}.safetensors"


def record_name(index: int) -> str:
    return f"shard_{index:06d}.json"


def weights_fingerprint(model: Any) -> str:
    """SHA-256 of a model's state dict: every tensor's name, dtype, shape and bytes, in name order.

    Two models of one architecture but other weights get other fingerprints, so a run can tell that
    it resumes with the model it started with.

    Example:
        >>> weights_fingerprint(model)[:13]  # doctest: +SKIP
        'sha256:3f1a0c'
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(memoryview(flat.view(torch.uint8).numpy()))
    return "sha256:" + digest.hexdigest()


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that ``path`` is either its old content or all of ``data``."""
    _write_pieces_atomic(path, [data])


def _write_pieces_atomic(path: Path, pieces: Iterable[Any]) -> str:
    """Write the buffers ``pieces`` one after the other to ``path`` atomically; returns their SHA-256.

    The bytes are hashed as they are written, so nothing is read back.
    """
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}{TEMPORARY_SUFFIX}")
    digest = hashlib.sha256()
    try:
        with open(temporary, "wb") as out:
            for piece in pieces:
                digest.update(piece)
                out.write(piece)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)
    return "sha256:" + digest.hexdigest()


def _fsync_directory(directory: Path) -> None:
    """Make a rename durable (POSIX); directories cannot be opened for this on Windows."""
    try:
        handle = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


def write_json_atomic(path: Path, value: Any) -> None:
    write_atomic(path, (json.dumps(value, indent=1) + "\n").encode())


def write_tensors(path: Path, tensors: dict[str, Tensor | list[Tensor]],
                  metadata: dict[str, str] | None = None) -> dict[str, Any]:
    """Write ``tensors`` to the safetensors file ``path`` atomically; returns its size and SHA-256.

    A value may be a list of tensors (a shard's rows, batch by batch): it is stored as their
    concatenation along the first axis, written piece by piece from the tensors' own memory, so no
    joined copy and no in-memory image of the file is made. Tensors are laid out by element size
    (largest first), then name, which keeps every tensor aligned to its element size; the file is
    a standard safetensors file (``safetensors.torch.load_file`` reads it).
    """
    entries = []
    for name, value in tensors.items():
        pieces = [value] if isinstance(value, Tensor) else list(value)
        if not pieces:
            raise ValueError(f"write_tensors: {name!r} is an empty list of tensors")
        pieces = [piece.detach().to("cpu").contiguous() for piece in pieces]
        dtype, inner = pieces[0].dtype, tuple(pieces[0].shape[1:])
        if any(piece.dtype != dtype or tuple(piece.shape[1:]) != inner or piece.ndim == 0 for piece in pieces[1:]):
            raise ValueError(f"write_tensors: the pieces of {name!r} differ in dtype or trailing shape; they must "
                             "stack along their first axis")
        shape = tuple(pieces[0].shape) if len(pieces) == 1 else (sum(len(piece) for piece in pieces), *inner)
        if dtype not in _SAFETENSORS_NAMES:
            raise ValueError(f"write_tensors: {name!r} has dtype {dtype}, which shards do not store; use one of "
                             f"{sorted(str(d) for d in _SAFETENSORS_NAMES)}")
        entries.append((name, dtype, shape, pieces))
    entries.sort(key=lambda entry: (-entry[1].itemsize, entry[0]))
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, dtype, shape, pieces in entries:
        size = sum(piece.numel() for piece in pieces) * dtype.itemsize
        header[name] = {"dtype": _SAFETENSORS_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    buffers = [struct.pack("<Q", len(text)), text]
    buffers += [_raw_bytes(piece) for _, _, _, pieces in entries for piece in pieces if piece.numel()]
    digest = _write_pieces_atomic(path, buffers)
    return {"bytes": 8 + len(text) + offset, "sha256": digest}


def _raw_bytes(tensor: Tensor) -> memoryview:
    """The little-endian bytes of a contiguous CPU tensor, as safetensors stores them (no copy on little-endian hosts)."""
    flat = tensor.reshape(-1)
    if sys.byteorder == "big" and tensor.element_size() > 1:
        numpy_dtype = _DTYPES[_SAFETENSORS_NAMES[tensor.dtype]][0]
        swapped = flat.view(torch.int16) if tensor.dtype == torch.bfloat16 else flat
        return memoryview(swapped.numpy().astype(np.dtype(numpy_dtype).newbyteorder("<")).view(np.uint8))
    return memoryview(flat.view(torch.uint8).numpy())


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return "sha256:" + digest.hexdigest()


def check_file(path: Path, record: dict[str, Any], checksum: bool) -> str | None:
    """Why ``path`` does not match ``record`` (size, and the SHA-256 if ``checksum``), or None if it does."""
    if not path.is_file():
        return f"{path} is missing"
    size = path.stat().st_size
    if size != record["bytes"]:
        return f"{path} has {size} bytes, its record says {record['bytes']} (truncated or replaced)"
    if checksum and file_digest(path) != record["sha256"]:
        return f"{path} does not match its recorded SHA-256 (the bytes changed after it was written)"
    return None


class TensorFile:
    """A safetensors file opened by memory-mapping: ``file[name]`` is a tensor over the mapped bytes.

    Nothing is read until a tensor's rows are used; the header is checked against the file size, so
    a truncated file raises here.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as handle:
            head = handle.read(8)
            if len(head) < 8:
                raise ValueError(f"{self.path} is not a safetensors file ({size} bytes)")
            (length,) = struct.unpack("<Q", head)
            if length > size - 8:
                raise ValueError(f"{self.path} is truncated: its header alone claims {length} bytes of {size}")
            try:
                header = json.loads(handle.read(length))
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                raise ValueError(f"{self.path} has a damaged safetensors header ({error})") from None
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self._entries = header
        self._base = 8 + length
        for name, entry in header.items():
            if self._base + entry["data_offsets"][1] > size:
                raise ValueError(f"{self.path} is truncated: tensor {name!r} ends past the end of the file")

    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name]["shape"])

    def __getitem__(self, name: str) -> Tensor:
        entry = self._entries[name]
        numpy_dtype, torch_dtype = _DTYPES[entry["dtype"]]
        start, stop = entry["data_offsets"]
        shape = tuple(entry["shape"])
        if stop == start:
            return torch.empty(shape, dtype=torch_dtype)
        array = np.memmap(self.path, dtype=numpy_dtype, mode="r", offset=self._base + start, shape=shape)
        with warnings.catch_warnings():  # a read-only map: the tensor must not be written to, and is not
            warnings.simplefilter("ignore", UserWarning)
            tensor = torch.from_numpy(array)
        return tensor.view(torch_dtype) if torch_dtype == torch.bfloat16 else tensor

"""Safe access to ``.safetensors`` files.

Everything here is checked from the file's header before a single tensor byte is read: pickles are
refused by name and by content (they are never unpickled), and a header that lies about shapes,
offsets or sizes is refused with a one-line message.
"""

from __future__ import annotations

import json
import math
import os
import stat
import struct
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import LoraError

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle")
PICKLE_MAGIC = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05", b"PK\x03\x04")
# safetensors dtype names and their torch dtypes (the ones lora_ops reads and writes)
TORCH_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
# What a path that is not a regular file is, in words.
FILE_KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a pipe (FIFO)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)
DTYPE_BYTES = {name: dtype.itemsize for name, dtype in TORCH_DTYPES.items()}
DTYPE_NAMES = {dtype: name for name, dtype in TORCH_DTYPES.items()}


@dataclass(frozen=True)
class Limits:
    """What a file may ask for before any of its data is read (the Space's defaults)."""

    header_bytes: int = 64 * 1024**2
    tensors: int = 100_000
    elements_per_tensor: int = 2**31
    elements_total: int = 2**33
    key_chars: int = 1024  # characters of one tensor name
    rank: int = 2048  # rank of one input module
    rank_cubes: int = 2**33  # sum over modules of rank**3: the work of the [r, r] eigen and singular value problems
    module_bytes: int = 2 * 1024**3  # float64 working memory of one module


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as the header describes it: safetensors dtype name (``"BF16"``), shape, size in bytes."""

    dtype: str
    shape: tuple[int, ...]
    nbytes: int

    @classmethod
    def of(cls, dtype: torch.dtype, shape: tuple[int, ...]) -> TensorInfo:
        """The entry a tensor of this torch dtype and shape gets."""
        return cls(DTYPE_NAMES[dtype], tuple(shape), math.prod(shape) * dtype.itemsize)


@dataclass(frozen=True)
class Header:
    """A validated safetensors header: tensors by key, the ``__metadata__`` strings, the file size in bytes and
    where each tensor's bytes begin in the file."""

    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    file_bytes: int
    offsets: dict[str, int]


def _refuse_pickle(path: Path) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise LoraError(
            f"{path.name} is a pickle-based checkpoint ({path.suffix}); only .safetensors files are read,"
            " because unpickling can run arbitrary code"
        )


def parse_json(text: str | bytes, refusal: str) -> object:
    """``json.loads(text)``, or ``LoraError(refusal)`` for anything that is not plain JSON: bad syntax or
    encoding, nesting deep enough to exhaust the stack, integers past Python's digit limit."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise LoraError(refusal) from None


def read_header(path: str | Path, limits: Limits = DEFAULT_LIMITS) -> Header:
    """Read and validate the header of a safetensors file without reading tensor data."""
    path = Path(path)
    _refuse_pickle(path)
    _refuse_non_file(path)
    size = path.stat().st_size
    if size == 0:
        raise LoraError(f"{path.name} is empty")
    with path.open("rb") as f:
        prefix = f.read(8)
        # A pickle's or zip's first bytes read as a header length far beyond the file's size.
        header_bytes = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else size
        if header_bytes > size - 8 and prefix.startswith(PICKLE_MAGIC):
            raise LoraError(f"{path.name} holds a pickled PyTorch checkpoint; it is not read (only safetensors)")
        if len(prefix) < 8:
            raise LoraError(f"{path.name} is not a safetensors file (only {size} bytes)")
        if header_bytes > size - 8 and prefix.isascii() and prefix.decode().isprintable():
            raise LoraError(f"{path.name} is not a safetensors file (it starts with the text {prefix.decode()!r})")
        if header_bytes > size - 8:
            raise LoraError(
                f"{path.name} is truncated or not a safetensors file: its header claims {header_bytes} bytes"
                f" but the file has {size}"
            )
        if header_bytes > limits.header_bytes:
            raise LoraError(f"{path.name}: header of {header_bytes} bytes exceeds the limit of {limits.header_bytes}")
        raw = f.read(header_bytes)
    header = parse_json(raw, f"{path.name} is not a safetensors file (its header is not JSON)")
    if not isinstance(header, dict):
        raise LoraError(f"{path.name} is not a safetensors file (its header is not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise LoraError(f"{path.name}: __metadata__ must map strings to strings")
    if len(header) > limits.tensors:
        raise LoraError(f"{path.name} has {len(header)} tensors; the limit is {limits.tensors}")
    _refuse_unprintable(path.name, header, metadata)
    long_key = next((key for key in header if len(key) > limits.key_chars), None)
    if long_key is not None:
        raise LoraError(
            f"{path.name}: a tensor name of {len(long_key)} characters ({long_key[:40]!r}...) exceeds the limit of"
            f" {limits.key_chars}"
        )
    tensors = {key: _tensor_info(path.name, key, entry, limits) for key, entry in header.items()}
    _check_offsets(path.name, header, size - 8 - header_bytes)
    total = sum(math.prod(info.shape) for info in tensors.values())
    if total > limits.elements_total:
        raise LoraError(f"{path.name} holds {total} elements; the limit is {limits.elements_total}")
    start = 8 + header_bytes
    offsets = {key: start + entry["data_offsets"][0] for key, entry in header.items()}
    return Header(tensors=tensors, metadata=dict(metadata), file_bytes=size, offsets=offsets)


def _refuse_non_file(path: Path) -> None:
    """Refuse what is not a regular file, saying what it is (``stat`` follows symbolic links)."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise LoraError(f"file not found: {path}") from None
    except OSError as error:
        raise LoraError(f"cannot read {path}: {error.strerror}") from None
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in FILE_KINDS if test(mode)), "not a regular file")
        raise LoraError(f"{path} is {kind}, not a LoRA file")


def _refuse_unprintable(file: str, header: dict, metadata: dict) -> None:
    """Refuse tensor names that are not valid UTF-8 text (JSON escapes can smuggle in lone surrogates, which
    safetensors itself refuses) or that hold control characters (a newline, a terminal escape sequence), and
    metadata that is not valid UTF-8: no consumer writes them, and printed they would act on the terminal."""
    for key in header:
        if not _is_utf8(key) or not key.isprintable():
            raise LoraError(f"{file}: tensor name {ascii(key)[:80]} holds a control character or is not valid UTF-8")
    for key, value in metadata.items():
        if not (_is_utf8(key) and _is_utf8(value)):
            raise LoraError(f"{file}: metadata entry {ascii(key)[:80]} is not valid UTF-8")


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _tensor_info(file: str, key: str, entry: object, limits: Limits) -> TensorInfo:
    if not (
        isinstance(entry, dict)
        and isinstance(entry.get("shape"), list)
        and all(type(d) is int and d >= 0 for d in entry["shape"])
        and isinstance(entry.get("data_offsets"), list)
        and len(entry["data_offsets"]) == 2
        and all(type(o) is int and o >= 0 for o in entry["data_offsets"])
    ):
        raise LoraError(f"{file}: malformed header entry for tensor {key!r}")
    dtype = entry.get("dtype")
    if not isinstance(dtype, str) or dtype not in DTYPE_BYTES:
        raise LoraError(f"{file}: tensor {key!r} has unsupported dtype {dtype!r}")
    shape = tuple(entry["shape"])
    elements = math.prod(shape)
    if elements > limits.elements_per_tensor:
        raise LoraError(f"{file}: tensor {key!r} has {elements} elements; the limit is {limits.elements_per_tensor}")
    begin, end = entry["data_offsets"]
    nbytes = elements * DTYPE_BYTES[dtype]
    if end - begin != nbytes:
        raise LoraError(
            f"{file}: tensor {key!r} of shape {list(shape)} and dtype {dtype} needs {nbytes} bytes"
            f" but the header gives it {end - begin}"
        )
    return TensorInfo(dtype=dtype, shape=shape, nbytes=nbytes)


def _check_offsets(file: str, header: dict, data_bytes: int) -> None:
    position = 0
    for key, entry in sorted(header.items(), key=lambda item: item[1]["data_offsets"]):
        begin, end = entry["data_offsets"]
        if begin != position:
            raise LoraError(f"{file}: tensor {key!r} overlaps another tensor or leaves a gap in the data")
        if end > data_bytes:
            raise LoraError(f"{file} is truncated: tensor {key!r} ends past the end of the file")
        position = end
    if position != data_bytes:
        raise LoraError(f"{file}: {data_bytes - position} bytes of data belong to no tensor")


class TensorReader:
    """The tensors of a file whose header :func:`read_header` validated, read one at a time with ``pread``.

    ``get_tensor`` reads the tensor's bytes into a new, aligned buffer and returns it as a tensor: one copy from
    the page cache, the same as ``safetensors.safe_open``, and no memory map. A mapped file that shrinks while it
    is read kills the process with SIGBUS, which Python cannot catch; a read that comes up short is a one-line
    :class:`LoraError` instead. The file stays open while the reader is alive.
    """

    def __init__(self, path: Path, header: Header) -> None:
        self._path, self._header = path, header
        self._fd = os.open(path, os.O_RDONLY)
        weakref.finalize(self, os.close, self._fd)
        if os.fstat(self._fd).st_size != header.file_bytes:
            raise LoraError(f"{path.name} changed while it was being read")

    def nbytes(self, key: str) -> int:
        """The size in bytes of tensor ``key``."""
        return self._header.tensors[key].nbytes

    def get_tensor(self, key: str, buffer: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor ``key``, read from the file into memory of its own, or into ``buffer`` (a 1-D uint8 tensor of
        at least its size, 8-byte aligned): the result is then a view of ``buffer``, valid until it is reused."""
        info, start = self._header.tensors[key], self._header.offsets[key]
        data = torch.empty(info.nbytes, dtype=torch.uint8) if buffer is None else buffer[: info.nbytes]
        if info.nbytes and os.preadv(self._fd, [data.numpy()], start) != info.nbytes:
            raise LoraError(f"{self._path.name} was truncated while it was being read")
        return data.view(TORCH_DTYPES[info.dtype]).reshape(info.shape)


def open_tensors(path: str | Path, header: Header) -> TensorReader:
    """Open a file whose ``header`` was validated, for reading tensor by tensor (never all at once)."""
    return TensorReader(Path(path), header)

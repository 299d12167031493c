"""The GGUF format: its checked reader of header and metadata, its errors, and GGUF file detection."""

from __future__ import annotations

import math
import os
import stat
import struct
from pathlib import Path
from typing import List

import gguf
import numpy as np
from gguf import GGUFValueType as VT

from ..storage.checks import PathLike, check_regular_file

# GGUF value types -> bytes (8: string, 9: array are variable)
GGUF_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


_GGUF_MAX_DIMS = 4


class _GGUFWalker:
    """Walks a GGUF header, checking that every length and count fits in the file."""

    def __init__(self, path: Path, data: bytes):
        self.path, self.data, self.pos = path, data, 0

    def fail(self, what: str):
        raise ValueError(f"{self.path}: {what} at byte {self.pos} does not fit the file; the file is damaged or truncated")

    def take(self, fmt: str):
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.data):
            self.fail(f"a field ({fmt})")
        value = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += size
        return value[0] if len(value) == 1 else value

    def string(self, what: str) -> bytes:
        n = self.take("<Q")
        if n > len(self.data) - self.pos:
            self.fail(f"{what} of {n} bytes")
        self.pos += n
        return self.data[self.pos - n : self.pos]

    def value(self, vtype: int, depth: int = 0) -> None:
        if vtype in GGUF_SCALAR_BYTES:
            self.take(f"<{GGUF_SCALAR_BYTES[vtype]}s")
        elif vtype == 8:
            self.string("a string")
        elif vtype == 9 and depth < 2:
            itype, count = self.take("<I"), self.take("<Q")
            least = GGUF_SCALAR_BYTES.get(itype, 8)  # a string or array item takes at least its 8-byte length
            if itype not in GGUF_SCALAR_BYTES and itype not in (8, 9):
                self.fail(f"an array of unknown type {itype}")
            if count * least > len(self.data) - self.pos:
                self.fail(f"an array of {count} items")
            if itype in GGUF_SCALAR_BYTES:
                self.pos += count * least
            else:
                for _ in range(count):
                    self.value(itype, depth + 1)
        else:
            self.fail(f"a value of unknown type {vtype}")


def check_gguf_structure(path: Path) -> None:
    """Check a GGUF file's header, metadata and tensor descriptions against its size.

    ``gguf.GGUFReader`` trusts the header: a count of 2**60 or a value type
    changed from string to array makes it loop for hours. After this check
    every loop it runs is bounded by the file.

    Raises:
        ValueError: naming the file and the first field that does not fit.
    """

    check_regular_file(path)
    size = os.stat(path).st_size
    with open(path, "rb") as f:
        head = f.read(24)
        if len(head) < 24 or head[:4] != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file (no GGUF header); check the path")
        version, n_tensors, n_kv = struct.unpack("<IQQ", head[4:24])
        if version not in (2, 3):
            raise ValueError(f"{path}: GGUF version {version} is not supported (2 or 3)")
        # each key/value takes at least 12 bytes, each tensor description at least 24
        if n_kv * 12 + n_tensors * 24 > size:
            raise ValueError(
                f"{path}: the header claims {n_tensors} tensors and {n_kv} metadata entries, more than "
                f"{size} bytes can hold; the file is damaged or truncated"
            )
        data = head + f.read()
    w = _GGUFWalker(path, data)
    w.pos = 24
    alignment = gguf.GGUF_DEFAULT_ALIGNMENT
    for _ in range(n_kv):
        key = w.string("a metadata key")
        vtype = w.take("<I")
        start = w.pos
        w.value(vtype)
        if key == b"general.alignment":
            alignment = struct.unpack_from("<I", data, start)[0] if vtype == gguf.GGUFValueType.UINT32 else None
            if not alignment or alignment & (alignment - 1):
                raise ValueError(f"{path}: general.alignment is not a power of two stored as uint32 (default "
                                 f"{gguf.GGUF_DEFAULT_ALIGNMENT}); the file is damaged")
    tensors = []
    for _ in range(n_tensors):
        name = w.string("a tensor name").decode("utf-8", "replace")
        n_dims = w.take("<I")
        if not 1 <= n_dims <= _GGUF_MAX_DIMS:
            w.fail(f"tensor {name!r} with {n_dims} dimensions")
        dims = [w.take("<Q") for _ in range(n_dims)]
        tensors.append((name, dims, w.take("<I"), w.take("<Q")))
        if math.prod(dims) > 8 * size:
            w.fail(f"tensor {name!r} of shape {dims}")
    data_start = -(-w.pos // alignment) * alignment
    _check_gguf_tensor_data(path, tensors, data_start, alignment, size)


def _check_gguf_tensor_data(path: Path, tensors: list, data_start: int, alignment: int, size: int) -> None:
    """Each tensor's data is aligned, inside the file and shares no byte with another's.

    ``tensors``: ``(name, dims, type, offset)`` as the header gives them (offsets
    from ``data_start``, where the aligned data section begins). The GGUF reader
    trusts the offsets: a misaligned one reads bytes shifted into NaN, one moved
    onto another tensor reads that tensor's values.
    """

    fix = "the file is damaged; download or export it again"
    spans = []
    for name, dims, ttype, offset in tensors:
        if ttype not in gguf.GGML_QUANT_SIZES:
            raise ValueError(f"{path}: tensor {name!r} has type {ttype}, which is not a GGML tensor type; {fix}")
        block, block_bytes = gguf.GGML_QUANT_SIZES[ttype]
        if dims[0] % block:
            raise ValueError(f"{path}: tensor {name!r} has rows of {dims[0]} values, not a multiple of the "
                             f"{block}-value blocks of {gguf.GGMLQuantizationType(ttype).name}; {fix}")
        nbytes = math.prod(dims) // block * block_bytes
        if offset % alignment:
            raise ValueError(f"{path}: tensor {name!r} has data offset {offset}, not a multiple of the alignment "
                             f"{alignment} (general.alignment); {fix}")
        if data_start + offset + nbytes > size:
            raise ValueError(f"{path}: tensor {name!r} has data offset {offset} and {nbytes} bytes, past the end of "
                             f"the file ({size - data_start} data bytes); the file is damaged or truncated")
        if nbytes:
            spans.append((offset, offset + nbytes, name))
    spans.sort(key=lambda s: s[0])  # stable: of two tensors at one offset, the later one is named
    for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise ValueError(f"{path}: tensor {n1!r} has data offset {b1}, which overlaps the data of tensor {n0!r} "
                             f"(offsets {b0} to {e0}); {fix}")


def read_gguf(path: Path):
    """A ``gguf.GGUFReader`` for ``path`` after :func:`check_gguf_structure`; any reader error is a ValueError."""

    path = Path(path)
    check_gguf_structure(path)
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # numpy / struct / gguf errors on damaged fields
        raise ValueError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e}); the file is damaged") from e


def is_gguf_file(path: PathLike) -> bool:
    """True if ``path`` is a regular file named ``*.gguf`` or starting with the GGUF magic (an Ollama blob)."""
    p = Path(path).expanduser()
    try:
        if not stat.S_ISREG(os.stat(p).st_mode):
            return False
        if p.suffix.lower() == ".gguf":
            return True
        with open(p, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


_INTS = (VT.UINT8, VT.INT8, VT.UINT16, VT.INT16, VT.UINT32, VT.INT32, VT.UINT64, VT.INT64)


_FLOATS = (VT.FLOAT32, VT.FLOAT64)


_REQUIRED = object()


class Metadata:
    """Typed access to a GGUF file's key/value metadata; a missing or mistyped value is a ValueError."""

    def __init__(self, reader, path: Path):
        self.fields, self.path = reader.fields, path

    def __contains__(self, key: str) -> bool:
        return key in self.fields

    def _missing(self, key: str, default):
        if default is _REQUIRED:
            raise ValueError(f"{self.path}: metadata {key!r} is missing; the GGUF file is incomplete or damaged")
        return default

    def _scalar(self, key: str, kinds, what: str, default):
        field = self.fields.get(key)
        if field is None:
            return self._missing(key, default)
        if len(field.types) != 1 or field.types[0] not in kinds:
            got = "/".join(t.name for t in field.types) or "nothing"
            raise ValueError(f"{self.path}: metadata {key!r} is {got}; expected {what}. The GGUF file is damaged")
        return field.parts[field.data[0]][0] if field.types[0] != VT.STRING else bytes(field.parts[field.data[0]])

    def int(self, key: str, default=_REQUIRED, low: int = 0, high: int = 1 << 31) -> int:
        value = self._scalar(key, _INTS, "an integer", default)
        if value is default:
            return value
        value = int(value)
        if not low <= value <= high:
            raise ValueError(f"{self.path}: metadata {key!r} = {value} is outside [{low}, {high}]; the file is damaged")
        return value

    def float(self, key: str, default=_REQUIRED, positive: bool = True) -> float:
        value = self._scalar(key, _FLOATS + _INTS, "a number", default)
        if value is default:
            return value
        # the shortest decimal of a float32 value (1e-05, not 9.999999747378752e-06): the same float32
        value = float(str(value)) if isinstance(value, np.float32) else float(value)
        if not math.isfinite(value) or (positive and value <= 0):
            raise ValueError(f"{self.path}: metadata {key!r} = {value}; expected a finite positive number")
        return value

    def bool(self, key: str, default=_REQUIRED) -> bool:
        value = self._scalar(key, (VT.BOOL,), "true or false", default)
        return value if value is default else bool(value)

    def str(self, key: str, default=_REQUIRED) -> str:
        value = self._scalar(key, (VT.STRING,), "a string", default)
        return value if value is default else _utf8(value, key, self.path)

    def _array(self, key: str, kinds, what: str, default):
        field = self.fields.get(key)
        if field is None:
            return self._missing(key, default)
        if len(field.types) != 2 or field.types[0] != VT.ARRAY or field.types[1] not in kinds:
            got = "/".join(t.name for t in field.types) or "an empty array"
            raise ValueError(f"{self.path}: metadata {key!r} is {got}; expected an array of {what}")
        return field

    def strings(self, key: str, default=_REQUIRED) -> List[str]:
        field = self._array(key, (VT.STRING,), "strings", default)
        if field is default:
            return field
        return [_utf8(bytes(field.parts[i]), key, self.path) for i in field.data]

    def numbers(self, key: str, default=_REQUIRED, dtype=np.float64) -> np.ndarray:
        field = self._array(key, _FLOATS + _INTS, "numbers", default)
        if field is default:
            return field
        if not field.data:
            return np.zeros(0, dtype)
        return np.concatenate([field.parts[i] for i in field.data]).astype(dtype)


def _utf8(raw: bytes, key: str, path: Path) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: metadata {key!r} is not valid UTF-8 ({e}); the file is damaged") from None


class GGUFExportError(ValueError):
    """The model (or the request) cannot be written as asked."""

"""Read the few GGUF header facts a manifest needs, without parsing the whole file.

``gguf.GGUFReader`` builds Python objects for every field and tensor; on Gemma 3
270M (a 262k-entry tokenizer) that took 24 s. Here the key/value section is
walked once with ``struct``: scalars are kept, arrays are skipped by seeking
(string arrays by walking their length prefixes), and tensor shapes are summed
for the parameter count. Enum names come from the ``gguf`` package itself.
"""

from __future__ import annotations

import io
import struct
from collections import Counter
from typing import Any, BinaryIO

from gguf.constants import GGMLQuantizationType, GGUFValueType, LlamaFileType

from .errors import NotGGUF

MAGIC = b"GGUF"

_SCALAR = {
    GGUFValueType.UINT8: "B", GGUFValueType.INT8: "b", GGUFValueType.UINT16: "H",
    GGUFValueType.INT16: "h", GGUFValueType.UINT32: "I", GGUFValueType.INT32: "i",
    GGUFValueType.FLOAT32: "f", GGUFValueType.BOOL: "?", GGUFValueType.UINT64: "Q",
    GGUFValueType.INT64: "q", GGUFValueType.FLOAT64: "d",
}


def is_gguf(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == MAGIC


class _Reader:
    def __init__(self, f: BinaryIO, size: int, path: str):
        self.f, self.size, self.path, self.endian = f, size, path, "<"

    def unpack(self, fmt: str):
        fmt = self.endian + fmt
        data = self.f.read(struct.calcsize(fmt))
        if len(data) < struct.calcsize(fmt):
            raise NotGGUF(f"{self.path}: truncated GGUF header")
        return struct.unpack(fmt, data)

    def string(self) -> str:
        (n,) = self.unpack("Q")
        if n > self.size:
            raise NotGGUF(f"{self.path}: corrupt GGUF header (string of {n} bytes)")
        return self.f.read(n).decode("utf-8", errors="replace")

    def skip_strings(self, count: int) -> None:
        for _ in range(count):
            (n,) = self.unpack("Q")
            if n > self.size:
                raise NotGGUF(f"{self.path}: corrupt GGUF header (string of {n} bytes)")
            self.f.seek(n, io.SEEK_CUR)

    def value(self, vtype: int) -> tuple[Any, int | None]:
        """Return (scalar value or None, array length or None)."""
        try:
            vtype = GGUFValueType(vtype)
        except ValueError:
            raise NotGGUF(f"{self.path}: corrupt GGUF header (value type {vtype})") from None
        if vtype == GGUFValueType.STRING:
            return self.string(), None
        if vtype == GGUFValueType.ARRAY:
            (etype, count) = self.unpack("IQ")
            if count > self.size:
                raise NotGGUF(f"{self.path}: corrupt GGUF header (array of {count})")
            etype = GGUFValueType(etype)
            if etype == GGUFValueType.STRING:
                self.skip_strings(count)
            elif etype == GGUFValueType.ARRAY:
                for _ in range(count):
                    self.value(GGUFValueType.ARRAY)
            else:
                self.f.seek(count * struct.calcsize(_SCALAR[etype]), io.SEEK_CUR)
            return None, count
        return self.unpack(_SCALAR[vtype])[0], None


def read_gguf_metadata(path: str) -> dict:
    """Architecture, name, parameter count, context length and quantization of a GGUF file.

    Raises NotGGUF naming the file if its magic bytes or header are not GGUF.
    """
    with open(path, "rb", buffering=1024 * 1024) as f:
        f.seek(0, io.SEEK_END)
        size = f.tell()
        f.seek(0)
        if f.read(4) != MAGIC:
            raise NotGGUF(f"{path}: not a GGUF file (magic bytes are not 'GGUF')")
        r = _Reader(f, size, path)
        (version,) = r.unpack("I")
        if version > 0xFFFF:  # a big-endian file
            r.endian = ">"
            version = struct.unpack(">I", struct.pack("<I", version))[0]
        n_tensors, n_kv = r.unpack("QQ")
        scalars: dict[str, Any] = {}
        arrays: dict[str, int] = {}
        for _ in range(n_kv):
            key = r.string()
            (vtype,) = r.unpack("I")
            value, count = r.value(vtype)
            if count is None:
                scalars[key] = value
            else:
                arrays[key] = count
        params = 0
        tensor_types: Counter[str] = Counter()
        for _ in range(n_tensors):
            r.string()
            (n_dims,) = r.unpack("I")
            if n_dims > 8:
                raise NotGGUF(f"{path}: corrupt GGUF header (tensor with {n_dims} dims)")
            dims = r.unpack("Q" * n_dims)
            (ttype, _offset) = r.unpack("IQ")
            count = 1
            for d in dims:
                count *= d
            params += count
            tensor_types[_enum_name(GGMLQuantizationType, ttype)] += count

    arch = scalars.get("general.architecture")
    file_type = scalars.get("general.file_type")
    meta = {
        "format": "GGUF",
        "gguf_version": version,
        "architecture": arch,
        "name": scalars.get("general.name"),
        "size_label": scalars.get("general.size_label"),
        "parameter_count": params,
        "context_length": scalars.get(f"{arch}.context_length"),
        "embedding_length": scalars.get(f"{arch}.embedding_length"),
        "block_count": scalars.get(f"{arch}.block_count"),
        "file_type": _enum_name(LlamaFileType, file_type) if file_type is not None else None,
        "quantization": _quantization_label(file_type, tensor_types),
        "quantization_version": scalars.get("general.quantization_version"),
        "vocab_size": arrays.get("tokenizer.ggml.tokens"),
        "tensor_count": n_tensors,
    }
    return {k: v for k, v in meta.items() if v is not None}


def _enum_name(enum, value) -> str:
    try:
        return enum(value).name
    except ValueError:
        return str(value)


def _quantization_label(file_type, tensor_types: Counter) -> str | None:
    """``Q4_K_M`` from ``MOSTLY_Q4_K_M``; else the tensor type holding most weights."""
    if file_type is not None:
        name = _enum_name(LlamaFileType, file_type)
        return name.removeprefix("MOSTLY_") if name.startswith("MOSTLY_") else name
    return tensor_types.most_common(1)[0][0] if tensor_types else None

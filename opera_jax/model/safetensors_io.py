"""Reading safetensors lazily from a memory map; writing with the `safetensors` library.

The format: 8-byte little-endian header length, a JSON header {name: {dtype, shape,
data_offsets}}, then the raw bytes. Reading memory-maps the file and hands out numpy views, so
the loader can transpose a tensor and give each device only its slice without the host ever
holding the whole tensor (the library's readers copy whole tensors or need per-slice
indexing through our layout transforms). A file shorter than its header says (an interrupted
copy) is an error naming the file and the tensor. `ml_dtypes` gives numpy a bfloat16.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Iterator

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_, "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
}


class SafetensorsFile:
    """Lazy, memory-mapped view of one .safetensors file."""

    def __init__(self, path: str):
        self.path = path
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ValueError(f"{path}: not a safetensors file (shorter than 8 bytes)")
            (n,) = struct.unpack("<Q", raw)
            if n > os.path.getsize(path) - 8:
                raise ValueError(f"{path}: corrupt or truncated safetensors file (its header "
                                 f"claims {n} bytes, the file has {os.path.getsize(path)})")
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{path}: corrupt safetensors header ({e})") from e
        header.pop("__metadata__", None)
        self._header = header
        self._data_start = 8 + n
        self._size = os.path.getsize(path)
        self._mmap = None

    def keys(self) -> list[str]:
        return list(self._header)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._header[name]["shape"])

    def get(self, name: str) -> np.ndarray:
        """The tensor as a read-only numpy array backed by the memory map."""
        info = self._header[name]
        if info["dtype"] not in _DTYPES:
            raise ValueError(f"{self.path}: tensor {name!r} has unsupported dtype {info['dtype']}")
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        start, end = info["data_offsets"]
        if self._data_start + end > self._size:
            raise ValueError(f"{self.path}: tensor {name!r} needs bytes {start}..{end} of the "
                             f"data, the file holds {self._size - self._data_start}: the file is "
                             f"truncated (an interrupted copy or export?)")
        buf = self._mmap[self._data_start + start:self._data_start + end]
        return buf.view(_DTYPES[info["dtype"]]).reshape(info["shape"])


def write(path: str, tensors: Iterator[tuple[str, np.ndarray]] | dict[str, np.ndarray],
          metadata: dict[str, str] | None = None) -> None:
    """Writes tensors (name, array) to `path` with `safetensors.numpy.save_file` (one file's
    tensors are in memory together), into a temporary file renamed into place."""
    items = dict(tensors.items() if isinstance(tensors, dict) else tensors)
    tmp = path + ".tmp"
    save_file({k: np.ascontiguousarray(v) for k, v in items.items()}, tmp,
              metadata=metadata or {"format": "pt"})
    os.replace(tmp, path)

"""One tensor of a safetensors file as a numpy array, read from the file's header and bytes: the
library's numpy reader has no float8 or bfloat16 type, and FP8 weights and the bfloat16 scales of
compressed-tensors checkpoints come in those (ml_dtypes has both)."""
from __future__ import annotations

import functools
import json
import os
import struct
from typing import Any

import ml_dtypes
import numpy as np

from converters.errors import WeightLoadError

_DTYPES = {"F8_E4M3": ml_dtypes.float8_e4m3fn, "BF16": ml_dtypes.bfloat16, "F16": np.float16,
           "F32": np.float32, "F64": np.float64, "I8": np.int8, "U8": np.uint8, "I16": np.int16,
           "I32": np.int32, "I64": np.int64, "BOOL": np.bool_}


def read_array(path: str, name: str) -> np.ndarray:
    """Tensor `name` of the safetensors file `path`."""
    st = os.stat(path)
    data_start, header = _header(path, st.st_mtime_ns, st.st_size)
    if name not in header:
        raise WeightLoadError(f"{path}: no tensor {name!r}")
    entry = header[name]
    dtype = _DTYPES.get(entry["dtype"])
    if dtype is None:
        raise WeightLoadError(f"{path}: tensor {name!r} has dtype {entry['dtype']}, which does not "
                              "load here")
    start, end = entry["data_offsets"]
    with open(path, "rb") as f:
        f.seek(data_start + start)
        data = f.read(end - start)
    return np.frombuffer(data, dtype).reshape(entry["shape"])


@functools.lru_cache(maxsize=4)
def _header(path: str, mtime_ns: int, size: int) -> tuple[int, dict[str, Any]]:
    """(where the tensor bytes start, the JSON header) of a safetensors file, parsed once per file
    (and again if it changes) rather than once per tensor: the loader reads a file's tensors one
    after another."""
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        return 8 + header_len, json.loads(f.read(header_len))

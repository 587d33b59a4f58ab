"""Reading whole tensors of a safetensors file straight into their own memory.

Contract: `TensorFile(path)` parses the header (8-byte little-endian length, then JSON: per tensor its
dtype, shape and byte range); `read(key)` allocates the tensor and reads its bytes into it with one
`readinto`: no pickle, no memory map, no intermediate copy. (safetensors' own `get_tensor` returns
views of a memory map of the whole file: every page read stays resident, and counted in the
process's memory, for as long as any tensor of that file is alive, so converting a checkpoint's
tensors one by one would keep all of them resident.) Errors raise `CheckpointError` naming the tensor.
"""
from __future__ import annotations

import ctypes
import json
import struct
from pathlib import Path

import torch

from .hf_layout import CheckpointError

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


class TensorFile:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            self.header = json.loads(f.read(n))
        self.header.pop("__metadata__", None)
        self.base = 8 + n

    def read(self, key: str) -> torch.Tensor:
        entry = self.header.get(key)
        if entry is None or entry.get("dtype") not in DTYPES:
            raise CheckpointError(f"tensor '{key}' is not readable from {self.path.name}")
        begin, end = entry["data_offsets"]
        out = torch.empty(end - begin, dtype=torch.uint8)
        if end > begin:
            with open(self.path, "rb", buffering=0) as f:
                f.seek(self.base + begin)
                view = memoryview((ctypes.c_char * (end - begin)).from_address(out.data_ptr())).cast("B")
                got = f.readinto(view)
            if got != end - begin:
                raise CheckpointError(f"tensor '{key}' is truncated in {self.path.name}")
        return out.view(DTYPES[entry["dtype"]]).reshape(entry["shape"])

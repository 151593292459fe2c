"""Safetensors bytes read as tensors that view the buffer itself: no second copy of the weights."""

from __future__ import annotations

import json
import math
import sys

import torch

from .errors import ModelLoadError

# The safetensors dtypes a served model's weights come in. Others (float8, unsigned wider than 8 bits) are refused.
DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit
MAX_RANK = 16


def _refuse(why: str) -> ModelLoadError:
    return ModelLoadError(f"not a safetensors file we accept: {why}")


def read_header(data: bytearray) -> tuple[int, dict[str, tuple[torch.dtype, list[int], int, int]]]:
    """(where the tensor data begins, name -> (dtype, shape, begin, end) within the data), every claim checked.

    The entries must tile the data exactly (no gap, no overlap, nothing after), each holding its shape's bytes.
    """
    if len(data) < 8:
        raise _refuse(f"{len(data)} bytes, shorter than its 8-byte header length")
    size = int.from_bytes(data[:8], "little")
    if size > min(MAX_HEADER_BYTES, len(data) - 8):
        raise _refuse(f"a header of {size} bytes in a file of {len(data)}")
    try:
        header = json.loads(bytes(memoryview(data)[8 : 8 + size]))
    except (ValueError, RecursionError) as e:  # not UTF-8 or JSON, nested too deep, a 5000-digit integer
        raise _refuse(f"its header is not JSON ({type(e).__name__})") from None
    if not isinstance(header, dict):
        raise _refuse("its header is not a JSON object")
    header.pop("__metadata__", None)
    entries = {name: _entry(name, value, len(data)) for name, value in header.items()}
    end = 0
    for name, (_, _, begin, stop) in sorted(entries.items(), key=lambda item: item[1][2:]):
        if begin != end:
            raise _refuse(f"{name[:80]!r} begins at byte {begin} of the data, not at {end}")
        end = stop
    if end != len(data) - 8 - size:
        raise _refuse(f"its tensors cover {end} of the {len(data) - 8 - size} bytes of data")
    return 8 + size, entries


def _entry(name, value, limit: int) -> tuple[torch.dtype, list[int], int, int]:
    """One tensor's (dtype, shape, begin, end); no number in it may exceed `limit` (the file's size)."""
    if not isinstance(value, dict):
        raise _refuse(f"the entry {str(name)[:80]!r} is not a JSON object")
    dtype, shape, offsets = value.get("dtype"), value.get("shape"), value.get("data_offsets")
    if dtype not in DTYPES:
        raise _refuse(f"{name[:80]!r} has the dtype {str(dtype)[:20]!r} (accepted: {', '.join(DTYPES)})")
    if not _ints(shape, limit) or len(shape) > MAX_RANK:
        raise _refuse(f"{name[:80]!r} has the shape {str(shape)[:80]}")
    if not _ints(offsets, limit) or len(offsets) != 2 or offsets[0] > offsets[1]:
        raise _refuse(f"{name[:80]!r} has the data offsets {str(offsets)[:80]}")
    nbytes = math.prod(shape) * DTYPES[dtype].itemsize
    if offsets[1] - offsets[0] != nbytes:
        raise _refuse(f"{name[:80]!r} has {offsets[1] - offsets[0]} bytes for a {dtype} {shape} ({nbytes})")
    return DTYPES[dtype], shape, offsets[0], offsets[1]


def _ints(value, limit: int) -> bool:
    """A list of integers in [0, limit] (a bool is not an integer here)."""
    return isinstance(value, list) and all(type(v) is int and 0 <= v <= limit for v in value)


def tensor_views(data: bytearray) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file held in `data`, as views of it (they keep it alive; writing to one writes
    to `data`). A tensor whose bytes are not aligned for its dtype is copied. Same values as safetensors' `load`."""
    start, entries = read_header(data)
    if sys.byteorder != "little":  # safetensors is little-endian
        from safetensors.torch import load

        return load(bytes(data))
    whole = torch.frombuffer(data, dtype=torch.uint8)
    out = {}
    for name, (dtype, shape, begin, end) in entries.items():
        raw = whole[start + begin : start + end]
        if (start + begin) % dtype.itemsize:
            raw = raw.clone()  # a fresh, aligned storage
        if dtype == torch.bool and raw.numel() and int(raw.max()) > 1:
            raise _refuse(f"{name[:80]!r} is BOOL but holds a byte other than 0 or 1")
        try:
            out[name] = raw.view(dtype).view(shape)
        except RuntimeError:  # not expected once every number is bounded: still one line
            raise _refuse(f"{name[:80]!r} has the shape {shape}") from None
    return out

"""Tensor <-> protobuf conversion: the one place that knows the wire layout of a tensor."""

from __future__ import annotations

import math

import numpy as np
import torch

from tandem.kernels import codecs
from tandem.kernels.checks import all_finite

from . import split_pb2 as pb

# dtype <-> wire enum; bf16 travels as 2 bytes (viewed as int16), never upcast.
_TO_WIRE = {
    torch.float32: pb.FLOAT32,
    torch.float16: pb.FLOAT16,
    torch.bfloat16: pb.BFLOAT16,
    torch.int8: pb.INT8,
    torch.uint8: pb.UINT8,
    torch.int64: pb.INT64,
}
_FROM_WIRE = {v: k for k, v in _TO_WIRE.items()}
_NUMPY_VIEW = {torch.bfloat16: (torch.int16, np.int16)}

# Limits on the wire, set deliberately in one place (see README "Protocol").
MAX_MESSAGE_BYTES = 256 * 1024 * 1024  # one Forward/Backward message; 8x1024 tokens x 4096 hidden fp32 = 128 MiB
MAX_TOKENS_PER_STEP = 64 * 1024  # B*T per request
CHUNK_BYTES = 1024 * 1024  # FetchClientStages chunk size


class WireError(ValueError):
    """A tensor message is malformed: wrong dtype, shape or byte count."""


def to_proto(t: torch.Tensor) -> pb.Tensor:
    """Encodes a tensor (any supported dtype) as raw bytes plus shape and dtype."""
    if t.dtype not in _TO_WIRE:
        raise WireError(f"dtype {t.dtype} cannot travel; supported: {sorted(str(d) for d in _TO_WIRE)}")
    t = t.detach().contiguous().cpu()
    view_t, _ = _NUMPY_VIEW.get(t.dtype, (None, None))
    arr = (t.view(view_t) if view_t is not None else t).numpy()
    return pb.Tensor(shape=list(t.shape), dtype=_TO_WIRE[t.dtype], data=arr.tobytes())


MAX_DIMS = 8  # a tensor's rank on the wire


def _dims(msg: pb.Tensor, name: str) -> tuple[int, ...]:
    """The declared shape, refused unless it is small and its element count can be held (even a zero-element
    shape: [2**62, 2**62, 0] would overflow torch's size arithmetic)."""
    if len(msg.shape) > MAX_DIMS:
        raise WireError(f"{name}: {len(msg.shape)} dimensions, at most {MAX_DIMS} allowed")
    dims = tuple(int(d) for d in msg.shape)
    if any(d < 0 for d in dims):
        raise WireError(f"{name}: negative dimension in shape {list(dims)}")
    if math.prod(d for d in dims if d) > MAX_MESSAGE_BYTES:
        raise WireError(f"{name}: shape {list(dims)} is larger than any message can carry")
    return dims


def from_proto(
    msg: pb.Tensor,
    name: str = "tensor",
    dtype: torch.dtype | None = None,
    shape: tuple | None = None,
) -> torch.Tensor:
    """Decodes a Tensor message, validating dtype, shape and byte count.

    Args:
        msg: The message.
        name: Field name used in error messages.
        dtype: Required dtype, or None for any supported one.
        shape: Required shape; None entries match any size. None checks nothing.
    """
    if msg.dtype not in _FROM_WIRE:
        raise WireError(f"{name}: unknown dtype code {msg.dtype}")
    got = _FROM_WIRE[msg.dtype]
    if dtype is not None and got != dtype:
        raise WireError(f"{name}: expected dtype {dtype}, got {got}")
    dims = _dims(msg, name)
    if shape is not None:
        if len(shape) != len(dims) or any(w is not None and w != d for w, d in zip(shape, dims)):
            want = ["*" if w is None else w for w in shape]
            raise WireError(f"{name}: expected shape {want}, got {list(dims)}")
    itemsize = torch.empty((), dtype=got).element_size()
    if len(msg.data) != math.prod(dims) * itemsize:
        raise WireError(
            f"{name}: shape {list(dims)} x {itemsize} B needs {math.prod(dims) * itemsize} bytes, got {len(msg.data)}"
        )
    view_t, np_t = _NUMPY_VIEW.get(got, (None, None))
    arr = np.frombuffer(msg.data, dtype=np_t if np_t is not None else torch.empty((), dtype=got).numpy().dtype)
    t = torch.from_numpy(arr.copy()).reshape(dims)
    return t.view(got) if view_t is not None else t


CODEC_ENUM = {
    "float32": pb.CODEC_NONE,
    "float16": pb.CODEC_FLOAT16,
    "bfloat16": pb.CODEC_BFLOAT16,
    "int8": pb.CODEC_INT8,
    "int4": pb.CODEC_INT4,
}
_CODEC_NAME = {v: k for k, v in CODEC_ENUM.items()}


def encode(t: torch.Tensor, codec: str = "float32", block: int = codecs.DEFAULT_BLOCK, encoder=None) -> pb.Tensor:
    """Encodes a float tensor of any compute dtype or device with a wire codec (float32 is exact and equals
    to_proto of the float32 tensor: a bfloat16 or float16 value travels as its exact float32 upcast).

    `encoder`: a `tensor -> (values, scales)` in `codec` and `block` to use instead of codecs.encode (an
    error-feedback stream: tandem.kernels.feedback); None: codecs.encode."""
    if codec == "float32":
        return to_proto(t.float())
    values, scales = encoder(t) if encoder is not None else codecs.encode(t.detach(), codec, block)
    msg = to_proto(values)
    del msg.shape[:]
    msg.shape.extend(t.shape)
    msg.dtype = pb.FLOAT32
    msg.codec = CODEC_ENUM[codec]
    if scales is not None:
        msg.scales = scales.cpu().numpy().tobytes()
        msg.block_size = block
    return msg


def decode(msg: pb.Tensor, name: str, codec: str = "float32", shape: tuple | None = None) -> torch.Tensor:
    """Decodes a float32 tensor sent with `codec` (the session's); validates sizes; returns float32."""
    got = _CODEC_NAME.get(msg.codec)
    if got is None:
        raise WireError(f"{name}: unknown codec code {msg.codec}")
    if got != codec:
        raise WireError(f"{name}: this session negotiated codec {codec}, got {got}")
    if codec == "float32":
        return from_proto(msg, name, torch.float32, shape)
    dims = _dims(msg, name)
    if shape is not None and (len(shape) != len(dims) or any(w is not None and w != d for w, d in zip(shape, dims))):
        raise WireError(f"{name}: expected shape {['*' if w is None else w for w in shape]}, got {list(dims)}")
    n = math.prod(dims)
    if codec in ("float16", "bfloat16"):
        want, vdtype = n * 2, torch.float16 if codec == "float16" else torch.bfloat16
        vcount = n
    else:
        block = int(msg.block_size)
        if block < 1 or block > 1 << 20:
            raise WireError(f"{name}: block_size {block} out of range")
        n_blocks = -(-n // block)
        if len(msg.scales) != 4 * n_blocks:
            raise WireError(f"{name}: {codec} needs {n_blocks} float32 scales, got {len(msg.scales)} bytes")
        vcount = n_blocks * block if codec == "int8" else -(-(n_blocks * block) // 2)
        want, vdtype = vcount, torch.int8 if codec == "int8" else torch.uint8
    if len(msg.data) != want:
        raise WireError(f"{name}: {codec} of shape {list(dims)} needs {want} bytes, got {len(msg.data)}")
    values = from_proto(pb.Tensor(shape=[vcount], dtype=_TO_WIRE[vdtype], data=msg.data), name)
    scales = None
    if codec in ("int8", "int4"):
        scales = torch.from_numpy(np.frombuffer(msg.scales, dtype=np.float32).copy())
        if not all_finite(scales):
            raise WireError(f"{name}: scales contain NaN or Inf")
        return codecs.decode(values, scales, codec, dims, block)
    return codecs.decode(values, scales, codec, dims)


def nbytes(msg) -> int:
    """Serialized size of any protobuf message (what crosses the wire, before HTTP/2 and TLS framing)."""
    return msg.ByteSize()

"""Activation/gradient wire codecs as vectorised tensor ops: half precision and blockwise absmax int8/int4."""

from __future__ import annotations

import torch

CODECS = ("float32", "float16", "bfloat16", "int8", "int4")
# Block size for int8/int4 absmax scaling. bench/codec_bytes.py measured 64..4096 on SmolLM2
# activations: 128 keeps the scale overhead at 3% of int8 bytes while the error stays near its floor.
DEFAULT_BLOCK = 128


def _blocks(x: torch.Tensor, block: int) -> tuple[torch.Tensor, int]:
    flat = x.reshape(-1)
    pad = (-flat.numel()) % block
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    return flat.view(-1, block), pad  # (n_blocks, block)


def encode(x: torch.Tensor, codec: str, block: int = DEFAULT_BLOCK) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Encodes a float32 tensor. Returns (values, scales); scales is None for float codecs.

    int8: values int8 in [-127, 127] per block of `block` elements, scale = absmax / 127 (float32).
    int4: two signed 4-bit values in [-7, 7] per uint8, scale = absmax / 7.
    """
    if codec == "float32":
        return x.float(), None
    if codec == "float16":
        return x.to(torch.float16), None
    if codec == "bfloat16":
        return x.to(torch.bfloat16), None
    if codec not in ("int8", "int4"):
        raise ValueError(f"unknown codec {codec!r}; choose one of {CODECS}")
    levels = 127.0 if codec == "int8" else 7.0
    b, _ = _blocks(x.float(), block)
    scale = b.abs().amax(dim=1, keepdim=True) / levels  # (n_blocks, 1)
    q = torch.round(b / scale.clamp_min(1e-30)).clamp_(-levels, levels).to(torch.int8)  # (n_blocks, block)
    if codec == "int8":
        return q.reshape(-1), scale.reshape(-1)
    nib = (q.reshape(-1) + 8).to(torch.uint8)  # 1..15
    if nib.numel() % 2:
        nib = torch.nn.functional.pad(nib, (0, 1), value=8)
    pairs = nib.view(-1, 2)
    return (pairs[:, 0] | (pairs[:, 1] << 4)).contiguous(), scale.reshape(-1)


def decode(
    values: torch.Tensor, scales: torch.Tensor | None, codec: str, shape: tuple, block: int = DEFAULT_BLOCK
) -> torch.Tensor:
    """Inverse of encode; returns float32 of `shape`."""
    n = 1
    for d in shape:
        n *= d
    if codec in ("float32", "float16", "bfloat16"):
        return values.float().reshape(shape)
    if codec == "int8":
        q = values.to(torch.float32)
    elif codec == "int4":
        lo = (values & 0x0F).to(torch.int16) - 8
        hi = (values >> 4).to(torch.int16) - 8
        q = torch.stack([lo, hi], dim=1).reshape(-1).to(torch.float32)
    else:
        raise ValueError(f"unknown codec {codec!r}; choose one of {CODECS}")
    n_blocks = -(-n // block)
    if scales is None or scales.numel() != n_blocks or q.numel() < n_blocks * block:
        raise ValueError(
            f"{codec}: {q.numel()} values and {0 if scales is None else scales.numel()} scales do not fit shape {list(shape)} in blocks of {block}"
        )
    x = q[: n_blocks * block].view(n_blocks, block) * scales.view(-1, 1)
    return x.reshape(-1)[:n].reshape(shape)


def bytes_per_value(codec: str, block: int = DEFAULT_BLOCK) -> float:
    """Wire bytes per tensor element, scales included."""
    return {"float32": 4.0, "float16": 2.0, "bfloat16": 2.0, "int8": 1.0 + 4.0 / block, "int4": 0.5 + 4.0 / block}[
        codec
    ]

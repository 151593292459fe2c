"""Where a model computes: the --device and --dtype values, what `auto` picks, and a model moved there.

The frozen weights compute in the chosen dtype; LoRA master weights and the optimizer stay float32 (see
kernels/lora.py for how the two meet). What crosses the wire does not depend on any of this: the session's codec
encodes it, and the receiving side casts what arrives to its own compute dtype.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from .errors import StageError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_CHOICES = ("auto", *DTYPES)
DEVICE_FORM = re.compile(r"auto|cpu|cuda(:\d{1,3})?")


class PlacementError(StageError):
    """A --device or --dtype that cannot be used here (a bad value, or CUDA on a machine without it)."""


@dataclass(frozen=True)
class Placement:
    """A resolved device and compute dtype."""

    device: torch.device
    dtype: torch.dtype

    @property
    def dtype_name(self) -> str:
        return dtype_name(self.dtype)

    def __str__(self) -> str:
        return f"{self.dtype_name} on {self.device}"


CPU_FLOAT32 = Placement(torch.device("cpu"), torch.float32)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_device(text: str) -> str:
    """The --device value if it is well formed (auto, cpu, cuda, cuda:N); else a PlacementError."""
    if not DEVICE_FORM.fullmatch(text or ""):
        raise PlacementError(f"--device: expected auto, cpu, cuda or cuda:N, got {text!r}")
    return text


def check_dtype(text: str) -> str:
    """The --dtype value if it is one of DTYPE_CHOICES; else a PlacementError."""
    if text not in DTYPE_CHOICES:
        raise PlacementError(f"--dtype: expected one of {', '.join(DTYPE_CHOICES)}, got {text!r}")
    return text


def resolve_device(text: str) -> torch.device:
    """The device --device names on this machine; CUDA where there is none is a PlacementError (one line)."""
    check_device(text)
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if text == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise PlacementError(
            f"--device {text}: this machine has no usable CUDA device (torch sees none); use --device cpu"
        )
    device = torch.device(text)
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise PlacementError(f"--device {text}: this machine has {count} CUDA device(s), cuda:0..cuda:{count - 1}")
    return device


def checkpoint_dtype(config) -> torch.dtype:
    """The dtype a config says its weights are stored in (config.dtype / torch_dtype); float32 when it says none."""
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(value, str):
        value = DTYPES.get(value.removeprefix("torch."))
    return value if value in DTYPES.values() else torch.float32


def resolve(device: str = "cpu", dtype: str = "float32", config=None) -> Placement:
    """The Placement of --device and --dtype; `auto` dtype reads `config` (the checkpoint's dtype) on a GPU."""
    where = resolve_device(device)
    check_dtype(dtype)
    if dtype != "auto":
        return Placement(where, DTYPES[dtype])
    if where.type == "cpu" or config is None:
        return Placement(where, torch.float32)
    return Placement(where, checkpoint_dtype(config))

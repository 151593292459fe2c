"""The files of a tuned adapter directory and the digest both sides compute over them."""

from __future__ import annotations

import hashlib
import os

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
CLIENT_BLOCKS = "client_blocks.safetensors"  # fully tuned client blocks, full-model key names
ADAPTER_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, CLIENT_BLOCKS)
REQUIRED = (ADAPTER_CONFIG, ADAPTER_WEIGHTS)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_adapter_dir(path: str) -> dict[str, bytes]:
    """Reads the adapter files of a `client tune` run's adapter/ directory, by name.

    Raises:
        FileNotFoundError: the directory lacks adapter_config.json or adapter_model.safetensors.
    """
    out = {}
    for name in ADAPTER_FILES:
        p = os.path.join(path, name)
        if os.path.isfile(p):
            with open(p, "rb") as f:
                out[name] = f.read()
    missing = [n for n in REQUIRED if n not in out]
    if missing:
        raise FileNotFoundError(f"{path!r} lacks {missing}: pass the adapter/ directory of a `client tune` run")
    return out


def adapter_digest(files: dict[str, bytes]) -> str:
    """SHA-256 over the sorted (name, SHA-256 of content) pairs: the adapter's identity."""
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(f"{name}\0{sha256(files[name])}\n".encode())
    return h.hexdigest()

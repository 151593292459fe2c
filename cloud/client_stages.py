"""The files a client downloads from the cloud: its stages, packed once into a private unlinked file, and its tokenizer.

The stages are as large as the client's share of the weights (about 1 GB for a 1B-class model). Kept
packed in memory they were a second copy of weights the loaded model already holds, so they are
written once, at start, straight from the model's tensors (safetensors writes from the tensors'
memory, with no packed copy) into a file that only this user can read (0600, in a fresh 0700
directory), and the file is unlinked as soon as it is open: nothing is left on disk however the
process ends, and the space is freed when it closes. Downloads read it back by offset; every read
is bounded by the size measured at start, and a file that changed under the server fails the
download rather than sending other bytes.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import stat
import tempfile
import threading
import weakref
from collections.abc import Iterator
from typing import NamedTuple

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

log = logging.getLogger(__name__)

STAGES = "client_stages.safetensors"
READ_BYTES = 1 << 20  # how much the start-up hash reads at a time


class Piece(NamedTuple):
    """One chunk of a download: the fields of a FileChunk (cloud/split_servicer.py)."""

    name: str
    offset: int
    data: bytes
    total_bytes: int
    sha256: str  # of the whole file, on its first chunk only ("" on the others)


def write_private(state: dict[str, torch.Tensor], directory: str | None = None) -> int:
    """Writes `state` as safetensors to a new file only this user can read; returns it open (read-only) and unlinked.
    OSError, in one line, when it cannot be written (the directory missing, read-only or full)."""
    where = directory or tempfile.gettempdir()
    need = sum(v.numel() * v.element_size() for v in state.values()) / 2**20
    try:
        return _write_private(state, directory)
    except (OSError, SafetensorError) as e:  # safetensors reports its own write failures (a full disk) as the latter
        raise OSError(
            f"cannot write the client stages ({need:,.0f} MiB) to a private file under {where}: {e}; "
            "set TMPDIR to a writable directory with room for them"
        ) from None


def _write_private(state: dict[str, torch.Tensor], directory: str | None) -> int:
    """write_private's work: a fresh 0700 directory, a 0600 file made before safetensors opens it, then both unlinked."""
    folder = tempfile.mkdtemp(prefix="tandem-stages-", dir=directory)  # 0700, a fresh name: no one else's file
    path = os.path.join(folder, STAGES)
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
        save_file(state, path)  # writes from the tensors' own memory; the existing file keeps its 0600
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_mode & 0o077 or info.st_uid != os.getuid():
            os.close(fd)
            raise OSError(f"{path} is not a private regular file (mode {oct(info.st_mode)})")
        return fd
    finally:
        shutil.rmtree(folder, ignore_errors=True)  # unlinked: the open descriptor alone keeps the bytes


class ClientFiles:
    """What FetchClientStages streams, by name and in order: the client's stages (from the private file) and the
    tokenizer files (small, kept in memory). Empty on a pipeline shard, which serves no downloads."""

    def __init__(
        self, state: dict[str, torch.Tensor] | None, tokenizer: dict[str, bytes], directory: str | None = None
    ):
        """`state`: the client's stages (None: nothing to serve); `directory`: where the file goes (default TMPDIR)."""
        self._fd: int | None = None
        self._closer = None  # closes the file if the service is dropped without stop()
        self._lock = threading.Lock()  # reads and close(): a closed descriptor's number must never be read again
        self._memory: dict[str, bytes] = {}
        self.sizes: dict[str, int] = {}
        self.sha256: dict[str, str] = {}
        if state is not None:
            self._fd = write_private(state, directory)
            self._closer = weakref.finalize(self, os.close, self._fd)
            self.sizes[STAGES], self.sha256[STAGES] = self._measure()
            log.info("client stages: %.1f MiB, served from a private unlinked file", self.sizes[STAGES] / 2**20)
        for name, blob in tokenizer.items():
            self._memory[name] = blob
            self.sizes[name], self.sha256[name] = len(blob), hashlib.sha256(blob).hexdigest()

    @property
    def stages_bytes(self) -> int:
        """The stages' size, as OpenSession announces it (0 when none are served)."""
        return self.sizes.get(STAGES, 0)

    @property
    def stages_sha256(self) -> str:
        """The stages' SHA-256, as OpenSession announces it (that of no bytes when none are served)."""
        return self.sha256.get(STAGES, hashlib.sha256(b"").hexdigest())

    def _measure(self) -> tuple[int, str]:
        """Size and SHA-256 of the stages file, read back once."""
        digest, offset = hashlib.sha256(), 0
        while data := os.pread(self._fd, READ_BYTES, offset):
            digest.update(data)
            offset += len(data)
        return offset, digest.hexdigest()

    def read(self, name: str, offset: int, length: int) -> bytes:
        """Bytes [offset, offset + length) of file `name`, clamped to its size; never anything beyond it."""
        size = self.sizes[name]
        if not 0 <= offset <= size or length < 0:
            raise ValueError(f"{name}: cannot read {length} bytes at {offset} of {size}")
        length = min(length, size - offset)
        if name in self._memory:
            return self._memory[name][offset : offset + length]
        with self._lock:
            if self._fd is None:
                raise RuntimeError("the client stages are no longer served (the server is stopping)")
            data = os.pread(self._fd, length, offset)
        if len(data) != length:
            raise RuntimeError(f"{name} changed on disk since start ({len(data)} of {length} bytes at {offset})")
        return data

    def chunks(self, chunk_bytes: int) -> Iterator[Piece]:
        """Every file, in order, in pieces of at most `chunk_bytes` (an empty file: one empty piece)."""
        for name, size in self.sizes.items():
            for offset in range(0, max(size, 1), chunk_bytes):
                data = self.read(name, offset, chunk_bytes)
                yield Piece(name, offset, data, size, self.sha256[name] if offset == 0 else "")

    def close(self) -> None:
        """Closes the stages file (its space is freed); later downloads fail. Idempotent."""
        with self._lock:
            if self._closer is not None:
                self._closer()  # os.close, once
            self._fd = None

"""Receiving files from an untrusted server: allow-listed names, bounded sizes, verified hashes, all-or-nothing writes.

Everything in a FileChunk stream is the server's claim: names, offsets, sizes and hashes are checked here before a
byte lands on disk, and files land only in a private staging directory that is renamed into place once every file
has arrived whole and verified. A failed download leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import tempfile
import uuid
from typing import TYPE_CHECKING

from tandem.protos import split_pb2 as pb
from tandem.stages.loading import cache_root

from .allowed_files import (
    DISK_RESERVE_BYTES,
    MAX_DOWNLOAD_BYTES,
    MAX_FILES,
    MAX_NAME,
    SAFE_NAME,
    SHA256_HEX,
    SMALL_FILE_BYTES,
    STAGES_FILE,
    TOKENIZER_NAMES,
    Allowed,
    check_name,
    check_no_remote_code,
    read_by_transformers,
    stage_files,
)
from .download_target import CACHE_MANIFEST, check_replaceable
from .errors import ClientError
from .rundir import write_atomic

if TYPE_CHECKING:
    from .transport import Transport


class _Receiver:
    """Assembles one FileChunk stream into `staging`, checking every claim as it arrives."""

    def __init__(self, staging: str, allowed: Allowed, free_bytes: int):
        self.staging, self.allowed = staging, allowed
        self.budget = min(allowed.total, max(0, free_bytes - DISK_RESERVE_BYTES))
        self.declared = 0  # bytes of every file begun so far, as declared
        self.digests: dict[str, str] = {}  # finished files
        self.name = ""  # the file being received
        self.f = None

    def add(self, chunk) -> None:
        if self.f is None:
            self._begin(chunk)
        elif chunk.name != self.name:
            raise ClientError(
                f"the server began {chunk.name[:MAX_NAME]!r} before finishing {self.name} ({self.got} of "
                f"{self.size} bytes); refusing the download"
            )
        elif chunk.sha256 and chunk.sha256 != self.want:
            raise ClientError(f"the server changed the SHA-256 of {chunk.name} mid-file; refusing the download")
        elif chunk.total_bytes != self.size:
            raise ClientError(
                f"the server changed the size of {chunk.name} mid-file ({self.size} -> {chunk.total_bytes})"
            )
        elif not chunk.data:  # without progress, a stream of these would never end
            raise ClientError(
                f"the server sent an empty chunk of {chunk.name} at offset {chunk.offset}; refusing the download"
            )
        if chunk.offset != self.got:
            raise ClientError(f"{chunk.name} arrived out of order (offset {chunk.offset}, expected {self.got}); retry")
        if self.got + len(chunk.data) > self.size:
            raise ClientError(
                f"the server sent more of {chunk.name} than the {self.size} bytes it declared; refusing it"
            )
        self.f.write(chunk.data)
        self.hash.update(chunk.data)
        self.got += len(chunk.data)
        if self.got == self.size:
            self._finish()

    def _begin(self, chunk) -> None:
        check_name(chunk.name, self.allowed)
        if chunk.name in self.digests:
            what = f"more of {chunk.name} than it declared" if chunk.offset else f"{chunk.name} twice"
            raise ClientError(f"the server sent {what}; refusing the download")
        if len(self.digests) >= MAX_FILES:
            raise ClientError(
                f"the server sent more than {MAX_FILES} files in {self.allowed.what}; refusing the download"
            )
        if not SHA256_HEX.fullmatch(chunk.sha256):
            raise ClientError(
                f"the server sent {chunk.name} without a valid SHA-256 (got {chunk.sha256[:70]!r}); "
                "refusing the download"
            )
        cap = self.allowed.sizes[chunk.name]
        if not 0 <= chunk.total_bytes <= cap:
            raise ClientError(
                f"the server declared {chunk.name} as {chunk.total_bytes} bytes; at most {cap} are allowed"
            )
        if self.declared + chunk.total_bytes > self.budget:
            raise ClientError(
                f"{self.allowed.what} would exceed {self.budget} bytes (the limit, or the free disk space "
                f"less {DISK_RESERVE_BYTES >> 20} MiB) with {chunk.name}'s {chunk.total_bytes}; refusing the download"
            )
        self.declared += chunk.total_bytes
        self.name, self.want, self.size, self.got = chunk.name, chunk.sha256, chunk.total_bytes, 0
        self.hash = hashlib.sha256()
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
        self.f = os.fdopen(os.open(os.path.join(self.staging, chunk.name), flags, 0o600), "wb")

    def _finish(self) -> None:
        self.f.close()
        self.f = None
        if self.hash.hexdigest() != self.want:
            raise ClientError(f"download of {self.name} is corrupt (SHA-256 mismatch); retry")
        self.digests[self.name] = self.want

    def end(self) -> dict[str, str]:
        if self.f is not None:
            raise ClientError(f"the download ended inside {self.name} ({self.got} of {self.size} bytes); retry")
        return self.digests

    def close(self) -> None:
        if self.f is not None:
            self.f.close()


def receive(chunks, target: str, allowed: Allowed, check=None) -> dict[str, str]:
    """Receives a FileChunk stream into the directory `target`, all or nothing; returns name -> SHA-256.

    `check(staging, digests)` may refuse the received files (raise ClientError) before they are committed.
    On any error nothing is left: not in `target`, not beside it. The stream is closed either way.
    """
    parent = os.path.dirname(os.path.abspath(target))
    _makedirs_private(parent)
    staging = tempfile.mkdtemp(prefix=".partial-", dir=parent)  # mode 0700
    receiver = _Receiver(staging, allowed, shutil.disk_usage(parent).free)
    try:
        try:
            for chunk in chunks:
                receiver.add(chunk)
        finally:
            receiver.close()
            if hasattr(chunks, "close"):
                chunks.close()  # stops the server's stream as soon as the client has had enough
        digests = receiver.end()
        for name in filter(read_by_transformers, digests):
            with open(os.path.join(staging, name), "rb") as f:
                check_no_remote_code(name, f.read())
        if check is not None:
            check(staging, digests)
        write_atomic(os.path.join(staging, CACHE_MANIFEST), json.dumps(digests, sort_keys=True).encode())
        _commit(staging, target, allowed)
    except BaseException as e:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(e, OSError):  # e.g. a mount point: EBUSY
            raise ClientError(
                f"cannot put {allowed.what} in {target} ({e.strerror or e}); choose another directory"
            ) from None
        raise
    return digests


def _makedirs_private(path: str) -> None:
    """Creates the missing directories of `path`, each mode 0700 (os.makedirs gives parents the umask's mode)."""
    if os.path.isdir(path):
        return
    _makedirs_private(os.path.dirname(path))
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass


def _commit(staging: str, target: str, allowed: Allowed) -> None:
    """Renames staging to target; a target already there (stale or another client's) is moved aside first.

    Outside the client's own cache (whose entries are replaced whatever they hold: a tampered one is downloaded
    again), only a target check_replaceable accepts is moved aside: never a directory of the user's files.
    """
    try:
        os.rename(staging, target)
        return
    except OSError:
        if not os.path.lexists(target):
            raise
    cache = os.path.abspath(cache_root())
    if os.path.commonpath([os.path.abspath(target), cache]) != cache:
        check_replaceable(target, allowed)
    aside = f"{target}.old-{uuid.uuid4().hex[:12]}"
    try:
        os.rename(target, aside)
    except FileNotFoundError:
        pass
    try:
        os.rename(staging, target)
    except OSError:
        if read_verified(target) is None:  # not a concurrent client's finished copy
            raise
        shutil.rmtree(staging, ignore_errors=True)
    if os.path.isdir(aside) and not os.path.islink(aside):
        shutil.rmtree(aside, ignore_errors=True)
    elif os.path.lexists(aside):
        os.remove(aside)


def read_verified(directory: str, required: dict[str, str] | None = None) -> dict[str, bytearray] | None:
    """The files a finished download left in `directory`, each checked against its recorded SHA-256.

    Each file is read once and hashed in memory: the bytes returned are the bytes verified, whatever happens to
    the files afterwards. Only names listed in CACHE_MANIFEST are read. None when the directory is absent,
    unfinished, altered, or lacks a `required` file (name -> SHA-256): the caller downloads again.
    """
    try:
        with open(os.path.join(directory, CACHE_MANIFEST), "rb") as f:
            digests = json.loads(f.read(SMALL_FILE_BYTES))
    except (OSError, ValueError):
        return None
    if not isinstance(digests, dict) or len(digests) > MAX_FILES:
        return None
    if any(digests.get(n) != d for n, d in (required or {}).items()):
        return None
    files = {}
    for name, want in digests.items():
        if not (isinstance(name, str) and SAFE_NAME.fullmatch(name) and isinstance(want, str)):
            return None
        files[name] = _read_regular(os.path.join(directory, name))
        if files[name] is None or hashlib.sha256(files[name]).hexdigest() != want:
            return None
    return files


def _named_by_handshake(digests: dict[str, str], want_files: str) -> bool:
    """Whether these files are the ones OpenSession named (want_files; empty from a server that names none)."""
    from tandem.protos.handshake import files_digest

    return not want_files or files_digest(digests) == want_files


def _read_regular(path: str) -> bytearray | None:
    """A cached file's bytes, read once into private memory (what is hashed is what is used: a file changed or
    swapped later is not seen); None unless a regular file (no link followed, no FIFO or device) of sane size.

    A bytearray, so the stages' tensors can view it rather than copy it (stages/tensor_views.py)."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        return None
    with os.fdopen(fd, "rb", buffering=0) as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_DOWNLOAD_BYTES:
            return None
        data, got = bytearray(info.st_size), 0
        try:
            with memoryview(data) as view:
                while got < len(data) and (n := f.readinto(view[got:])):
                    got += n
            if got < len(data) or f.read(1):  # shrunk or still growing: it would fail its hash anyway
                return None
        except OSError:
            return None
        return data


def fetch_client_files(
    transport: Transport, session_id: str, want_sha: str, want_bytes: int = MAX_DOWNLOAD_BYTES, want_files: str = ""
) -> dict[str, bytearray]:
    """Downloads the client's stages and tokenizer, or takes them from the cache (keyed by the stages' SHA-256);
    each file as read_verified read it, the bytes it verified.

    want_sha, want_bytes and want_files are what OpenSession announced (signed when sealing is authenticated):
    the stages must hash to the first and fit the second, and every file (the tokenizer too) must be one the
    third names, downloaded or cached (a cache entry left by another server with the same stages is not).
    """
    if not SHA256_HEX.fullmatch(want_sha or ""):
        raise ClientError(f"the server announced the client stages' SHA-256 as {want_sha[:70]!r}; not a SHA-256")
    cache = os.path.join(cache_root(), "client", want_sha)
    files = read_verified(cache, {STAGES_FILE: want_sha})
    if files is not None:  # the stages hash to want_sha (verified): only the small files are hashed again
        digests = {n: want_sha if n == STAGES_FILE else hashlib.sha256(b).hexdigest() for n, b in files.items()}
        if _named_by_handshake(digests, want_files):
            return files
    files = None  # not held while downloading again
    allowed = stage_files(want_bytes)

    def matches(staging: str, digests: dict[str, str]) -> None:
        if digests.get(STAGES_FILE) != want_sha:
            raise ClientError("the client stages do not match the hash the server announced; retry")
        if not {"tokenizer.json", "vocab.json"} & set(digests):
            raise ClientError("the server sent no tokenizer (tokenizer.json or vocab.json) with the client stages")
        if not _named_by_handshake(digests, want_files):
            raise ClientError(
                "the downloaded tokenizer or stages are not the files the server's signed handshake names "
                "(a proxy on the path may have substituted them); refusing them"
            )

    request = pb.FetchClientStagesRequest(session_id=session_id)
    transport.download("FetchClientStages", request, cache, allowed, matches)
    files = read_verified(cache, {STAGES_FILE: want_sha})
    if files is None:
        raise ClientError(f"the downloaded client stages in {cache} changed on disk before they could be read; retry")
    return files


def load_tokenizer(files: dict[str, bytes | bytearray]):
    """The tokenizer among downloaded files, loaded from a private directory that holds nothing else."""
    from tandem.stages.errors import ModelLoadError
    from tandem.stages.loading import load_tokenizer as load_tokenizer_dir

    names = [n for n in files if n in TOKENIZER_NAMES]
    for n in names:
        check_no_remote_code(n, files[n])
    with tempfile.TemporaryDirectory(prefix="tandem-tokenizer-") as d:  # mode 0700
        for n in names:
            write_atomic(os.path.join(d, n), files[n])
        try:
            return load_tokenizer_dir(d)  # remote code refused, nothing fetched
        except ModelLoadError as e:
            raise ClientError(f"the server's tokenizer files do not load: {str(e).splitlines()[0]}") from None

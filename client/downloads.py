"""Receiving files from an untrusted server: allow-listed names, bounded sizes, verified hashes, all-or-nothing writes.

Everything in a FileChunk stream is the server's claim: names, offsets, sizes and hashes are checked here before a
byte lands on disk, and files land only in a private staging directory that is renamed into place once every file
has arrived whole and verified. A failed download leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
import threading
import uuid
from dataclasses import dataclass

from tandem.protos import split_pb2 as pb
from tandem.stages.loading import TOKENIZER_FILES, cache_root

from .errors import ClientError
from .transport import Transport

STAGES_FILE = "client_stages.safetensors"
TOKENIZER_NAMES = (*TOKENIZER_FILES, "vocab.json", "merges.txt")
# Written by this client beside downloaded files: name -> SHA-256. Its leading dot keeps it out of SAFE_NAME,
# so no server can send a file of that name.
CACHE_MANIFEST = ".verified.json"
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*(\.[A-Za-z0-9_-]+)*")
MAX_NAME = 128
SHA256_HEX = re.compile(r"[0-9a-f]{64}")

# Limits (bytes unless named otherwise). A server can only ask for less than these, never more.
MAX_DOWNLOAD_BYTES = 64 * 2**30  # hard ceiling of one download, whatever the server announces
TOKENIZER_ALLOWANCE = 64 * 2**20  # all tokenizer files together (SmolLM2's are 3.5 MiB)
SMALL_FILE_BYTES = 4 * 2**20  # a config or manifest
MAX_FILES = 16
DISK_RESERVE_BYTES = 256 * 2**20  # free space a download must leave on the target's file system


@dataclass(frozen=True)
class Allowed:
    """What one download may contain.

    Attributes:
        what: The download, for messages ("the client stages").
        sizes: Allowed file name -> its largest size.
        total: Largest size of all files together.
    """

    what: str
    sizes: dict[str, int]
    total: int


def stage_files(announced_bytes: int) -> Allowed:
    """FetchClientStages: the stages at the size OpenSession announced, and the tokenizer files."""
    if not 0 < announced_bytes <= MAX_DOWNLOAD_BYTES:
        raise ClientError(
            f"the server announced client stages of {announced_bytes} bytes; expected 1.."
            f"{MAX_DOWNLOAD_BYTES} (is it a tandem server?)"
        )
    sizes = {STAGES_FILE: announced_bytes, **{n: TOKENIZER_ALLOWANCE for n in TOKENIZER_NAMES}}
    return Allowed("the client stages", sizes, announced_bytes + TOKENIZER_ALLOWANCE)


def emulator_files(max_bytes: int = MAX_DOWNLOAD_BYTES) -> Allowed:
    """FetchEmulator: the files emulator/package.py writes, and nothing else."""
    from tandem.emulator.package import (
        CLIENT_FILE,
        CONFIG_FILE,
        EMULATOR_FILE,
        MANIFEST,
        SINK_FILE,
    )

    big = min(max_bytes, MAX_DOWNLOAD_BYTES)
    sizes = {
        CLIENT_FILE: big,
        EMULATOR_FILE: big,
        SINK_FILE: SMALL_FILE_BYTES,
        CONFIG_FILE: SMALL_FILE_BYTES,
        MANIFEST: SMALL_FILE_BYTES,
        **{n: TOKENIZER_ALLOWANCE for n in TOKENIZER_NAMES},
    }
    return Allowed("the emulator package", sizes, big)


def check_name(name: str, allowed: Allowed) -> None:
    """A file name the server sent: a plain allow-listed name, never a path, never one of ours."""
    if len(name) > MAX_NAME or not SAFE_NAME.fullmatch(name):
        raise ClientError(
            f"the server sent a file named {name[:MAX_NAME]!r} in {allowed.what}; refusing it "
            "(a file name must be a plain name, not a path)"
        )
    if name not in allowed.sizes:
        raise ClientError(
            f"the server sent a file named {name!r}, which {allowed.what} never contain; refusing it "
            f"(expected some of {sorted(allowed.sizes)})"
        )


def _read_by_transformers(name: str) -> bool:
    """A JSON file whose keys transformers acts on (tokenizer.json and vocab.json only hold a vocabulary)."""
    return name.endswith(".json") and name not in ("tokenizer.json", "vocab.json")


def check_no_remote_code(name: str, data: bytes) -> None:
    """JSON files transformers reads must not point it at code (auto_map) or at other files on this machine."""
    if not _read_by_transformers(name):
        return
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as e:  # not UTF-8 or JSON, nested too deep, a 5000-digit integer
        raise ClientError(f"the server's {name} is not JSON we accept ({e.__class__.__name__}); refusing it") from None
    if not isinstance(doc, dict):
        raise ClientError(f"the server's {name} is not a JSON object; refusing it")
    for key, value in doc.items():
        if key in ("auto_map", "trust_remote_code"):
            raise ClientError(
                f"the server's {name} has {key!r}, which would make transformers run the server's code; refusing it"
            )
        if key.endswith(("_file", "_files")) and value is not None and value not in TOKENIZER_NAMES:
            raise ClientError(f"the server's {name} names a file {key}={str(value)[:80]!r}; refusing it")


class _Receiver:
    """Assembles one FileChunk stream into `staging`, checking every claim as it arrives."""

    def __init__(self, staging: str, allowed: Allowed, free_bytes: int):
        self.staging, self.allowed = staging, allowed
        self.budget = min(allowed.total, max(0, free_bytes - DISK_RESERVE_BYTES))
        self.declared = 0  # bytes of every file begun so far, as declared
        self.digests: dict[str, str] = {}  # finished files
        self.name = ""  # the file being received
        self.f = None

    def chunk(self, c) -> None:
        if self.f is None:
            self._begin(c)
        elif c.name != self.name:
            raise ClientError(
                f"the server began {c.name[:MAX_NAME]!r} before finishing {self.name} ({self.got} of "
                f"{self.size} bytes); refusing the download"
            )
        elif c.sha256 and c.sha256 != self.want:
            raise ClientError(f"the server changed the SHA-256 of {c.name} mid-file; refusing the download")
        elif c.total_bytes != self.size:
            raise ClientError(f"the server changed the size of {c.name} mid-file ({self.size} -> {c.total_bytes})")
        elif not c.data:  # without progress, a stream of these would never end
            raise ClientError(f"the server sent an empty chunk of {c.name} at offset {c.offset}; refusing the download")
        if c.offset != self.got:
            raise ClientError(f"{c.name} arrived out of order (offset {c.offset}, expected {self.got}); retry")
        if self.got + len(c.data) > self.size:
            raise ClientError(f"the server sent more of {c.name} than the {self.size} bytes it declared; refusing it")
        self.f.write(c.data)
        self.hash.update(c.data)
        self.got += len(c.data)
        if self.got == self.size:
            self._finish()

    def _begin(self, c) -> None:
        check_name(c.name, self.allowed)
        if c.name in self.digests:
            what = f"more of {c.name} than it declared" if c.offset else f"{c.name} twice"
            raise ClientError(f"the server sent {what}; refusing the download")
        if len(self.digests) >= MAX_FILES:
            raise ClientError(
                f"the server sent more than {MAX_FILES} files in {self.allowed.what}; refusing the download"
            )
        if not SHA256_HEX.fullmatch(c.sha256):
            raise ClientError(
                f"the server sent {c.name} without a valid SHA-256 (got {c.sha256[:70]!r}); refusing the download"
            )
        cap = self.allowed.sizes[c.name]
        if not 0 <= c.total_bytes <= cap:
            raise ClientError(f"the server declared {c.name} as {c.total_bytes} bytes; at most {cap} are allowed")
        if self.declared + c.total_bytes > self.budget:
            raise ClientError(
                f"{self.allowed.what} would exceed {self.budget} bytes (the limit, or the free disk space "
                f"less {DISK_RESERVE_BYTES >> 20} MiB) with {c.name}'s {c.total_bytes}; refusing the download"
            )
        self.declared += c.total_bytes
        self.name, self.want, self.size, self.got = c.name, c.sha256, c.total_bytes, 0
        self.hash = hashlib.sha256()
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
        self.f = os.fdopen(os.open(os.path.join(self.staging, c.name), flags, 0o600), "wb")

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
    rx = _Receiver(staging, allowed, shutil.disk_usage(parent).free)
    try:
        try:
            for c in chunks:
                rx.chunk(c)
        finally:
            rx.close()
            if hasattr(chunks, "close"):
                chunks.close()  # stops the server's stream as soon as the client has had enough
        digests = rx.end()
        for name in filter(_read_by_transformers, digests):
            with open(os.path.join(staging, name), "rb") as f:
                check_no_remote_code(name, f.read())
        if check is not None:
            check(staging, digests)
        _write_private(os.path.join(staging, CACHE_MANIFEST), json.dumps(digests, sort_keys=True).encode())
        _commit(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
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


def _commit(staging: str, target: str) -> None:
    """Renames staging to target; a target already there (stale or another client's) is moved aside first."""
    try:
        os.rename(staging, target)
        return
    except OSError:
        if not os.path.lexists(target):
            raise
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


def read_verified(directory: str, required: dict[str, str] | None = None) -> dict[str, bytes] | None:
    """The files a finished download left in `directory`, each checked against its recorded SHA-256.

    Only names listed in CACHE_MANIFEST are read. None when the directory is absent, unfinished, altered,
    or lacks a `required` file (name -> SHA-256): the caller downloads again.
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


def _read_regular(path: str) -> bytes | None:
    """A cached file's bytes; None unless it is a regular file (no link followed, no FIFO or device) of sane size."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_DOWNLOAD_BYTES:
            return None
        try:
            return f.read(st.st_size + 1)  # a file still growing fails its hash
        except OSError:
            return None


def fetch_client_files(
    t: Transport, session_id: str, want_sha: str, want_bytes: int = MAX_DOWNLOAD_BYTES, want_files: str = ""
) -> dict[str, bytes]:
    """Downloads the client's stages and tokenizer, or takes them from the cache (keyed by the stages' SHA-256).

    want_sha, want_bytes and want_files are what OpenSession announced (signed when sealing is authenticated):
    the stages must hash to the first and fit the second, and every file (the tokenizer too) must be one the
    third names, downloaded or cached (a cache entry left by another server with the same stages is not).
    """
    if not SHA256_HEX.fullmatch(want_sha or ""):
        raise ClientError(f"the server announced the client stages' SHA-256 as {want_sha[:70]!r}; not a SHA-256")
    cache = os.path.join(cache_root(), "client", want_sha)
    files = read_verified(cache, {STAGES_FILE: want_sha})
    if files is not None and _named_by_handshake(
        {n: hashlib.sha256(b).hexdigest() for n, b in files.items()}, want_files
    ):
        return files
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

    stream = t.stream("FetchClientStages", pb.FetchClientStagesRequest(session_id=session_id), kind="FetchClientStages")
    receive(stream, cache, allowed, matches)
    files = read_verified(cache, {STAGES_FILE: want_sha})
    if files is None:
        raise ClientError(f"the downloaded client stages in {cache} changed on disk before they could be read; retry")
    return files


def load_tokenizer(files: dict[str, bytes]):
    """The tokenizer among downloaded files, loaded from a private directory that holds nothing else."""
    from tandem.stages.errors import ModelLoadError
    from tandem.stages.loading import load_tokenizer as load_tokenizer_dir

    names = [n for n in files if n in TOKENIZER_NAMES]
    for n in names:
        check_no_remote_code(n, files[n])
    with tempfile.TemporaryDirectory(prefix="tandem-tokenizer-") as d:  # mode 0700
        for n in names:
            _write_private(os.path.join(d, n), files[n])
        try:
            return load_tokenizer_dir(d)  # remote code refused, nothing fetched
        except ModelLoadError as e:
            raise ClientError(f"the server's tokenizer files do not load: {str(e).splitlines()[0]}") from None


def _write_private(path: str, data: bytes) -> None:
    """Writes a mode-0600 file via a temporary name and a rename, so no reader ever sees half of it."""
    tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0), 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


_write_atomic = _write_private  # the name client/staged.py used

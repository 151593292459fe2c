"""Which files a download from the server may contain, how large, and what a JSON file among them may say."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from tandem.stages.loading import TOKENIZER_FILES

from .errors import ClientError

STAGES_FILE = "client_stages.safetensors"
TOKENIZER_NAMES = (*TOKENIZER_FILES, "vocab.json", "merges.txt")
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


def read_by_transformers(name: str) -> bool:
    """A JSON file whose keys transformers acts on (tokenizer.json and vocab.json only hold a vocabulary)."""
    return name.endswith(".json") and name not in ("tokenizer.json", "vocab.json")


def check_no_remote_code(name: str, data: bytes) -> None:
    """JSON files transformers reads must not point it at code (auto_map) or at other files on this machine."""
    if not read_by_transformers(name):
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

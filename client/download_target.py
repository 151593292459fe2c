"""Where a download may land: a missing path, an empty directory, or an earlier download of the same kind, never
a directory of the user's files (a finished run, a project), the current directory or a mount point."""

from __future__ import annotations

import json
import os
import stat
from typing import TYPE_CHECKING

from .allowed_files import SMALL_FILE_BYTES
from .errors import ClientError

if TYPE_CHECKING:
    from .allowed_files import Allowed

# Written by this client beside downloaded files: name -> SHA-256. Its leading dot keeps it out of SAFE_NAME,
# so no server can send a file of that name.
CACHE_MANIFEST = ".verified.json"


def check_replaceable(target: str, allowed: Allowed, flag: str = "") -> None:
    """Refuses (one line) a `target` that a download of `allowed` must not replace; changes nothing.

    Replaceable: a missing path, an empty directory, or a directory holding only `allowed` files and the mark of
    a download (CACHE_MANIFEST) or a package's manifest.json. Never the current directory or a mount point.
    """
    label, advice = f"{flag} {target}".strip(), f"choose another {flag or 'directory'} or remove it"
    path = os.path.abspath(target)
    if not os.path.lexists(path):
        return
    try:
        cwd = os.getcwd()
    except OSError:
        cwd = ""
    if os.path.ismount(path) or os.path.commonpath([path, cwd or "/"]) == path:
        raise ClientError(f"{label} is a mount point or holds the current directory; choose a new directory")
    if os.path.islink(path) or not os.path.isdir(path):
        raise ClientError(f"{label} exists and is not a directory; {advice}")
    try:
        names = sorted(os.listdir(path))
        foreign = [n for n in names if n not in {*allowed.sizes, CACHE_MANIFEST} or not _is_regular(path, n)]
    except OSError as e:
        raise ClientError(f"{label}: cannot read it ({e.strerror or e}); {advice}") from None
    if foreign:
        shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise ClientError(f"{label} holds files that are not {allowed.what}'s ({shown}); {advice}")
    if names and CACHE_MANIFEST not in names and not _is_manifest(os.path.join(path, "manifest.json")):
        raise ClientError(f"{label} holds files but no {allowed.what} (no {CACHE_MANIFEST}, no manifest); {advice}")


def _is_regular(directory: str, name: str) -> bool:
    return stat.S_ISREG(os.lstat(os.path.join(directory, name)).st_mode)


def _is_manifest(path: str) -> bool:
    """Whether `path` (a regular file) is a package's manifest.json: a small JSON object listing its files."""
    try:
        if os.path.getsize(path) > SMALL_FILE_BYTES:
            return False
        with open(path, "rb") as f:
            return isinstance(json.loads(f.read()).get("files"), dict)
    except (OSError, ValueError, AttributeError, RecursionError):
        return False

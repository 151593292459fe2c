"""The run directory (--out): never overwriting another run's work, and keeping what it holds private."""

from __future__ import annotations

import contextlib
import json
import os
import shutil

from .errors import ClientError

# What `client tune` writes into a run directory; --overwrite removes these and nothing else.
ARTIFACTS = (
    "checkpoint.pt",
    "checkpoint.pt.tmp",
    "report.json",
    "report.json.tmp",
    "report.png",
    "adapter",
    "cloud_view",
    "privacy_context.json",
    "private_bottom.safetensors",
    "private_bottom.safetensors.tmp",
)
FINISHED = ("report.json", "adapter")
PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600


def _make_private_dir(path: str, flag: str) -> None:
    """Creates `path` (0700) and checks that files can be written in it; one-line ClientError when not."""
    try:
        os.makedirs(path, mode=PRIVATE_DIR, exist_ok=True)
        os.chmod(path, PRIVATE_DIR)  # an existing directory may have been made under a wider umask
        probe = os.path.join(path, f".write-test-{os.getpid()}")
        with open(probe, "wb"):
            pass
        os.remove(probe)
    except OSError as e:
        raise ClientError(f"{flag} {path}: cannot write there ({e.strerror or e}); pick a writable directory") from None


def check_writable(path: str, flag: str = "--out") -> None:
    """Fails early (before any network call) when `path` cannot be created or written as a private directory."""
    _make_private_dir(path, flag)


def check_creatable(path: str, flag: str) -> None:
    """Fails early when `path` could not be created (its nearest existing ancestor is no writable directory).

    Changes nothing: for outputs that are replaced as a whole once complete.
    """
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise ClientError(
            f"{flag} {path}: cannot write there ({parent} is not a writable directory); pick another place"
        )


def prepare(out: str, resume: bool, overwrite: bool) -> None:
    """Makes `out` ready for a run: private, writable, and holding no other run's work unless --overwrite.

    A finished run (report.json, adapter/) and an unfinished one (checkpoint.pt) are refused: the
    first would lose its adapter, the second its progress (--resume continues it). So are files
    tandem did not write, which --overwrite leaves in place.
    """
    _make_private_dir(out, "--out")
    if resume:
        return
    present = set(os.listdir(out))
    foreign = sorted(present - set(ARTIFACTS))
    if not overwrite:
        if present & set(FINISHED):
            raise ClientError(
                f"--out {out} holds a finished run (report.json, adapter/); pass --overwrite to replace it, "
                "or choose another --out"
            )
        if "checkpoint.pt" in present:
            raise ClientError(
                f"--out {out} holds an unfinished run (checkpoint.pt); pass --resume to continue it, "
                "--overwrite to replace it, or choose another --out"
            )
        if foreign:
            shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
            raise ClientError(
                f"--out {out} holds files that are not a tandem run ({shown}); choose another --out, "
                "or pass --overwrite (those files are kept)"
            )
    for name in present & set(ARTIFACTS):  # an old run's results must not mix with this one's
        path = os.path.join(out, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)


def make_private_dir(path: str) -> None:
    """Restricts an existing directory (not its contents) to this user: 0700 closes everything under it."""
    if os.path.isdir(path):
        os.chmod(path, PRIVATE_DIR)


def make_run_private(out: str) -> None:
    """Restricts `out` and what tandem wrote in it; files --overwrite kept (a project's scripts) keep their modes."""
    make_private_dir(out)
    for name in ARTIFACTS:
        make_private(os.path.join(out, name))


def make_private(path: str) -> None:
    """Restricts a file (0600) or a directory tree (0700 dirs, 0600 files) to this user; links are not followed."""
    if os.path.islink(path) or not os.path.exists(path):
        return
    if os.path.isfile(path):
        os.chmod(path, PRIVATE_FILE)
        return
    for root, _dirs, files in os.walk(path):
        os.chmod(root, PRIVATE_DIR)
        for f in files:
            p = os.path.join(root, f)
            if not os.path.islink(p):
                os.chmod(p, PRIVATE_FILE)


def write_json(path: str, obj: dict) -> None:
    """Writes `obj` as indented JSON atomically: a reader never sees a half-written file."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def write_atomic(path: str, data) -> None:
    """Writes a mode-0600 file via PATH.tmp and a rename: no reader sees half of it, a failure keeps the old one.

    `data`: the bytes, or fn(file) that writes them (e.g. `lambda f: torch.save(obj, f)`). On any error the
    temporary file is removed and the error raised.
    """
    tmp = f"{path}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0), PRIVATE_FILE)
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise

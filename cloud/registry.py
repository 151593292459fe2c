"""The adapter registry: pushed adapters checked, registered on disk per owner within quotas, listed and looked up."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import threading
import time
from dataclasses import asdict, dataclass, field

from torch import nn

from tandem.stages.adapter_files import adapter_digest
from tandem.stages.modules import StageLayout

from .adapter_check import AdapterCheck, received_files
from .errors import InvalidRequest, NameTaken, RegistryFull
from .flags import DEFAULT_REGISTRY

log = logging.getLogger(__name__)

ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # used with fullmatch: `$` would let "name\n" through
DEFAULT_QUOTA_BYTES = 2**30  # registry disk per identity
DEFAULT_MAX_ADAPTERS = 64  # registered adapters per identity
REGISTRATION = "registration.json"  # beside an adapter's files: its Registered record


@dataclass
class Registered:
    """A registered adapter (what ListAdapters returns)."""

    name: str
    sha256: str
    params: int
    blocks: list[int]
    model_id: str
    files: list[str] = field(default_factory=list)
    registered_at: float = 0.0
    owner: str = ""  # the identity that pushed it; "" for registrations made before adapters had owners
    public: bool = False  # every identity may list it and generate with it

    def visible_to(self, who: str | None) -> bool:
        """Whether identity `who` may list and use it (None: the operator, who sees everything)."""
        return who is None or self.public or not self.owner or self.owner == who


class AdapterRegistry:
    """The served model's registered adapters, one sub-directory per name (no gRPC).

    Args:
        model: The served full model (its LoRA slots, if any, are looked through).
        model_id: The served model's id; adapters must name it as their base model.
        layout: The split layout the data owners tune (the emulator package's when there is one).
        directory: Where registered adapters are kept, one sub-directory per name.
        quota_bytes: Registry disk one identity may fill (files of its adapters); 0 = unlimited.
        max_adapters: Adapters one identity may register; 0 = unlimited.
    """

    def __init__(
        self,
        model: nn.Module,
        model_id: str,
        layout: StageLayout,
        directory: str = DEFAULT_REGISTRY,
        quota_bytes: int = DEFAULT_QUOTA_BYTES,
        max_adapters: int = DEFAULT_MAX_ADAPTERS,
    ):
        if quota_bytes < 0 or max_adapters < 0:
            raise ValueError("registry quotas must be >= 0 (0 = unlimited)")
        self.quota_bytes, self.max_adapters = quota_bytes, max_adapters
        self.model_id = model_id
        self.check = AdapterCheck(model, model_id, layout)
        self.directory = directory
        self._lock = threading.Lock()
        self.adapters: dict[str, Registered] = {}
        self._sizes: dict[str, int] = {}  # name -> bytes of its files on disk
        self._load()

    def _load(self) -> None:
        """Reads the registrations on disk for the served model."""
        if not os.path.isdir(self.directory):
            return
        for name in sorted(os.listdir(self.directory)):
            meta = os.path.join(self.directory, name, REGISTRATION)
            if ADAPTER_NAME.fullmatch(name) and os.path.isfile(meta):  # skips unfinished pushes (.push-NAME)
                with open(meta) as f:
                    reg = Registered(**json.load(f))
                if reg.model_id == self.model_id and reg.name == name:
                    self.adapters[reg.name] = reg
                    self._sizes[name] = sum(
                        os.path.getsize(os.path.join(self.directory, name, n))
                        for n in reg.files
                        if os.path.isfile(os.path.join(self.directory, name, n))
                    )
                    if not reg.owner:
                        log.warning(
                            "adapter %s has no owner (registered before adapters had owners): every identity "
                            "can use it; push it again to scope it to its data owner",
                            reg.name,
                        )
        if self.adapters:
            log.info("adapter registry %s: %d adapter(s) for %s", self.directory, len(self.adapters), self.model_id)

    def list(self, who: str | None = None) -> list[Registered]:
        """The adapters identity `who` may use: its own and the public ones (None: all of them)."""
        with self._lock:
            return sorted((r for r in self.adapters.values() if r.visible_to(who)), key=lambda r: r.name)

    def lookup(self, name: str, who: str | None = None) -> tuple[Registered, str] | None:
        """The registration of adapter `name` and the directory holding its files, or None when unknown
        or not visible to identity `who` (None: the operator)."""
        with self._lock:
            reg = self.adapters.get(name)
        if reg is None or not reg.visible_to(who):
            return None
        return reg, os.path.join(self.directory, reg.name)

    def push(
        self, name: str, files: dict[str, tuple[bytes, str]], owner: str = "", public: bool = False
    ) -> tuple[Registered, bool]:
        """Validates an uploaded adapter and registers it; returns (registration, already registered).

        Args:
            name: Registry name ('' derives one from the digest).
            files: File name -> (content, SHA-256 the client computed).
            owner: The pushing identity; only it may list and use the adapter unless `public`.
            public: Let every identity list it and generate with it.
        """
        if name and not ADAPTER_NAME.fullmatch(name):
            raise InvalidRequest(
                f"adapter name {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
            )
        blobs = received_files(files)
        params, blocks = self.check.validate(blobs)
        digest = adapter_digest(blobs)
        name = name or f"adapter-{digest[:12]}"
        with self._lock:
            twin = next((n for n in self.adapters if n != name and n.casefold() == name.casefold()), None)
            if twin is not None:  # one directory on a case-insensitive disk: it would replace the other's files
                raise NameTaken(f"the name {name!r} is taken (names that differ only in case are one); use another")
            old = self.adapters.get(name)
            if old is not None:
                return self._push_again(old, digest, owner, public), True
            size = sum(len(b) for b in blobs.values())
            self._check_quota(owner, size)
            reg = Registered(name, digest, params, blocks, self.model_id, sorted(blobs), time.time(), owner, public)
            self._write(reg, blobs)
            self.adapters[name] = reg
            self._sizes[name] = size
        log.info(
            "registered adapter %s (%s, %d params, blocks %s) for %s%s",
            name,
            digest[:12],
            params,
            blocks,
            owner or "no identity",
            ", public" if public else "",
        )
        return reg, False

    def _push_again(self, old: Registered, digest: str, owner: str, public: bool) -> Registered:
        """A push under a registered name: the same adapter (its owner may change who may use it, or claim an
        ownerless one), or NameTaken (lock held)."""
        claim = bool(owner) and not old.owner and old.sha256 == digest  # ownerless, pushed again with its files
        if old.owner != owner and not claim:  # says nothing about another owner's adapter, not even its digest
            raise NameTaken(f"the name {old.name!r} is taken; push with another --name")
        if old.sha256 == digest and old.public == public and old.owner == owner:
            return old
        if old.sha256 == digest:  # the owner changes who may use it, or claims it
            reg = Registered(**{**asdict(old), "public": public, "owner": owner})
            self._write_registration(reg)
            self.adapters[old.name] = reg
            log.info("adapter %s is now %s", old.name, "public" if public else "private to its owner")
            return reg
        raise NameTaken(
            f"you registered another adapter as {old.name!r} (digest {old.sha256[:12]}); push with another --name"
        )

    def _check_quota(self, owner: str, size: int) -> None:
        """Raises RegistryFull when one more adapter of `size` bytes would exceed `owner`'s share (lock held)."""
        mine = [n for n, r in self.adapters.items() if r.owner == owner]
        used = sum(self._sizes.get(n, 0) for n in mine)
        who = f"identity {owner!r}" if owner else "this caller"
        if self.max_adapters and len(mine) + 1 > self.max_adapters:
            raise RegistryFull(
                f"{who} has {len(mine)} adapters registered, the most this server allows per identity "
                f"(--registry-max-adapters {self.max_adapters}); ask the operator to remove some or raise it"
            )
        if self.quota_bytes and used + size > self.quota_bytes:
            raise RegistryFull(
                f"this adapter is {size / 2**20:.1f} MiB and {who}'s adapters already use "
                f"{used / 2**20:.1f} MiB of its {self.quota_bytes / 2**20:.0f} MiB registry quota "
                "(--registry-quota-mb); ask the operator to remove some or raise it"
            )

    def _write(self, reg: Registered, blobs: dict[str, bytes]) -> None:
        """Writes the adapter's files and registration into a hidden directory, then renames it to its name."""
        final = os.path.join(self.directory, reg.name)
        tmp = os.path.join(self.directory, f".push-{reg.name}")  # outside the name space: no adapter is called that
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(self.directory, mode=0o700, exist_ok=True)  # adapters are the data owners' work: private
        os.mkdir(tmp, 0o700)
        for name, data in blobs.items():
            write_private(os.path.join(tmp, name), data)
        write_private(os.path.join(tmp, REGISTRATION), json.dumps(asdict(reg), indent=2).encode())
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)

    def _write_registration(self, reg: Registered) -> None:
        path = os.path.join(self.directory, reg.name, REGISTRATION)
        write_private(path + ".tmp", json.dumps(asdict(reg), indent=2).encode())
        os.replace(path + ".tmp", path)


def write_private(path: str, data: bytes) -> None:
    """Writes a file only the server's user can read (0600, whatever the umask)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0), 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)

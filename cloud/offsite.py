"""The cloud's Offsite-Tuning core: serves the emulator package, validates and registers uploaded adapters."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import threading
import time
from dataclasses import asdict, dataclass, field

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from torch import nn

from tandem.emulator.errors import PackageError
from tandem.emulator.package import EmulatorPackage, load_package
from tandem.kernels.checks import all_finite
from tandem.stages.adapter_files import (
    ADAPTER_CONFIG,
    ADAPTER_FILES,
    ADAPTER_WEIGHTS,
    CLIENT_BLOCKS,
    REQUIRED,
    adapter_digest,
    sha256,
)
from tandem.stages.errors import LayoutError
from tandem.stages.lora import LoRASlot, block_of
from tandem.stages.modules import StageLayout

from .adapter_config import ConfigError, parse_config
from .errors import CloudError, InvalidRequest

log = logging.getLogger(__name__)

DEFAULT_REGISTRY = os.path.join(os.path.expanduser("~"), ".tandem", "adapters")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # used with fullmatch: `$` would let "name\n" through
DEFAULT_QUOTA_BYTES = 2**30  # registry disk per identity
DEFAULT_MAX_ADAPTERS = 64  # registered adapters per identity


class AdapterRejected(CloudError):
    """An uploaded adapter does not fit the served model (names, shapes, layout, hashes)."""

    reason = "adapter-rejected"


class NameTaken(CloudError):
    """A different adapter is already registered under this name."""

    reason = "name-taken"


class RegistryFull(CloudError):
    """The pushing identity's share of the registry (bytes or adapters) would be exceeded."""

    reason = "registry-quota"


class NoEmulator(CloudError):
    """The server was started without --emulator, so it has no package to hand out."""

    reason = "no-emulator"


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


def _in_block(path: str) -> bool:
    try:
        block_of(path)
    except LayoutError:
        return False
    return True


def _adaptable(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Module path (without LoRA-slot wrappers) -> (in, out) for every Linear / GPT-2 Conv1D of the model."""
    out = {}
    for path, m in model.named_modules():
        if ".base_layer" in path or path.endswith("base_layer"):
            continue
        if isinstance(m, LoRASlot):
            out[path] = (m.in_features, m.out_features)
        elif isinstance(m, nn.Linear):
            out[path] = (m.in_features, m.out_features)
        elif type(m).__name__ == "Conv1D":
            out[path] = (m.weight.shape[0], m.weight.shape[1])
    return out


class OffsiteService:
    """Pure core (no gRPC) of Offsite-Tuning on the cloud side.

    Args:
        model: The served full model (its LoRA slots, if any, are looked through).
        model_id: The served model's id; adapters must name it as their base model.
        layout: The served split layout (used for full-block adapters when there is no package).
        registry: Directory where registered adapters are kept, one sub-directory per name.
        emulator: Path of an emulator package to hand out, or None.
        quota_bytes: Registry disk one identity may fill (files of its adapters); 0 = unlimited.
        max_adapters: Adapters one identity may register; 0 = unlimited.
    """

    def __init__(
        self,
        model: nn.Module,
        model_id: str,
        layout: StageLayout,
        registry: str = DEFAULT_REGISTRY,
        emulator: str | None = None,
        quota_bytes: int = DEFAULT_QUOTA_BYTES,
        max_adapters: int = DEFAULT_MAX_ADAPTERS,
    ):
        if quota_bytes < 0 or max_adapters < 0:
            raise ValueError("registry quotas must be >= 0 (0 = unlimited)")
        self.quota_bytes, self.max_adapters = quota_bytes, max_adapters
        self.model_id = model_id
        self.package: EmulatorPackage | None = None
        if emulator is not None:
            try:
                self.package = load_package(emulator)
            except PackageError as e:
                raise ValueError(f"--emulator: {e}") from None
            if self.package.manifest["model_id"] != model_id:
                raise ValueError(
                    f"--emulator was built from {self.package.manifest['model_id']!r}, this server serves "
                    f"{model_id!r}; build the package from the served model"
                )
        self.layout = self.package.layout if self.package else layout
        if self.layout.num_layers != layout.num_layers:
            raise ValueError(f"--emulator is for {self.layout.num_layers} blocks, the model has {layout.num_layers}")
        self.modules = _adaptable(model)
        self.leaves = {p.rsplit(".", 1)[-1] for p in self.modules if _in_block(p)}
        self.fan_in_fan_out = any(type(m).__name__ == "Conv1D" for m in model.modules())
        self.state_shapes = {
            re.sub(r"\.base_layer\.", ".", k): (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()
        }
        self.registry = registry
        self._lock = threading.Lock()
        self.adapters: dict[str, Registered] = {}
        self._sizes: dict[str, int] = {}  # name -> bytes of its files on disk
        self._load_registry()

    # Package ----------------------------------------------------------------------------------
    def package_files(self):
        """Yields (name, bytes, sha256) for every file of the package, manifest last."""
        if self.package is None:
            raise NoEmulator(
                "this server has no emulator package; ask the operator to start `cloud serve --emulator PKG` "
                "(built with `cloud emulator build`) or to hand the package over as files"
            )
        for name in self.package.files():
            data = self.package.read(name)
            yield name, data, sha256(data)

    # Registry ---------------------------------------------------------------------------------
    def _load_registry(self) -> None:
        if not os.path.isdir(self.registry):
            return
        for name in sorted(os.listdir(self.registry)):
            meta = os.path.join(self.registry, name, "registration.json")
            if _NAME.fullmatch(name) and os.path.isfile(meta):  # skips unfinished pushes (.push-NAME)
                with open(meta) as f:
                    reg = Registered(**json.load(f))
                if reg.model_id == self.model_id and reg.name == name:
                    self.adapters[reg.name] = reg
                    self._sizes[name] = sum(
                        os.path.getsize(os.path.join(self.registry, name, n))
                        for n in reg.files
                        if os.path.isfile(os.path.join(self.registry, name, n))
                    )
                    if not reg.owner:
                        log.warning(
                            "adapter %s has no owner (registered before adapters had owners): every identity "
                            "can use it; push it again to scope it to its data owner",
                            reg.name,
                        )
        if self.adapters:
            log.info("adapter registry %s: %d adapter(s) for %s", self.registry, len(self.adapters), self.model_id)

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
        return reg, os.path.join(self.registry, reg.name)

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
        if name and not _NAME.fullmatch(name):
            raise InvalidRequest(
                f"adapter name {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
            )
        blobs = self._check_files(files)
        params, blocks = self.validate(blobs)
        digest = adapter_digest(blobs)
        name = name or f"adapter-{digest[:12]}"
        with self._lock:
            old = self.adapters.get(name)
            if old is not None:
                claim = bool(owner) and not old.owner and old.sha256 == digest  # ownerless, pushed again with its files
                if old.owner != owner and not claim:  # says nothing about another owner's adapter, not even its digest
                    raise NameTaken(f"the name {name!r} is taken; push with another --name")
                if old.sha256 == digest and old.public == public and old.owner == owner:
                    return old, True
                if old.sha256 == digest:  # the owner changes who may use it, or claims it
                    reg = Registered(**{**asdict(old), "public": public, "owner": owner})
                    self._write_registration(reg)
                    self.adapters[name] = reg
                    log.info("adapter %s is now %s", name, "public" if public else "private to its owner")
                    return reg, True
                raise NameTaken(
                    f"you registered another adapter as {name!r} (digest {old.sha256[:12]}); push with another --name"
                )
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
        final = os.path.join(self.registry, reg.name)
        tmp = os.path.join(self.registry, f".push-{reg.name}")  # outside the name space: no adapter is called that
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(
            self.registry, mode=0o700, exist_ok=True
        )  # adapters are the data owners' work: private to the server
        os.mkdir(tmp, 0o700)
        for n, b in blobs.items():
            _write_private(os.path.join(tmp, n), b)
        _write_private(os.path.join(tmp, "registration.json"), json.dumps(asdict(reg), indent=2).encode())
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)

    def _write_registration(self, reg: Registered) -> None:
        path = os.path.join(self.registry, reg.name, "registration.json")
        _write_private(path + ".tmp", json.dumps(asdict(reg), indent=2).encode())
        os.replace(path + ".tmp", path)

    # Validation -------------------------------------------------------------------------------
    @staticmethod
    def _check_files(files: dict[str, tuple[bytes, str]]) -> dict[str, bytes]:
        unknown = sorted(set(files) - set(ADAPTER_FILES))
        if unknown:
            raise AdapterRejected(
                f"unexpected files {unknown}; an adapter is {list(ADAPTER_FILES)} (the last one optional)"
            )
        missing = [n for n in REQUIRED if n not in files]
        if missing:
            raise AdapterRejected(f"the adapter lacks {missing}; push the adapter/ directory of a `client tune` run")
        for n, (data, digest) in files.items():
            if sha256(data) != digest:
                raise AdapterRejected(
                    f"{n} arrived with SHA-256 {sha256(data)[:12]}, the client sent {digest[:12]}: "
                    "the upload is corrupt; push again"
                )
        return {n: d for n, (d, _) in files.items()}

    def validate(self, blobs: dict[str, bytes]) -> tuple[int, list[int]]:
        """Checks an adapter against the served model; returns (trainable values, blocks it changes).

        Raises:
            AdapterRejected: with a message naming the first problem found.
        """
        try:
            lora = parse_config(
                blobs[ADAPTER_CONFIG], self.model_id, self.leaves, self.fan_in_fan_out, self.layout.num_layers
            )
        except ConfigError as e:
            raise AdapterRejected(f"{ADAPTER_CONFIG}: {e}") from None
        rank = lora.rank
        tensors = self._load(ADAPTER_WEIGHTS, blobs[ADAPTER_WEIGHTS])
        if not tensors:
            raise AdapterRejected(
                f"{ADAPTER_WEIGHTS} holds no tensors; push the adapter/ directory of a `client tune` run"
            )
        params, blocks, halves = 0, set(), {}
        for key, t in tensors.items():
            m = re.fullmatch(r"base_model\.model\.(.+)\.lora_([AB])\.weight", key)
            if m is None:
                raise AdapterRejected(
                    f"{ADAPTER_WEIGHTS}: unexpected tensor {key!r}; expected base_model.model.<module>.lora_A/B.weight"
                )
            path, ab = m.groups()
            if path not in self.modules:
                raise AdapterRejected(
                    f"{ADAPTER_WEIGHTS}: {key!r} adapts {path!r}, which the served model {self.model_id!r} "
                    "does not have; was it tuned for another architecture?"
                )
            fin, fout = self.modules[path]
            want = (rank, fin) if ab == "A" else (fout, rank)
            if tuple(t.shape) != want:
                raise AdapterRejected(
                    f"{ADAPTER_WEIGHTS}: {key!r} has shape {list(t.shape)}, the served model needs "
                    f"{list(want)} (r={rank}); was it tuned for another model size?"
                )
            try:
                block = block_of(path)
            except LayoutError:
                raise AdapterRejected(
                    f"{ADAPTER_WEIGHTS}: {key!r} adapts {path!r}, which is outside the blocks; "
                    "tandem adapters put LoRA only on layers inside the blocks (not lm_head or embeddings)"
                ) from None
            # peft would skip a tensor its config does not target; serving would apply it: refuse the mismatch.
            if path.rsplit(".", 1)[-1] not in lora.targets or (lora.layers is not None and block not in lora.layers):
                raise AdapterRejected(
                    f"{ADAPTER_WEIGHTS}: {key!r} adapts {path!r}, which {ADAPTER_CONFIG} does not "
                    "target (target_modules / layers_to_transform); the two files do not belong together"
                )
            if not t.is_floating_point():
                raise AdapterRejected(f"{ADAPTER_WEIGHTS}: {key!r} is {t.dtype}; LoRA weights are floating point")
            halves.setdefault(path, set()).add(ab)
            self._finite(key, t)
            params += t.numel()
            blocks.add(block)
        unpaired = sorted(p for p, h in halves.items() if h != {"A", "B"})
        if unpaired:
            raise AdapterRejected(
                f"{ADAPTER_WEIGHTS}: {unpaired[0]!r} has only lora_{min(halves[unpaired[0]])}; "
                "every adapted layer needs both lora_A and lora_B"
            )
        if CLIENT_BLOCKS in blobs:
            client = set(self.layout.client_blocks)
            for key, t in self._load(CLIENT_BLOCKS, blobs[CLIENT_BLOCKS]).items():
                want = self.state_shapes.get(key)
                if want is None:
                    raise AdapterRejected(f"{CLIENT_BLOCKS}: {key!r} is not a weight of {self.model_id!r}")
                try:
                    b = block_of(key)
                except LayoutError:
                    b = -1  # embeddings, final norm, head: not a client block
                if b not in client:
                    raise AdapterRejected(
                        f"{CLIENT_BLOCKS}: {key!r} changes block {b}, but the layout "
                        f"{self.layout.bottom}:{self.layout.top} lets the data owner tune only blocks {sorted(client)}"
                    )
                if (tuple(t.shape), t.dtype) != want:
                    raise AdapterRejected(
                        f"{CLIENT_BLOCKS}: {key!r} is {t.dtype} {list(t.shape)}, the model has {want[1]} {list(want[0])}"
                    )
                self._finite(key, t)
                params += t.numel()
                blocks.add(b)
        return params, sorted(blocks)

    @staticmethod
    def _load(name: str, data: bytes) -> dict[str, torch.Tensor]:
        try:
            return st_load(data)
        except (SafetensorError, ValueError, RuntimeError) as e:
            raise AdapterRejected(f"{name} is not a readable safetensors file ({e})") from None

    @staticmethod
    def _finite(key: str, t: torch.Tensor) -> None:
        if t.is_floating_point() and not all_finite(t):
            raise AdapterRejected(f"{key!r} contains NaN or Inf; the tuning run diverged")


def _write_private(path: str, data: bytes) -> None:
    """Writes a file only the server's user can read (0600, whatever the umask)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0), 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)

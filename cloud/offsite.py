"""The emulator package the cloud hands out for Offsite-Tuning (what FetchEmulator serves)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

from tandem.emulator.errors import PackageError
from tandem.emulator.package import MANIFEST, EmulatorPackage, load_package
from tandem.stages.adapter_files import sha256
from tandem.stages.modules import StageLayout

from .client_stages import Piece
from .errors import NoEmulator


class OffsiteService:
    """Pure core (no gRPC) of the emulator download.

    Args:
        model_id: The served model's id; the package must have been built from it.
        layout: The served split layout (the one data owners tune when there is no package).
        emulator: Path of an emulator package to hand out, or None.

    Attributes:
        layout: The split layout data owners tune: the package's when there is one, else `layout`.
    """

    def __init__(self, model_id: str, layout: StageLayout, emulator: str | None = None):
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
        self.files = self._measure() if self.package else {}  # name -> (size, SHA-256), manifest last
        if self.layout.num_layers != layout.num_layers:
            raise ValueError(f"--emulator is for {self.layout.num_layers} blocks, the model has {layout.num_layers}")

    def _measure(self) -> dict[str, tuple[int, str]]:
        """Each file's (size, SHA-256), once at start, manifest last: what every download announces and is signed.

        load_package has just checked every file against the manifest, so the manifest's digests stand; the
        manifest itself must still be the one it read (a package rewritten meanwhile is refused)."""
        manifest = self.package.read(MANIFEST)
        if json.loads(manifest) != self.package.manifest:
            raise ValueError(f"--emulator: {MANIFEST} changed while the server loaded it; start again")
        files = {
            name: (os.path.getsize(self.package.file(name)), self.package.manifest["files"][name]["sha256"])
            for name in self.package.files()[:-1]
        }
        files[MANIFEST] = (len(manifest), sha256(manifest))
        return files

    def require_package(self) -> None:
        """Raises NoEmulator when this server hands out no package."""
        if self.package is None:
            raise NoEmulator(
                "this server has no emulator package; ask the operator to start `cloud serve --emulator PKG` "
                "(built with `cloud emulator build`) or to hand the package over as files"
            )

    def chunks(self, chunk_bytes: int) -> Iterator[Piece]:
        """Every file, manifest last, in pieces read from disk as the client reads them (one piece held at a time).

        Sizes and digests are the ones measured at start: a file changed on disk since fails the client's check."""
        self.require_package()
        for name, (size, digest) in self.files.items():
            with open(self.package.file(name), "rb") as f:
                for offset in range(0, max(size, 1), chunk_bytes):
                    data = f.read(min(chunk_bytes, size - offset))
                    if len(data) != min(chunk_bytes, size - offset):
                        raise RuntimeError(f"the package's {name} changed on disk since the server started")
                    yield Piece(name, offset, data, size, digest if offset == 0 else "")

"""The emulator package the cloud hands out for Offsite-Tuning (what FetchEmulator serves)."""

from __future__ import annotations

from tandem.emulator.errors import PackageError
from tandem.emulator.package import EmulatorPackage, load_package
from tandem.stages.adapter_files import sha256
from tandem.stages.modules import StageLayout

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
        if self.layout.num_layers != layout.num_layers:
            raise ValueError(f"--emulator is for {self.layout.num_layers} blocks, the model has {layout.num_layers}")

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

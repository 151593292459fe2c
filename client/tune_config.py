"""TuneConfig: what `client tune` does, checked as a whole (the flags' combinations) and persisted as JSON."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from tandem.stages.lora import LoraConfig

from .data import MAX_VAL_SEQUENCES
from .kill_revive import KillReviveConfig

MODES = ("split", "local", "offsite")


@dataclass
class TuneConfig:
    """What `client tune` does. Dicts only at the edges: this is persisted as JSON in the report."""

    data: str
    out: str = "tandem-run"
    mode: str = "split"
    model: str | None = None  # local mode only
    client_blocks: str = "2:2"  # local mode only (split mode takes the server's layout)
    steps: int = 0  # 0: run --epochs
    epochs: float = 1.0
    batch_size: int = 4
    seq_len: int = 128
    lr: float = 1e-3
    lora: LoraConfig = field(default_factory=LoraConfig)
    seed: int = 0
    val_fraction: float = 0.1
    val_max_sequences: int = MAX_VAL_SEQUENCES  # the validation set's cap (the rest of the held-out share trains)
    checkpoint_every: int = 10
    tune_client_blocks: bool = False  # also train the client's K+M blocks in full
    noise_multiplier: float = 0.0  # Gaussian noise at the bottom cut, sigma = noise_multiplier * clip_norm
    clip_norm: float = 0.0  # per-token L2 clip at the cut; 0 = auto (median norm on public text) when noise is on
    private_bottom: float = 0.0  # weight of the private bottom's inverter term (0: the shipped bottom, untrained)
    private_warmup: int = 0  # the private bottom's steps on public text before anything is sent
    private_lr: float = 1e-4  # AdamW learning rate of the private bottom's blocks
    label_noise: float = 0.0  # noise on the top-cut gradient, relative to each token's gradient norm (0: none)
    audit: str = "auto"  # privacy audit of what the cloud received: auto (split mode), yes, no, record (audit later)
    audit_tokens: int = 256  # received tokens the audit attacks
    emulator: str | None = None  # offsite mode: the emulator package directory
    middle_lora: bool = True  # split/local: LoRA on the middle blocks too (offsite: never)
    cloud_optimizer: bool = False  # split: the cloud applies the remote LoRA's AdamW updates (no LoRA traffic per step)
    kill_revive: KillReviveConfig | None = None  # DLoRA's Kill-and-Revive of the middle's LoRA modules (None: off)
    device: str = "auto"  # where the client's stages compute (local mode: the whole model): auto, cpu, cuda[:N]
    dtype: str = "auto"  # their compute dtype: auto (see stages/precision.py), float32, bfloat16, float16
    resume: bool = False
    overwrite: bool = False  # replace a finished or unfinished run in `out` (refused otherwise)
    progress: bool = True

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if (self.mode == "offsite") != (self.emulator is not None):
            raise ValueError("--mode offsite needs --emulator PKG, and --emulator only applies to --mode offsite")
        if self.steps < 0 or self.epochs <= 0:
            raise ValueError("steps must be >= 0 and epochs > 0")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.batch_size < 1 or self.seq_len < 2 or self.checkpoint_every < 1:
            raise ValueError(
                f"batch_size and checkpoint_every must be >= 1 and seq_len >= 2, got "
                f"{self.batch_size}, {self.checkpoint_every}, {self.seq_len}"
            )
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.val_max_sequences < 1:
            raise ValueError(f"val_max_sequences must be >= 1, got {self.val_max_sequences}")
        if self.noise_multiplier < 0 or self.clip_norm < 0:
            raise ValueError(
                f"noise_multiplier and clip_norm must be >= 0, got {self.noise_multiplier}, {self.clip_norm}"
            )
        self._check_private_defenses()
        if self.cloud_optimizer and (self.mode != "split" or not self.middle_lora):
            raise ValueError("--cloud-optimizer applies to --mode split with a remote LoRA (not with --no-middle-lora)")
        if self.kill_revive is not None and (self.mode == "offsite" or not self.middle_lora or self.cloud_optimizer):
            raise ValueError(
                "--kill-revive needs a middle LoRA trained here (not --mode offsite, --no-middle-lora "
                "or --cloud-optimizer)"
            )
        if self.resume and self.overwrite:
            raise ValueError("--resume continues the run in --out and --overwrite replaces it; pass one of them")
        if self.audit not in ("auto", "yes", "no", "record"):
            raise ValueError(f"audit must be auto, yes, no or record, got {self.audit!r}")

    def _check_private_defenses(self) -> None:
        """The trained defenses' flags (client/privacy/private_bottom.py, label_defense.py)."""
        if self.private_bottom < 0 or self.label_noise < 0 or self.private_warmup < 0 or not self.private_lr > 0:
            raise ValueError(
                "--private-bottom, --label-noise and --private-warmup must be >= 0 and --private-lr > 0, got "
                f"{self.private_bottom}, {self.label_noise}, {self.private_warmup}, {self.private_lr}"
            )
        if (self.private_bottom > 0 or self.label_noise > 0) and self.mode == "offsite":
            raise ValueError("--private-bottom and --label-noise apply to split and local mode (offsite sends nothing)")
        if self.private_bottom > 0 and self.tune_client_blocks:
            raise ValueError("--private-bottom trains the bottom blocks itself; not with --tune-client-blocks")
        if self.private_warmup > 0 and not self.private_bottom > 0:
            raise ValueError("--private-warmup warms up a private bottom; pass --private-bottom WEIGHT too")

    def to_dict(self) -> dict:
        """The config as JSON-ready dicts (the report's and the checkpoint's "config")."""
        d = asdict(self)
        d["lora"]["target_modules"] = list(self.lora.target_modules)
        d["lora"]["layers"] = list(self.lora.layers)  # --lora-layers; [] = every block
        return d

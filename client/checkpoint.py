"""Recovery: the checkpoint (atomic save, checked resume), rollback to it, and redoing a step the cloud lost."""

from __future__ import annotations

import copy
import hashlib
import logging
import os

import torch

from tandem.stages.arch import arch_for
from tandem.stages.lora_layers import format_layers
from tandem.stages.resume_settings import PLAIN, differing

from . import rundir
from .errors import CheckpointError
from .session import SessionLost

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
# Cloud optimizer: sessions the cloud may lose in a row, each sending the run back to its last checkpoint, before
# the run stops. Any number are survived while checkpoints keep being reached; this bounds a cloud that loses the
# session at every attempt (e.g. one that crashes on the same step), which would otherwise redo steps forever.
MAX_LOST_WITHOUT_PROGRESS = 5


def checkpoint_path(out: str) -> str:
    return os.path.join(out, CHECKPOINT_FILE)


def save(out: str, payload: dict) -> None:
    """Writes the checkpoint atomically (a failure, disk full, leaves the previous one intact) and private."""
    path = checkpoint_path(out)
    try:
        rundir.write_atomic(path, lambda f: torch.save(payload, f))  # created 0600: it holds the defenses' keys
    except OSError as e:
        raise CheckpointError(
            f"could not write the checkpoint to {path} ({e.strerror or e}); the previous checkpoint is intact. "
            "Free disk space and rerun with --resume to continue from it."
        ) from None


def load(out: str, run_settings: dict) -> dict:
    """The checkpoint --resume continues from, refused when its settings differ from this run's."""
    path = checkpoint_path(out)
    if not os.path.exists(path):
        raise CheckpointError(f"--resume: no checkpoint in {out}; run without --resume to start fresh")
    try:  # tensors and plain values only: a planted or swapped file must not run code when loaded
        saved = torch.load(path, weights_only=True, map_location="cpu")  # a GPU run's checkpoint resumes anywhere
    except OSError as e:
        raise CheckpointError(
            f"--resume: cannot read {path} ({e.strerror or e}); start fresh without --resume"
        ) from None
    except Exception:  # torch's unpickler refused it (any other object) or the file is damaged
        saved = None
    if isinstance(saved, dict) and "settings" not in saved and "step" in saved:
        raise CheckpointError(
            f"--resume: {path} was written by an older client that did not record its settings, so they cannot be "
            "checked; start fresh without --resume"
        )
    if not isinstance(saved, dict) or not isinstance(saved.get("settings"), dict):
        raise CheckpointError(
            f"--resume: {path} is damaged or holds more than tensors and plain values (it is not loaded); "
            "start fresh without --resume"
        )
    check(saved["settings"], run_settings, out)
    return saved


def misfit(out: str, error: Exception) -> CheckpointError:
    """The refusal of a checkpoint whose settings match this run's but whose contents do not fit it (missing
    entries, tensors of other shapes: a damaged or edited file)."""
    first = (str(error).strip().splitlines() or [""])[0][:160]
    return CheckpointError(
        f"--resume: {checkpoint_path(out)} does not fit this run ({type(error).__name__}: {first}); "
        "start fresh without --resume"
    )


def settings(cfg, transport_cfg, data_fingerprint: str) -> dict:
    """The settings a resumed run must repeat, keyed by the flag that sets them (known before any network call).

    --steps, --epochs, --checkpoint-every and the audit may change: they extend or observe a run, they do not
    change its steps.
    """
    split = cfg.mode == "split"
    codec = (transport_cfg.codec if transport_cfg else "float32") if split else None
    gradient_codec = (transport_cfg.gradient_codec or transport_cfg.codec) if transport_cfg else "float32"
    return {
        "--mode": cfg.mode,
        "--data (file names, sizes, SHA-256)": data_fingerprint,
        "--lr": cfg.lr,
        "--batch-size": cfg.batch_size,
        "--seq-len": cfg.seq_len,
        "--val-fraction": cfg.val_fraction,
        "--val-max-sequences": cfg.val_max_sequences,
        "--seed": cfg.seed,
        "--lora-rank": cfg.lora.rank,
        "--lora-alpha": cfg.lora.alpha,
        "--lora-dropout": cfg.lora.dropout,
        "--lora-layers": format_layers(cfg.lora.layers),
        "--no-middle-lora": not cfg.middle_lora,
        "--cloud-optimizer": cfg.cloud_optimizer,
        "--kill-revive": cfg.kill_revive.to_dict() if cfg.kill_revive is not None else None,
        "--tune-client-blocks": cfg.tune_client_blocks,
        "--noise-multiplier": cfg.noise_multiplier,
        "--clip-norm": cfg.clip_norm,
        "--private-bottom": cfg.private_bottom,
        "--private-warmup": cfg.private_warmup,
        "--private-lr": cfg.private_lr if cfg.private_bottom > 0 else None,
        "--label-noise": cfg.label_noise,
        "--codec": codec,
        "--gradient-codec": gradient_codec if split else None,
        "--lora-codec": (transport_cfg.lora_codec if transport_cfg else "float32") if split else None,
        "--error-feedback": bool(transport_cfg and transport_cfg.error_feedback) if split else None,
        "--model": cfg.model if cfg.mode == "local" else None,
        "--client-blocks": cfg.client_blocks if cfg.mode == "local" else None,
        "--emulator": cfg.emulator,
        "--emulator (package SHA-256)": package_digest(cfg.emulator),
    }


def package_digest(pkg_dir: str | None) -> str | None:
    """The SHA-256 of an emulator package's manifest, which holds every file's: a package rebuilt in place differs."""
    if pkg_dir is None:
        return None
    try:
        with open(os.path.join(pkg_dir, "manifest.json"), "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except OSError:
        return None  # the run's own load of the package says what is wrong


def stages(model, lora) -> dict:
    """What the stages are (known once the session is open): the model, where it is cut, the LoRA slots."""
    targets = list(lora.target_modules or arch_for(model.config).lora_targets)
    return {
        "model": model.model_id,
        "cut (K:M of layers)": f"{model.layout.bottom}:{model.layout.top} of {model.layout.num_layers}",
        "client stages (SHA-256)": model.stages_sha256 or None,
        "--lora-targets": ",".join(targets),
        "LoRA slots": len(model.adapter.specs),
        "compute dtype (--dtype)": model.placement.dtype_name,  # resolved: auto may pick another on another machine
    }


def _show(value) -> str:
    """A setting as the refusal prints it: short, one line, and never a tensor's values (an edited file may hold
    one anywhere)."""
    if not _plain(value):
        return (
            f"a {type(value).__name__} holding other objects"
            if isinstance(value, PLAIN)
            else f"a {type(value).__name__}"
        )
    if isinstance(value, str) and len(value) == 64:
        return value[:12] + "..."
    text = "(default)" if value is None else " ".join(str(value).split())
    return text if len(text) <= 80 else text[:77] + "..."


def _plain(value, depth: int = 0) -> bool:
    """Whether value is made of str, int, float, bool and None only (in lists, tuples and dicts, a few levels)."""
    if isinstance(value, (list, tuple)):
        return depth < 4 and all(_plain(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return depth < 4 and all(_plain(k, depth + 1) and _plain(v, depth + 1) for k, v in value.items())
    return isinstance(value, (str, int, float, bool, type(None)))


def check(saved: dict | None, now: dict, out: str) -> None:
    """Refuses to resume when a setting differs; the message names each difference, saved value first.

    A key missing from `saved` (a checkpoint from an older client) is not compared.
    """
    if saved is None:
        return
    if not isinstance(saved, dict):
        raise CheckpointError(f"--resume: the checkpoint in {out} is damaged; start fresh without --resume")
    diffs = [f"{k} {_show(saved[k])} (now {_show(now[k])})" for k in differing(saved, now, missing_differs=False)]
    if diffs:
        raise CheckpointError(
            f"--resume: the checkpoint in {out} was made with {'; '.join(diffs)}; resume with the "
            "same settings, or start afresh with --overwrite"
        )


def surviving_restarts(model, fn, attempts: int = 3):
    """Runs fn(); when the cloud lost the session (it restarted), reopens it and runs fn() again.

    fn must be a whole step (forward and backward): every input it depends on is deterministic
    in (seed, step), so the redone step equals the lost one.
    """
    for attempt in range(attempts):
        try:
            return fn()
        except SessionLost:
            if attempt == attempts - 1:
                raise
            model.middle.reopen()


class Rollback:
    """Cloud optimizer: when the cloud loses the remote LoRA's state, the run goes back to its last checkpoint.

    Holds a copy of that checkpoint (the file may be unwritable) and gives the new session its remote state.
    """

    def __init__(self, point: dict):
        self.point = copy.deepcopy(point)
        self.lost = 0  # sessions lost since the last checkpoint (progress resets it)
        self.pending = False  # a rollback is pending: the new session must get the checkpoint's remote state

    def reached(self, payload: dict) -> None:
        """A new checkpoint: progress, and the new point to go back to."""
        self.point, self.lost = copy.deepcopy(payload), 0

    def restart_if_pending(self, model) -> None:
        if self.pending:
            model.middle.restart(self.point["remote_optimizer"])
            self.pending = False

    def back(self, error: SessionLost) -> dict:
        """A copy of the point to go back to; raises when the cloud never lets the run reach a checkpoint."""
        self.lost += 1  # the cloud lost the remote LoRA's updates since the last checkpoint: redo them
        if self.lost > MAX_LOST_WITHOUT_PROGRESS:
            raise SessionLost(
                f"{error}; the cloud lost {self.lost} sessions in a row before the run reached a new checkpoint, "
                f"giving up at step {self.point['step']}. Rerun with --resume when the server is stable, or lower "
                "--checkpoint-every"
            ) from None
        log.warning(
            "%s; going back to step %d (the last checkpoint) and redoing the steps since", error, self.point["step"]
        )
        self.pending = True
        return copy.deepcopy(self.point)

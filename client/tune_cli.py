"""`client tune`: the TuneConfig and TransportConfig its flags make, and the run that prints the report."""

from __future__ import annotations

import argparse
import os

from . import flags
from .errors import ClientError

CODECS = ("float32", "float16", "bfloat16", "int8", "int4")


def lora_config(args: argparse.Namespace):
    from tandem.stages.lora import LoraConfig

    from .placement import resolve_placement

    targets = tuple(name for name in (args.lora_targets or "").split(",") if name)
    return LoraConfig(
        rank=args.lora_rank,
        alpha=args.lora_alpha,
        dropout=args.lora_dropout,
        target_modules=targets,
        layers=resolve_placement(args.lora_layers, args.mode, args.emulator),
    )


def kill_revive_config(args: argparse.Namespace):
    """--kill-revive's settings, or None when it is off."""
    from .kill_revive import KillReviveConfig

    if not args.kill_revive:
        return None
    return KillReviveConfig(
        threshold=args.kill_threshold,
        warmup=args.kill_warmup,
        probe=args.kill_probe,
        revive_after=args.revive_after,
        measure=args.kill_measure,
    )


def tune_config(args: argparse.Namespace):
    """The TuneConfig of the flags; a combination of flags it refuses is a ClientError (one line), and so is a
    --device or --dtype this machine cannot compute in (a PlacementError), before any network call."""
    from tandem.stages.precision import check_dtype, resolve_device

    from .trainer import TuneConfig

    check_dtype(args.dtype)
    resolve_device(args.device)

    try:
        return TuneConfig(
            data=args.data,
            out=args.out,
            mode=args.mode,
            model=args.model,
            client_blocks=args.client_blocks,
            steps=args.steps,
            epochs=args.epochs,
            batch_size=args.batch_size,
            seq_len=args.seq_len,
            lr=args.lr,
            lora=lora_config(args),
            seed=args.seed,
            val_fraction=args.val_fraction,
            val_max_sequences=args.val_max_sequences,
            checkpoint_every=args.checkpoint_every,
            tune_client_blocks=args.tune_client_blocks,
            resume=args.resume,
            overwrite=args.overwrite,
            progress=not args.no_progress,
            noise_multiplier=args.noise_multiplier,
            clip_norm=args.clip_norm,
            private_bottom=args.private_bottom,
            private_warmup=args.private_warmup,
            private_lr=args.private_lr,
            label_noise=args.label_noise,
            audit=args.audit,
            audit_tokens=args.audit_tokens,
            emulator=args.emulator,
            middle_lora=args.mode != "offsite" and not args.no_middle_lora,
            cloud_optimizer=args.cloud_optimizer,
            kill_revive=kill_revive_config(args),
            device=args.device,
            dtype=args.dtype,
        )
    except ValueError as e:  # combinations of flags (each flag alone was checked as it was parsed)
        raise ClientError(str(e)) from None


def run_tune(args: argparse.Namespace) -> int:
    """Tunes, prints the report (and the privacy audit when one was measured), writes the plot."""
    from . import report as rep
    from .trainer import tune

    flags.apply_threads(args)
    config = tune_config(args)
    try:
        transport_config = flags.transport_config(
            args,
            seal=not args.no_seal,
            codec=args.codec,
            gradient_codec=args.gradient_codec,
            lora_codec=args.lora_codec,
            error_feedback=args.error_feedback,
            exact_eval=args.exact_eval,
        )
    except ValueError as e:  # combinations of the codec flags
        raise ClientError(str(e)) from None
    report = tune(config, transport_config)
    rep.render(report)
    if report["privacy"].get("measured"):
        rep.render_privacy(report["privacy"])
    png = rep.plot(report, os.path.join(args.out, "report.png"))
    print(f"report: {os.path.join(args.out, 'report.json')}  plot: {png}  adapter: {os.path.join(args.out, 'adapter')}")
    return 0

"""What a checkpoint must share with the run that resumes it: every setting that changes the result."""

from __future__ import annotations

from tandem.stages.arch import arch_for

from .errors import CheckpointError


def settings(cfg, tcfg, data_fingerprint: str) -> dict:
    """The settings a resumed run must repeat, keyed by the flag that sets them (known before any network call).

    --steps, --epochs, --checkpoint-every and the audit may change: they extend or observe a run, they do not
    change its steps.
    """
    split = cfg.mode == "split"
    codec = (tcfg.codec if tcfg else "float32") if split else None
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
        "--no-middle-lora": not cfg.middle_lora,
        "--cloud-optimizer": cfg.cloud_optimizer,
        "--tune-client-blocks": cfg.tune_client_blocks,
        "--noise-multiplier": cfg.noise_multiplier,
        "--clip-norm": cfg.clip_norm,
        "--codec": codec,
        "--gradient-codec": ((tcfg.gradient_codec or tcfg.codec) if tcfg else "float32") if split else None,
        "--lora-codec": (tcfg.lora_codec if tcfg else "float32") if split else None,
        "--model": cfg.model if cfg.mode == "local" else None,
        "--client-blocks": cfg.client_blocks if cfg.mode == "local" else None,
        "--emulator": cfg.emulator,
    }


def stages(sm, lora) -> dict:
    """What the stages are (known once the session is open): the model, where it is cut, the LoRA slots."""
    targets = list(lora.target_modules or arch_for(sm.config).lora_targets)
    return {
        "model": sm.model_id,
        "cut (K:M of layers)": f"{sm.layout.bottom}:{sm.layout.top} of {sm.layout.num_layers}",
        "client stages (SHA-256)": sm.stages_sha256 or None,
        "--lora-targets": ",".join(targets),
        "LoRA slots": len(sm.adapter.specs),
    }


def _show(v) -> str:
    if isinstance(v, str) and len(v) == 64:
        return v[:12] + "..."
    return "(default)" if v is None else str(v)


def check(saved: dict | None, now: dict, out: str) -> None:
    """Refuses to resume when a setting differs; the message names each difference, saved value first.

    A key missing from `saved` (a checkpoint from an older client) is not compared.
    """
    if saved is None:
        return
    diffs = [f"{k} {_show(saved[k])} (now {_show(now[k])})" for k in now if k in saved and saved[k] != now[k]]
    if diffs:
        raise CheckpointError(
            f"--resume: the checkpoint in {out} was made with {'; '.join(diffs)}; resume with the "
            "same settings, or start afresh with --overwrite"
        )

"""`client tune`'s privacy flags: the cut noise, the trained defenses (private bottom, label noise), the audit."""

from __future__ import annotations

import argparse

from ..flags import nonneg_float, nonneg_int, positive_float, positive_int


def add_privacy_flags(parser: argparse.ArgumentParser) -> None:
    """The privacy group: the cut noise, the trained defenses and the audit."""
    parser.add_argument(
        "--noise-multiplier",
        type=nonneg_float,
        default=0.0,
        metavar="S",
        help="privacy defense: Gaussian noise on every token's state at the bottom cut, sigma = S x clip norm "
        "(train and eval); the report states the (epsilon, delta) it implies; default 0 (none)",
    )
    parser.add_argument(
        "--clip-norm",
        type=nonneg_float,
        default=0.0,
        metavar="C",
        help="clip every token's state at the cut to L2 norm C before the noise; default 0 = with noise on, the "
        "median norm at the cut on public text (position 0 gets its own)",
    )
    add_trained_defense_flags(parser)
    parser.add_argument(
        "--audit",
        choices=("auto", "yes", "no", "record"),
        default="auto",
        help="privacy audit: record what the cloud receives (RUN_DIR/cloud_view) and attack it after tuning; "
        "auto = in split mode; record = record only (run `client audit` later); default auto",
    )
    parser.add_argument(
        "--audit-tokens", type=positive_int, default=256, help="received tokens the audit attacks; default 256"
    )


def add_trained_defense_flags(parser: argparse.ArgumentParser) -> None:
    """The defenses the client trains or draws itself, which the cloud never sees (split and local mode)."""
    parser.add_argument(
        "--private-bottom",
        type=nonneg_float,
        default=0.0,
        metavar="WEIGHT",
        help="privacy defense: train the K bottom blocks in full (float32) against an inverter refitted here every "
        "step on their recent outputs (your text and public text: the cloud's learned-inverter attack); the loss "
        "subtracts WEIGHT x that inverter's cross-entropy. What travels is unchanged (the bottom's output); the "
        "blocks, the inverter and this loss stay here, and the blocks are saved to RUN_DIR/private_bottom.safetensors "
        "(mode 0600, outside adapter/: `client push` never sends them; copy them yourself to use the tuned adapter "
        "elsewhere). Its settings (not its weights) are in the privacy context; default 0 (off)",
    )
    parser.add_argument(
        "--private-warmup",
        type=nonneg_int,
        default=0,
        metavar="STEPS",
        help="--private-bottom: steps on public text (Python docstrings) before anything is sent, even the first "
        "evaluation: the inverter term while staying close to the shipped bottom's output; default 0",
    )
    parser.add_argument(
        "--private-lr",
        type=positive_float,
        default=1e-4,
        metavar="LR",
        help="--private-bottom: AdamW learning rate of the bottom blocks (warm-up and tuning); default 1e-4",
    )
    parser.add_argument(
        "--label-noise",
        type=nonneg_float,
        default=0.0,
        metavar="X",
        help="privacy defense for labels: add Gaussian noise to the gradient sent down at the top cut, of expected "
        "norm X times each token's own gradient norm, drawn from a secret the cloud never gets. Your top adapter "
        "trains on the exact gradient; the middle's LoRA and the bottom train on the noisy one; default 0 (off)",
    )

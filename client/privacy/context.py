"""The run's privacy context (RUN_DIR/privacy_context.json): what the attackers may know, read and checked."""

from __future__ import annotations

import json
import os

from ..errors import ClientError
from .defenses import CutNoise
from .record import CONTEXT_FILE

REQUIRED = ("mode", "model_config_json", "layout", "stages_sha256", "model", "defense")
OPTIONAL_SETTINGS = ("private_bottom", "label_defense")  # trained defenses: null or a dict of settings


def read_context(run_dir: str) -> dict:
    """RUN_DIR/privacy_context.json, as `attach` wrote it, checked (one-line ClientError when unusable)."""
    path = os.path.join(run_dir, CONTEXT_FILE)
    if not os.path.exists(path):
        raise ClientError(f"no {CONTEXT_FILE} in {run_dir}: audit a directory written by `client tune`")
    try:
        with open(path) as f:
            context = json.load(f)
    except (OSError, ValueError) as e:
        raise ClientError(f"{path} is not readable JSON ({e}); rerun `client tune`") from None
    check_context(context, path)
    return context


def check_context(context, path: str = CONTEXT_FILE) -> None:
    """Refuses a context the audit cannot use, in one line naming what is wrong."""
    if not isinstance(context, dict):
        raise ClientError(f"{path} holds {type(context).__name__}, not an object; rerun `client tune`")
    missing = [k for k in REQUIRED if k not in context]
    if missing:
        raise ClientError(f"{path} lacks {', '.join(missing)}; rerun `client tune`")
    layout = context["layout"]
    keys = ("num_layers", "bottom", "top")
    if not isinstance(layout, dict) or not all(type(layout.get(k)) is int for k in keys):
        raise ClientError(f"{path}: layout must give integer {', '.join(keys)}, got {layout!r}")
    if not (0 < layout["bottom"] and 0 <= layout["top"] and layout["bottom"] + layout["top"] <= layout["num_layers"]):
        raise ClientError(f"{path}: layout {layout} is not a cut of the model (0 < bottom, bottom + top <= layers)")
    defense_of(context, path)
    for key in OPTIONAL_SETTINGS:
        if context.get(key) is not None and not isinstance(context[key], dict):
            raise ClientError(f"{path}: {key} must be null or an object of settings, got {context[key]!r}")


def defense_of(context: dict, path: str = CONTEXT_FILE) -> CutNoise | None:
    """The run's cut defense, as recorded in its context."""
    settings = context["defense"]
    if not settings:
        return None
    try:
        return CutNoise(
            float(settings["noise_multiplier"]), float(settings["clip_norm"]), float(settings["first_clip_norm"])
        )
    except (KeyError, TypeError, ValueError) as e:
        raise ClientError(f"{path}: defense {settings!r} is not a cut defense ({type(e).__name__}: {e})") from None

"""The data owner's tuned adapter read back for private generation: plain LoRA tensors by slot name, and its config."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

import torch

from tandem.stages.adapter_files import CLIENT_BLOCKS, read_adapter_dir
from tandem.stages.lora import LoraConfig, load_peft_tensors

from .errors import ClientError

LORA_KEY = re.compile(r"(.+)\.lora_([AB])\.weight")  # keys as load_peft_tensors returns them


@dataclass
class OwnAdapter:
    """A peft LoRA adapter: its LoraConfig and (A (r, in), B (out, r)) by full-model slot name, float32."""

    lora: LoraConfig
    tensors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    trained_cut: tuple[int, int] | None = None  # (K, M) of the run that tuned it (its report.json), when known


def trained_cut(adapter_dir: str) -> tuple[int, int] | None:
    """(K, M) from the report.json of the `client tune` run whose adapter/ this is; None when there is none."""
    path = os.path.join(os.path.dirname(os.path.abspath(adapter_dir)), "report.json")
    try:
        with open(path) as f:
            layout = json.load(f)["layout"]
        return int(layout["bottom"]), int(layout["top"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def layers_of(config: dict) -> tuple[int, ...]:
    """peft's layers_to_transform (None, an int or a list) as a tuple; empty: every block."""
    layers = config.get("layers_to_transform")
    if layers is None:
        return ()
    return (int(layers),) if isinstance(layers, int) else tuple(int(i) for i in layers)


def read_adapter(path: str) -> OwnAdapter:
    """Reads a `client tune` run's adapter/ directory (peft format); refuses what private generation cannot run."""
    try:
        files = read_adapter_dir(path)
    except FileNotFoundError as e:
        raise ClientError(f"--adapter: {e}") from None
    if CLIENT_BLOCKS in files:
        raise ClientError(
            f"--adapter: {path} also retunes whole client blocks ({CLIENT_BLOCKS}); private generation runs plain "
            "LoRA adapters (tune without --tune-client-blocks)"
        )
    from .privacy.private_bottom import PRIVATE_BOTTOM_FILE

    if os.path.exists(os.path.join(os.path.dirname(os.path.abspath(path)), PRIVATE_BOTTOM_FILE)):
        raise ClientError(
            f"--adapter: {path} was tuned with a private bottom ({PRIVATE_BOTTOM_FILE} beside it); private "
            "generation runs the shipped bottom blocks, which this adapter was not tuned with"
        )
    config, raw = load_peft_tensors(path)
    plain = config.get("peft_type", "LORA") == "LORA" and not any(
        config.get(k) for k in ("use_dora", "use_rslora", "rank_pattern", "alpha_pattern")
    )
    if not plain:
        raise ClientError("--adapter: only plain LoRA with one r and alpha runs (no DoRA, rsLoRA or per-module ranks)")
    rank = int(config["r"])
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in raw.items():
        match = LORA_KEY.fullmatch(key)
        if match is None:
            raise ClientError(f"--adapter: unexpected tensor {key!r} (not a LoRA A or B weight)")
        pairs.setdefault(match.group(1), {})[match.group(2)] = value.float()
    tensors = {}
    for name, ab in sorted(pairs.items()):
        a, b = ab.get("A"), ab.get("B")
        if a is None or b is None or a.dim() != 2 or b.dim() != 2 or a.shape[0] != rank or b.shape[1] != rank:
            raise ClientError(f"--adapter: {name} lacks lora_A or lora_B, or their shapes do not have rank {rank}")
        tensors[name] = (a, b)
    if not tensors:
        raise ClientError(f"--adapter: {path} holds no LoRA tensors")
    targets = tuple(sorted({name.rsplit(".", 1)[-1] for name in tensors}))
    lora = LoraConfig(
        rank=rank, alpha=float(config.get("lora_alpha", rank)), target_modules=targets, layers=layers_of(config)
    )
    return OwnAdapter(lora, tensors, trained_cut(path))

"""`cloud emulator build` in one call: select blocks, distill on public text, write the package."""
from __future__ import annotations

import logging
import os

from tandem.stages.loading import load_model
from tandem.stages.modules import StageLayout

from .distill import CHECKPOINT, DistillConfig, distill
from .package import build_package
from .select import kept_blocks
from .text import read_texts

log = logging.getLogger(__name__)


def build_emulator(model: str | None, client_blocks: str, out: str, distill_data: str | None, cfg: DistillConfig,
                   drop_ratio: float | None = None, keep: int | None = None) -> dict:
    """Builds an emulator package; returns its manifest.

    Args:
        model: Hugging Face causal-LM directory (None: the embedded default model).
        client_blocks: 'K:M', the adapter blocks the data owner gets (the paper uses 2:2).
        out: Package directory.
        distill_data: Directory of public .txt/.jsonl text (needed when cfg.steps > 0).
        cfg: Distillation settings.
        drop_ratio: Share of middle blocks to drop, or
        keep: number of middle blocks to keep.
    """
    loaded = load_model(model)
    layout = StageLayout.parse(client_blocks, loaded.config)
    kept = kept_blocks(layout.middle_blocks, drop_ratio, keep)
    log.info("emulator keeps middle blocks %s of %s", kept, layout.middle_blocks)
    if cfg.steps > 0:
        if distill_data is None:
            from .errors import TextError

            raise TextError("--distill-data DIR is needed to distill (or pass --steps 0 for a plain layer drop)")
        student, hist = distill(loaded, layout, kept, read_texts(distill_data), cfg, out)
    else:
        from .model import copy_blocks
        from tandem.stages.arch import parts_of

        student, hist = copy_blocks(parts_of(loaded.model), kept), {"config": {"steps": 0}}
    summary = {k: v for k, v in hist.items() if k != "steps"}
    if hist.get("steps"):
        summary["train_kd_first"], summary["train_kd_last"] = hist["steps"][0]["kd"], hist["steps"][-1]["kd"]
    manifest = build_package(loaded, layout, kept, student, out, summary)
    ckpt = os.path.join(out, CHECKPOINT)
    if os.path.exists(ckpt):
        os.remove(ckpt)  # the package is complete; the checkpoint only served resumption
    return manifest

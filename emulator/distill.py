"""Knowledge distillation of the kept middle blocks so the emulator reproduces the full middle's output."""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from tandem.stages.arch import Parts, parts_of
from tandem.stages.loading import LoadedModel
from tandem.stages.modules import BottomStage, StageLayout, run_blocks

from .errors import EmulatorError
from .model import copy_blocks
from .text import pack_blocks, split_blocks

log = logging.getLogger(__name__)

CHECKPOINT = "distill_checkpoint.pt"


@dataclass
class DistillConfig:
    """How the emulator is distilled (Offsite-Tuning: KD on public text, only the emulator trains).

    Attributes:
        steps: Optimizer steps (0 packages the uniformly dropped blocks without distillation).
        batch_size: Blocks of text per step.
        seq_len: Tokens per block.
        lr: AdamW peak learning rate (linear warm-up, then cosine decay to 0).
        warmup: Warm-up steps.
        kd_weight: Weight of the KD loss ((t - s) / rms(t))^2.
        lm_weight: Weight of the next-token loss through the real top stage (0 disables it).
        val_fraction: Share of text blocks held out to validate the KD loss.
        val_every: Steps between validations (also run before the first and after the last step).
        max_val_batches: Cap on validation batches per validation.
        checkpoint_every: Steps between checkpoints.
        seed: Seeds the split and the batch order.
        resume: Continue from the checkpoint in the output directory.
        progress: Show a progress bar.
    """

    steps: int = 200
    batch_size: int = 4
    seq_len: int = 128
    lr: float = 1e-4
    warmup: int = 10
    kd_weight: float = 1.0
    lm_weight: float = 0.0
    val_fraction: float = 0.1
    val_every: int = 50
    max_val_batches: int = 8
    checkpoint_every: int = 50
    seed: int = 0
    resume: bool = False
    progress: bool = True

    def __post_init__(self):
        for name in ("steps", "warmup"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("batch_size", "val_every", "max_val_batches", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.kd_weight < 0 or self.lm_weight < 0 or self.kd_weight + self.lm_weight == 0:
            raise ValueError("lr must be > 0, kd_weight and lm_weight >= 0 and not both 0")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")


def kd_loss(teacher: torch.Tensor, student: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Offsite-Tuning's distillation loss: mean of ((t - s) / sqrt(mean(t^2)))^2 over valid tokens."""
    if mask is None:
        mask = torch.ones(teacher.shape[:2], dtype=teacher.dtype)
    m = mask.to(teacher.dtype).unsqueeze(-1)  # (B, T, 1)
    denom = m.sum() * teacher.shape[-1]
    scale = ((teacher.pow(2) * m).sum() / denom).sqrt().clamp_min(1e-12)
    return (((teacher - student) / scale).pow(2) * m).sum() / denom


@dataclass
class Distiller:
    """Teacher (the full model) and student (the emulator blocks) for one layout and selection."""

    parts: Parts
    layout: StageLayout
    kept: list[int]
    student: nn.ModuleList
    bottom: BottomStage = field(init=False)

    def __post_init__(self):
        self.bottom = BottomStage(self.parts, self.layout.bottom_blocks)
        self.teacher = [self.parts.blocks[i] for i in self.layout.middle_blocks]
        self.top = [self.parts.blocks[i] for i in self.layout.top_blocks]

    def losses(self, ids: torch.Tensor, cfg: DistillConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(weighted total, KD, LM) for a batch of full blocks of ids (B, T)."""
        am = torch.ones_like(ids)
        with torch.no_grad():
            h = self.bottom(ids, am)  # (B, T, H)
            t = run_blocks(self.parts, self.teacher, h, am)  # (B, T, H)
        s = run_blocks(self.parts, self.student, h, am)  # (B, T, H)
        kd = kd_loss(t, s)
        lm = torch.zeros(())
        if cfg.lm_weight > 0:
            logits = self.parts.head(self.parts.norm(run_blocks(self.parts, self.top, s, am)))  # (B, T, V)
            lm = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        return cfg.kd_weight * kd + cfg.lm_weight * lm, kd, lm

    @torch.no_grad()
    def validate(self, val: torch.Tensor, cfg: DistillConfig) -> dict:
        """Mean KD (and LM) loss over held-out blocks."""
        kds, lms = [], []
        for i in range(0, min(len(val), cfg.batch_size * cfg.max_val_batches), cfg.batch_size):
            _, kd, lm = self.losses(val[i : i + cfg.batch_size], cfg)
            kds.append(float(kd))
            lms.append(float(lm))
        return {"kd": sum(kds) / len(kds), "lm": sum(lms) / len(lms)}


def _schedule(cfg: DistillConfig):
    def f(step: int) -> float:
        if step < cfg.warmup:
            return (step + 1) / (cfg.warmup + 1)
        rest = max(1, cfg.steps - cfg.warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - cfg.warmup) / rest)))

    return f


def _save(path: str, payload: dict) -> None:
    tmp = path + ".tmp"
    torch.save(payload, tmp)
    os.replace(tmp, path)


def distill(loaded: LoadedModel, layout: StageLayout, kept: list[int], texts: list[str], cfg: DistillConfig,
            out_dir: str) -> tuple[nn.ModuleList, dict]:
    """Distills the kept middle blocks into an emulator of the whole middle.

    Args:
        loaded: The full model (the teacher), frozen.
        layout: Where the client's stages are cut.
        kept: Full-model indices of the middle blocks the student starts from.
        texts: Public text.
        cfg: Distillation settings.
        out_dir: Where the checkpoint lives (the package directory).

    Returns:
        The student blocks and a history dict (validation KD before/after, per-step losses).
    """
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    parts = parts_of(loaded.model)
    tokenizer = AutoTokenizer.from_pretrained(loaded.path)
    train, val = split_blocks(pack_blocks(texts, tokenizer, cfg.seq_len), cfg.val_fraction, cfg.seed)
    student = copy_blocks(parts, kept)
    student.train(False)  # deterministic: no dropout in the student either
    student.requires_grad_(True)
    d = Distiller(parts, layout, kept, student)
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(cfg))
    ckpt_path = os.path.join(out_dir, CHECKPOINT)
    settings = {"kept": list(kept), "seed": cfg.seed, "seq_len": cfg.seq_len, "batch_size": cfg.batch_size,
                "layout": [layout.num_layers, layout.bottom, layout.top]}
    hist = {"config": asdict(cfg), "train_blocks": len(train), "val_blocks": len(val), "steps": [], "val": []}
    start = 0
    if cfg.resume:
        if not os.path.exists(ckpt_path):
            raise EmulatorError(f"--resume: no {CHECKPOINT} in {out_dir}; run without --resume to start fresh")
        ck = torch.load(ckpt_path, weights_only=False)
        if ck["settings"] != settings:
            raise EmulatorError("--resume: the checkpoint was made with other blocks, seed, layout or batch shape; "
                                "use the same settings or start fresh without --resume")
        student.load_state_dict(ck["student"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        start, hist = ck["step"], ck["history"]
        log.info("resumed distillation at step %d", start)
    else:
        hist["val"].append({"step": 0, **d.validate(val, cfg)})
    os.makedirs(out_dir, exist_ok=True)
    per_epoch = max(1, len(train) // cfg.batch_size)
    bar = tqdm(total=cfg.steps, initial=start, desc="distill", unit="step", disable=not cfg.progress)
    for step in range(start, cfg.steps):
        epoch, i = divmod(step, per_epoch)
        perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed * 7919 + epoch))
        ids = train[perm[i * cfg.batch_size : (i + 1) * cfg.batch_size]]  # (B, T)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss, kd, lm = d.losses(ids, cfg)
        loss.backward()
        opt.step()
        sched.step()
        hist["steps"].append({"step": step, "loss": float(loss.detach()), "kd": float(kd.detach()), "lm": float(lm.detach()),
                              "wall_s": time.perf_counter() - t0})
        bar.update(1)
        bar.set_postfix(kd=f"{hist['steps'][-1]['kd']:.4f}", val_kd=f"{hist['val'][-1]['kd']:.4f}")
        if (step + 1) % cfg.val_every == 0 or step + 1 == cfg.steps:
            hist["val"].append({"step": step + 1, **d.validate(val, cfg)})
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            _save(ckpt_path, {"student": student.state_dict(), "optimizer": opt.state_dict(),
                              "scheduler": sched.state_dict(), "step": step + 1, "history": hist, "settings": settings})
    bar.close()
    student.requires_grad_(False)
    hist["val_kd_before"] = hist["val"][0]["kd"]
    hist["val_kd_after"] = hist["val"][-1]["kd"]
    return student, hist

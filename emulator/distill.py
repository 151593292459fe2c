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
from tandem.stages.resume_settings import differing

from .errors import EmulatorError
from .model import MAX_SLOT_SCALE, copy_blocks, scaled_slots
from .text import pack_blocks, split_blocks

log = logging.getLogger(__name__)

CHECKPOINT = "distill_checkpoint.pt"
INITS = ("copy", "rescale")
# Learned slot scales (--slot-scales learn) train at this multiple of the blocks' learning rate: a scale is one number
# for a whole slot, and AdamW moves a parameter by about lr per step, so at the blocks' rate a scale could move only
# ~0.1 in 100 steps.
SCALE_LR_FACTOR = 10.0


@dataclass
class DistillConfig:
    """How the emulator is distilled (Offsite-Tuning: KD on public text, only the emulator trains).

    Attributes:
        steps: Optimizer steps (0 packages the uniformly dropped blocks without distillation).
        batch_size: Blocks of text per step.
        seq_len: Tokens per block.
        lr: AdamW peak learning rate (linear warm-up, then cosine decay to 0).
        warmup: Warm-up steps.
        kd_weight: Weight of the KD loss ((t - s) / rms(t))^2 on the middle's output.
        lm_weight: Weight of the next-token loss through the real top stage (0 disables it).
        kl_weight: Weight of KL(teacher || student) between the next-token distributions computed
            through the frozen top blocks, norm and head (the parts the data owner holds); 0 disables it.
        layer_weight: Weight of per-layer matching: the mean KD loss of every kept block's output
            (but the last, which kd_weight covers) against the teacher's hidden state at the matching
            depth (right before the next kept block); 0 disables it.
        jacobian_weight: Weight of matching how the middle's output moves when its input moves: for a
            random per-token perturbation d of the middle's input h (RMS jacobian_eps of h's), the mean over
            tokens of |(T(h+d)-T(h)) - (S(h+d)-S(h))|^2 / |T(h+d)-T(h)|^2 (a finite-difference Jacobian
            match). The data owner's bottom adapter learns through the emulator's Jacobian, not its output;
            0 disables it. Costs a teacher pass over the whole middle and a second student pass per step.
        jacobian_eps: Size of that perturbation, relative to each token's RMS.
        init: How the student starts: "copy" (the kept blocks as they are) or "rescale" (each kept
            block's residual update scaled by a factor fitted to the teacher on a few public batches,
            folded into the block's output projections; the blocks stay standard blocks).
        init_batches: Public batches used to fit the rescaling factors.
        kd_norm: "global" (one teacher RMS over the batch, the paper's) or "token" (each token by its own
            teacher RMS) for the KD, per-layer and rescaling losses.
        cache_teacher: Compute the teacher's outputs on the training text once and reuse them
            (the teacher is frozen); costs memory of a few hidden states per training token.
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
    kl_weight: float = 0.0
    layer_weight: float = 0.0
    jacobian_weight: float = 0.0
    jacobian_eps: float = 0.05
    init: str = "copy"
    init_batches: int = 2
    kd_norm: str = "global"
    cache_teacher: bool = True
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
        for name in ("batch_size", "val_every", "max_val_batches", "checkpoint_every", "init_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        weights = (self.kd_weight, self.lm_weight, self.kl_weight, self.layer_weight, self.jacobian_weight)
        if self.lr <= 0 or min(weights) < 0 or sum(weights) == 0:
            raise ValueError(
                "lr must be > 0, kd_weight, lm_weight, kl_weight, layer_weight and jacobian_weight >= 0 and not all 0"
            )
        if self.jacobian_eps <= 0:
            raise ValueError(f"jacobian_eps must be > 0, got {self.jacobian_eps}")
        if self.kd_norm not in ("global", "token"):
            raise ValueError(f"kd_norm must be global or token, got {self.kd_norm!r}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {', '.join(INITS)}, got {self.init!r}")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")


def kd_loss(
    teacher: torch.Tensor, student: torch.Tensor, mask: torch.Tensor | None = None, per_token: bool = False
) -> torch.Tensor:
    """Offsite-Tuning's distillation loss: mean of ((t - s) / sqrt(mean(t^2)))^2 over valid tokens.

    With per_token=True every token is normalised by its own teacher RMS: mean over valid tokens of
    |t - s|^2 / |t|^2. Llama-family models put a few massive activations on the first token (the attention
    sink, here ~40x the norm of the others); with one global scale that token is nearly all of the loss.
    """
    if mask is None:
        mask = torch.ones(teacher.shape[:2], dtype=teacher.dtype)
    m = mask.to(teacher.dtype).unsqueeze(-1)  # (B, T, 1)
    if per_token:
        err = (teacher - student).pow(2).sum(-1, keepdim=True) / teacher.pow(2).sum(-1, keepdim=True).clamp_min(1e-12)
        return (err * m).sum() / m.sum()
    denom = m.sum() * teacher.shape[-1]
    scale = ((teacher.pow(2) * m).sum() / denom).sqrt().clamp_min(1e-12)
    return (((teacher - student) / scale).pow(2) * m).sum() / denom


def residual_outputs(block: nn.Module) -> list[nn.Module]:
    """The layers that write a block's residual update: the attention and MLP output projections.

    Llama-family blocks (Llama, SmolLM2, Qwen2, Mistral): self_attn.o_proj and mlp.down_proj;
    GPT-2 blocks: attn.c_proj and mlp.c_proj.
    """
    out = []
    for a, b in (("self_attn", "o_proj"), ("mlp", "down_proj"), ("attn", "c_proj"), ("mlp", "c_proj")):
        m = getattr(getattr(block, a, None), b, None)
        if m is not None and all(m is not o for o in out):
            out.append(getattr(m, "base_layer", m))
    if len(out) != 2:
        raise EmulatorError(
            f"cannot find the residual output projections of a {type(block).__name__}; "
            "--init rescale supports Llama-family and GPT-2 blocks (use --init copy)"
        )
    return out


@torch.no_grad()
def scale_residual(block: nn.Module, factor: float) -> None:
    """Multiplies the block's residual update projections (weights and biases) by factor, in place."""
    for m in residual_outputs(block):
        m.weight.mul_(factor)
        if getattr(m, "bias", None) is not None:
            m.bias.mul_(factor)


@dataclass
class Distiller:
    """Teacher (the full model) and student (the emulator blocks) for one layout and selection."""

    parts: Parts
    layout: StageLayout
    kept: list[int]
    student: nn.ModuleList
    slots: list[int] | None = None  # a shared student's slot map (tandem.emulator.share); None: one slot per block
    slot_blocks: list[int] | None = None  # the full-model block each slot stands for (None: the kept blocks)
    # Per-slot update scales (tandem.emulator.share.fit_slot_scales): a list stays fixed, a tensor (one entry per
    # slot, an nn.Parameter) trains with the blocks (--slot-scales learn).
    scales: list[float] | torch.Tensor | None = None
    bottom: BottomStage = field(init=False)

    def __post_init__(self):
        self.bottom = BottomStage(self.parts, self.layout.bottom_blocks)
        middle = self.layout.middle_blocks
        stands_for = self.kept if self.slot_blocks is None else self.slot_blocks
        # Teacher segment j: from slot j's block up to (not including) slot j+1's; segment 0 starts at the
        # middle's first block. The teacher's state after segment j is student slot j's per-layer target.
        bounds = [middle[0]] + list(stands_for[1:]) + [middle[-1] + 1]
        self.segments = [[self.parts.blocks[i] for i in range(a, b)] for a, b in zip(bounds[:-1], bounds[1:])]
        self.top = [self.parts.blocks[i] for i in self.layout.top_blocks]

    @torch.no_grad()
    def teacher(self, ids: torch.Tensor, cfg: DistillConfig, every_layer: bool | None = None) -> dict:
        """Frozen-model outputs for ids (B, T): 'h' the middle's input, 'targets' the states after each
        segment (only the last, the middle's output, unless per-layer targets are needed), and 'top' the
        top blocks' output on the teacher's middle output (when the KL loss needs it)."""
        am = torch.ones_like(ids)
        every = (cfg.layer_weight > 0) if every_layer is None else every_layer
        h = self.bottom(ids, am)  # (B, T, H)
        targets, t = [], h
        for seg in self.segments:
            t = run_blocks(self.parts, seg, t, am)  # (B, T, H)
            targets.append(t)
        out = {"h": h, "targets": targets if every else targets[-1:]}
        if cfg.kl_weight > 0:
            out["top"] = run_blocks(self.parts, self.top, t, am)  # (B, T, H)
        return out

    def slot_modules(self) -> list[nn.Module]:
        """The student block of every slot, in order: a shared block is the same module in each of its slots, so
        its gradient is the sum of its slots' gradients."""
        return list(self.student) if self.slots is None else [self.student[i] for i in self.slots]

    def student_states(self, h: torch.Tensor, am: torch.Tensor, every: bool) -> list[torch.Tensor]:
        """Outputs of every student slot (every=True) or only of the last, each (B, T, H)."""
        slots = scaled_slots(self.slot_modules(), self.scales)
        if not every:
            return [run_blocks(self.parts, slots, h, am)]
        out = []
        for block in slots:
            h = run_blocks(self.parts, [block], h, am)
            out.append(h)
        return out

    def logits(self, h: torch.Tensor, am: torch.Tensor, through_top: bool = True) -> torch.Tensor:
        """Next-token logits (B, T, V) of a middle output h through the frozen top blocks, norm and head."""
        if through_top:
            h = run_blocks(self.parts, self.top, h, am)
        return self.parts.head(self.parts.norm(h))

    def losses(self, ids: torch.Tensor, cfg: DistillConfig, teacher: dict | None = None, step: int = -1) -> dict:
        """Weighted total ('loss') and its terms ('kd', 'lm', 'kl', 'layer', 'jac') for a batch of ids (B, T).

        Args:
            teacher: This batch's teacher outputs (from a cache); computed here when None.
            step: Seeds the Jacobian term's perturbation (with cfg.seed), so a resumed run draws the same ones.
        """
        am = torch.ones_like(ids)
        if teacher is None:
            teacher = self.teacher(ids, cfg)
        every = cfg.layer_weight > 0
        states = self.student_states(teacher["h"], am, every)
        s = states[-1]
        tok = cfg.kd_norm == "token"
        out = {
            "kd": kd_loss(teacher["targets"][-1], s, per_token=tok),
            "lm": torch.zeros(()),
            "kl": torch.zeros(()),
            "layer": torch.zeros(()),
            "jac": torch.zeros(()),
        }
        if cfg.jacobian_weight > 0:
            out["jac"] = self.jacobian_loss(teacher["h"], teacher["targets"][-1], s, am, cfg, step)
        if every and len(states) > 1:
            out["layer"] = torch.stack(
                [kd_loss(t, x, per_token=tok) for t, x in zip(teacher["targets"][:-1], states[:-1])]
            ).mean()
        if cfg.lm_weight > 0 or cfg.kl_weight > 0:
            logits = self.logits(s, am)  # (B, T, V)
            if cfg.lm_weight > 0:
                out["lm"] = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
            if cfg.kl_weight > 0:
                with torch.no_grad():
                    t_logp = F.log_softmax(self.logits(teacher["top"], am, through_top=False), -1).flatten(0, 1)
                s_logp = F.log_softmax(logits, -1).flatten(0, 1)  # (B*T, V)
                out["kl"] = F.kl_div(s_logp, t_logp, log_target=True, reduction="batchmean")
        out["loss"] = (
            cfg.kd_weight * out["kd"]
            + cfg.lm_weight * out["lm"]
            + cfg.kl_weight * out["kl"]
            + cfg.layer_weight * out["layer"]
            + cfg.jacobian_weight * out["jac"]
        )
        return out

    def jacobian_loss(
        self, h: torch.Tensor, t: torch.Tensor, s: torch.Tensor, am: torch.Tensor, cfg: DistillConfig, step: int
    ) -> torch.Tensor:
        """Finite-difference Jacobian match (DistillConfig.jacobian_weight) at the middle's input h (B, T, H),
        given the teacher's and the student's outputs t, s on h."""
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step + 1)
        rms = h.detach().pow(2).mean(-1, keepdim=True).sqrt()  # (B, T, 1)
        moved = h + cfg.jacobian_eps * rms * torch.randn(h.shape, generator=g, dtype=h.dtype)
        with torch.no_grad():
            dt = run_blocks(self.parts, [b for seg in self.segments for b in seg], moved, am) - t  # (B, T, H)
        ds = self.student_states(moved, am, False)[-1] - s
        return kd_loss(dt, ds, per_token=True)

    @torch.no_grad()
    def validate(self, val: torch.Tensor, cfg: DistillConfig) -> dict:
        """Mean KD, LM and KL losses over held-out blocks (LM and KL whatever their training weight)."""
        vcfg = DistillConfig(**{**asdict(cfg), "lm_weight": 1.0, "kl_weight": 1.0})
        sums: dict[str, list[float]] = {"kd": [], "lm": [], "kl": []}
        if cfg.jacobian_weight > 0:
            sums["jac"] = []
        for i in range(0, min(len(val), cfg.batch_size * cfg.max_val_batches), cfg.batch_size):
            out = self.losses(val[i : i + cfg.batch_size], vcfg)
            for k in sums:
                sums[k].append(float(out[k]))
        return {k: sum(v) / len(v) for k, v in sums.items()}

    @torch.no_grad()
    def rescale(self, ids: torch.Tensor, cfg: DistillConfig) -> list[float]:
        """Residual rescaling init: for each student block in turn, the factor on its residual update that
        minimises the KD loss of its output against the teacher's state at the matching depth (given the
        already rescaled blocks below), by a search over a log grid; folded into the block's weights.

        Args:
            ids: Public blocks (N, T) to fit on.

        Returns:
            The factor of every student block (all 1.0 when the fitted ones would not lower the KD loss
            of the output on these blocks: the student then stays the plain copy).
        """
        batches = [ids[i : i + cfg.batch_size] for i in range(0, len(ids), cfg.batch_size)]
        ams = [torch.ones_like(b) for b in batches]
        teach = [self.teacher(b, cfg, every_layer=True) for b in batches]
        xs = [t["h"] for t in teach]
        factors, tok = [], cfg.kd_norm == "token"

        def final_err(states: list[torch.Tensor]) -> float:
            return sum(float(kd_loss(t["targets"][-1], x, per_token=tok)) for t, x in zip(teach, states))

        if self.slots is not None:
            raise EmulatorError("--init rescale fits one factor per block and slot; use --init copy with sharing")
        copy_err = final_err([run_blocks(self.parts, self.student, x, am) for x, am in zip(xs, ams)])
        originals = [{k: v.clone() for k, v in b.state_dict().items()} for b in self.student]
        for j, block in enumerate(self.student):
            mods = residual_outputs(block)
            orig = [(m.weight.clone(), None if getattr(m, "bias", None) is None else m.bias.clone()) for m in mods]

            def set_factor(f: float) -> None:
                for m, (w, b) in zip(mods, orig):  # noqa: B023 - called only within this iteration
                    m.weight.copy_(w * f)
                    if b is not None:
                        m.bias.copy_(b * f)

            def err(f: float) -> float:
                set_factor(f)
                return sum(
                    float(kd_loss(t["targets"][j], run_blocks(self.parts, [block], x, am), per_token=tok))  # noqa: B023
                    for t, x, am in zip(teach, xs, ams)  # noqa: B023 - called only within this iteration
                )

            tried: dict[float, float] = {}
            for f in [2 ** (k / 2) for k in range(-4, 7)]:  # 1/4 .. 8
                tried[f] = err(f)
            best = min(tried, key=tried.get)
            for f in [best * 2 ** (k / 8) for k in (-2, -1, 1, 2)]:
                tried[f] = err(f)
            best = min(tried, key=tried.get)
            set_factor(best)
            factors.append(best)
            xs = [run_blocks(self.parts, [block], x, am) for x, am in zip(xs, ams)]
        if final_err(xs) >= copy_err:  # the greedy per-block fit can miss on the output: never start worse
            for b, st in zip(self.student, originals):
                b.load_state_dict(st)
            factors = [1.0] * len(factors)
        return factors


class TeacherCache:
    """The teacher's outputs on every training block, computed once (the teacher never changes)."""

    def __init__(self, d: Distiller, train: torch.Tensor, cfg: DistillConfig):
        chunks = [d.teacher(train[i : i + cfg.batch_size], cfg) for i in range(0, len(train), cfg.batch_size)]
        self.data = {k: torch.cat([c[k] for c in chunks]) for k in ("h", "top") if k in chunks[0]}
        self.targets = [torch.cat([c["targets"][j] for c in chunks]) for j in range(len(chunks[0]["targets"]))]

    def get(self, idx: torch.Tensor) -> dict:
        return {**{k: v[idx] for k, v in self.data.items()}, "targets": [t[idx] for t in self.targets]}


def learnable(scales: list[float]) -> nn.Parameter:
    """Slot scales as one trainable tensor (slots,), for a distillation that learns them."""
    return nn.Parameter(torch.tensor([float(x) for x in scales], dtype=torch.float32))


def build_optimizer(student: nn.ModuleList, scales, cfg: DistillConfig) -> torch.optim.Optimizer:
    """AdamW over the student's blocks, and over learned slot scales (a tensor) at SCALE_LR_FACTOR x the rate."""
    groups = [{"params": list(student.parameters())}]
    if isinstance(scales, torch.Tensor):
        groups.append({"params": [scales], "lr": cfg.lr * SCALE_LR_FACTOR})
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=0.0)


def _schedule(cfg: DistillConfig):
    def f(step: int) -> float:
        if step < cfg.warmup:
            return (step + 1) / (cfg.warmup + 1)
        rest = max(1, cfg.steps - cfg.warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - cfg.warmup) / rest)))

    return f


def _check_finite(value: float, step: int) -> None:
    """Stops a distillation that diverged (a loss or a trained weight not finite) before it is stepped on,
    checkpointed or packaged: NaN weights would otherwise ship in a package that loads."""
    if not math.isfinite(value):
        raise EmulatorError(
            f"distillation diverged at step {step + 1} (not finite): lower --lr and start fresh without --resume "
            "(a resumed run repeats the same steps)"
        )


def _all_finite(student: nn.ModuleList, scales) -> bool:
    """Whether every trained weight (and learned scale) is finite: a step can turn them NaN with a finite loss."""
    tensors = [*student.parameters(), *([scales] if scales is not None else [])]
    return bool(torch.stack([t.detach().isfinite().all() for t in tensors]).all())


def _load_checkpoint(path: str, out_dir: str, settings: dict) -> dict:
    """The distillation checkpoint --resume continues from, refused in one line when it is missing, unreadable,
    not made of tensors and plain values, or made with other settings (named)."""
    if not os.path.exists(path):
        raise EmulatorError(f"--resume: no {CHECKPOINT} in {out_dir}; run without --resume to start fresh")
    try:  # tensors and plain values only: a planted or swapped file must not run code when loaded
        ck = torch.load(path, weights_only=True, map_location="cpu")
    except Exception:  # torch's unpickler refused it (any other object), or the file is damaged
        ck = None
    if not isinstance(ck, dict) or not isinstance(ck.get("settings"), dict):
        raise EmulatorError(
            f"--resume: {path} is unreadable, damaged or holds more than tensors and plain values (it is "
            "not loaded); start fresh without --resume"
        )
    saved = ck["settings"]
    structure = {k: v for k, v in settings.items() if k not in OBJECTIVE}
    objective = {k: v for k, v in settings.items() if k in OBJECTIVE}  # older checkpoints lack these: not refused
    changed = differing(saved, structure) + differing(saved, objective, missing_differs=False)
    changed += [k for k in saved if k not in settings]
    if changed:
        raise EmulatorError(
            f"--resume: the checkpoint was made with other settings ({', '.join(map(str, changed))[:200]}); use the "
            "same blocks, seed, layout, init, batch shape, slot scales, steps, rate and loss weights, or start fresh "
            "without --resume"
        )
    return ck


def _restore(ck: dict, path: str, student: nn.ModuleList, scales, opt, sched, steps: int) -> tuple[int, dict]:
    """Loads a checkpoint whose settings match into the student, its learned scales (a tensor, or None), the
    optimizer and the schedule; returns (step, history). A file whose contents do not fit is refused in one line."""
    try:
        if scales is not None:
            saved = ck["slot_scales"]
            if not isinstance(saved, torch.Tensor) or saved.shape != scales.shape or not saved.isfinite().all():
                raise ValueError(f"slot_scales must be {scales.numel()} finite numbers")
            if saved.abs().max() > MAX_SLOT_SCALE:
                raise ValueError(f"slot_scales past {MAX_SLOT_SCALE:g}")
            scales.data.copy_(saved)
        student.load_state_dict(ck["student"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        start, hist = ck["step"], ck["history"]
        if not isinstance(start, int) or isinstance(start, bool) or not 0 <= start <= steps:
            raise ValueError(f"its step {str(start)[:20]} is not one of this run's 0..{steps} (--steps)")
        if not isinstance(hist, dict) or not all(isinstance(hist.get(k), list) for k in ("steps", "val")):
            raise TypeError("the history is not a dict of step and validation records")
    except torch.OutOfMemoryError:
        raise  # not the checkpoint's fault: it stays usable
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError) as e:
        first = (str(e).strip().splitlines() or [""])[0][:160]
        raise EmulatorError(
            f"--resume: {path} does not fit this run ({type(e).__name__}: {first}); start fresh without --resume"
        ) from None
    return start, hist


def save_checkpoint(path: str, payload: dict) -> None:
    """Writes the distillation checkpoint atomically (a .tmp file, then a rename)."""
    tmp = path + ".tmp"
    torch.save(payload, tmp)
    os.replace(tmp, path)


def distill(
    loaded: LoadedModel,
    layout: StageLayout,
    kept: list[int],
    texts: list[str],
    cfg: DistillConfig,
    out_dir: str,
    student: nn.ModuleList | None = None,
    slots: list[int] | None = None,
    slot_blocks: list[int] | None = None,
    scales: list[float] | None = None,
    learn_scales: bool = False,
) -> tuple[nn.ModuleList, dict]:
    """Distills the kept middle blocks into an emulator of the whole middle.

    Args:
        loaded: The full model (the teacher), frozen.
        layout: Where the client's stages are cut.
        kept: Full-model indices of the middle blocks the student starts from.
        texts: Public text.
        cfg: Distillation settings.
        out_dir: Where the checkpoint lives (the package directory).
        student: The blocks to start from, one per kept block (a width-pruned copy, tandem.emulator.prune);
            None: copies of the kept blocks.
        slots, slot_blocks: a shared emulator's slot map (tandem.emulator.share): slot i runs student block
            slots[i] in place of full-model block slot_blocks[i]; each unique block trains on all its slots.
        scales: a shared student's per-slot update scales (tandem.emulator.share.fit_slot_scales), kept fixed...
        learn_scales: ...unless True: then they are where the scales start, they train with the blocks (at
            SCALE_LR_FACTOR times the rate, clamped to MAX_SLOT_SCALE), and the history's "slot_scales" holds
            the learned ones.

    Returns:
        The student blocks and a history dict (validation KD before/after, per-step losses).
    """
    from tandem.stages.loading import load_tokenizer

    parts = parts_of(loaded.model)
    tokenizer = load_tokenizer(loaded.path)
    train, val = split_blocks(pack_blocks(texts, tokenizer, cfg.seq_len), cfg.val_fraction, cfg.seed)
    student = copy_blocks(parts, kept) if student is None else student
    _check_student(student, kept, slots, slot_blocks, cfg, scales if learn_scales else [])
    student.train(False)  # deterministic: no dropout in the student either
    d = Distiller(parts, layout, kept, student, slots, slot_blocks, learnable(scales) if learn_scales else scales)
    ckpt_path = os.path.join(out_dir, CHECKPOINT)
    settings = run_settings(layout, kept, cfg, student, slots, slot_blocks, scales, learn_scales)
    hist = {"config": asdict(cfg), "train_blocks": len(train), "val_blocks": len(val), "steps": [], "val": []}
    start = 0
    if cfg.resume:
        ck = _load_checkpoint(ckpt_path, out_dir, settings)
    else:
        _first_validation(d, train, val, cfg, hist)
    student.requires_grad_(True)
    opt = build_optimizer(student, d.scales, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(cfg))
    if cfg.resume:
        start, hist = _restore(ck, ckpt_path, student, d.scales if learn_scales else None, opt, sched, cfg.steps)
        log.info("resumed distillation at step %d", start)
    os.makedirs(out_dir, exist_ok=True)
    run = _Run(d, opt, sched, cfg, learn_scales, ckpt_path, settings)
    run.train(train, val, hist, start)
    student.requires_grad_(False)
    if learn_scales:
        hist["slot_scales"] = [float(x) for x in d.scales.detach()]
        log.info("learned slot scales %s", [round(a, 3) for a in hist["slot_scales"]])
    hist["val_kd_before"] = hist["val"][0]["kd"]
    hist["val_kd_after"] = hist["val"][-1]["kd"]
    return student, hist


def _check_student(student, kept, slots, slot_blocks, cfg: DistillConfig, learn_from) -> None:
    """Refuses a student that does not fit its kept blocks and slot map (`learn_from`: the scales a learning
    run starts from, None when missing; [] when not learning)."""
    if len(student) != len(kept):
        raise EmulatorError(f"{len(student)} student blocks for {len(kept)} kept blocks")
    if slots is not None and (slot_blocks is None or len(slot_blocks) != len(slots)):
        raise EmulatorError("a shared student needs the full-model block of every slot: one per slot")
    if cfg.init == "rescale" and slots is not None:
        raise EmulatorError("--init rescale fits one factor per block and slot; use --init copy with sharing")
    if learn_from is None:
        raise EmulatorError("learning slot scales needs the scales to start from (--slot-scales learn)")


# The settings a resumed run's steps depend on besides its structure: its schedule, objective and data split.
OBJECTIVE = (
    "steps", "lr", "warmup", "kd_weight", "lm_weight", "kl_weight", "layer_weight", "jacobian_weight", "jacobian_eps",
    "val_fraction",
)  # fmt: skip


def run_settings(layout, kept, cfg: DistillConfig, student, slots, slot_blocks, scales, learn_scales) -> dict:
    """What a checkpoint must match to be resumed: the run's structure and the settings its steps depend on."""
    settings = {
        "kept": list(kept),
        "seed": cfg.seed,
        "seq_len": cfg.seq_len,
        "batch_size": cfg.batch_size,
        "layout": [layout.num_layers, layout.bottom, layout.top],
        "init": cfg.init,
        "kd_norm": cfg.kd_norm,
        "student_params": sum(p.numel() for p in student.parameters()),
    }
    if slots is not None:  # a key only when shared, so an unshared run's checkpoint still resumes
        settings["slots"], settings["slot_blocks"] = list(slots), list(slot_blocks or kept)
    if scales is not None:
        settings["slot_scales"] = [float(x) for x in scales]
    if learn_scales:  # a key only when learning, so a fixed-scale run's checkpoint still resumes
        settings["slot_scales_learn"] = True
    return settings | {k: getattr(cfg, k) for k in OBJECTIVE}


def _first_validation(d: Distiller, train, val, cfg: DistillConfig, hist: dict) -> None:
    """A fresh run's validation at step 0, and the residual rescaling when asked for (validated again)."""
    hist["val"].append({"step": 0, "init": "copy", **d.validate(val, cfg)})
    if cfg.init == "rescale":
        t0 = time.perf_counter()
        hist["rescale_factors"] = d.rescale(train[: cfg.batch_size * cfg.init_batches], cfg)
        hist["rescale_s"] = time.perf_counter() - t0
        log.info("residual rescaling factors %s", [round(f, 3) for f in hist["rescale_factors"]])
        hist["val"].append({"step": 0, "init": "rescale", **d.validate(val, cfg)})


class _Run:
    """The distillation's steps from `start`: batches, updates, validations and checkpoints."""

    def __init__(self, d: Distiller, opt, sched, cfg: DistillConfig, learn_scales: bool, ckpt_path: str, settings):
        self.d, self.opt, self.sched, self.cfg = d, opt, sched, cfg
        self.learn_scales, self.ckpt_path, self.settings = learn_scales, ckpt_path, settings

    def train(self, train, val, hist: dict, start: int) -> None:
        from tqdm.auto import tqdm

        cfg = self.cfg
        per_epoch = max(1, len(train) // cfg.batch_size)
        # The cache pays off once a block is seen twice: with more than one epoch of steps. (Decided on the
        # whole run, not on what is left, so that a resumed run computes exactly what an uninterrupted one does.)
        cache = None
        if cfg.cache_teacher and cfg.steps > per_epoch and start < cfg.steps:
            t0 = time.perf_counter()
            cache = TeacherCache(self.d, train, cfg)
            hist["teacher_cache_s"] = hist.get("teacher_cache_s", 0.0) + time.perf_counter() - t0
        bar = tqdm(total=cfg.steps, initial=start, desc="distill", unit="step", disable=not cfg.progress)
        for step in range(start, cfg.steps):
            epoch, i = divmod(step, per_epoch)
            perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed * 7919 + epoch))
            idx = perm[i * cfg.batch_size : (i + 1) * cfg.batch_size]
            hist["steps"].append(self.step(train[idx], cache.get(idx) if cache is not None else None, step))
            bar.update(1)
            bar.set_postfix(kd=f"{hist['steps'][-1]['kd']:.4f}", val_kd=f"{hist['val'][-1]['kd']:.4f}")
            if (step + 1) % cfg.val_every == 0 or step + 1 == cfg.steps:
                hist["val"].append({"step": step + 1, **self.d.validate(val, cfg)})
            if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
                self.checkpoint(step, hist)
        bar.close()

    def step(self, ids: torch.Tensor, cached, step: int) -> dict:
        """One update on the (B, T) batch `ids`; returns its record."""
        t0 = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        out = self.d.losses(ids, self.cfg, cached, step)
        _check_finite(float(out["loss"].detach()), step)
        out["loss"].backward()
        self.opt.step()
        if self.learn_scales:
            with torch.no_grad():
                self.d.scales.clamp_(-MAX_SLOT_SCALE, MAX_SLOT_SCALE)  # what a package may hold
        self.sched.step()
        return {"step": step, **{k: float(v.detach()) for k, v in out.items()}, "wall_s": time.perf_counter() - t0}

    def checkpoint(self, step: int, hist: dict) -> None:
        """Saves the run after `step`; the weights must be finite (a finite loss can still step them to NaN)."""
        student, scales = self.d.student, self.d.scales if self.learn_scales else None
        _check_finite(0.0 if _all_finite(student, scales) else math.nan, step)
        payload = {
            "student": student.state_dict(),
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "step": step + 1,
            "history": hist,
            "settings": self.settings,
        }
        if self.learn_scales:
            payload["slot_scales"] = self.d.scales.detach().clone()
        save_checkpoint(self.ckpt_path, payload)

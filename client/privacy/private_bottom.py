"""The private bottom: the client tunes its K bottom blocks against an inverter it refits on their outputs.

The cloud's strongest attacks assume it knows the client's bottom stage (it shipped it). A private bottom
is trained by the client, on its own machine, to stay useful to the middle (the run's task loss) while a
learned inverter fails on its output: each step the client refits a ridge inverter (the cloud's attack b,
attacks.RidgeInverter) on recent bottom outputs of its own text and of public text, and the bottom's loss
subtracts `weight` times that inverter's cross-entropy (cosine scores against the input embeddings,
capped at ln V per token). The inverter is closed-form, so the algorithm has no random draws of its own.
An optional warm-up runs the same adversarial term on public text before anything is sent, with "stay
close to the shipped bottom's output" standing in for the task loss (client-local: no middle needed).

Nothing of this travels: the bottom's output is what the cloud receives, as in any run; the blocks, the
inverter and the extra loss stay here. The blocks are saved to RUN_DIR/private_bottom.safetensors (0600,
outside adapter/, so `client push` never sends them). `train_private_bottom` re-runs the algorithm on
public text from the cloud's knowledge (the adaptive attacker's shadow of the defense).
"""

from __future__ import annotations

import copy
import math
import os
from collections import deque
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from safetensors.torch import save as st_save

from tandem.stages.arch import arch_for, positions
from tandem.stages.modules import run_blocks

from .. import rundir
from ..errors import ClientError
from .attacks import public_ids
from .defenses import keyed_normal, new_secret

ALGORITHM = "ridge-adversary/v1"
PRIVATE_BOTTOM_FILE = "private_bottom.safetensors"  # RUN_DIR/...: the tuned bottom blocks, full-model key names
SCALE = 20.0  # the inverter's token scores: SCALE x cosine(predicted embedding, embedding)
PUBLIC_SEQ = 64  # tokens per public-text row


@dataclass(frozen=True)
class PrivateBottomSettings:
    """The algorithm's settings; all of them are in the run's privacy context (the attacker may know them).

    Attributes:
        weight: Weight of the inverter's cross-entropy the bottom maximizes (--private-bottom).
        warmup: Optimizer steps on public text before the run sends anything (--private-warmup).
        lr: AdamW learning rate of the bottom blocks (--private-lr).
        window: Training steps of the client's own bottom outputs the inverter is refitted on.
        public_tokens: Public-text tokens (through the current bottom) added to every refit.
        lam: Ridge regularization, relative to the Gram matrix's mean diagonal.
    """

    weight: float
    warmup: int = 0
    lr: float = 1e-4
    window: int = 8
    public_tokens: int = 256
    lam: float = 1e-2

    def __post_init__(self):
        if not (self.weight > 0 and math.isfinite(self.weight)) or self.warmup < 0 or not self.lr > 0:
            raise ValueError(
                f"private bottom: weight and lr must be > 0 and warmup >= 0, got {self.weight}, {self.lr}, {self.warmup}"
            )

    def describe(self) -> dict:
        return {"algorithm": ALGORITHM} | asdict(self)

    @classmethod
    def from_context(cls, entry: dict) -> PrivateBottomSettings:
        """The settings of a privacy context's "private_bottom" entry."""
        if entry.get("algorithm") != ALGORITHM:
            raise ValueError(f"unknown private-bottom algorithm {entry.get('algorithm')!r}")
        return cls(**{k: v for k, v in entry.items() if k != "algorithm"})


class Inverter:
    """The client's stand-in for the cloud's learned inverter: ridge from bottom outputs to input embeddings."""

    def __init__(self, embedding: torch.Tensor, window: int, lam: float):
        self.embedding = embedding.detach().float()  # (V, H)
        self.kept: deque = deque(maxlen=window)  # (states (n, H), ids (n,)) of recent steps, detached
        self.lam = lam
        self.w: torch.Tensor | None = None  # (H+1, H)

    def remember(self, h: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> None:
        """Keeps the valid positions (all but the first: an outlier the attacks fit apart) of one batch."""
        states, targets = valid(h.detach().float(), ids, mask)
        self.kept.append((states.cpu(), targets.cpu()))

    def refit(self, fresh: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """Solves the ridge regression on the kept states plus `fresh` ones (e.g. public text through the bottom)."""
        pairs = list(self.kept) + ([fresh] if fresh is not None else [])
        x = torch.cat([p[0] for p in pairs]).double()
        xa = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)  # (n, H+1)
        y = self.embedding.cpu()[torch.cat([p[1] for p in pairs])].double()  # (n, H)
        gram = xa.T @ xa
        reg = self.lam * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype)
        self.w = torch.linalg.solve(gram + reg, xa.T @ y).float()

    def loss(self, h: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy (each token's capped at ln V) of the inverter's token scores; differentiable in h."""
        states, targets = valid(h.float(), ids, mask)
        w = self.w.to(states.device)
        pred = states @ w[:-1] + w[-1]  # (n, H)
        embedding = self.embedding.to(states.device)
        scores = SCALE * F.normalize(pred, dim=-1) @ F.normalize(embedding, dim=-1).T  # (n, V)
        ce = F.cross_entropy(scores, targets.to(states.device), reduction="none")
        return ce.clamp(max=math.log(len(embedding))).mean()


def valid(h: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(states (n, H), token ids (n,)) at the attended positions after the first."""
    keep = mask[:, 1:].bool().to(h.device)
    return h[:, 1:][keep], ids[:, 1:].to(h.device)[keep]


def closeness(h: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared distance to the shipped bottom's output, relative to that output's squared norm (warm-up's task)."""
    return ((h - target) ** 2).sum(-1).mean() / (target**2).sum(-1).mean().clamp_min(1e-12)


class PrivateBottom:
    """The defense on a StagedModel: trains its bottom blocks (their parameters go in the run's optimizer).

    The bottom stage's output is caught by a forward hook on training forwards; `loss()` (after the model's
    loss, before backward) returns the term to add: -weight x the refitted inverter's cross-entropy.
    """

    def __init__(self, model, settings: PrivateBottomSettings):
        self.model, self.settings = model, settings
        self.params = unfreeze_bottom(model)
        self.inverter = Inverter(model.bottom.parts.embed.weight, settings.window, settings.lam)
        n_rows = max(1, settings.public_tokens // PUBLIC_SEQ)
        self.public = public_ids(model.tokenizer, 64 * PUBLIC_SEQ, PUBLIC_SEQ)  # (N, 64)
        self.public_rows = n_rows
        self.refits = 0
        # The order the public rows are used in, keyed with a secret: from the shipped weights and public text
        # alone the cloud could otherwise replay the warm-up exactly.
        self.secret = new_secret()
        self.order = secret_order(len(self.public), self.secret)
        self.caught: tuple | None = None
        model.bottom.register_forward_hook(self._catch)

    def _catch(self, module, args, out) -> None:
        if out.requires_grad:
            self.caught = (out, args[0], args[1])

    def _public_batch(self) -> torch.Tensor:
        at = (self.refits * self.public_rows) % len(self.public)
        rows = self.order[torch.arange(at, at + self.public_rows) % len(self.public)]
        self.refits += 1
        return self.public[rows]

    def _refit(self) -> None:
        ids = self._public_batch().to(self.model.placement.device)
        with torch.no_grad():
            h = self.model.bottom(ids, torch.ones_like(ids))
        self.inverter.refit(valid(h.float().cpu(), ids.cpu(), torch.ones_like(ids).cpu()))

    def loss(self) -> torch.Tensor:
        """The privacy term of this training step (then this step's states join the inverter's window)."""
        if self.caught is None:
            raise RuntimeError("the private bottom saw no training forward of the bottom stage")
        h, ids, mask = self.caught
        self.caught = None
        self._refit()
        term = -self.settings.weight * self.inverter.loss(h, ids, mask)
        self.inverter.remember(h, ids, mask)
        return term

    def warmup(self, batch_size: int) -> list[float]:
        """--private-warmup: the adversarial term on public text, staying close to the shipped output; losses."""
        if not self.settings.warmup:
            return []
        device = self.model.placement.device
        shipped = frozen_copy(self.model.bottom.blocks)
        parts = self.model.bottom.parts
        optimizer = torch.optim.AdamW(self.params, lr=self.settings.lr, weight_decay=0.0)
        losses = []
        for step in range(self.settings.warmup):
            rows = self.order[torch.arange(step * batch_size, (step + 1) * batch_size) % len(self.public)]
            ids = self.public[rows].to(device)
            mask = torch.ones_like(ids)
            with torch.no_grad():
                target = run_blocks(parts, shipped, embedded(parts, ids, mask), mask)
            self._refit()
            h = self.model.bottom(ids, mask)
            task = closeness(h, target)
            losses.append(adversarial_step(optimizer, self.inverter, self.settings.weight, h, ids, mask, task))
        self.caught = None
        return losses

    def state_dict(self) -> dict:
        """For the checkpoint (private, 0600): the blocks, the inverter's window and the public-text position."""
        return {
            "params": [p.detach().clone() for p in self.params],
            "kept": list(self.inverter.kept),
            "refits": self.refits,
            "secret": self.secret,
        }

    def load_state_dict(self, saved: dict) -> None:
        with torch.no_grad():
            for p, value in zip(self.params, saved["params"]):
                p.copy_(value)
        self.inverter.kept.clear()
        self.inverter.kept.extend(saved["kept"])
        self.refits = saved["refits"]
        if saved.get("secret") is not None:  # absent: a checkpoint from before the keyed order
            self.secret = saved["secret"]
            self.order = secret_order(len(self.public), self.secret)

    def save(self, out: str) -> str:
        """Writes the tuned bottom blocks to OUT/private_bottom.safetensors (mode 0600); returns the path."""
        prefix = arch_for(self.model.config).block_prefix
        state = {}
        for block_id, block in zip(self.model.layout.bottom_blocks, self.model.bottom.blocks):
            for k, v in block.state_dict().items():
                state[f"{prefix}.{block_id}.{k.replace('.base_layer.', '.')}"] = v.detach().cpu().contiguous()
        path = os.path.join(out, PRIVATE_BOTTOM_FILE)
        rundir.write_atomic(path, st_save(state, metadata={"format": "pt", "algorithm": ALGORITHM}))
        return path


def unfreeze_bottom(model) -> list[torch.nn.Parameter]:
    """Makes the bottom blocks trainable (float32 only: no master copy beside a half dtype); their parameters."""
    if model.placement.dtype != torch.float32:
        raise ClientError(
            f"--private-bottom trains the bottom blocks in float32 (no master copy beside a half dtype), not "
            f"{model.placement.dtype_name}; use --dtype float32"
        )
    params = [p for block in model.bottom.blocks for p in block.parameters()]
    for p in params:
        p.requires_grad_(True)
    return params


def frozen_copy(blocks) -> list[torch.nn.Module]:
    """Deep copies of blocks, frozen."""
    out = [copy.deepcopy(block) for block in blocks]
    for block in out:
        block.requires_grad_(False)
    return out


def embedded(parts, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The bottom stage's input: token (and learned position) embeddings, (B, T, H)."""
    h = parts.embed(ids)
    if parts.pos_embed is not None:
        h = h + parts.pos_embed(positions(mask))
    return h


def adversarial_step(optimizer, inverter: Inverter, weight: float, h, ids, mask, task: torch.Tensor) -> float:
    """One step of task - weight x inverter cross-entropy on the bottom's output h; h then joins the window."""
    loss = task - weight * inverter.loss(h, ids, mask)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    inverter.remember(h, ids, mask)
    return float(loss.detach())


def lm_loss(parts, top_blocks, h_mid: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of the top blocks, final norm and head on the middle's output."""
    logits = parts.head(parts.norm(run_blocks(parts, top_blocks, h_mid, mask)))[:, :-1].float()
    labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)


def secret_order(n: int, secret: bytes) -> torch.Tensor:
    """A permutation of range(n) keyed with `secret`."""
    return torch.argsort(keyed_normal((n,), secret + b"order"))


def train_private_bottom(
    parts, layout, ids: torch.Tensor, settings, seed: int, steps: int, middle=None, batch: int = 2
) -> list[dict[str, torch.Tensor]]:
    """The adaptive attacker's shadow of the defense: the same algorithm, on public text, from the shipped weights.

    Args:
        parts: The attacker's client parts (attacks.KnownStages.parts); not changed (the bottom is copied).
        layout: Where the model is cut (KnownStages.layout).
        ids: (N, T) public token ids.
        settings: The run's context["private_bottom"] (a dict) or PrivateBottomSettings.
        seed: The attacker's own seed (its batch order; the algorithm has no other random draws).
        steps: Steps after the settings' warm-up: the task loss through `middle`, top and head when `middle`
            (a callable (h, attention_mask) -> h) is given, else more warm-up steps (stay close + inverter).
        batch: Rows of `ids` per step.

    Returns:
        One state_dict per bottom block (for parts.blocks[i], i < layout.bottom).
    """
    if not isinstance(settings, PrivateBottomSettings):
        settings = PrivateBottomSettings.from_context(settings)
    shipped = frozen_copy(parts.blocks[: layout.bottom])
    blocks = frozen_copy(parts.blocks[: layout.bottom])
    params = [p.requires_grad_(True) for block in blocks for p in block.parameters()]
    top = [parts.blocks[i] for i in range(layout.bottom, layout.bottom + layout.top)]
    inverter = Inverter(parts.embed.weight, settings.window, settings.lam)
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(int(seed))
    n_public = max(1, settings.public_tokens // ids.shape[1])
    for step in range(settings.warmup + steps):
        x = ids[torch.randint(len(ids), (batch,), generator=generator)]
        refit = ids[torch.randint(len(ids), (n_public,), generator=generator)]
        mask, refit_mask = torch.ones_like(x), torch.ones_like(refit)
        with torch.no_grad():
            refit_h = run_blocks(parts, blocks, embedded(parts, refit, refit_mask), refit_mask)
            inverter.refit(valid(refit_h, refit, refit_mask))
        h = run_blocks(parts, blocks, embedded(parts, x, mask), mask)
        if step >= settings.warmup and middle is not None:
            task = lm_loss(parts, top, middle(h, mask), x, mask)
        else:
            with torch.no_grad():
                target = run_blocks(parts, shipped, embedded(parts, x, mask), mask)
            task = closeness(h, target)
        adversarial_step(optimizer, inverter, settings.weight, h, x, mask, task)
    return [{k: v.detach().clone() for k, v in block.state_dict().items()} for block in blocks]

"""Kill-and-Revive (DLoRA): freezing the remote-LoRA modules whose updates have become insignificant, and reviving them.

A module is one middle slot's (A, B) pair. After every backward (before the optimizer step) each live module's
gradient goes into an exponential moving average, and its significance is the mean |EMA| per value.

Why this measure: AdamW moves each value by about lr * m / sqrt(v) per step, so the loss a module can still buy per
step is about lr * |E[g]| summed over its values; a module whose gradient only flips sign (noise, |EMA| small)
moves nowhere and buys nothing. Per value, because a module's bytes on the wire are per value too: the measure is
the benefit per byte. It needs only the gradients the step already has, so it costs no traffic.
`--kill-measure snr` divides by the root of the moving average of the squared gradient instead: how steady a
module's direction is, whatever its gradients' scale (AdamW moves a small but steady module as far as a large one).

The schedule:
- no module is killed before `warmup` steps (the averages fill first);
- a live module that has been live for `probe` steps is killed when its significance falls below `threshold`
  times the mean significance of all modules (a killed module keeps its last measured value);
- a killed module is revived after `revive_after` steps killed (the scheduled probe: it then runs `probe` steps
  and is judged on its average, fed again with fresh gradients), or earlier when its last significance is again at least `threshold` times the
  mean (the others' updates have shrunk below it).

The defaults (bench/kill_revive.py, SmolLM2, 200 steps of 2 x 32 tokens): below the mean kills about half of the
middle's modules (mostly q_proj: v_proj's gradients are larger); probes of 5 steps every 50 keep the revival bursts
cheap. Measured there over three seeds: 0.43x the remote-LoRA bytes at +0.8% validation loss on the mean (-0.3% to
+2.3% per run; at seed 0, 1.25x the mean gave 0.34x at +2.4%, and a 30-step warm-up was worse, +10%).

A killed module is frozen: requires_grad is off and its gradient dropped before the optimizer step (AdamW skips it),
so its values stay those the cloud already holds. In split mode its weights stop going up and its gradients stop
coming down (RemoteMiddle reads the live set from requires_grad); local mode runs the same decisions.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

MEASURES = ("gradient", "snr")
SQUARES_BETA = 0.99  # the snr measure's average of squared gradients (Adam's second moment, shorter memory)


@dataclass(frozen=True)
class KillReviveConfig:
    """The schedule's settings (`client tune --kill-*` flags)."""

    threshold: float = 1.0  # kill below threshold * the mean significance of all modules
    warmup: int = 10  # steps before the first kill
    probe: int = 5  # steps a (revived) module stays live before it may be killed
    revive_after: int = 50  # steps a killed module stays killed at most
    beta: float = 0.9  # the gradient average's decay per step
    measure: str = "gradient"  # gradient: mean |EMA of g|; snr: mean |EMA of g| / sqrt(EMA of g^2) (scale-free)

    def __post_init__(self):
        if not self.threshold > 0:
            raise ValueError(f"--kill-threshold must be > 0, got {self.threshold}")
        if self.warmup < 1 or self.probe < 1 or self.revive_after < 1:
            raise ValueError(
                f"--kill-warmup, --kill-probe and --revive-after must be >= 1, got "
                f"{self.warmup}, {self.probe}, {self.revive_after}"
            )
        if self.measure not in MEASURES:
            raise ValueError(f"--kill-measure must be one of {MEASURES}, got {self.measure!r}")
        if not 0 <= self.beta < 1:
            raise ValueError(f"the kill-revive average's beta must be in [0, 1), got {self.beta}")

    def to_dict(self) -> dict:
        return asdict(self)


class KillRevive:
    """Decides, after each backward, which of `modules` (one (A, B) pair each) stay live."""

    def __init__(self, modules: list[tuple[nn.Parameter, nn.Parameter]], cfg: KillReviveConfig):
        self.modules, self.cfg = modules, cfg
        self.ema = [[torch.zeros_like(p) for p in pair] for pair in modules]
        self.squares = [[torch.zeros_like(p) for p in pair] for pair in modules] if cfg.measure == "snr" else None
        self.score = [0.0] * len(modules)
        self.live = [True] * len(modules)
        self.since = [0] * len(modules)  # steps in the current state (live or killed)
        self.kills = self.revivals = 0

    @classmethod
    def for_middle(cls, model, cfg: KillReviveConfig) -> KillRevive:
        """The controller of a StagedModel's middle slots, in wire order (the same in split and local mode)."""
        params = model.adapter.params_for(model.names[1])
        return cls([(params[i], params[i + 1]) for i in range(0, len(params), 2)], cfg)

    @property
    def live_count(self) -> int:
        return sum(self.live)

    def after_backward(self, step: int, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Updates the live modules' significance from their gradients, then kills and revives (before the
        optimizer step: a module killed now does not change, so the cloud's copy of it stays current). A revived
        module's AdamW momentum in `optimizer` restarts at zero: its old direction is stale (its scale is kept)."""
        for i, pair in enumerate(self.modules):
            self.since[i] += 1
            if self.live[i]:
                self.score[i] = self._measure(i, pair)
        if step + 1 < self.cfg.warmup or not self.modules:
            return
        bar = self.cfg.threshold * sum(self.score) / len(self.score)
        for i in range(len(self.modules)):
            if self.live[i] and self.since[i] >= self.cfg.probe and self.score[i] < bar:
                self._set(i, False)
            elif not self.live[i] and (self.since[i] >= self.cfg.revive_after or self.score[i] >= bar):
                self._set(i, True)
                for p in self.modules[i] if optimizer is not None else ():
                    if "exp_avg" in optimizer.state.get(p, {}):
                        optimizer.state[p]["exp_avg"].zero_()

    def _measure(self, i: int, pair) -> float:
        """Module i's significance after this step's gradients: mean |EMA of g|, or with `snr` that over the root of
        the EMA of g^2 per value (how consistent its direction is, whatever its gradients' scale)."""
        beta, total, count = self.cfg.beta, 0.0, 0
        for k, p in enumerate(pair):
            ema = self.ema[i][k]
            grad = p.grad.detach().to(ema.dtype) if p.grad is not None else torch.zeros_like(ema)
            ema.mul_(beta).add_(grad, alpha=1 - beta)
            if self.squares is None:
                total += float(ema.abs().sum())
            else:
                squares = self.squares[i][k].mul_(SQUARES_BETA).addcmul_(grad, grad, value=1 - SQUARES_BETA)
                total += float((ema.abs() / (squares.sqrt() + 1e-12)).sum())
            count += ema.numel()
        return total / max(1, count)

    def _set(self, i: int, live: bool) -> None:
        self.live[i], self.since[i] = live, 0
        if live:
            self.revivals += 1
        else:
            self.kills += 1
        self._apply(i)

    def _apply(self, i: int) -> None:
        for p in self.modules[i]:
            p.requires_grad_(self.live[i])
            if not self.live[i]:
                p.grad = None  # AdamW skips it: a killed module does not change

    def state_dict(self) -> dict:
        """What a checkpoint keeps (resume continues the same decisions)."""
        return {
            "ema": [[t.clone() for t in pair] for pair in self.ema],
            "squares": None if self.squares is None else [[t.clone() for t in pair] for pair in self.squares],
            "score": list(self.score),
            "live": list(self.live),
            "since": list(self.since),
            "kills": self.kills,
            "revivals": self.revivals,
        }

    def load_state_dict(self, state: dict) -> None:
        if len(state["live"]) != len(self.modules):
            raise ValueError(f"kill-revive state for {len(state['live'])} modules, the model has {len(self.modules)}")
        with torch.no_grad():
            for mine, saved in zip(self.ema + (self.squares or []), state["ema"] + (state.get("squares") or [])):
                for t, value in zip(mine, saved):
                    t.copy_(value)
        self.score, self.live, self.since = list(state["score"]), list(state["live"]), list(state["since"])
        self.kills, self.revivals = int(state["kills"]), int(state["revivals"])
        for i in range(len(self.modules)):
            self._apply(i)

    def summary(self, steps: list[dict]) -> dict:
        """The report's kill_revive section: settings, live modules over the recorded steps, kills and revivals."""
        live = [s["live_modules"] for s in steps if "live_modules" in s]
        fields = ("remote_lora_bytes_sent", "remote_lora_bytes_received", "remote_lora_bytes_saved")
        return {
            "settings": self.cfg.to_dict(),
            "modules": len(self.modules),
            "mean_live_modules": sum(live) / len(live) if live else None,
            "min_live_modules": min(live) if live else None,
            "kills": self.kills,
            "revivals": self.revivals,
        } | {name: sum(s.get(name, 0) for s in steps) for name in fields}


# The wire side (split mode): which slots a Forward names live, and the remote LoRA's bytes.
def live_slots(params: list[nn.Parameter]) -> list[bool]:
    """Per remote slot ([A0, B0, A1, B1, ...]), whether it is live (a killed slot's parameters need no grad)."""
    return [params[i].requires_grad for i in range(0, len(params), 2)]


def slot_versions(params: list[nn.Parameter]) -> list[int]:
    """Per remote slot, the sum of its tensors' version counters (an optimizer step or a restore bumps them)."""
    return [params[i]._version + params[i + 1]._version for i in range(0, len(params), 2)]  # noqa: SLF001


def wire_live(params: list[nn.Parameter], sent: list[int] | None, force: bool) -> list[bool]:
    """The live_slots of a Forward that carries the remote LoRA: the live set, or every slot when the cloud's copy
    of a killed slot may not be current (a new session, a lost adapter, a restored checkpoint)."""
    live = live_slots(params)
    now = slot_versions(params)
    if force or sent is None or any(not on and v != s for on, v, s in zip(live, now, sent)):
        return [True] * len(live)
    return live


def selected(params: list[nn.Parameter], live: list[bool] | None) -> list[nn.Parameter]:
    """The parameters of the live slots, in wire order (all of them when `live` is None)."""
    return list(params) if live is None else [p for i, p in enumerate(params) if live[i // 2]]


@dataclass
class LoraTraffic:
    """Remote-LoRA bytes (the `lora` and `lora_grad` fields) and what they would have been with every slot live."""

    sent: int = 0
    received: int = 0
    sent_all: int = 0
    received_all: int = 0

    def count(self, direction: str, nbytes: int, part: list[nn.Parameter], whole: list[nn.Parameter]) -> None:
        share = sum(p.numel() for p in part) / max(1, sum(p.numel() for p in whole))
        setattr(self, direction, getattr(self, direction) + nbytes)
        every = f"{direction}_all"
        setattr(self, every, getattr(self, every) + (round(nbytes / share) if share else nbytes))

    def take(self) -> dict:
        """This step's figures (and zero for the next)."""
        out = {
            "remote_lora_bytes_sent": self.sent,
            "remote_lora_bytes_received": self.received,
            "remote_lora_bytes_saved": self.sent_all + self.received_all - self.sent - self.received,
        }
        self.sent = self.received = self.sent_all = self.received_all = 0
        return out


def one_line(section: dict) -> str:
    """The report's Kill-and-Revive line: live modules, and the remote-LoRA bytes sent, received and saved."""
    mean = section["mean_live_modules"]
    live = f"{mean:.1f} of {section['modules']} modules live on average" if mean is not None else "no steps"
    moved = section["remote_lora_bytes_sent"] + section["remote_lora_bytes_received"]
    saved = section["remote_lora_bytes_saved"]
    share = saved / (moved + saved) if moved + saved else 0.0
    return (
        f"[bold]kill-and-revive:[/bold] {live} ({section['kills']} kills, {section['revivals']} revivals); "
        f"remote LoRA {moved / 1e6:.2f} MB moved, {saved / 1e6:.2f} MB saved ({share:.0%})"
    )

"""Recording what the cloud receives in a run, and the cut defense: attached to a StagedModel by `attach`."""

from __future__ import annotations

import glob
import json
import os

import torch

from tandem.protos import serde
from tandem.protos import split_pb2 as pb
from tandem.stages.loading import config_json

from ..errors import ClientError
from ..model import stage_seed
from ..transport import Recorder
from . import label_defense
from .attacks import public_ids
from .cloud_view import middle_output_path
from .defenses import CutNoise, new_secret
from .private_bottom import PrivateBottomSettings

CONTEXT_FILE = "privacy_context.json"  # what the audit needs besides cloud_view/: the model, the cut, the defense


def plan_steps(total: int, n: int = 8) -> set[int]:
    """The training steps whose messages are kept: n spread over the run, first and last included."""
    if total <= n:
        return set(range(total))
    return {round(i * (total - 1) / (n - 1)) for i in range(n)}


class AuditRecorder(Recorder):
    """Keeps the cloud's view of chosen steps: spread training steps and the first evaluation batches."""

    def __init__(self, run_dir: str, kinds=("Forward", "EvalForward", "Backward"), eval_batches: int = 4):
        super().__init__(run_dir, kinds, limit=10**9)
        for old in glob.glob(os.path.join(self.dir, "*.bin")):
            os.remove(old)  # a resumed or repeated run records afresh
        self.steps: set[int] = set(range(8))
        self.eval_batches = eval_batches
        self.sealer_of = lambda: None  # set by attach(): the live session's Sealer, when tensors are sealed

    def wants(self, kind: str, step: int) -> bool:
        if kind == "EvalForward":
            return -step - 1 < self.eval_batches
        return kind in self.kinds and step in self.steps

    def __call__(self, kind: str, request) -> None:
        if kind in self.kinds and self.wants(kind, int(getattr(request, "step", 0))):
            self.write(kind, opened_request(request, self.sealer_of()))

    def write(self, kind: str, request) -> None:
        with open(os.path.join(self.dir, f"{kind}-{self.counts[kind]:04d}.bin"), "wb") as f:
            f.write(request.SerializeToString())
        self.counts[kind] += 1


def opened_request(request, sealer):
    """The request as the cloud holds it after opening the seal (a copy; the sent message is untouched).

    Sealing protects tensors on the path, like TLS; the cloud opens them with the session's
    client-to-cloud key, which this side derived too. The audit attacks what the cloud opened.
    """
    sealed = [(fd, v) for fd, v in request.ListFields() if isinstance(v, pb.Tensor) and v.sealed]
    if not sealed:
        return request
    if sealer is None:
        raise ClientError("a sealed request reached the audit recorder without its session's keys")
    return sealer.unseal_sent(request, int(getattr(request, "step", 0)))


def middle_seed(cut_seed: int) -> int:
    """The middle's dropout seed a split-mode Forward carries, from the cut transform's seed (model.stage_seed)."""
    return (cut_seed + stage_seed(0, 0, 1) - stage_seed(0, 0, 3)) % (2**63 - 1)


class PrivacyTap:
    """The cut transform of a run: applies the defense and keeps what the audit needs.

    In split mode the transport's AuditRecorder keeps the requests; this tap keeps the middle's
    outputs of the recorded steps (the cloud knows them: it computed them). In local mode nothing is
    sent, so the tap writes the requests split mode would send (same tensors, same format).
    """

    def __init__(self, model, recorder: AuditRecorder | None, defense: CutNoise | None, record_requests: bool):
        self.recorder, self.defense, self.record_requests = recorder, defense, record_requests
        self.current: tuple[int, bool] | None = None  # (step, train) of the cut the last forward passed
        if recorder is not None:
            model.top.register_forward_pre_hook(self._keep_middle_output)

    def __call__(self, h, attention_mask, step: int, seed: int, train: bool):
        out = self.defense(h, attention_mask, step, seed, train) if self.defense is not None else h
        self.current = (step, train)
        kind = "Forward" if train else "EvalForward"
        if self.record_requests and self.recorder is not None and self.recorder.wants(kind, step):
            self.recorder.write(
                kind,
                pb.ForwardRequest(
                    session_id="local",
                    step=step,
                    hidden=serde.to_proto(out),
                    attention_mask=serde.to_proto(attention_mask.to(torch.uint8)),
                    dropout_seed=middle_seed(seed),  # what split mode sends with the same step
                    train=train,
                ),
            )
        return out

    def _keep_middle_output(self, module, args):
        if self.current is None or not self.current[1] or not self.recorder.wants("Backward", self.current[0]):
            return
        step, h_mid = self.current[0], args[0]
        with open(middle_output_path(self.recorder.dir, step), "wb") as f:
            f.write(serde.to_proto(h_mid).SerializeToString())
        if self.record_requests and h_mid.requires_grad:
            h_mid.register_hook(
                lambda g: self.recorder.write(
                    "Backward", pb.BackwardRequest(session_id="local", step=step, grad_output=serde.to_proto(g))
                )
            )
        self.current = None


def auto_clip(model, tokenizer, seq_len: int = 64, n_tokens: int = 1024) -> tuple[float, float]:
    """Median token norm at the cut on public text, (later positions, position 0): shipped weights only."""
    ids = public_ids(tokenizer, n_tokens, min(seq_len, 64))
    with torch.no_grad():
        norms = model.bottom(ids, torch.ones_like(ids)).norm(dim=-1)  # (N, T); no adapter bound: the shipped weights
    return float(norms[:, 1:].median()), float(norms[:, 0].median())


def attach(model, cfg, total_steps: int, recorder: AuditRecorder | None) -> PrivacyTap:
    """Installs the run's cut defense and recording on a StagedModel; writes RUN_DIR/privacy_context.json.

    The tap goes in through the model's documented hook, `model.cut_transform`, plus a forward-pre-hook
    on its top stage; the live session (for opening sealed requests) is read through `model.session`.
    """
    defense = None
    if cfg.noise_multiplier > 0 or cfg.clip_norm > 0:
        clip, first_clip = (cfg.clip_norm, 0.0) if cfg.clip_norm > 0 else auto_clip(model, model.tokenizer)
        defense = CutNoise(cfg.noise_multiplier, clip, first_clip, secret=new_secret())
    audit_on = cfg.audit in ("yes", "record") or (cfg.audit == "auto" and model.mode == "split")
    if audit_on and recorder is None:
        recorder = AuditRecorder(cfg.out)
    if recorder is not None:
        recorder.steps = plan_steps(total_steps)
        recorder.sealer_of = lambda: model.session.sealer if model.session is not None else None
    tap = PrivacyTap(model, recorder if audit_on else None, defense, record_requests=model.mode != "split")
    model.cut_transform = tap
    _write_context(model, cfg, defense, audit_on)
    return tap


def private_bottom_settings(cfg) -> PrivateBottomSettings:
    """The private bottom's settings of a run's TuneConfig (--private-bottom > 0)."""
    return PrivateBottomSettings(weight=cfg.private_bottom, warmup=cfg.private_warmup, lr=cfg.private_lr)


def _write_context(model, cfg, defense: CutNoise | None, audit_on: bool) -> None:
    """RUN_DIR/privacy_context.json: the model, the cut and the defense, as the audit will need them."""
    context = {
        "mode": model.mode,
        "model_config_json": config_json(model.config),
        "layout": {"num_layers": model.layout.num_layers, "bottom": model.layout.bottom, "top": model.layout.top},
        "stages_sha256": model.stages_sha256,
        "model": cfg.model,
        "defense": defense.describe() if defense else None,
        "private_bottom": private_bottom_settings(cfg).describe() if cfg.private_bottom > 0 else None,
        "label_defense": label_defense.describe(cfg.label_noise) if cfg.label_noise > 0 else None,
        "audit": audit_on,
    }
    os.makedirs(cfg.out, exist_ok=True)
    with open(os.path.join(cfg.out, CONTEXT_FILE), "w") as f:
        json.dump(context, f, indent=2)

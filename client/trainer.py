"""The tuning loop: seeded batches, the data owner's optimizer, checkpoints, evaluation and the report."""

from __future__ import annotations

import logging
import math
import os
import time

import torch
from safetensors.torch import save_file

from tandem.kernels.checks import all_finite
from tandem.stages.arch import arch_for
from tandem.stages.loading import cache_root
from tandem.stages.lora import PeftMeta, save_peft

from . import checkpoint, report, rundir
from .assemble import build_local, build_offsite, connect_split
from .checkpoint import Rollback, surviving_restarts
from .data import check_positions, fingerprint, load_split
from .errors import ClientError
from .evaluation import evaluate
from .kill_revive import KillRevive
from .meter import Meter
from .model import StagedModel
from .privacy import record as privacy_record
from .privacy.audit import audit_run
from .privacy.label_defense import LabelNoise
from .privacy.private_bottom import PrivateBottom
from .privacy.record import AuditRecorder, private_bottom_settings
from .session import SessionLost
from .transport import Transport, TransportConfig
from .tune_config import TuneConfig

log = logging.getLogger(__name__)

# The data owner's optimizer (torch.optim.AdamW, no weight decay); with --cloud-optimizer the cloud runs the same.
ADAMW = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.0}
CLIENT_BLOCKS_FILE = "client_blocks.safetensors"  # fully tuned client blocks, full-model key names
EVAL_AFTER_SEED = 0x5EED  # added to --seed for the evaluation after tuning (its cut noise must differ from the first's)


def tune(cfg: TuneConfig, transport_cfg: TransportConfig | None = None) -> dict:
    """Runs `client tune`; returns the report (also written to OUT/report.json)."""
    started = time.perf_counter()
    # Everything that can be checked here is, before the session opens and the stages download.
    settings = checkpoint.settings(cfg, transport_cfg, fingerprint(cfg.data))
    rundir.prepare(cfg.out, cfg.resume, cfg.overwrite)
    saved = checkpoint.load(cfg.out, settings) if cfg.resume else None
    meter = Meter(tls=bool(transport_cfg and not transport_cfg.insecure))
    transport, model = assemble_model(cfg, transport_cfg, meter)
    rundir.make_private_dir(cache_root())  # downloaded stages and tokenizers: this user's only
    try:
        stages = checkpoint.stages(model, cfg.lora)
        checkpoint.check(saved.get("stages") if saved else None, stages, cfg.out)
        check_positions(model.config, cfg.seq_len)
        data = load_split(
            cfg.data, model.tokenizer, cfg.seq_len, cfg.batch_size, cfg.seed, cfg.val_fraction, cfg.val_max_sequences
        )
        total_steps = cfg.steps or max(1, math.ceil(cfg.epochs * data.batches_per_epoch))
        privacy_record.attach(model, cfg, total_steps, transport.recorder if transport is not None else None)
        state = TrainState(model, cfg, meter)
        val_before = state.begin(saved, data, cfg.batch_size)
        meter.take_step()  # evaluation traffic is accounted per kind, not per training step
        rollback = state.rollback(saved) if cfg.cloud_optimizer else None
        progress = Progress(cfg, total_steps, state)
        while state.step < total_steps:
            at_checkpoint = (state.step + 1) % cfg.checkpoint_every == 0 or state.step + 1 == total_steps
            try:
                remote_state = state.train_step(data.batch_at(state.step), rollback, at_checkpoint)
            except SessionLost as e:
                if rollback is None:
                    raise
                state.restore(rollback.back(e))
                meter.take_step()  # the lost steps' traffic stays in the totals, not in the step records
                progress.back_to(state)
                continue
            progress.advance(state.steps[-1])
            if at_checkpoint:
                payload = state.snapshot() | {
                    "val_before": val_before,
                    "config": cfg.to_dict(),
                    "remote_optimizer": remote_state,
                    "settings": settings,
                    "stages": stages,
                }
                if rollback is not None:
                    rollback.reached(payload)  # progress: a new point to go back to
                checkpoint.save(cfg.out, payload)
        progress.close()
        val_after = evaluate(model, data, cfg.seed + EVAL_AFTER_SEED)  # fresh cut noise: never the first pass's draws
        save_adapter(model, cfg, state.private)
        wall = time.perf_counter() - started
        run_report = report.run_report(cfg, model, data, state.steps, meter, val_before, val_after, wall)
        if state.kill_revive is not None:
            run_report["kill_revive"] = state.kill_revive.summary(state.steps)
        return write_report(cfg, run_report, data)
    finally:
        model.close()
        if transport is not None:
            transport.close()


def assemble_model(cfg: TuneConfig, transport_cfg: TransportConfig | None, meter: Meter):
    """(transport or None, model) for the run's mode: split opens a session, offsite and local contact no server."""
    place = {"device": cfg.device, "dtype": cfg.dtype}
    if cfg.mode == "offsite":  # no server at all: the emulator package stands in for the middle
        return None, build_offsite(cfg.emulator, cfg.lora, cfg.seed, **place)
    if cfg.mode == "local":
        return None, build_local(cfg.model, cfg.client_blocks, cfg.lora, cfg.seed, cfg.middle_lora, **place)
    recorder = AuditRecorder(cfg.out) if cfg.audit != "no" else None
    transport = Transport(transport_cfg or TransportConfig(), meter, recorder=recorder)
    cloud_optimizer = ADAMW | {"lr": cfg.lr} if cfg.cloud_optimizer else None
    model = connect_split(
        transport,
        cfg.lora,
        cfg.seed,
        remote_lora=cfg.middle_lora,
        cloud_optimizer=cloud_optimizer,
        kill_revive=cfg.kill_revive is not None,
        **place,
    )
    return transport, model


def make_optimizer(params: list, lr: float) -> torch.optim.AdamW:
    """The data owner's AdamW (the ADAMW settings, at --lr): parameters, or parameter groups (dicts)."""
    betas = (ADAMW["beta1"], ADAMW["beta2"])
    return torch.optim.AdamW(params, lr=lr, betas=betas, eps=ADAMW["eps"], weight_decay=ADAMW["weight_decay"])


def step_record(meter_record: dict, step: int, loss: torch.Tensor, batch: dict, label_tokens: int, wall: float) -> dict:
    """One training step in the report: the meter's bytes and times, the loss, tokens and where the time went."""
    rpc_s = meter_record["rpc_s"]
    return meter_record | {
        "step": step,
        "loss": float(loss.detach()),
        "tokens": int(batch["attention_mask"].sum()),
        "label_tokens": label_tokens,
        "wall_s": wall,
        "client_compute_s": wall - rpc_s - meter_record["serialization_s"] - meter_record["sealing_s"],
        "network_wait_s": max(0.0, rpc_s - meter_record["cloud_compute_s"]),
    }


class TrainState:
    """What training changes: the model's trainable weights, the data owner's optimizer, the step and its records."""

    def __init__(self, model: StagedModel, cfg: TuneConfig, meter: Meter):
        self.model, self.meter, self.seed, self.cloud_optimizer = model, meter, cfg.seed, cfg.cloud_optimizer
        self.out = cfg.out  # where the checkpoint is, for a refusal to name it
        remote = {id(p) for p in model.middle.params} if cfg.cloud_optimizer else set()  # the cloud updates these
        adapter = [p for p in model.adapter.parameters() if id(p) not in remote]
        self.client_blocks = model.unfreeze_client_blocks() if cfg.tune_client_blocks else []
        # The trained defenses, which the cloud never sees: the private bottom's blocks train at --private-lr.
        self.private = PrivateBottom(model, private_bottom_settings(cfg)) if cfg.private_bottom > 0 else None
        self.label_noise = LabelNoise(cfg.label_noise).install(model) if cfg.label_noise > 0 else None
        groups = [{"params": adapter + self.client_blocks}]
        if self.private is not None:
            groups.append({"params": self.private.params, "lr": cfg.private_lr})
        self.optimizer = make_optimizer(groups, cfg.lr)
        self.kill_revive = KillRevive.for_middle(model, cfg.kill_revive) if cfg.kill_revive is not None else None
        self.step = 0
        self.steps: list[dict] = []

    def train_step(self, batch: dict, rollback: Rollback | None, at_checkpoint: bool) -> dict | None:
        """One recorded optimizer step; returns the remote LoRA's state when a checkpoint needs it (else None)."""
        started = time.perf_counter()
        if rollback is not None:  # here, inside the caller's try: the cloud may go away again while it restarts
            rollback.restart_if_pending(self.model)
        loss, label_tokens = surviving_restarts(self.model, lambda: self._forward_backward(batch))
        grads = [p.grad for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not all(all_finite(g) for g in grads):  # the loss was checked before backward
            raise self._not_finite()
        lora_fields = self._lora_fields()
        if self.kill_revive is not None:  # before the step: a module killed now does not change
            self.kill_revive.after_backward(self.step, self.optimizer)
        self.optimizer.step()
        wall = time.perf_counter() - started
        # Cloud optimizer: the remote LoRA and its state come down for the checkpoint (this step's traffic).
        remote_state = self.model.middle.fetch_state(self.step) if at_checkpoint and self.cloud_optimizer else None
        self.steps.append(step_record(self.meter.take_step(), self.step, loss, batch, label_tokens, wall) | lora_fields)
        self.step += 1
        return remote_state

    def _not_finite(self) -> ClientError:
        """The refusal of a NaN or Inf loss or gradient: the step is not applied, the last checkpoint stays."""
        return ClientError(
            f"step {self.step + 1}: the loss or its gradients are not finite, so the step is not applied; lower "
            "--lr, or check the data and the emulator or cloud it runs through (--resume continues from the last "
            "checkpoint)"
        )

    def _lora_fields(self) -> dict:
        """The step record's remote-LoRA figures: its bytes each way (split mode) and the live modules."""
        traffic = getattr(self.model.middle, "traffic", None)
        fields = traffic.take() if traffic is not None and self.model.middle.params else {}
        if self.kill_revive is not None:
            fields["live_modules"] = self.kill_revive.live_count
        return fields

    def _forward_backward(self, batch: dict) -> tuple[torch.Tensor, int]:
        self.optimizer.zero_grad(set_to_none=True)
        if self.label_noise is not None:
            self.label_noise.step = self.step
        loss, label_tokens = self.model.loss(batch, self.step, self.seed, train=True)
        if not math.isfinite(float(loss.detach())):  # before backward: a cloud optimizer steps during it
            raise self._not_finite()
        # The private bottom's term (client-local: it changes no tensor that travels, only the bottom's gradient).
        (loss + self.private.loss() if self.private is not None else loss).backward()
        return loss, label_tokens

    def snapshot(self) -> dict:
        """The checkpoint's training part: adapter, tuned client blocks, optimizer, the next step, the records."""
        return {
            "adapter": self.model.adapter.state_dict(),
            "client_blocks": [p.detach().clone() for p in self.client_blocks],
            "optimizer": self.optimizer.state_dict(),
            "kill_revive": self.kill_revive.state_dict() if self.kill_revive is not None else None,
            "private_bottom": self.private.state_dict() if self.private is not None else None,
            "label_noise": self.label_noise.state_dict() if self.label_noise is not None else None,
            "cut_noise_secret": self._cut_noise().secret if self._cut_noise() is not None else None,
            "step": self.step,
            "steps": self.steps,
        }

    def restore(self, saved: dict) -> None:
        self.model.adapter.load_state_dict(saved["adapter"])
        if self.client_blocks:
            with torch.no_grad():
                for p, value in zip(self.client_blocks, saved["client_blocks"]):
                    p.copy_(value)
        self.optimizer.load_state_dict(saved["optimizer"])
        if self.kill_revive is not None and saved.get("kill_revive") is not None:  # None: saved before it was on
            self.kill_revive.load_state_dict(saved["kill_revive"])
        for defense, key in ((self.private, "private_bottom"), (self.label_noise, "label_noise")):
            if defense is not None and saved.get(key) is not None:
                defense.load_state_dict(saved[key])
        if self._cut_noise() is not None and saved.get("cut_noise_secret") is not None:  # the same noise on resume
            self._cut_noise().secret = saved["cut_noise_secret"]
        self.steps, self.step = saved["steps"], saved["step"]

    def _cut_noise(self):
        """The run's CutNoise (its key is checkpointed), or None."""
        return getattr(self.model.cut_transform, "defense", None)

    def begin(self, saved: dict | None, data, batch_size: int) -> dict:
        """The validation before tuning: the checkpoint's (resuming), else measured after the private bottom's
        warm-up (which runs before anything is sent, so the first evaluation goes through the private bottom)."""
        if saved:
            return self.resume(saved)
        if self.private is not None:
            log.info("private bottom: warm-up losses %s", self.private.warmup(batch_size))
        return evaluate(self.model, data, self.seed)

    def resume(self, saved: dict) -> dict:
        """Continues from a checkpoint (the cloud gets the remote optimizer's state); returns its validation."""
        try:
            if not isinstance(saved.get("step"), int) or isinstance(saved["step"], bool) or saved["step"] < 0:
                raise ValueError(f"its step {str(saved.get('step'))[:20]} is not a step count")
            if not isinstance(saved.get("steps"), list) or not isinstance(saved.get("val_before"), dict):
                raise ValueError("its step records or first validation are missing")
            if self.cloud_optimizer and not isinstance(saved.get("remote_optimizer"), dict):
                raise ValueError("it holds no state of the cloud's optimizer")
            self.restore(saved)
        except torch.OutOfMemoryError:
            raise  # not the checkpoint's fault: it stays usable
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError, OverflowError) as e:
            raise checkpoint.misfit(self.out, e) from None
        if self.cloud_optimizer:
            self.model.middle.put_state(saved["remote_optimizer"], self.step)
        log.info("resumed from step %d", self.step)
        return saved["val_before"]

    def rollback(self, saved: dict | None) -> Rollback:
        """Cloud optimizer: the point to go back to is where the run starts, until it reaches a checkpoint."""
        return Rollback(self.snapshot() | {"remote_optimizer": saved.get("remote_optimizer") if saved else None})


class Progress:
    """The progress bar: steps done, the last loss, tokens per second, and the bytes of the recorded steps."""

    def __init__(self, cfg: TuneConfig, total_steps: int, state: TrainState):
        from tqdm.auto import tqdm

        desc = f"tune ({cfg.mode})"
        self.bar = tqdm(total=total_steps, initial=state.step, desc=desc, unit="step", disable=not cfg.progress)
        self._count(state.steps)

    def _count(self, steps: list[dict]) -> None:
        self.sent = sum(s["bytes_sent"] for s in steps)
        self.received = sum(s["bytes_received"] for s in steps)

    def advance(self, record: dict) -> None:
        self.sent += record["bytes_sent"]
        self.received += record["bytes_received"]
        self.bar.update(1)
        self.bar.set_postfix(
            loss=f"{record['loss']:.3f}",
            tok_s=f"{record['tokens'] / record['wall_s']:.0f}",
            sent=f"{self.sent / 2**20:.1f}MB",
            recv=f"{self.received / 2**20:.1f}MB",
        )

    def back_to(self, state: TrainState) -> None:
        """After a rollback: the bar and the byte counts go back to the checkpoint's step."""
        self._count(state.steps)
        self.bar.n = state.step
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


def save_adapter(model: StagedModel, cfg: TuneConfig, private: PrivateBottom | None = None) -> None:
    """OUT/adapter: the LoRA in PEFT's format, plus the fully tuned client blocks when --tune-client-blocks; a
    private bottom goes to OUT/private_bottom.safetensors (0600, outside adapter/: `client push` never sends it)."""
    if private is not None:
        private.save(cfg.out)
    adapter_dir = os.path.join(cfg.out, "adapter")
    save_peft(
        model.adapter, adapter_dir, PeftMeta(model.model_id, fan_in_fan_out=arch_for(model.config).fan_in_fan_out)
    )
    if cfg.tune_client_blocks:
        path = os.path.join(adapter_dir, CLIENT_BLOCKS_FILE)
        save_file(model.client_block_state(), path, metadata={"format": "pt"})


def write_report(cfg: TuneConfig, run_report: dict, data) -> dict:
    """Writes OUT/report.json; with the audit on, first without it (the audit reads it), then with its findings."""
    path = os.path.join(cfg.out, "report.json")
    if cfg.audit == "yes" or (cfg.audit == "auto" and run_report["mode"] == "split"):
        rundir.write_json(path, run_report)
        run_report["privacy"] = audit_run(cfg.out, cfg.to_dict(), data, tokens=cfg.audit_tokens, progress=cfg.progress)
    rundir.write_json(path, run_report)
    rundir.make_run_private(
        cfg.out
    )  # adapter, report, recorded traffic (the CLI's umask already did; library calls too)
    return run_report

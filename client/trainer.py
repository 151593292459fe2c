"""The tuning loop: seeded batches, the data owner's optimizer, evaluation, checkpoints and the report."""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field

import torch
from safetensors.torch import save_file

from tandem.stages.arch import arch_for
from tandem.stages.loading import cache_root
from tandem.stages.lora import LoraConfig, PeftMeta, save_peft

from . import audit as privacy
from . import resume, rundir
from .audit import AuditRecorder
from .data import MAX_VAL_SEQUENCES, fingerprint, load_split
from .errors import CheckpointError, DataError
from .staged import SessionLost, StagedModel, build_local, connect_split
from .transport import Meter, Transport, TransportConfig

log = logging.getLogger(__name__)

MODES = ("split", "local", "offsite")
# The data owner's optimizer (torch.optim.AdamW, no weight decay); with --cloud-optimizer the cloud runs the same.
ADAMW = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.0}
CLIENT_BLOCKS_FILE = "client_blocks.safetensors"  # fully tuned client blocks, full-model key names
EVAL_AFTER_SEED = 0x5EED  # added to --seed for the evaluation after tuning (its cut noise must differ from the first's)
PRIVACY_NOTE = (
    "The cloud receives the hidden states after client block {k} and the gradients at the top cut. At shallow "
    "cuts these are invertible by an operator who knows the client-stage weights it shipped (the literature "
    "recovers 85-96% ROUGE-L on 7B decoders). TLS protects them from the network, not from the cloud. This run "
    "did not measure that exposure; treat your text as readable by the operator."
)

OFFSITE_NOTE = (
    "offsite mode: tuning ran against the emulator with no server; no byte left this machine. Only the "
    "adapter leaves it, when you run `client push`."
)


@dataclass
class TuneConfig:
    """What `client tune` does. Dicts only at the edges: this is persisted as JSON in the report."""

    data: str
    out: str = "tandem-run"
    mode: str = "split"
    model: str | None = None  # local mode only
    client_blocks: str = "2:2"  # local mode only (split mode takes the server's layout)
    steps: int = 0  # 0: run --epochs
    epochs: float = 1.0
    batch_size: int = 4
    seq_len: int = 128
    lr: float = 1e-3
    lora: LoraConfig = field(default_factory=LoraConfig)
    seed: int = 0
    val_fraction: float = 0.1
    val_max_sequences: int = MAX_VAL_SEQUENCES  # the validation set's cap (the rest of the held-out share trains)
    checkpoint_every: int = 10
    tune_client_blocks: bool = False  # also train the client's K+M blocks in full
    noise_multiplier: float = 0.0  # Gaussian noise at the bottom cut, sigma = noise_multiplier * clip_norm
    clip_norm: float = 0.0  # per-token L2 clip at the cut; 0 = auto (median norm on public text) when noise is on
    audit: str = "auto"  # privacy audit of what the cloud received: auto (split mode), yes, no, record (audit later)
    audit_tokens: int = 256  # received tokens the audit attacks
    emulator: str | None = None  # offsite mode: the emulator package directory
    middle_lora: bool = True  # split/local: LoRA on the middle blocks too (offsite: never)
    cloud_optimizer: bool = False  # split: the cloud applies the remote LoRA's AdamW updates (no LoRA traffic per step)
    resume: bool = False
    overwrite: bool = False  # replace a finished or unfinished run in `out` (refused otherwise)
    progress: bool = True

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if (self.mode == "offsite") != (self.emulator is not None):
            raise ValueError("--mode offsite needs --emulator PKG, and --emulator only applies to --mode offsite")
        if self.steps < 0 or self.epochs <= 0:
            raise ValueError("steps must be >= 0 and epochs > 0")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.batch_size < 1 or self.seq_len < 2 or self.checkpoint_every < 1:
            raise ValueError(
                f"batch_size and checkpoint_every must be >= 1 and seq_len >= 2, got "
                f"{self.batch_size}, {self.checkpoint_every}, {self.seq_len}"
            )
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.val_max_sequences < 1:
            raise ValueError(f"val_max_sequences must be >= 1, got {self.val_max_sequences}")
        if self.noise_multiplier < 0 or self.clip_norm < 0:
            raise ValueError(
                f"noise_multiplier and clip_norm must be >= 0, got {self.noise_multiplier}, {self.clip_norm}"
            )
        if self.cloud_optimizer and (self.mode != "split" or not self.middle_lora):
            raise ValueError("--cloud-optimizer applies to --mode split with a remote LoRA (not with --no-middle-lora)")
        if self.resume and self.overwrite:
            raise ValueError("--resume continues the run in --out and --overwrite replaces it; pass one of them")
        if self.audit not in ("auto", "yes", "no", "record"):
            raise ValueError(f"audit must be auto, yes, no or record, got {self.audit!r}")


# Cloud optimizer: sessions the cloud may lose in a row, each sending the run back to its last checkpoint, before
# the run stops. Any number are survived while checkpoints keep being reached; this bounds a cloud that loses the
# session at every attempt (e.g. one that crashes on the same step), which would otherwise redo steps forever.
MAX_LOST_WITHOUT_PROGRESS = 5


def surviving_restarts(sm: StagedModel, fn, attempts: int = 3):
    """Runs fn(); when the cloud lost the session (it restarted), reopens it and runs fn() again.

    fn must be a whole step (forward and backward): every input it depends on is deterministic
    in (seed, step), so the redone step equals the lost one.
    """
    for attempt in range(attempts):
        try:
            return fn()
        except SessionLost:
            if attempt == attempts - 1:
                raise
            sm.middle.reopen()


def evaluate(sm: StagedModel, data, seed: int) -> dict:
    """Token-weighted validation loss and perplexity (no dropout, no gradients)."""
    total, n = 0.0, 0
    with torch.no_grad():
        for i, batch in enumerate(data.val_batches()):
            loss, k = surviving_restarts(sm, lambda: sm.loss(batch, -1 - i, seed, train=False))  # noqa: B023
            total += float(loss) * k
            n += k
    loss = total / max(n, 1)
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": n}


def _check_positions(config, seq_len: int) -> None:
    """--seq-len within the model's positions (the cloud refuses longer; GPT-2's position table would raise)."""
    n = int(getattr(config, "max_position_embeddings", 0) or getattr(config, "n_positions", 0) or 0)
    if n and seq_len > n:
        raise DataError(f"--seq-len {seq_len} is over the model's {n} positions; use --seq-len {n} or less")


def _ckpt_path(out: str) -> str:
    return os.path.join(out, "checkpoint.pt")


def save_checkpoint(out: str, payload: dict) -> None:
    """Writes the checkpoint atomically: a failure (disk full) leaves the previous one intact."""
    path = _ckpt_path(out)
    tmp = path + ".tmp"
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    except OSError as e:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise CheckpointError(
            f"could not write the checkpoint to {path} ({e.strerror or e}); the previous checkpoint is intact. "
            "Free disk space and rerun with --resume to continue from it."
        ) from None


def write_json(path: str, obj: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def _expected_bytes(sm: StagedModel, batch_tokens: int) -> int:
    """What a float32 training step must carry: activations 4x (fwd up/down, bwd up/down) + LoRA up and grads down."""
    if sm.mode != "split":
        return 0
    hidden = int(sm.config.hidden_size)
    lora = 0 if sm.middle.cloud_optimizer else sum(p.numel() for p in sm.middle.params)
    return 4 * (4 * batch_tokens * hidden + 2 * lora) + batch_tokens  # float32 tensors + a 1-byte mask per token


def tune(cfg: TuneConfig, tcfg: TransportConfig | None = None) -> dict:
    """Runs `client tune`; returns the report (also written to OUT/report.json)."""
    from tqdm.auto import tqdm

    t_start = time.perf_counter()
    # Everything that can be checked here is, before the session opens and the stages download.
    settings = resume.settings(cfg, tcfg, fingerprint(cfg.data))
    rundir.prepare(cfg.out, cfg.resume, cfg.overwrite)
    ckpt = None
    if cfg.resume:
        if not os.path.exists(_ckpt_path(cfg.out)):
            raise CheckpointError(f"--resume: no checkpoint in {cfg.out}; run without --resume to start fresh")
        try:
            ckpt = torch.load(_ckpt_path(cfg.out), weights_only=False)
        except (OSError, RuntimeError, EOFError) as e:
            raise CheckpointError(
                f"--resume: cannot read {_ckpt_path(cfg.out)} ({e}); start fresh without --resume"
            ) from None
        resume.check(ckpt.get("settings"), settings, cfg.out)

    transport = None
    meter = Meter(tls=bool(tcfg and not tcfg.insecure))
    if cfg.mode == "split":
        transport = Transport(
            tcfg or TransportConfig(), meter, recorder=AuditRecorder(cfg.out) if cfg.audit != "no" else None
        )
        sm = connect_split(
            transport,
            cfg.lora,
            cfg.seed,
            remote_lora=cfg.middle_lora,
            cloud_optimizer=ADAMW | {"lr": cfg.lr} if cfg.cloud_optimizer else None,
        )
    elif cfg.mode == "offsite":  # no server at all: the emulator package stands in for the middle
        from .offsite import build_offsite

        sm = build_offsite(cfg.emulator, cfg.lora, cfg.seed)
    else:
        sm = build_local(cfg.model, cfg.client_blocks, cfg.lora, cfg.seed, middle_lora=cfg.middle_lora)
    rundir.make_private_dir(cache_root())  # downloaded stages and tokenizers: this user's only
    try:
        stages = resume.stages(sm, cfg.lora)
        resume.check(ckpt.get("stages") if ckpt else None, stages, cfg.out)
        _check_positions(sm.config, cfg.seq_len)
        data = load_split(
            cfg.data, sm.tokenizer, cfg.seq_len, cfg.batch_size, cfg.seed, cfg.val_fraction, cfg.val_max_sequences
        )
        total_steps = cfg.steps or max(1, math.ceil(cfg.epochs * data.batches_per_epoch))
        privacy.attach(sm, cfg, total_steps, transport.recorder if transport is not None else None)
        remote = {id(p) for p in sm.middle.params} if cfg.cloud_optimizer else set()  # the cloud updates these
        trainable = [p for p in sm.adapter.parameters() if id(p) not in remote]
        n_adapter = len(trainable)
        trainable += sm.unfreeze_client_blocks() if cfg.tune_client_blocks else []
        opt = torch.optim.AdamW(
            trainable,
            lr=cfg.lr,
            betas=(ADAMW["beta1"], ADAMW["beta2"]),
            eps=ADAMW["eps"],
            weight_decay=ADAMW["weight_decay"],
        )
        steps: list[dict] = []
        start = 0
        if ckpt is not None:
            sm.adapter.load_state_dict(ckpt["adapter"])
            if cfg.tune_client_blocks:
                with torch.no_grad():
                    for p, saved in zip(trainable[n_adapter:], ckpt["client_blocks"]):
                        p.copy_(saved)
            opt.load_state_dict(ckpt["optimizer"])
            steps, start, val_before = ckpt["steps"], ckpt["step"], ckpt["val_before"]
            if cfg.cloud_optimizer:
                sm.middle.put_state(ckpt["remote_optimizer"], start)
            log.info("resumed from step %d", start)
        else:
            val_before = evaluate(sm, data, cfg.seed)
        meter.take_step()  # evaluation traffic is accounted per kind, not per training step
        # Cloud optimizer: where the run goes back to when the cloud loses the remote LoRA's state (a copy of the
        # last checkpoint; the file may be unwritable).
        last = (
            copy.deepcopy(
                {
                    "adapter": sm.adapter.state_dict(),
                    "optimizer": opt.state_dict(),
                    "step": start,
                    "steps": steps,
                    "client_blocks": [p.detach() for p in trainable[n_adapter:]],
                    "remote_optimizer": ckpt.get("remote_optimizer") if ckpt else None,
                }
            )
            if cfg.cloud_optimizer
            else None
        )
        lost = 0  # sessions lost since the last checkpoint (progress resets it)
        restart = False  # a rollback is pending: the new session must get the checkpoint's remote state

        bar = tqdm(total=total_steps, initial=start, desc=f"tune ({cfg.mode})", unit="step", disable=not cfg.progress)
        sent = sum(s["bytes_sent"] for s in steps)
        recv = sum(s["bytes_received"] for s in steps)
        step = start
        while step < total_steps:
            batch = data.batch_at(step)
            t0 = time.perf_counter()

            def one_step():
                opt.zero_grad(set_to_none=True)
                loss, n_tok = sm.loss(batch, step, cfg.seed, train=True)  # noqa: B023
                loss.backward()
                return loss, n_tok

            checkpoint = (step + 1) % cfg.checkpoint_every == 0 or step + 1 == total_steps
            try:
                if restart:  # inside the try: the cloud may go away again while the new session gets its state
                    sm.middle.restart(last["remote_optimizer"])
                    restart = False
                loss, n_tok = surviving_restarts(sm, one_step)
                opt.step()
                wall = time.perf_counter() - t0
                # Cloud optimizer: the remote LoRA and its state come down for the checkpoint (this step's traffic).
                remote_state = sm.middle.fetch_state(step) if checkpoint and cfg.cloud_optimizer else None
            except SessionLost as e:
                if not cfg.cloud_optimizer:
                    raise
                lost += 1  # the cloud lost the remote LoRA's updates since the last checkpoint: redo them
                if lost > MAX_LOST_WITHOUT_PROGRESS:  # a cloud that never lets the run reach a checkpoint: stop
                    raise SessionLost(
                        f"{e}; the cloud lost {lost} sessions in a row before the run reached a new checkpoint, giving "
                        f"up at step {last['step']}. Rerun with --resume when the server is stable, or lower "
                        "--checkpoint-every"
                    ) from None
                log.warning(
                    "%s; going back to step %d (the last checkpoint) and redoing the steps since", e, last["step"]
                )
                sm.adapter.load_state_dict(last["adapter"])
                with torch.no_grad():
                    for p, saved in zip(trainable[n_adapter:], last["client_blocks"]):
                        p.copy_(saved)
                opt.load_state_dict(copy.deepcopy(last["optimizer"]))
                steps, step = copy.deepcopy(last["steps"]), last["step"]
                meter.take_step()  # the lost steps' traffic stays in the totals, not in the step records
                restart = True
                sent = sum(s["bytes_sent"] for s in steps)
                recv = sum(s["bytes_received"] for s in steps)
                bar.n = step
                bar.refresh()
                continue
            rec = meter.take_step()
            rec.update(
                step=step,
                loss=float(loss.detach()),
                tokens=int(batch["attention_mask"].sum()),
                label_tokens=n_tok,
                wall_s=wall,
                client_compute_s=wall - rec["rpc_s"] - rec["serialization_s"] - rec["sealing_s"],
                network_wait_s=max(0.0, rec["rpc_s"] - rec["cloud_compute_s"]),
            )
            steps.append(rec)
            sent += rec["bytes_sent"]
            recv += rec["bytes_received"]
            bar.update(1)
            bar.set_postfix(
                loss=f"{rec['loss']:.3f}",
                tok_s=f"{rec['tokens'] / wall:.0f}",
                sent=f"{sent / 2**20:.1f}MB",
                recv=f"{recv / 2**20:.1f}MB",
            )
            if checkpoint:
                blocks = [p.detach().clone() for p in trainable[n_adapter:]]
                payload = {
                    "adapter": sm.adapter.state_dict(),
                    "client_blocks": blocks,
                    "optimizer": opt.state_dict(),
                    "step": step + 1,
                    "steps": steps,
                    "val_before": val_before,
                    "config": _cfg_dict(cfg),
                    "remote_optimizer": remote_state,
                    "settings": settings,
                    "stages": stages,
                }
                if cfg.cloud_optimizer:
                    last, lost = copy.deepcopy(payload), 0  # progress: a new point to go back to
                save_checkpoint(cfg.out, payload)
                rundir.make_private(_ckpt_path(cfg.out))
            step += 1
        bar.close()
        val_after = evaluate(sm, data, cfg.seed + EVAL_AFTER_SEED)  # fresh cut noise: never the draws of the first pass
        adapter_dir = os.path.join(cfg.out, "adapter")
        save_peft(sm.adapter, adapter_dir, PeftMeta(sm.model_id, fan_in_fan_out=arch_for(sm.config).fan_in_fan_out))
        if cfg.tune_client_blocks:
            save_file(sm.client_block_state(), os.path.join(adapter_dir, CLIENT_BLOCKS_FILE), metadata={"format": "pt"})
        report = _report(cfg, sm, data, steps, meter, val_before, val_after, time.perf_counter() - t_start)
        if cfg.audit == "yes" or (cfg.audit == "auto" and sm.mode == "split"):
            write_json(os.path.join(cfg.out, "report.json"), report)
            report["privacy"] = privacy.audit_run(
                cfg.out, _cfg_dict(cfg), data, tokens=cfg.audit_tokens, progress=cfg.progress
            )
        write_json(os.path.join(cfg.out, "report.json"), report)
        rundir.make_run_private(
            cfg.out
        )  # adapter, report, recorded traffic (the CLI's umask already did; library calls too)
        return report
    finally:
        sm.close()
        if transport is not None:
            transport.close()


def _wire(sm: StagedModel) -> dict:
    sess = sm.session
    if sess is None:
        return {"codec": None, "gradient_codec": None, "lora_codec": None, "sealed": False, "sealing": "off"}
    # "sealed" only says tensors were encrypted; "sealing" says against whom (authenticated: active hops too).
    return {
        "codec": sess.codec,
        "gradient_codec": sess.gradient_codec,
        "lora_codec": sess.lora_codec,
        "sealed": sess.sealer is not None,
        "sealing": sess.sealing,
    }


def _cfg_dict(cfg: TuneConfig) -> dict:
    d = asdict(cfg)
    d["lora"]["target_modules"] = list(cfg.lora.target_modules)
    return d


def _report(cfg, sm, data, steps, meter, val_before, val_after, wall) -> dict:
    tot = meter.totals()
    sum_ = lambda k: sum(s[k] for s in steps)
    tokens = sum_("tokens") or 1
    one_time_sent = sum(v["sent"] for v in tot["one_time"].values())
    one_time_recv = sum(v["received"] for v in tot["one_time"].values())
    eval_kinds = {k: v for k, v in tot["per_kind"].items() if k.startswith("Eval")}
    train_sent, train_recv = sum_("bytes_sent"), sum_("bytes_received")
    batch_tokens = cfg.batch_size * cfg.seq_len
    return {
        "mode": sm.mode,
        "wire": _wire(sm),
        "model_id": sm.model_id,
        "layout": {"num_layers": sm.layout.num_layers, "bottom": sm.layout.bottom, "top": sm.layout.top},
        "config": _cfg_dict(cfg),
        "adapter": {
            "trainable_params": sum(p.numel() for p in sm.adapter.parameters())
            + (sum(v.numel() for v in sm.client_block_state().values()) if cfg.tune_client_blocks else 0),
            "client_blocks_tuned": cfg.tune_client_blocks,
            "remote_lora_params": sum(p.numel() for p in sm.middle.params),
        },
        "steps": steps,
        "totals": {
            "bytes_sent": train_sent + one_time_sent + sum(v["sent"] for v in eval_kinds.values()),
            "bytes_received": train_recv + one_time_recv + sum(v["received"] for v in eval_kinds.values()),
            "train_bytes_sent": train_sent,
            "train_bytes_received": train_recv,
            "one_time_bytes_sent": one_time_sent,
            "one_time_bytes_received": one_time_recv,
            "wall_s": wall,
            "steps": len(steps),
            "tokens": tokens,
            "per_kind": tot["per_kind"],
            "one_time": tot["one_time"],
            "framing_estimate_bytes": tot["framing_estimate_bytes"],
            "bytes_are": "serialized protobuf messages, measured; HTTP/2 and TLS framing estimated separately",
        },
        "per_token": {
            "bytes_sent": train_sent / tokens,
            "bytes_received": train_recv / tokens,
            "expected_bytes_per_step": _expected_bytes(sm, batch_tokens),
        },
        "time": {
            "client_compute_s": sum_("client_compute_s"),
            "cloud_compute_s": sum_("cloud_compute_s"),
            "serialization_s": sum_("serialization_s"),
            "sealing_s": sum(s.get("sealing_s", 0.0) for s in steps),
            "network_wait_s": sum_("network_wait_s"),
            "encryption_note": "sealing_s is the AES-GCM sealing of tensors (client side); TLS runs inside "
            "gRPC's core and is included in network_wait_s",
        },
        "validation": {"before": val_before, "after": val_after, "sequences": len(data.val)},
        "privacy": {
            "cut_after_block": sm.layout.bottom,
            "measured": False,
            "note": PRIVACY_NOTE.format(k=sm.layout.bottom)
            if sm.mode == "split"
            else OFFSITE_NOTE
            if sm.mode == "offsite"
            else "local mode: nothing leaves this process",
        },
    }

"""The privacy audit: attacks on exactly what the cloud received in a run, and the report's privacy section."""

from __future__ import annotations

import glob
import json
import logging
import os
from dataclasses import dataclass

import torch

from tandem.protos import serde
from tandem.protos import split_pb2 as pb
from tandem.stages.loading import cache_root, client_state, config_from_json, config_json, load_model, unpack_state
from tandem.stages.lora import load_peft_tensors
from tandem.stages.modules import StageLayout

from . import attacks as atk
from .defenses import CutNoise, dp_statement
from .errors import ClientError
from .transport import Recorder

log = logging.getLogger(__name__)

CONTEXT_FILE = "privacy_context.json"  # what the audit needs besides cloud_view/: the model, the cut, the defense
VIEW_DIR = "cloud_view"
MIDDLE_OUT = (
    "MiddleOutput"  # the middle's outputs the cloud computed for recorded steps (the client cannot recompute them)
)
OFFSITE_NOTE = (
    "Offsite-Tuning sends no activations at all: the cloud ships a compressed emulator and the data owner "
    "tunes offline (tandem's emulator/ path; nothing of the text leaves the machine)."
)


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
            self.write(kind, _opened(request, self.sealer_of()))

    def write(self, kind: str, request) -> None:
        with open(os.path.join(self.dir, f"{kind}-{self.counts[kind]:04d}.bin"), "wb") as f:
            f.write(request.SerializeToString())
        self.counts[kind] += 1


def _opened(request, sealer):
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


class PrivacyTap:
    """The cut transform of a run: applies the defense and keeps what the audit needs.

    In split mode the transport's AuditRecorder keeps the requests; this tap keeps the middle's
    outputs of the recorded steps (the cloud knows them: it computed them). In local mode nothing is
    sent, so the tap writes the requests split mode would send (same tensors, same format).
    """

    def __init__(self, sm, recorder: AuditRecorder | None, defense: CutNoise | None, record_requests: bool):
        self.sm, self.recorder, self.defense, self.record_requests = sm, recorder, defense, record_requests
        self.current: tuple[int, bool] | None = None
        if recorder is not None:
            sm.top.register_forward_pre_hook(self._middle_output)

    def __call__(self, h, am, step: int, seed: int, train: bool):
        out = self.defense(h, am, step, seed, train) if self.defense is not None else h
        self.current = (step, train)
        kind = "Forward" if train else "EvalForward"
        if self.record_requests and self.recorder is not None and self.recorder.wants(kind, step):
            self.recorder.write(
                kind,
                pb.ForwardRequest(
                    session_id="local",
                    step=step,
                    hidden=serde.to_proto(out),
                    attention_mask=serde.to_proto(am.to(torch.uint8)),
                    dropout_seed=seed,
                    train=train,
                ),
            )
        return out

    def _middle_output(self, module, args):
        if self.current is None or not self.current[1] or not self.recorder.wants("Backward", self.current[0]):
            return
        step, h_mid = self.current[0], args[0]
        with open(os.path.join(self.recorder.dir, f"{MIDDLE_OUT}-{step:06d}.bin"), "wb") as f:
            f.write(serde.to_proto(h_mid).SerializeToString())
        if self.record_requests and h_mid.requires_grad:
            h_mid.register_hook(
                lambda g: self.recorder.write(
                    "Backward", pb.BackwardRequest(session_id="local", step=step, grad_output=serde.to_proto(g))
                )
            )
        self.current = None


def auto_clip(sm, tokenizer, seq_len: int = 64, n_tokens: int = 1024) -> tuple[float, float]:
    """Median token norm at the cut on public text, (later positions, position 0): shipped weights only."""
    ids = atk.public_ids(tokenizer, n_tokens, min(seq_len, 64))
    with torch.no_grad():
        h = sm.bottom(ids, torch.ones_like(ids)).norm(dim=-1)  # (N, T); no adapter bound: the shipped weights
    return float(h[:, 1:].median()), float(h[:, 0].median())


def attach(sm, cfg, total_steps: int, recorder: AuditRecorder | None) -> PrivacyTap:
    """Installs the run's cut defense and recording on a StagedModel; writes RUN_DIR/privacy_context.json."""
    defense = None
    if cfg.noise_multiplier > 0 or cfg.clip_norm > 0:
        c, c0 = (cfg.clip_norm, 0.0) if cfg.clip_norm > 0 else auto_clip(sm, sm.tokenizer)
        defense = CutNoise(cfg.noise_multiplier, c, c0)
    audit_on = cfg.audit in ("yes", "record") or (cfg.audit == "auto" and sm.mode == "split")
    if audit_on and recorder is None:
        recorder = AuditRecorder(cfg.out)
    if recorder is not None:
        recorder.steps = plan_steps(total_steps)
        recorder.sealer_of = lambda: sm.session.sealer if sm.session is not None else None
    tap = PrivacyTap(sm, recorder if audit_on else None, defense, record_requests=sm.mode != "split")
    sm.cut_transform = tap
    ctx = {
        "mode": sm.mode,
        "model_config_json": config_json(sm.config),
        "layout": {"num_layers": sm.layout.num_layers, "bottom": sm.layout.bottom, "top": sm.layout.top},
        "stages_sha256": sm.stages_sha256,
        "model": cfg.model,
        "defense": defense.describe() if defense else None,
        "audit": audit_on,
    }
    os.makedirs(cfg.out, exist_ok=True)
    with open(os.path.join(cfg.out, CONTEXT_FILE), "w") as f:
        json.dump(ctx, f, indent=2)
    return tap


@dataclass
class Received:
    """One recorded request as the cloud decoded it."""

    kind: str
    step: int
    order: int
    hidden: torch.Tensor | None  # (B, T, H): Forward/EvalForward hidden, Backward grad_output
    mask: torch.Tensor | None  # (B, T)
    path: str


def _tensor(msg, name: str) -> torch.Tensor:
    if getattr(msg, "sealed", False):
        raise ClientError(
            f"{name} was recorded sealed; the audit reads what the cloud decrypts: run the audit without --seal"
        )
    codec = getattr(msg, "codec", 0)
    if codec and hasattr(serde, "decode"):
        return serde.decode(msg, name, {v: k for k, v in serde.CODEC_ENUM.items()}[codec])
    return serde.from_proto(msg, name)


def read_cloud_view(run_dir: str) -> list[Received]:
    """Decodes every recorded request in RUN_DIR/cloud_view (the bytes the cloud received)."""
    out = []
    for path in sorted(glob.glob(os.path.join(run_dir, VIEW_DIR, "*-[0-9][0-9][0-9][0-9].bin"))):
        kind, num = os.path.basename(path)[:-4].rsplit("-", 1)
        with open(path, "rb") as f:
            raw = f.read()
        try:
            if kind == "Backward":
                msg = pb.BackwardRequest.FromString(raw)
                out.append(
                    Received(kind, msg.step, int(num), _tensor(msg.grad_output, "grad_output").float(), None, path)
                )
            elif kind in ("Forward", "EvalForward"):
                msg = pb.ForwardRequest.FromString(raw)
                out.append(
                    Received(
                        kind,
                        msg.step,
                        int(num),
                        _tensor(msg.hidden, "hidden").float(),
                        _tensor(msg.attention_mask, "attention_mask").long(),
                        path,
                    )
                )
        except Exception as e:  # noqa: BLE001 - any decode failure means the recording is unusable
            raise ClientError(
                f"{path} is not a {kind} request the cloud could have received ({e}); "
                "the audit attacks only intact recordings: rerun `client tune`"
            ) from None
    return out


def _known_state(ctx: dict, config, layout: StageLayout):
    """The shipped client-stage weights and the tokenizer, as the data owner has them."""
    from tandem.stages.loading import load_tokenizer

    if ctx["mode"] == "split":
        from . import downloads

        sha = ctx["stages_sha256"] or ""
        where = os.path.join(cache_root(), "client", sha)
        # The cache came from the network: read it only through the hash record its download wrote.
        files = downloads.read_verified(where, {downloads.STAGES_FILE: sha}) if sha else None
        if files is None:
            raise ClientError(
                f"the client stages this run downloaded are not in the cache, or fail their hash check "
                f"({where}); rerun `client tune`"
            )
        return unpack_state(files[downloads.STAGES_FILE]), downloads.load_tokenizer(files)
    from tandem.stages.arch import parts_of
    from tandem.stages.loading import default_model_dir

    loaded = load_model(ctx["model"])
    return client_state(parts_of(loaded.model), layout), load_tokenizer(ctx["model"] or default_model_dir())


def _score(tokenizer, rows: list[tuple[torch.Tensor, torch.Tensor]]) -> dict:
    """Token recovery and word-level ROUGE-L F1 of (guess, truth) rows."""
    hit = sum(int((g == t).sum()) for g, t in rows)
    n = sum(len(t) for _, t in rows)
    rl = [atk.rouge_l(tokenizer.decode(t).split(), tokenizer.decode(g).split()) for g, t in rows]
    return {
        "token_recovery": hit / max(n, 1),
        "rouge_l": sum(rl) / max(len(rl), 1),
        "tokens": n,
        "sequences": len(rows),
    }


ATTACKS = {
    "logit_lens": "a1: final norm + LM head on the cut state (no training, no search)",
    "nearest_embedding": "a2: nearest input embedding (cosine) after removing the public-text mean",
    "learned_inverter": "b: ridge regression from cut states to input embeddings, fitted on public text through the known bottom stage, nearest token",
    "search": "c: causal search over the inverter's top candidates for the tokens whose bottom-stage output is nearest the received state",
}


def attack_rows(known, rows, tokenizer, defense, public, search_tokens: int, candidates: int, bar=None) -> dict:
    """Runs the four forward attacks on sample rows [(received states (T, H), true ids (T,))]."""
    inv = atk.RidgeInverter(known, public, defense)
    flat = torch.cat([h for h, _ in rows])
    lens, near, scores = atk.logit_lens(known, flat), atk.nearest_embedding(known, flat, inv.mean), inv.scores(flat)
    top = scores.topk(candidates, -1).indices  # (n, C)
    out, guesses, at = {}, {k: [] for k in ("logit_lens", "nearest_embedding", "learned_inverter", "search")}, 0
    budget = search_tokens
    for h, t in rows:
        sl = slice(at, at + len(t))
        guesses["logit_lens"].append((lens[sl], t))
        guesses["nearest_embedding"].append((near[sl], t))
        guesses["learned_inverter"].append((top[sl, 0], t))
        if budget > 0:
            guesses["search"].append((atk.search_attack(known, h, top[sl], defense), t))
            budget -= len(t)
        at += len(t)
        if bar is not None:
            bar.update(1)
    for k, v in guesses.items():
        out[k] = {**_score(tokenizer, v), "how": ATTACKS[k]}
    return out


def inventory(view: list[Received], run_dir: str) -> dict:
    """Every field and tensor dtype in the recorded requests, by kind."""
    inv: dict[str, dict] = {}
    for r in view:
        with open(r.path, "rb") as f:
            msg = (pb.BackwardRequest if r.kind == "Backward" else pb.ForwardRequest).FromString(f.read())
        fields = inv.setdefault(r.kind, {})
        for fd, value in msg.ListFields():
            fields[fd.name] = pb.DType.Name(value.dtype) if isinstance(value, pb.Tensor) else type(value).__name__
    return inv


def audit_run(
    run_dir: str,
    cfg: dict | None = None,
    data=None,
    tokens: int = 256,
    search_tokens: int = 128,
    candidates: int = 8,
    public_tokens: int = 4096,
    progress: bool = False,
    tuned: bool = True,
) -> dict:
    """Attacks what the cloud received in a run (RUN_DIR/cloud_view) and returns the privacy section.

    Args:
        run_dir: The --out directory of a `client tune` run.
        cfg: The run's TuneConfig as a dict (default: from RUN_DIR/report.json).
        data: The run's DataSplit (default: re-read from the run's --data, which must be unchanged).
        tokens: Received tokens attacked by the cheap attacks.
        search_tokens: Of those, tokens attacked by the search.
        candidates: Candidates per position for the search.
        public_tokens: Public-text tokens the inverter is fitted on.
        progress: Show a progress bar.
        tuned: Also attack with the data owner's tuned weights (shows how stale the cloud's copy is).
    """
    from tqdm.auto import tqdm

    ctx_path = os.path.join(run_dir, CONTEXT_FILE)
    if not os.path.exists(ctx_path):
        raise ClientError(f"no {CONTEXT_FILE} in {run_dir}: audit a directory written by `client tune`")
    with open(ctx_path) as f:
        ctx = json.load(f)
    if cfg is None:
        from .report import load

        cfg = load(run_dir)["config"]
    view = read_cloud_view(run_dir)
    fwd = [r for r in view if r.kind == "Forward"]
    if not fwd:
        raise ClientError(
            f"{run_dir}/{VIEW_DIR} holds no recorded Forward request: nothing to audit "
            "(was the run made with --audit no?)"
        )
    config = config_from_json(ctx["model_config_json"])
    layout = StageLayout(**ctx["layout"])
    state, tokenizer = _known_state(ctx, config, layout)
    if data is None:
        from .data import load_split

        data = load_split(
            cfg["data"],
            tokenizer,
            cfg["seq_len"],
            cfg["batch_size"],
            cfg["seed"],
            cfg["val_fraction"],
            cfg.get("val_max_sequences", 2**62),
        )  # absent: a run from before the cap
    defense = (
        CutNoise(ctx["defense"]["noise_multiplier"], ctx["defense"]["clip_norm"], ctx["defense"]["first_clip_norm"])
        if ctx["defense"]
        else None
    )
    rows = _sample(fwd, data, tokens)
    known = atk.KnownStages.build(config, layout, state)
    public = atk.public_ids(tokenizer, public_tokens, 64)
    adapter_dir = os.path.join(run_dir, "adapter")
    variants = {"known": known}
    if tuned and os.path.exists(os.path.join(adapter_dir, "adapter_model.safetensors")):
        variants["tuned"] = atk.KnownStages.build(
            config, layout, _tuned_state(state, adapter_dir, layout, config), load_peft_tensors(adapter_dir)
        )
    bar = tqdm(total=len(rows) * len(variants), desc="privacy audit", unit="seq", disable=not progress)
    results = {
        k: attack_rows(v, rows, tokenizer, defense, public, search_tokens, candidates, bar) for k, v in variants.items()
    }
    bar.close()
    labels = _label_attack(view, run_dir, known, data)
    strongest = max(results["known"].items(), key=lambda kv: kv[1]["token_recovery"])
    steps = sorted({r.step for r in fwd})
    total = cfg["steps"] or -(-int(cfg["epochs"] * data.batches_per_epoch) // 1)
    passes = max(2, -(-total * cfg["batch_size"] // max(len(data.train), 1)))  # training epochs; validation rows: 2
    dp = dp_statement(defense, int(cfg["seq_len"]), passes)
    section = {
        "measured": True,
        "cut_after_block": layout.bottom,
        "client_blocks": f"{layout.bottom}:{layout.top}",
        "sample": {
            "kind": "Forward (training) requests as recorded from the transport",
            "steps": steps,
            "sequences": len(rows),
            "tokens": sum(len(t) for _, t in rows),
            "search_tokens": min(search_tokens, sum(len(t) for _, t in rows)),
            "search_candidates": candidates,
            "public_tokens": int(public.numel()),
        },
        "attacks": results,
        "strongest": {
            "attack": strongest[0],
            "token_recovery": strongest[1]["token_recovery"],
            "rouge_l": strongest[1]["rouge_l"],
        },
        "labels": labels,
        "received": inventory(view, run_dir),
        "defenses": {
            "client_blocks": {"K": layout.bottom, "set_by": "the operator (cloud serve --client-blocks)"},
            "cut_noise": {**(defense.describe() if defense else {"noise_multiplier": 0.0}), **dp},
            "private_lora": _staleness(results),
            "offsite_tuning": OFFSITE_NOTE,
        },
        "assumptions": (
            "The attacker is the cloud operator: it knows the full model, hence the client-stage weights it shipped, "
            "and the defense settings; it does not know the data owner's LoRA ('known' rows; 'tuned' rows show an "
            "attacker who also had the final LoRA). It sees every request recorded in cloud_view/. Public text: "
            "Python standard-library docstrings. The search only tries the inverter's top candidates."
        ),
    }
    section["note"] = one_line(section)
    return section


def _tuned_state(state: dict, adapter_dir: str, layout: StageLayout, config) -> dict:
    """The shipped weights with the run's fully tuned client blocks (if any) put in place."""
    from safetensors.torch import load_file

    from tandem.stages.arch import arch_for

    path = os.path.join(adapter_dir, "client_blocks.safetensors")
    if not os.path.exists(path):
        return state
    prefix = arch_for(config).block_prefix
    out = dict(state)
    for k, v in load_file(path).items():
        gid, rest = k[len(prefix) + 1 :].split(".", 1)
        out[f"{prefix}.{layout.client_blocks.index(int(gid))}.{rest}"] = v
    return out


def _sample(fwd: list[Received], data, tokens: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Rows (received states, true ids) of the valid tokens, round robin over the recorded steps."""
    per_step = []
    for r in sorted(fwd, key=lambda r: r.step):
        batch = data.batch_at(r.step)
        if not torch.equal(batch["attention_mask"].long(), r.mask):
            raise ClientError(
                f"{r.path}: the recorded mask does not match step {r.step} of the run's data; "
                "the audit needs the run's --data, --seq-len, --batch-size and --seed unchanged"
            )
        per_step.append(
            [
                (r.hidden[b, : int(r.mask[b].sum())], batch["input_ids"][b, : int(r.mask[b].sum())])
                for b in range(r.hidden.shape[0])
            ]
        )
    rows, n, i = [], 0, 0
    while n < tokens and any(per_step):
        group = per_step[i % len(per_step)]
        if group:
            h, t = group.pop(0)
            take = min(len(t), tokens - n)
            rows.append((h[:take], t[:take]))
            n += take
        i += 1
    return rows


def _label_attack(view: list[Received], run_dir: str, known, data) -> dict:
    """The gradient attack on the top cut, on every recorded Backward with its middle output."""
    hits = n = 0
    steps = []
    for r in view:
        if r.kind != "Backward":
            continue
        path = os.path.join(run_dir, VIEW_DIR, f"{MIDDLE_OUT}-{r.step:06d}.bin")
        if not os.path.exists(path):
            continue
        with open(path, "rb") as f:
            h_mid = serde.from_proto(pb.Tensor.FromString(f.read()), "middle output").float()
        batch = data.batch_at(r.step)
        guess = atk.gradient_attack(known, h_mid, r.hidden, batch["attention_mask"])[:, :-1]
        labels = batch["labels"][:, 1:]
        keep = labels != -100
        hits += int((guess[keep] == labels[keep]).sum())
        n += int(keep.sum())
        steps.append(r.step)
    return {
        "gradient_attack": {
            "label_recovery": hits / n if n else None,
            "labels": n,
            "steps": steps,
            "how": "push -dL/dh' through the shipped top blocks, norm and head (finite-difference JVP); argmax logit",
        },
        "on_the_wire": "no label or token id: the cloud receives float32 states and gradients and a uint8 padding mask (see 'received')",
        "note": (
            "Labels and the loss stay on the client, but the gradient at the top cut is J^T (softmax - onehot(label)) / n: "
            "with the top-stage weights it shipped, the cloud reads labels (= the next tokens) from it. Forward noise "
            "does not protect this path; the data owner's LoRA on the top blocks makes the cloud's Jacobian stale."
        ),
    }


def _staleness(results: dict) -> dict:
    if "tuned" not in results:
        return {"note": "no adapter in the run directory"}
    k, t = results["known"], results["tuned"]
    return {
        "recovery_with_known_weights": {a: k[a]["token_recovery"] for a in k},
        "recovery_with_tuned_weights": {a: t[a]["token_recovery"] for a in t},
        "note": "the cloud only knows the shipped weights; the data owner's LoRA on the bottom blocks makes them stale",
    }


def one_line(section: dict) -> str:
    """The report's one-line privacy summary."""
    s, lab = section["strongest"], section["labels"]["gradient_attack"]
    noise = section["defenses"]["cut_noise"]
    eps = noise.get("epsilon_per_release")
    line = (
        f"A curious operator recovers {s['token_recovery']:.0%} of the tokens it received (ROUGE-L {s['rouge_l']:.2f}, "
        f"attack '{s['attack']}', {section['sample']['tokens']} tokens after client block {section['cut_after_block']})"
    )
    if lab["label_recovery"] is not None:
        line += f" and {lab['label_recovery']:.0%} of the labels from the top-cut gradients"
    line += (
        "; cut noise: "
        + (
            f"multiplier {noise['noise_multiplier']}, epsilon {eps:.3g} per vector per release (delta {noise['delta']:g})"
            if eps
            else "none"
        )
        + "."
    )
    return line


def render_privacy(section: dict, console=None) -> None:
    """Prints the privacy section as a table."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    if not section.get("measured"):
        console.print(f"[bold]privacy:[/bold] {section.get('note', '')}")
        return
    t = Table(title=f"privacy audit: what the cloud could recover (cut after block {section['cut_after_block']})")
    for col in ("attack", "weights", "token recovery", "ROUGE-L", "tokens"):
        t.add_column(col, justify="left" if col in ("attack", "weights") else "right")
    for variant, res in section["attacks"].items():
        for name, r in res.items():
            t.add_row(name, variant, f"{r['token_recovery']:.1%}", f"{r['rouge_l']:.3f}", str(r["tokens"]))
    g = section["labels"]["gradient_attack"]
    if g["label_recovery"] is not None:
        t.add_row("gradient (labels)", "known", f"{g['label_recovery']:.1%}", "", str(g["labels"]))
    console.print(t)
    console.print(f"[bold]privacy:[/bold] {section['note']}")

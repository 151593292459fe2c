"""The run report: assembling report.json from a finished run, and reading it back as tables and a plot."""

from __future__ import annotations

import json
import os

from tandem.stages.traffic import step_bytes

PRIVACY_NOTE = (
    "The cloud receives the hidden states after client block {k} and the gradients at the top cut. At shallow "
    "cuts these are invertible by an operator who knows the client-stage weights it shipped (the literature "
    "recovers 85-96% ROUGE-L on 7B decoders). TLS protects them from the network, not from the cloud. This run "
    "did not measure that exposure; treat your text as readable by the operator."
)
OFFSITE_NOTE = (
    "Offsite-Tuning sends no activations at all: the cloud ships a compressed emulator and the data owner "
    "tunes offline (tandem's emulator/ path; nothing of the text leaves the machine, only the adapter, when "
    "you run `client push`)."
)
LOCAL_NOTE = "local mode: nothing leaves this process"
BYTES_ARE = "serialized protobuf messages, measured; HTTP/2 and TLS framing estimated separately"
ENCRYPTION_NOTE = (
    "sealing_s is the AES-GCM sealing of tensors (client side); TLS runs inside gRPC's core and is included in "
    "network_wait_s"
)


def run_report(cfg, model, data, steps: list[dict], meter, val_before: dict, val_after: dict, wall: float) -> dict:
    """report.json of a finished run: what was tuned, the bytes and time per step and in all, validation, privacy."""
    train_tokens = sum(s["tokens"] for s in steps) or 1
    return {
        "mode": model.mode,
        "wire": wire(model),
        "model_id": model.model_id,
        "layout": {"num_layers": model.layout.num_layers, "bottom": model.layout.bottom, "top": model.layout.top},
        "config": cfg.to_dict(),
        "adapter": _adapter(cfg, model),
        "steps": steps,
        "totals": _totals(steps, meter.totals(), train_tokens, wall),
        "per_token": {
            "bytes_sent": _sum(steps, "bytes_sent") / train_tokens,
            "bytes_received": _sum(steps, "bytes_received") / train_tokens,
            "expected_bytes_per_step": expected_bytes(model, cfg.batch_size * cfg.seq_len),
        },
        "time": _time(steps),
        "validation": {"before": val_before, "after": val_after, "sequences": len(data.val)},
        "privacy": {"cut_after_block": model.layout.bottom, "measured": False, "note": privacy_note(model)},
    }


def wire(model) -> dict:
    """The codecs the session agreed and whether tensors were sealed (all off outside split mode)."""
    session = model.session
    if session is None:
        return {"codec": None, "gradient_codec": None, "lora_codec": None, "sealed": False, "sealing": "off"}
    # "sealed" only says tensors were encrypted; "sealing" says against whom (authenticated: active hops too).
    return {
        "codec": session.codec,
        "gradient_codec": session.gradient_codec,
        "lora_codec": session.lora_codec,
        "sealed": session.sealer is not None,
        "sealing": session.sealing,
        "error_feedback": session.error_feedback,  # both sides carried their int8/int4 streams' error
        "exact_eval": model.middle.transport.cfg.exact_eval,  # the validation forwards travelled in float32
    }


def expected_bytes(model, batch_tokens: int) -> int:
    """What a training step must carry in the session's codecs, both ways (the formula `cloud plan` uses too)."""
    if model.mode != "split":
        return 0
    session = model.session
    lora = 0 if model.middle.cloud_optimizer else sum(p.numel() for p in model.middle.params)
    hidden = int(model.config.hidden_size)
    codecs = (session.codec, session.gradient_codec, session.lora_codec)
    return step_bytes(batch_tokens, hidden, lora, *codecs, backward=model.trains_below_top()).total


def privacy_note(model) -> str:
    """What the cloud received, in one paragraph (the audit, when it runs, replaces it with measured figures)."""
    if model.mode == "split":
        return PRIVACY_NOTE.format(k=model.layout.bottom)
    return OFFSITE_NOTE if model.mode == "offsite" else LOCAL_NOTE


def _sum(steps: list[dict], key: str) -> float:
    return sum(s[key] for s in steps)


def _adapter(cfg, model) -> dict:
    tuned_blocks = sum(v.numel() for v in model.client_block_state().values()) if cfg.tune_client_blocks else 0
    return {
        "trainable_params": sum(p.numel() for p in model.adapter.parameters()) + tuned_blocks,
        "client_blocks_tuned": cfg.tune_client_blocks,
        "remote_lora_params": sum(p.numel() for p in model.middle.params),
    }


def _totals(steps: list[dict], meter_totals: dict, train_tokens: int, wall: float) -> dict:
    """Bytes in all: training steps, one-time transfers (session, stages, tokenizer) and evaluation."""
    one_time = meter_totals["one_time"].values()
    evals = [v for k, v in meter_totals["per_kind"].items() if k.startswith("Eval")]
    train_sent, train_received = _sum(steps, "bytes_sent"), _sum(steps, "bytes_received")
    one_time_sent, one_time_received = sum(v["sent"] for v in one_time), sum(v["received"] for v in one_time)
    return {
        "bytes_sent": train_sent + one_time_sent + sum(v["sent"] for v in evals),
        "bytes_received": train_received + one_time_received + sum(v["received"] for v in evals),
        "train_bytes_sent": train_sent,
        "train_bytes_received": train_received,
        "one_time_bytes_sent": one_time_sent,
        "one_time_bytes_received": one_time_received,
        "wall_s": wall,
        "steps": len(steps),
        "tokens": train_tokens,
        "per_kind": meter_totals["per_kind"],
        "one_time": meter_totals["one_time"],
        "framing_estimate_bytes": meter_totals["framing_estimate_bytes"],
        "bytes_are": BYTES_ARE,
    }


def _time(steps: list[dict]) -> dict:
    return {
        "client_compute_s": _sum(steps, "client_compute_s"),
        "cloud_compute_s": _sum(steps, "cloud_compute_s"),
        "serialization_s": _sum(steps, "serialization_s"),
        "sealing_s": sum(s.get("sealing_s", 0.0) for s in steps),
        "network_wait_s": _sum(steps, "network_wait_s"),
        "encryption_note": ENCRYPTION_NOTE,
    }


def load(run_dir: str) -> dict:
    path = os.path.join(run_dir, "report.json")
    if not os.path.exists(path):
        from .errors import ClientError

        raise ClientError(f"no report.json in {run_dir}; run `client tune --out {run_dir}` first")
    with open(path) as f:
        return json.load(f)


def _mb(n: float) -> str:
    return f"{n / 2**20:,.2f} MiB" if n >= 2**20 else f"{n / 1024:,.1f} KiB"


def render(report: dict, console=None) -> None:
    """Prints the communication and training report as tables."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    totals = report["totals"]
    steps = report["steps"]
    n = max(len(steps), 1)
    head = Table(
        title=f"tandem {report['mode']} run: {report['model_id']}  "
        f"(client blocks {report['layout']['bottom']}:{report['layout']['top']} of {report['layout']['num_layers']})"
    )
    head.add_column("what")
    head.add_column("sent", justify="right")
    head.add_column("received", justify="right")
    head.add_row(
        "one-time (session, stages, tokenizer)",
        _mb(totals["one_time_bytes_sent"]),
        _mb(totals["one_time_bytes_received"]),
    )
    head.add_row(
        f"training ({totals['steps']} steps)", _mb(totals["train_bytes_sent"]), _mb(totals["train_bytes_received"])
    )
    head.add_row("per step", _mb(totals["train_bytes_sent"] / n), _mb(totals["train_bytes_received"] / n))
    head.add_row(
        "per token", f"{report['per_token']['bytes_sent']:,.0f} B", f"{report['per_token']['bytes_received']:,.0f} B"
    )
    for kind, counts in sorted(totals["per_kind"].items()):
        head.add_row(f"  {kind} x{counts['calls']}", _mb(counts["sent"]), _mb(counts["received"]))
    head.add_row("total (all kinds)", _mb(totals["bytes_sent"]), _mb(totals["bytes_received"]))
    head.add_row("est. HTTP/2+TLS framing (both ways)", _mb(totals["framing_estimate_bytes"]), "")
    console.print(head)

    seconds = report["time"]
    times = Table(title=f"time ({totals['wall_s']:.1f} s wall in all)")
    for col in ("client compute", "cloud compute", "serialization", "network wait"):
        times.add_column(col, justify="right")
    times.add_row(
        *(f"{seconds[k]:.2f} s" for k in ("client_compute_s", "cloud_compute_s", "serialization_s", "network_wait_s"))
    )
    console.print(times)

    validation = report["validation"]
    val = Table(title="validation (held-out split)")
    val.add_column("")
    val.add_column("loss", justify="right")
    val.add_column("perplexity", justify="right")
    val.add_row("before", f"{validation['before']['loss']:.4f}", f"{validation['before']['ppl']:.2f}")
    val.add_row("after", f"{validation['after']['loss']:.4f}", f"{validation['after']['ppl']:.2f}")
    console.print(val)
    if report.get("kill_revive"):
        from .kill_revive import one_line as kill_revive_line

        console.print(kill_revive_line(report["kill_revive"]))
    console.print(f"[bold]privacy:[/bold] {report['privacy']['note']}")


def plot(report: dict, path: str) -> str:
    """Writes a PNG with the loss and the bytes per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = report["steps"]
    x = [s["step"] for s in steps]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.plot(x, [s["loss"] for s in steps], marker=".")
    a.axhline(report["validation"]["before"]["loss"], color="gray", ls="--", label="val before")
    a.axhline(report["validation"]["after"]["loss"], color="green", ls="--", label="val after")
    a.set(xlabel="step", ylabel="training loss", title="loss")
    a.legend()
    b.bar(x, [s["bytes_sent"] / 2**20 for s in steps], label="sent")
    b.bar(
        x,
        [s["bytes_received"] / 2**20 for s in steps],
        bottom=[s["bytes_sent"] / 2**20 for s in steps],
        label="received",
    )
    b.set(xlabel="step", ylabel="MiB", title=f"bytes per step ({report['mode']})")
    b.legend()
    fig.suptitle(f"tandem: {report['model_id']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def one_line(section: dict) -> str:
    """The report's one-line privacy summary."""
    best, labels = section["strongest"], section["labels"]["gradient_attack"]
    noise = section["defenses"]["cut_noise"]
    eps = noise.get("epsilon_per_release")
    line = (
        f"A curious operator recovers {best['token_recovery']:.0%} of the tokens it received "
        f"(ROUGE-L {best['rouge_l']:.2f}, attack '{best['attack']}', {section['sample']['tokens']} tokens "
        f"after client block {section['cut_after_block']})"
    )
    if labels["label_recovery"] is not None:
        line += f" and {labels['label_recovery']:.0%} of the labels from the top-cut gradients"
    adaptive = section.get("labels", {}).get("adaptive")
    if adaptive and adaptive["label_recovery"] is not None:  # labels are next tokens: the adaptive attacker reads them
        line += f" ({adaptive['label_recovery']:.0%} as the adaptive attacker's recovered next tokens)"
    if eps:
        noise_text = f"multiplier {noise['noise_multiplier']}, epsilon {eps:.3g} per vector per release (delta {noise['delta']:g})"
    else:
        noise_text = "none"
    return line + "; cut noise: " + noise_text + "."


def render_privacy(section: dict, console=None) -> None:
    """Prints the privacy section as a table."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    if not section.get("measured"):
        console.print(f"[bold]privacy:[/bold] {section.get('note', '')}")
        return
    table = Table(title=f"privacy audit: what the cloud could recover (cut after block {section['cut_after_block']})")
    for col in ("attack", "weights", "token recovery", "ROUGE-L", "tokens"):
        table.add_column(col, justify="left" if col in ("attack", "weights") else "right")
    for variant, results in section["attacks"].items():
        for name, r in results.items():
            table.add_row(name, variant, f"{r['token_recovery']:.1%}", f"{r['rouge_l']:.3f}", str(r["tokens"]))
    gradient = section["labels"]["gradient_attack"]
    if gradient["label_recovery"] is not None:
        table.add_row("gradient (labels)", "known", f"{gradient['label_recovery']:.1%}", "", str(gradient["labels"]))
    console.print(table)
    console.print(f"[bold]privacy:[/bold] {section['note']}")

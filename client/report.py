"""Reading a run's report.json: a table for people, a PNG plot."""

from __future__ import annotations

import json
import os


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
    t = report["totals"]
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
        "one-time (session, stages, tokenizer)", _mb(t["one_time_bytes_sent"]), _mb(t["one_time_bytes_received"])
    )
    head.add_row(f"training ({t['steps']} steps)", _mb(t["train_bytes_sent"]), _mb(t["train_bytes_received"]))
    head.add_row("per step", _mb(t["train_bytes_sent"] / n), _mb(t["train_bytes_received"] / n))
    head.add_row(
        "per token", f"{report['per_token']['bytes_sent']:,.0f} B", f"{report['per_token']['bytes_received']:,.0f} B"
    )
    for kind, v in sorted(t["per_kind"].items()):
        head.add_row(f"  {kind} x{v['calls']}", _mb(v["sent"]), _mb(v["received"]))
    head.add_row("total (all kinds)", _mb(t["bytes_sent"]), _mb(t["bytes_received"]))
    head.add_row("est. HTTP/2+TLS framing (both ways)", _mb(t["framing_estimate_bytes"]), "")
    console.print(head)

    tm = report["time"]
    times = Table(title=f"time ({t['wall_s']:.1f} s wall in all)")
    for col in ("client compute", "cloud compute", "serialization", "network wait"):
        times.add_column(col, justify="right")
    times.add_row(
        *(f"{tm[k]:.2f} s" for k in ("client_compute_s", "cloud_compute_s", "serialization_s", "network_wait_s"))
    )
    console.print(times)

    v = report["validation"]
    val = Table(title="validation (held-out split)")
    val.add_column("")
    val.add_column("loss", justify="right")
    val.add_column("perplexity", justify="right")
    val.add_row("before", f"{v['before']['loss']:.4f}", f"{v['before']['ppl']:.2f}")
    val.add_row("after", f"{v['after']['loss']:.4f}", f"{v['after']['ppl']:.2f}")
    console.print(val)
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

"""Error feedback on SmolLM2: bytes per step and validation loss of float32, int8, int4 and int4/int8 + error feedback.

Run: nice -n 5 .venv/bin/python bench/codec_feedback.py [--steps 150] [--batch 2 --seq 64] [--configs ...]

Every configuration tunes the same LoRA (r=8, alpha 16 on q,v, every block) from the same seed on the same data for
the same steps, in split mode against one real `cloud serve` (TLS, sealed). The remote LoRA is optimized by the cloud
(--cloud-optimizer, what a data owner on a slow link uses: the remote LoRA goes up once, no LoRA-sized tensor per
step; --no-cloud-optimizer sends it up and its gradients down every step in --lora-codec). Bytes are the meter's:
every request and reply of the training steps (serialized protobuf, sealed), the first step's LoRA upload included;
the final GetRemoteState (the tuned remote LoRA and its moments, float32) is shown apart as a one-off.

`+ef` is `--error-feedback`: the gradient streams carry their error and every int8/int4 tensor is rotated
(tandem.kernels.feedback). Validation loss is measured two ways after the same steps: through the session's codec (what `client tune` reports;
evaluation forwards use the plain codec, no feedback) and exactly (the same adapter evaluated through a float32
session: the honest measure of what was tuned). Writes bench/out/codec_feedback.json.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import torch

from tandem.testing.bench_cli import bench_parser, offline_hub

offline_hub()

from tandem.client.assemble import connect_split  # noqa: E402
from tandem.client.data import load_split  # noqa: E402
from tandem.client.evaluation import evaluate  # noqa: E402
from tandem.client.sample import write_sample  # noqa: E402
from tandem.client.trainer import ADAMW, make_optimizer  # noqa: E402
from tandem.client.transport import Transport  # noqa: E402
from tandem.stages.lora import LoraConfig  # noqa: E402
from tandem.testing.servers import start_server  # noqa: E402

LORA = LoraConfig(rank=8, alpha=16)


def _connect(server, args, codec: str, feedback: bool):
    transport = Transport(
        server.transport_cfg(codec=codec, error_feedback=feedback, lora_codec=args.lora_codec, seal=True)
    )
    adamw = ADAMW | {"lr": args.lr} if args.cloud_optimizer else None
    return transport, connect_split(transport, LORA, seed=args.seed, cloud_optimizer=adamw)


def _exact_val(server, args, model, data_dir) -> float:
    """The adapter's validation loss through a float32 session (exact activations both ways)."""
    transport, exact = _connect(server, args, "float32", False)
    exact.adapter.load_state_dict(model.adapter.state_dict())
    data = load_split(data_dir, exact.tokenizer, args.seq, args.batch, args.seed, 0.1)
    loss = evaluate(exact, data, 0)["loss"]
    exact.close()
    transport.close()
    return loss


def run(server, data_dir, name: str, args) -> dict:
    codec, feedback = name.removesuffix("+ef"), name.endswith("+ef")
    torch.manual_seed(args.seed)
    transport, model = _connect(server, args, codec, feedback)
    data = load_split(data_dir, model.tokenizer, args.seq, args.batch, args.seed, 0.1)
    remote = {id(p) for p in model.middle.params} if args.cloud_optimizer else set()
    optimizer = make_optimizer([p for p in model.adapter.parameters() if id(p) not in remote], args.lr)
    transport.meter.take_step()
    steps, t0 = [], time.perf_counter()
    for step in range(args.steps):
        optimizer.zero_grad()
        loss, _ = model.loss(data.batch_at(step), step, 0, train=True)
        loss.backward()
        optimizer.step()
        rec = transport.meter.take_step()
        steps.append({"loss": float(loss.detach()), "bytes": rec["bytes_sent"] + rec["bytes_received"]})
    train_s = time.perf_counter() - t0
    val_codec = evaluate(model, data, 0)["loss"]
    transport.meter.take_step()
    if args.cloud_optimizer:
        model.middle.fetch_state(args.steps)
    fetch = transport.meter.take_step()
    model.close()
    transport.close()
    total = sum(s["bytes"] for s in steps)
    return {
        "config": name,
        "bytes_per_step": total / len(steps),
        "bytes_per_step_after_first": sum(s["bytes"] for s in steps[1:]) / max(1, len(steps) - 1),
        "final_fetch_bytes": fetch["bytes_sent"] + fetch["bytes_received"],
        "train_loss_last10": sum(s["loss"] for s in steps[-10:]) / len(steps[-10:]),
        "val_loss_codec": val_codec,
        "val_loss_exact": _exact_val(server, args, model, data_dir),
        "train_s": train_s,
        "losses": [s["loss"] for s in steps],
    }


def main() -> None:
    p = bench_parser(__file__, __doc__, results=True, seed=0)
    p.add_argument("--steps", type=int, default=150, help="tuning steps per configuration")
    p.add_argument("--batch", type=int, default=2, help="sequences per step")
    p.add_argument("--seq", type=int, default=64, help="tokens per sequence")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (client tune's default)")
    p.add_argument(
        "--configs", default="float32,int8,int4,int4+ef,int8+ef", help="codecs to compare; +ef: with --error-feedback"
    )
    p.add_argument("--lora-codec", default="float32", help="codec of the remote LoRA's traffic")
    p.add_argument(
        "--no-cloud-optimizer",
        dest="cloud_optimizer",
        action="store_false",
        help="the client optimizes the remote LoRA (it travels every step, both ways)",
    )
    args = p.parse_args()
    from rich.console import Console
    from rich.table import Table

    tmp = tempfile.mkdtemp(prefix="tandem-bench-")
    data_dir = write_sample(os.path.join(tmp, "data"), n=300)
    server = start_server(None, Path(tmp), timeout=300)
    out = {"setup": vars(args), "runs": []}
    try:
        for name in args.configs.split(","):
            out["runs"].append(run(server, data_dir, name, args))
    finally:
        server.stop()
    base = out["runs"][0]
    table = Table(
        title=f"SmolLM2, {args.steps} steps of {args.batch}x{args.seq}, lr {args.lr}, "
        f"{'cloud optimizer' if args.cloud_optimizer else 'client optimizer, lora codec ' + args.lora_codec}, sealed"
    )
    for col in (
        "config",
        "B/step",
        "x first",
        "x first (steady)",
        "val (codec)",
        "vs first",
        "val (exact)",
        "vs first",
    ):
        table.add_column(col, justify="right")
    for r in out["runs"]:
        table.add_row(
            r["config"],
            f"{r['bytes_per_step']:,.0f}",
            f"{r['bytes_per_step'] / base['bytes_per_step']:.3f}",
            f"{r['bytes_per_step_after_first'] / base['bytes_per_step_after_first']:.3f}",
            f"{r['val_loss_codec']:.4f}",
            f"{r['val_loss_codec'] / base['val_loss_exact'] - 1:+.2%}",
            f"{r['val_loss_exact']:.4f}",
            f"{r['val_loss_exact'] / base['val_loss_exact'] - 1:+.2%}",
        )
    Console().print(table)
    print(f"one-off final GetRemoteState: {base['final_fetch_bytes']:,} B (every config)")
    os.makedirs(os.path.join(os.path.dirname(__file__), "out"), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()

"""Top-only adapters on SmolLM2: bytes per step and round trips against the full adapter, side by side.

The full adapter is LoRA r=8 on q,v in every block, the middle's as a remote LoRA (the default of `client tune`).
The top-only adapter is the same LoRA on the top blocks alone (`--lora-layers` = the blocks above the top cut):
nothing below the top cut trains, so a step makes one round trip and no gradient crosses the network.

Run: nice -n 5 .venv/bin/python bench/top_only.py [--steps 4] [--batch 2 --seq 64] [--codec float32]
Prints one table and writes bench/out/top_only.json. Bytes are serialized message bytes (the client's meter).
"""

from __future__ import annotations

import json
import os
import pathlib
import tempfile
import time

import torch

from tandem.testing.bench_cli import bench_parser, offline_hub

offline_hub()

from tandem.client.assemble import connect_split  # noqa: E402
from tandem.client.data import load_split  # noqa: E402
from tandem.client.report import expected_bytes  # noqa: E402
from tandem.client.sample import write_sample  # noqa: E402
from tandem.client.transport import Transport  # noqa: E402
from tandem.stages.lora import LoraConfig  # noqa: E402
from tandem.stages.lora_layers import format_layers  # noqa: E402
from tandem.testing.servers import start_server  # noqa: E402


def run(server, data_dir: str, layers: tuple[int, ...], args) -> dict:
    """Tunes `args.steps` steps with LoRA on `layers` (empty: every block); returns bytes and calls per step."""
    transport = Transport(server.transport_cfg(codec=args.codec))
    model = connect_split(transport, LoraConfig(rank=8, alpha=16, layers=layers), seed=0)
    data = load_split(data_dir, model.tokenizer, args.seq, args.batch, 0, 0.1)
    opt = torch.optim.AdamW(model.adapter.parameters(), lr=2e-3)
    transport.meter.take_step()
    steps = []
    for step in range(args.steps):
        start = time.perf_counter()
        opt.zero_grad()
        loss, _ = model.loss(data.batch_at(step), step, 0, train=True)
        loss.backward()
        opt.step()
        steps.append(
            {**transport.meter.take_step(), "loss": float(loss.detach()), "wall_s": time.perf_counter() - start}
        )
    kinds = transport.meter.totals()["per_kind"]
    result = {
        "lora_layers": format_layers(layers),
        "trainable_params": sum(p.numel() for p in model.adapter.parameters()),
        "remote_lora_params": sum(p.numel() for p in model.middle.params),
        "bytes_per_step": sum(s["bytes_sent"] + s["bytes_received"] for s in steps) / len(steps),
        "bytes_up_per_step": sum(s["bytes_sent"] for s in steps) / len(steps),
        "bytes_down_per_step": sum(s["bytes_received"] for s in steps) / len(steps),
        "expected_bytes_per_step": expected_bytes(model, args.batch * args.seq),
        "round_trips_per_step": sum(kinds.get(k, {}).get("calls", 0) for k in ("Forward", "Backward")) / len(steps),
        "step_s": sum(s["wall_s"] for s in steps[1:]) / max(1, len(steps) - 1),
        "final_loss": steps[-1]["loss"],
        "top_blocks": list(model.layout.top_blocks),
    }
    model.close()
    transport.close()
    return result


def main() -> None:
    parser = bench_parser(__file__, __doc__, results=True)
    parser.add_argument("--steps", type=int, default=4, help="tuning steps per adapter; default 4")
    parser.add_argument("--batch", type=int, default=2, help="sequences per step; default 2")
    parser.add_argument("--seq", type=int, default=64, help="tokens per sequence; default 64")
    parser.add_argument("--codec", default="float32", help="activation codec; default float32")
    args = parser.parse_args()
    from rich.console import Console
    from rich.table import Table

    tmp = tempfile.mkdtemp(prefix="tandem-bench-")
    data_dir = write_sample(os.path.join(tmp, "data"), n=200)
    server = start_server(None, pathlib.Path(tmp), timeout=300)
    try:
        full = run(server, data_dir, (), args)
        top = tuple(full["top_blocks"])  # the blocks above the server's top cut
        top_only = run(server, data_dir, top, args)
    finally:
        server.stop()
    ratio = top_only["bytes_per_step"] / full["bytes_per_step"]
    table = Table(
        title=f"top-only vs full adapter, SmolLM2 ({args.steps} steps of {args.batch}x{args.seq}, {args.codec})"
    )
    for col in ("adapter", "trainable", "remote LoRA", "round trips/step", "MB/step up", "MB/step down", "x full"):
        table.add_column(col, justify="right")
    for name, r in (("full (every block)", full), (f"top-only (--lora-layers {format_layers(top)})", top_only)):
        table.add_row(
            name,
            f"{r['trainable_params']:,}",
            f"{r['remote_lora_params']:,}",
            f"{r['round_trips_per_step']:.0f}",
            f"{r['bytes_up_per_step'] / 1e6:.3f}",
            f"{r['bytes_down_per_step'] / 1e6:.3f}",
            f"{r['bytes_per_step'] / full['bytes_per_step']:.3f}",
        )
    Console().print(table)
    print(f"top-only / full bytes per step: {ratio:.3f} (aim: <= 0.55)")
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"setup": vars(args), "full": full, "top_only": top_only, "ratio": ratio}, f, indent=2)


if __name__ == "__main__":
    main()

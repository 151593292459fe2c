"""Transport benchmark on SmolLM2: bytes and loss per codec, the time share of sealing, and concurrent clients.

Run: .venv/bin/python bench/transport_bench.py [--steps 8] [--batch 2 --seq 64] [--clients 1,4,8]
Prints tables and writes bench/out/transport.json. Everything runs side by side in one run, so
compare ratios; absolute times depend on this 2-core machine and whatever else it is doing.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time

import torch

from tandem.testing.bench_cli import bench_parser, offline_hub

offline_hub()

from tandem.client.assemble import connect_split  # noqa: E402
from tandem.client.data import load_split  # noqa: E402
from tandem.client.evaluation import evaluate  # noqa: E402
from tandem.client.sample import write_sample  # noqa: E402
from tandem.client.transport import Transport  # noqa: E402
from tandem.stages.lora import LoraConfig  # noqa: E402
from tandem.testing.servers import BIN, start_server  # noqa: E402


def run_codec(server, data_dir, codec: str, seal: bool, args, lora_codec: str = "float32") -> dict:
    """Tunes `args.steps` steps with one codec; returns bytes per token, losses and time shares."""
    t = Transport(server.transport_cfg(codec=codec, seal=seal, lora_codec=lora_codec))
    sm = connect_split(t, LoraConfig(rank=8, alpha=16), seed=0)
    data = load_split(data_dir, sm.tokenizer, args.seq, args.batch, 0, 0.1)
    opt = torch.optim.AdamW(sm.adapter.parameters(), lr=2e-3)
    t.meter.take_step()
    recs = []
    for step in range(args.steps):
        t0 = time.perf_counter()
        opt.zero_grad()
        loss, _ = sm.loss(data.batch_at(step), step, 0, train=True)
        loss.backward()
        opt.step()
        rec = t.meter.take_step()
        rec.update(
            wall_s=time.perf_counter() - t0,
            loss=float(loss.detach()),
            tokens=int(data.batch_at(step)["attention_mask"].sum()),
        )
        recs.append(rec)
    val = evaluate(sm, data, 0)
    sm.close()
    t.close()
    tokens = sum(r["tokens"] for r in recs)
    wall = sum(r["wall_s"] for r in recs[1:]) or 1e-9
    return {
        "codec": codec if lora_codec == "float32" else f"{codec}+lora {lora_codec}",
        "sealed": seal,
        "bytes_per_token_sent": sum(r["bytes_sent"] for r in recs) / tokens,
        "bytes_per_token_received": sum(r["bytes_received"] for r in recs) / tokens,
        "final_train_loss": recs[-1]["loss"],
        "val_loss": val["loss"],
        "step_s": wall / max(1, len(recs) - 1),
        "sealing_share": sum(r["sealing_s"] for r in recs[1:]) / wall,
    }


def run_concurrent(server, data_dir, n: int, args, tmp: str) -> dict:
    """n client processes tuning at once; returns aggregate steps/s (wall clock of the slowest)."""
    t0 = time.perf_counter()
    procs = [
        subprocess.Popen(
            [
                os.path.join(BIN, "client"),
                "tune",
                *server.cli_args(),
                "--data",
                data_dir,
                "--out",
                os.path.join(tmp, f"c{n}-{i}"),
                "--steps",
                str(args.conc_steps),
                "--batch-size",
                str(args.batch),
                "--seq-len",
                str(args.seq),
                "--no-progress",
                "--threads",
                "1",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(n)
    ]
    for p in procs:
        _, err = p.communicate()
        if p.returncode:
            raise RuntimeError(err)
    wall = time.perf_counter() - t0
    steps = []
    for i in range(n):
        with open(os.path.join(tmp, f"c{n}-{i}", "report.json")) as f:
            steps += json.load(f)["steps"]
    train_s = max(sum(s["wall_s"] for s in steps[i * args.conc_steps : (i + 1) * args.conc_steps]) for i in range(n))
    return {
        "clients": n,
        "steps": n * args.conc_steps,
        "wall_s": wall,
        "train_s": train_s,
        "aggregate_steps_per_s": n * args.conc_steps / train_s,
    }


def main() -> None:
    p = bench_parser(__file__, __doc__)
    p.add_argument("--steps", type=int, default=6, help="tuning steps per codec")
    p.add_argument("--batch", type=int, default=4, help="sequences per step")
    p.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    p.add_argument("--codecs", default="float32,float16,bfloat16,int8,int4", help="codecs to compare")
    p.add_argument("--clients", default="1,4,8", help="concurrent client counts")
    p.add_argument("--conc-steps", type=int, default=3, help="steps per client in the concurrency runs")
    args = p.parse_args()
    from rich.console import Console
    from rich.table import Table

    tmp = tempfile.mkdtemp(prefix="tandem-bench-")
    data_dir = write_sample(os.path.join(tmp, "data"), n=300)
    server = start_server(None, __import__("pathlib").Path(tmp), timeout=300)
    out = {"setup": vars(args), "codecs": [], "concurrency": []}
    try:
        for c in args.codecs.split(","):
            out["codecs"].append(run_codec(server, data_dir, c, True, args))
        for c in ("int8",):  # the codec on the remote-LoRA traffic too
            out["codecs"].append(run_codec(server, data_dir, c, True, args, lora_codec=c))
        out["unsealed_float32"] = run_codec(server, data_dir, "float32", False, args)
        for n in (int(x) for x in args.clients.split(",")):
            out["concurrency"].append(run_concurrent(server, data_dir, n, args, tmp))
    finally:
        server.stop()
    con = Console()
    base = out["codecs"][0]
    t = Table(title=f"codecs on SmolLM2 ({args.steps} steps of {args.batch}x{args.seq}, sealed)")
    for col in (
        "codec",
        "B/token up",
        "B/token down",
        "x float32",
        "final loss",
        "val loss",
        "val vs f32",
        "sealing share",
    ):
        t.add_column(col, justify="right")
    for r in out["codecs"]:
        ratio = (r["bytes_per_token_sent"] + r["bytes_per_token_received"]) / (
            base["bytes_per_token_sent"] + base["bytes_per_token_received"]
        )
        t.add_row(
            r["codec"],
            f"{r['bytes_per_token_sent']:,.0f}",
            f"{r['bytes_per_token_received']:,.0f}",
            f"{ratio:.3f}",
            f"{r['final_train_loss']:.4f}",
            f"{r['val_loss']:.4f}",
            f"{r['val_loss'] / base['val_loss'] - 1:+.2%}",
            f"{r['sealing_share']:.2%}",
        )
    con.print(t)
    u = out["unsealed_float32"]
    con.print(
        f"float32 step time sealed {base['step_s']:.3f} s vs unsealed {u['step_s']:.3f} s "
        f"(ratio {base['step_s'] / u['step_s']:.3f}); sealing share of the sealed step {base['sealing_share']:.2%}"
    )
    c = Table(
        title=f"concurrent clients ({args.conc_steps} steps each, {args.batch}x{args.seq}, one server, 2 cores in all)"
    )
    for col in ("clients", "aggregate steps/s", "x one client"):
        c.add_column(col, justify="right")
    one = out["concurrency"][0]["aggregate_steps_per_s"] if out["concurrency"] else 1
    for r in out["concurrency"]:
        c.add_row(str(r["clients"]), f"{r['aggregate_steps_per_s']:.3f}", f"{r['aggregate_steps_per_s'] / one:.2f}")
    con.print(c)
    os.makedirs(os.path.join(os.path.dirname(__file__), "out"), exist_ok=True)
    with open(os.path.join(os.path.dirname(__file__), "out", "transport.json"), "w") as f:
        json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()

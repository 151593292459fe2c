"""Benchmark: bfloat16 against float32 on the CPU, split tuning of one model (issue #19).

For each dtype, float32 first, it starts a real `cloud serve --dtype D --device cpu` (mutual TLS on loopback,
the embedded SmolLM2-135M-Instruct unless --model) and runs one `client tune --dtype D --device cpu` in split
mode on the same sample data with the same seed. It reports the median step wall time (after --warmup steps)
and the ratio bfloat16/float32, the cloud's peak RSS (VmHWM of the `cloud serve` process) and its ratio, the
validation loss before and after tuning from each report.json with the relative difference of the after-losses
(target within 2%), and the bytes per step each way (the wire codec stays float32 in both runs). Prints a table
and writes bench/out/dtype_bench.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from tandem.testing.bench_cli import bench_parser, offline_hub

offline_hub()

from tandem.client.sample import write_sample  # noqa: E402
from tandem.testing.servers import BIN, start_server  # noqa: E402

ENV = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
DTYPES = ("float32", "bfloat16")
MIB = 2**20


def parse_args(argv=None) -> argparse.Namespace:
    """Parses the command line."""
    p = bench_parser(
        __file__, __doc__, model=True, work="scratch folder (data, TLS, runs)", results=True, seed=0, threads=0
    )
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per dtype; default 30")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per step; default 4")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence; default 128")
    p.add_argument("--warmup", type=int, default=1, help="first steps left out of the step-time median; default 1")
    p.add_argument("--records", type=int, default=400, help="sample-data records to generate; default 400")
    p.add_argument(
        "--val-max-sequences", type=int, default=16, help="validation sequences of each run (`client tune`); default 16"
    )
    p.add_argument("--server-threads", type=int, default=1, help="torch threads of `cloud serve`; default 1")
    return p.parse_args(argv)


def proc_kib(pid: int, field: str) -> int:
    """A /proc/PID/status field in KiB (VmHWM: peak resident set) of a live process."""
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE).group(1))


def run_client(args, dtype: str, out: str, server, data: str) -> dict:
    """One `client tune --dtype DTYPE --device cpu` in split mode to completion: report.json and the wall time."""
    cmd = [os.path.join(BIN, "client"), "tune", "--data", data, "--out", out, "--mode", "split"]
    cmd += ["--steps", str(args.steps), "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len)]
    cmd += ["--seed", str(args.seed), "--dtype", dtype, "--device", "cpu", "--threads", str(args.threads)]
    cmd += ["--codec", "float32", "--val-max-sequences", str(args.val_max_sequences), "--audit", "no"]
    cmd += ["--checkpoint-every", str(10**6), "--no-progress", "--overwrite", *server.cli_args()]
    started = time.perf_counter()
    with open(out + ".log", "w") as log:
        done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=ENV)
    if done.returncode:
        raise RuntimeError(f"client tune --dtype {dtype} failed ({done.returncode}); see {out}.log")
    with open(os.path.join(out, "report.json")) as f:
        return {"report": json.load(f), "process_wall_s": time.perf_counter() - started}


def run_dtype(args, dtype: str, work: str, data: str) -> dict:
    """Serves the model in DTYPE, tunes against it, and returns the client's run and the server's peak RSS."""
    run_dir = Path(work) / dtype
    run_dir.mkdir(parents=True, exist_ok=True)
    serve = ["--dtype", dtype, "--device", "cpu", "--threads", str(args.server_threads)]
    server = start_server(args.model, run_dir, *serve, timeout=600)
    try:
        client = run_client(args, dtype, str(run_dir / "tune"), server, data)
        client["cloud_peak_rss_kib"] = proc_kib(server.proc.pid, "VmHWM")
    finally:
        server.stop()
    return client


def figures(args, run: dict) -> dict:
    """One dtype's numbers: median step time, cloud peak RSS, validation losses, bytes per step."""
    steps = run["report"]["steps"]
    timed = steps[args.warmup :] or steps
    validation = run["report"]["validation"]
    return {
        "step_s_median": statistics.median(s["wall_s"] for s in timed),
        "step_s_min": min(s["wall_s"] for s in timed),
        "timed_steps": len(timed),
        "cloud_peak_rss_mib": run["cloud_peak_rss_kib"] / 1024,
        "val_loss_before": validation["before"]["loss"],
        "val_loss_after": validation["after"]["loss"],
        "val_sequences": validation["sequences"],
        "train_loss_last": steps[-1]["loss"],
        "bytes_sent_per_step": statistics.median(s["bytes_sent"] for s in timed),
        "bytes_received_per_step": statistics.median(s["bytes_received"] for s in timed),
        "process_wall_s": run["process_wall_s"],
    }


def summarize(args, runs: dict, loads: dict) -> dict:
    """Both dtypes' figures and the ratios bfloat16/float32."""
    per = {dtype: figures(args, run) for dtype, run in runs.items()}
    f32, bf16 = per["float32"], per["bfloat16"]
    after_diff = abs(bf16["val_loss_after"] - f32["val_loss_after"]) / abs(f32["val_loss_after"])
    return {
        "settings": {k: v for k, v in vars(args).items() if k not in ("work", "json")},
        "model_id": runs["float32"]["report"]["model_id"],
        "per_dtype": per,
        "ratios_bf16_over_f32": {
            "step_s_median": bf16["step_s_median"] / f32["step_s_median"],
            "step_s_min": bf16["step_s_min"] / f32["step_s_min"],
            "cloud_peak_rss": bf16["cloud_peak_rss_mib"] / f32["cloud_peak_rss_mib"],
            "bytes_sent_per_step": bf16["bytes_sent_per_step"] / f32["bytes_sent_per_step"],
        },
        "val_loss_after_rel_diff": after_diff,
        "val_loss_after_within_2pct": after_diff <= 0.02,
        "loadavg_1m": loads,
        "cpus": os.cpu_count(),
        "steps": {dtype: run["report"]["steps"] for dtype, run in runs.items()},
    }


def render(res: dict) -> None:
    """Prints the results as one table."""
    from rich.console import Console
    from rich.table import Table

    settings, per, ratio = res["settings"], res["per_dtype"], res["ratios_bf16_over_f32"]
    console = Console(width=max(Console().width, 120))
    console.print(
        f"[bold]{res['model_id']}[/bold], split mode on the CPU, {settings['steps']} steps of "
        f"{settings['batch_size']} x {settings['seq_len']} tokens, seed {settings['seed']}, codec float32, "
        f"{res['cpus']} CPUs, 1-min load {' / '.join(f'{d}: {a:.1f}-{b:.1f}' for d, (a, b) in res['loadavg_1m'].items())}"
    )
    table = Table(title="bfloat16 against float32")
    for col in ("", "float32", "bfloat16", "bf16/f32"):
        table.add_column(col, justify="right")
    f32, bf16 = per["float32"], per["bfloat16"]
    table.add_row(
        f"step s (median of {f32['timed_steps']})",
        f"{f32['step_s_median']:.3f}",
        f"{bf16['step_s_median']:.3f}",
        f"{ratio['step_s_median']:.3f}",
    )
    table.add_row(
        "step s (fastest)", f"{f32['step_s_min']:.3f}", f"{bf16['step_s_min']:.3f}", f"{ratio['step_s_min']:.3f}"
    )
    table.add_row(
        "cloud peak RSS (VmHWM)",
        f"{f32['cloud_peak_rss_mib']:,.0f} MiB",
        f"{bf16['cloud_peak_rss_mib']:,.0f} MiB",
        f"{ratio['cloud_peak_rss']:.3f}",
    )
    table.add_row("val loss before", f"{f32['val_loss_before']:.4f}", f"{bf16['val_loss_before']:.4f}", "")
    diff = f"{res['val_loss_after_rel_diff']:.2%} ({'within' if res['val_loss_after_within_2pct'] else 'over'} 2%)"
    table.add_row("val loss after", f"{f32['val_loss_after']:.4f}", f"{bf16['val_loss_after']:.4f}", diff)
    table.add_row(
        "bytes/step up",
        f"{f32['bytes_sent_per_step']:,.0f}",
        f"{bf16['bytes_sent_per_step']:,.0f}",
        f"{ratio['bytes_sent_per_step']:.3f}",
    )
    table.add_row(
        "bytes/step down", f"{f32['bytes_received_per_step']:,.0f}", f"{bf16['bytes_received_per_step']:,.0f}", ""
    )
    console.print(table)


def main(argv=None) -> int:
    """Runs the benchmark: float32, then bfloat16, each with its own server; then the summary."""
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that `finally` stops the server
    work = os.path.abspath(args.work)
    data = write_sample(os.path.join(work, "data"), n=args.records, seed=args.seed)
    runs, loads = {}, {}
    for dtype in DTYPES:
        load0 = os.getloadavg()[0]
        runs[dtype] = run_dtype(args, dtype, work, data)
        loads[dtype] = [load0, os.getloadavg()[0]]
        print(f"{dtype}: {runs[dtype]['process_wall_s']:.1f} s", file=sys.stderr, flush=True)
    res = summarize(args, runs, loads)
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(res, f, indent=2)
    render(res)
    return 0


if __name__ == "__main__":
    sys.exit(main())

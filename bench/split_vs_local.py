"""Benchmark: split vs local tuning of one model on loopback TLS (step time, bytes, time outside compute, peak memory)."""

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

from tandem.testing.bench_cli import bench_parser
from tandem.testing.servers import BIN

ENV = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")


def parse_args(argv=None) -> argparse.Namespace:
    """Parses the command line."""
    p = bench_parser(__file__, __doc__, model=True, work="scratch directory (data, TLS, runs)", results=True)
    p.add_argument(
        "--rounds", type=int, default=3, help="interleaved rounds, each one split run then one local run; default 3"
    )
    p.add_argument("--steps", type=int, default=4, help="optimizer steps per run; default 4")
    p.add_argument("--warmup", type=int, default=1, help="first steps of each run left out of the timings; default 1")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per step; default 4")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence; default 128")
    p.add_argument(
        "--threads", type=int, default=0, help="torch threads of each client (0 = torch's default, all cores)"
    )
    p.add_argument("--server-threads", type=int, default=0, help="torch threads of the server (0 = torch's default)")
    p.add_argument(
        "--no-seal",
        action="store_true",
        help="split mode without end-to-end sealing (TLS only); default: sealed, as `client tune`",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of both modes; default 0")
    p.add_argument(
        "--device",
        default="",
        help="`--device` of the server and of both clients (cpu, cuda, cuda:N); default: theirs (auto)",
    )
    p.add_argument("--dtype", default="", help="`--dtype` of the server and of both clients; default: theirs (auto)")
    p.add_argument("--records", type=int, default=400, help="sample-data records to generate; default 400")
    return p.parse_args(argv)


def vm_hwm_kib(pid: int) -> int:
    """Returns the peak resident set size (VmHWM) of a live process, in KiB.

    Args:
        pid: Process id; the process must not have been reaped yet.
    """
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"^VmHWM:\s+(\d+) kB", f.read(), re.MULTILINE).group(1))


def device_flags(args) -> list[str]:
    """--device and --dtype for `cloud serve` and `client tune`, when the command line set them."""
    return (["--device", args.device] if args.device else []) + (["--dtype", args.dtype] if args.dtype else [])


def start_server(args, work: str) -> tuple[subprocess.Popen, str, str]:
    """Starts `cloud serve` with TLS on a free loopback port.

    Args:
        args: Parsed command line (model, server threads).
        work: Scratch directory; the certificates go to WORK/tls, the log to WORK/server.log.

    Returns:
        (process, "127.0.0.1:PORT", path of the CA certificate).
    """
    cmd = [
        os.path.join(BIN, "cloud"),
        "--log-level",
        "WARNING",
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--tls-dir",
        os.path.join(work, "tls"),
        "--threads",
        str(args.server_threads),
    ]
    cmd += ["--model", args.model] if args.model else []
    cmd += device_flags(args)
    with open(os.path.join(work, "server.log"), "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=ENV)
    for line in proc.stdout:
        m = re.search(r"on (127\.0\.0\.1:\d+) \(TLS, CA (.+)\)", line)
        if m:
            return proc, m.group(1), m.group(2)
    raise RuntimeError(f"cloud serve exited ({proc.wait()}); see {work}/server.log")


def run_client(args, mode: str, out: str, addr: str, ca: str, data: str) -> dict:
    """Runs one `client tune` to completion.

    Args:
        args: Parsed command line (steps, batch, sequence length, seed, threads).
        mode: "split" or "local".
        out: Run directory; the client's output goes to OUT.log.
        addr: HOST:PORT of the server (split mode).
        ca: CA certificate of the server (split mode); the 'local' identity bundle is found next to it.
        data: Training data directory.

    Returns:
        {"report": report.json, "peak_rss_kib": ru_maxrss from wait4, "process_wall_s", "loadavg_1m": [start, end]}.
    """
    cmd = [
        os.path.join(BIN, "client"),
        "tune",
        "--data",
        data,
        "--out",
        out,
        "--mode",
        mode,
        "--steps",
        str(args.steps),
        "--batch-size",
        str(args.batch_size),
        "--seq-len",
        str(args.seq_len),
        "--seed",
        str(args.seed),
        "--threads",
        str(args.threads),
        "--checkpoint-every",
        str(10**6),
        "--no-progress",
        "--codec",
        "float32",
        "--server",
        addr,
        "--ca",
        ca,
        "--identity",
        os.path.join(os.path.dirname(ca), "clients", "local.pem"),
    ]
    cmd += ["--no-seal"] if args.no_seal else []
    cmd += ["--model", args.model] if args.model and mode == "local" else []
    cmd += device_flags(args)
    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    with open(out + ".log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=ENV)
        try:
            _, status, usage = os.wait4(proc.pid, 0)  # ru_maxrss of this child alone, KiB on Linux
        except BaseException:
            proc.kill()
            proc.wait()
            raise
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise RuntimeError(f"client tune --mode {mode} failed ({proc.returncode}); see {out}.log")
    with open(os.path.join(out, "report.json")) as f:
        return {
            "report": json.load(f),
            "peak_rss_kib": usage.ru_maxrss,
            "process_wall_s": time.perf_counter() - t0,
            "loadavg_1m": [load0, os.getloadavg()[0]],
        }


def hidden_size(model: str | None) -> int:
    """Returns the hidden size in the model's config.json (default model when `model` is None)."""
    if model is None:
        from tandem.stages.loading import default_model_dir

        model = default_model_dir()
    with open(os.path.join(model, "config.json")) as f:
        return int(json.load(f)["hidden_size"])


def summarize(args, runs: dict, server_hwm_kib: int, hidden: int) -> dict:
    """Reduces the runs of both modes to the benchmark's numbers.

    Args:
        args: Parsed command line.
        runs: {"split": [run_client results], "local": [...]}, one entry per round.
        server_hwm_kib: The server's VmHWM after the last run.
        hidden: The model's hidden size.

    Returns:
        The results, as written to the JSON file.
    """
    timed = {m: [s for r in rs for s in r["report"]["steps"][args.warmup :]] for m, rs in runs.items()}

    def med(xs):
        return statistics.median(xs) if xs else float("nan")

    def wall(run):
        return med([s["wall_s"] for s in run["report"]["steps"][args.warmup :]])

    split_s, local_s = med([s["wall_s"] for s in timed["split"]]), med([s["wall_s"] for s in timed["local"]])
    rounds = [wall(a) / wall(b) for a, b in zip(runs["split"], runs["local"])]
    split_min, local_min = min(s["wall_s"] for s in timed["split"]), min(s["wall_s"] for s in timed["local"])
    bt = args.batch_size * args.seq_len
    lora = runs["split"][0]["report"]["adapter"]["remote_lora_params"]
    act = 4 * bt * hidden  # one float32 (B, T, H) tensor
    # Up: forward hidden + mask (1 B/token) + LoRA weights + backward grad_output. Down: forward out + grad_input + LoRA grads.
    expected = {"sent": 2 * act + bt + 4 * lora, "received": 2 * act + 4 * lora}
    measured = {d: med([s[f"bytes_{d}"] for s in timed["split"]]) for d in ("sent", "received")}
    for s in timed["split"]:  # the client's report counts sealing in client_compute_s
        s["client_only_compute_s"] = s["client_compute_s"] - s.get("sealing_s", 0.0)
    parts = ("client_only_compute_s", "cloud_compute_s", "serialization_s", "sealing_s", "network_wait_s")
    outside = [
        (s["serialization_s"] + s.get("sealing_s", 0.0) + s["network_wait_s"]) / s["wall_s"] for s in timed["split"]
    ]
    return {
        "settings": {k: v for k, v in vars(args).items() if k not in ("work", "json")}
        | {"hidden_size": hidden, "tokens_per_step": bt},
        "model_id": runs["split"][0]["report"]["model_id"],
        "layout": runs["split"][0]["report"]["layout"],
        "step_s": {
            "split_median": split_s,
            "local_median": local_s,
            "ratio": split_s / local_s,
            "ratio_per_round": rounds,
            "split_min": split_min,
            "local_min": local_min,
            "ratio_of_mins": split_min / local_min,
            "timed_steps": {m: len(v) for m, v in timed.items()},
            "split_components_median": {k: med([s.get(k, 0.0) for s in timed["split"]]) for k in parts},
        },
        "bytes": {
            "remote_lora_params": lora,
            "per_step": {
                d: {"measured": measured[d], "expected": expected[d], "ratio": measured[d] / expected[d]}
                for d in measured
            },
            "per_token": {d: {"measured": measured[d] / bt, "expected": expected[d] / bt} for d in measured},
            "report_tokens_per_step": med([s["tokens"] for s in timed["split"]]),
        },
        "outside_compute_share": {"median": med(outside), "min": min(outside), "max": max(outside)},
        "peak_rss_mib": {
            "cloud_server": server_hwm_kib / 1024,
            "client_split": max(r["peak_rss_kib"] for r in runs["split"]) / 1024,
            "client_local": max(r["peak_rss_kib"] for r in runs["local"]) / 1024,
        },
        "loadavg_1m": {m: [r["loadavg_1m"] for r in rs] for m, rs in runs.items()},
        "cpus": os.cpu_count(),
        "steps": {m: [r["report"]["steps"] for r in rs] for m, rs in runs.items()},
    }


def render(res: dict) -> None:
    """Prints the results as tables."""
    from rich.console import Console
    from rich.table import Table

    c, st, b, pk = Console(width=max(Console().width, 130)), res["step_s"], res["bytes"], res["peak_rss_mib"]
    s = res["settings"]
    c.print(
        f"[bold]{res['model_id']}[/bold], client blocks {res['layout']['bottom']}:{res['layout']['top']} of "
        f"{res['layout']['num_layers']}, batch {s['batch_size']} x seq {s['seq_len']}, hidden {s['hidden_size']}, "
        f"{s['rounds']} rounds x {s['steps']} steps per mode ({st['timed_steps']['split']} timed each), loopback TLS{'' if s['no_seal'] else ' + sealing'}, float32"
    )
    t = Table(title="step time (median of timed steps)")
    for col in ("split s", "local s", "split/local", "per round", "fastest split/local s", "ratio of fastest", "aim"):
        t.add_column(col, justify="right")
    t.add_row(
        f"{st['split_median']:.3f}",
        f"{st['local_median']:.3f}",
        f"{st['ratio']:.3f}",
        " ".join(f"{r:.3f}" for r in st["ratio_per_round"]),
        f"{st['split_min']:.3f} / {st['local_min']:.3f}",
        f"{st['ratio_of_mins']:.3f}",
        "<= 1.15",
    )
    c.print(t)
    loads = [x for rs in res["loadavg_1m"].values() for r in rs for x in r]
    if max(loads) > res["cpus"] + 1:
        c.print(
            f"[yellow]noisy machine: 1-min load average reached {max(loads):.1f} on {res['cpus']} CPUs during the runs; "
            "timings include other work (ratio of fastest steps is the less contaminated estimate)[/yellow]"
        )
    t = Table(title="split step time components (median per step)")
    for k in st["split_components_median"]:
        t.add_column(k.removesuffix("_s").replace("_only", "").replace("_", " ") + " s", justify="right")
    t.add_column("serialization+sealing+network share of wall", justify="right")
    o = res["outside_compute_share"]
    t.add_row(
        *(f"{v:.3f}" for v in st["split_components_median"].values()),
        f"{o['median']:.1%} (min {o['min']:.1%}, max {o['max']:.1%})",
    )
    c.print(t)
    t = Table(title=f"split traffic (serialized protobuf; remote LoRA params {b['remote_lora_params']:,})")
    for col in (
        "direction",
        "measured B/step",
        "expected B/step",
        "measured B/token",
        "expected B/token",
        "measured/expected",
    ):
        t.add_column(col, justify="right")
    for d, v in b["per_step"].items():
        t.add_row(
            "up (sent)" if d == "sent" else "down (received)",
            f"{v['measured']:,.0f}",
            f"{v['expected']:,.0f}",
            f"{b['per_token'][d]['measured']:,.1f}",
            f"{b['per_token'][d]['expected']:,.1f}",
            f"{v['ratio']:.4f}",
        )
    c.print(t)
    t = Table(title="peak memory (VmHWM / ru_maxrss)")
    for col in ("cloud server", "client (split)", "server + client (split)", "local tuning"):
        t.add_column(col, justify="right")
    t.add_row(
        *(
            f"{v:,.0f} MiB"
            for v in (
                pk["cloud_server"],
                pk["client_split"],
                pk["cloud_server"] + pk["client_split"],
                pk["client_local"],
            )
        )
    )
    c.print(t)


def main(argv=None) -> int:
    """Runs the benchmark: one server, interleaved split and local runs, then the summary."""
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that `finally` stops the server and the client
    work = os.path.abspath(args.work)
    os.makedirs(work, exist_ok=True)
    data = os.path.join(work, "data")
    subprocess.run(
        [os.path.join(BIN, "client"), "sample-data", "--out", data, "--n", str(args.records)],
        check=True,
        env=ENV,
        stdout=subprocess.DEVNULL,
    )
    server, addr, ca = start_server(args, work)
    runs: dict[str, list] = {"split": [], "local": []}
    try:
        for r in range(args.rounds):
            for mode in ("split", "local"):
                res = run_client(args, mode, os.path.join(work, f"{mode}-{r}"), addr, ca, data)
                runs[mode].append(res)
                print(f"round {r} {mode}: {res['process_wall_s']:.1f} s", file=sys.stderr, flush=True)
        server_hwm = vm_hwm_kib(server.pid)
    finally:
        server.terminate()
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    res = summarize(args, runs, server_hwm, hidden_size(args.model))
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(res, f, indent=2)
    render(res)
    print(f"results: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

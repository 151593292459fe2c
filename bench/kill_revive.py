"""Benchmark: DLoRA's Kill-and-Revive (`client tune --kill-revive`) against the same run without it (issue #20).

It writes sample data (tandem's generator), starts two real `cloud serve` processes (mutual TLS on loopback, the
embedded SmolLM2-135M-Instruct unless --model), and runs two `client tune` in split mode at once, one against
each: the baseline and --kill-revive with its default schedule, with the same data, seed, steps and batch
(float32 codecs, r=8 on q,v). It reports, from each report.json:
- the remote-LoRA bytes over the run, up (the `lora` field of Forward) and down (`lora_grad` of Backward), and
  the ratio kill-revive / baseline (the aim: at most 0.5);
- the validation loss after the steps, and the relative change (the aim: at most 1%);
- the live modules (mean and minimum of the remote slots), kills and revivals;
- all bytes per step each way, and the cloud's compute per step (its backward skips the killed slots' weight
  gradients).
Prints a table and writes bench/out/kill_revive.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from tandem.testing.bench_cli import bench_parser, offline_hub

offline_hub()

from tandem.client.sample import write_sample  # noqa: E402
from tandem.testing.servers import BIN, start_server  # noqa: E402

ENV = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
RUNS = ("baseline", "kill_revive")


def parse_args(argv=None) -> argparse.Namespace:
    """Parses the command line."""
    p = bench_parser(
        __file__, __doc__, model=True, work="scratch folder (data, TLS, runs)", results=True, seed=0, threads=1
    )
    p.add_argument("--steps", type=int, default=200, help="optimizer steps of each run; default 200")
    p.add_argument("--batch-size", type=int, default=2, help="sequences per step; default 2")
    p.add_argument("--seq-len", type=int, default=64, help="tokens per sequence; default 64")
    p.add_argument("--records", type=int, default=400, help="sample-data records to generate; default 400")
    p.add_argument("--val-max-sequences", type=int, default=32, help="validation sequences; default 32")
    p.add_argument(
        "--kill-flags",
        default="",
        help='extra `client tune` flags of the kill-revive run, e.g. "--kill-threshold 0.9"; default: none (the '
        "shipped schedule)",
    )
    return p.parse_args(argv)


def client_command(args, name: str, out: str, server, data: str) -> list[str]:
    """`client tune` of one run (the kill-revive run adds --kill-revive and --kill-flags)."""
    cmd = [os.path.join(BIN, "client"), "tune", "--data", data, "--out", out, "--mode", "split"]
    cmd += ["--steps", str(args.steps), "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len)]
    cmd += ["--seed", str(args.seed), "--threads", str(args.threads), "--codec", "float32"]
    cmd += ["--val-max-sequences", str(args.val_max_sequences), "--audit", "no", "--checkpoint-every", str(10**6)]
    cmd += ["--no-progress", "--overwrite", *server.cli_args()]
    return cmd + (["--kill-revive", *args.kill_flags.split()] if name == "kill_revive" else [])


def run_both(args, work: Path, data: str) -> dict:
    """Both runs at once, each against its own server; their report.json files."""
    servers, procs = {}, {}
    try:
        for name in RUNS:
            (work / name).mkdir(parents=True, exist_ok=True)
            servers[name] = start_server(args.model, work / name, "--threads", str(args.threads), timeout=600)
        for name in RUNS:
            out = str(work / name / "tune")
            log = open(out + ".log", "w")
            procs[name] = (
                subprocess.Popen(
                    client_command(args, name, out, servers[name], data), stdout=log, stderr=subprocess.STDOUT, env=ENV
                ),
                out,
            )
        reports = {}
        for name, (proc, out) in procs.items():
            if proc.wait():
                raise RuntimeError(f"client tune ({name}) failed ({proc.returncode}); see {out}.log")
            with open(os.path.join(out, "report.json")) as f:
                reports[name] = json.load(f)
        return reports
    finally:
        for proc, _ in procs.values():
            if proc.poll() is None:
                proc.kill()
        for server in servers.values():
            server.stop()


def figures(report: dict) -> dict:
    """One run's numbers."""
    steps = report["steps"]
    up = sum(s["remote_lora_bytes_sent"] for s in steps)
    down = sum(s["remote_lora_bytes_received"] for s in steps)
    section = report.get("kill_revive") or {}
    return {
        "remote_lora_bytes_up": up,
        "remote_lora_bytes_down": down,
        "remote_lora_bytes": up + down,
        "val_loss_before": report["validation"]["before"]["loss"],
        "val_loss_after": report["validation"]["after"]["loss"],
        "train_loss_last": steps[-1]["loss"],
        "bytes_sent_per_step": statistics.mean(s["bytes_sent"] for s in steps),
        "bytes_received_per_step": statistics.mean(s["bytes_received"] for s in steps),
        "cloud_compute_s_per_step": statistics.mean(s["cloud_compute_s"] for s in steps),
        "step_s_median": statistics.median(s["wall_s"] for s in steps),
        "mean_live_modules": section.get("mean_live_modules"),
        "min_live_modules": section.get("min_live_modules"),
        "modules": section.get("modules"),
        "kills": section.get("kills"),
        "revivals": section.get("revivals"),
    }


def summarize(args, reports: dict) -> dict:
    per = {name: figures(report) for name, report in reports.items()}
    base, kill = per["baseline"], per["kill_revive"]
    ratio = kill["remote_lora_bytes"] / base["remote_lora_bytes"]
    change = (kill["val_loss_after"] - base["val_loss_after"]) / base["val_loss_after"]
    return {
        "command": " ".join(sys.argv),
        "settings": {k: v for k, v in vars(args).items() if k not in ("work", "json")},
        "kill_revive_settings": reports["kill_revive"]["kill_revive"]["settings"],
        "model_id": reports["baseline"]["model_id"],
        "per_run": per,
        "remote_lora_bytes_ratio": ratio,
        "remote_lora_bytes_saved": 1 - ratio,
        "val_loss_after_rel_change": change,
        "aim_met": ratio <= 0.5 and abs(change) <= 0.01,
        "cloud_compute_ratio": kill["cloud_compute_s_per_step"] / base["cloud_compute_s_per_step"],
        "live_modules_per_step": [s.get("live_modules") for s in reports["kill_revive"]["steps"]],
    }


def render(res: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    per = res["per_run"]
    table = Table(title=f"Kill-and-Revive on {res['model_id']}: {res['settings']['steps']} steps")
    table.add_column("")
    for name in RUNS:
        table.add_column(name, justify="right")
    rows = [
        ("remote-LoRA MB up", lambda f: f"{f['remote_lora_bytes_up'] / 1e6:.1f}"),
        ("remote-LoRA MB down", lambda f: f"{f['remote_lora_bytes_down'] / 1e6:.1f}"),
        ("validation loss after", lambda f: f"{f['val_loss_after']:.4f}"),
        ("live modules (mean / min)", lambda f: f"{f['mean_live_modules'] or 0:.1f} / {f['min_live_modules'] or '-'}"),
        ("kills / revivals", lambda f: f"{f['kills'] or 0} / {f['revivals'] or 0}"),
        (
            "all MB per step (up / down)",
            lambda f: f"{f['bytes_sent_per_step'] / 1e6:.2f} / {f['bytes_received_per_step'] / 1e6:.2f}",
        ),
        ("cloud compute s per step", lambda f: f"{f['cloud_compute_s_per_step']:.3f}"),
    ]
    for label, show in rows:
        table.add_row(label, *(show(per[name]) for name in RUNS))
    console = Console(width=120)
    console.print(table)
    console.print(
        f"remote-LoRA bytes: {res['remote_lora_bytes_ratio']:.3f}x the baseline ({res['remote_lora_bytes_saved']:.1%} "
        f"saved); validation loss {res['val_loss_after_rel_change']:+.2%}; cloud compute "
        f"{res['cloud_compute_ratio']:.2f}x; aim met: {res['aim_met']}"
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    work = Path(args.work)
    data = write_sample(str(work / "data"), n=args.records, seed=args.seed)
    res = summarize(args, run_both(args, work, data))
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(res, f, indent=1)
    render(res)
    return 0


if __name__ == "__main__":
    sys.exit(main())

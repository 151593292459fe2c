"""Forward state modes (`cloud serve --forward-state keep|recompute`): memory per pending step, compute, 16 sessions.

Run: .venv/bin/python bench/forward_state.py [--batch 4 --seq 128] [--steps 3] [--sessions 16 --rss-batch 1]

Two real `cloud serve` processes (mutual TLS, --no-batching) on the model, one per mode, get the same
replay client: real-sized Forward and Backward requests of one session (hidden states, output
gradients, a remote LoRA with dropout), without the client's own stages. Per step it reads the server's
forward-state metric between the Forward and the Backward (what waits for the Backward: keep mode's
whole graph, recompute mode's input), and the cloud compute the replies report (forward + backward,
the recompute included), median over --steps. The two servers' outputs, grad_input and LoRA gradients
are compared bit for bit. Then, on a fresh recompute server, its peak RSS (VmHWM) after one session's steps
and again after --sessions sessions ran their steps at once: what 16 concurrent sessions cost over one.
Writes bench/out/forward_state.json.
"""

from __future__ import annotations

import json
import os
import pathlib
import statistics
import threading
import time

import torch

from tandem.testing.bench_cli import bench_parser, offline_hub

offline_hub()

from tandem.client.remote import RemoteMiddle  # noqa: E402
from tandem.client.session import open_session  # noqa: E402
from tandem.client.transport import Transport  # noqa: E402
from tandem.stages.lora import LoraConfig, slot_shapes  # noqa: E402
from tandem.testing.servers import free_port, metric, start_server  # noqa: E402

LORA = LoraConfig(rank=8, alpha=16, dropout=0.05)
MIB = 2**20


def parse_args(argv=None):
    """Parses the command line."""
    p = bench_parser(__file__, __doc__, model=True, work="scratch directory", results=True, threads=2)
    p.add_argument(
        "--batch", type=int, default=4, help="sequences per step of the keep/recompute comparison; default 4"
    )
    p.add_argument("--seq", type=int, default=128, help="tokens per sequence; default 128")
    p.add_argument("--steps", type=int, default=3, help="steps per mode (and per session in the RSS part); default 3")
    p.add_argument("--sessions", type=int, default=16, help="concurrent sessions of the RSS part; default 16")
    p.add_argument("--rss-batch", type=int, default=1, help="sequences per step of each session there; default 1")
    return p.parse_args(argv)


class Replay:
    """One session's traffic: a fixed input, output gradient and remote LoRA (updated after every step)."""

    def __init__(self, server, batch: int, seq: int, seed: int):
        self.transport = Transport(server.transport_cfg())
        first = open_session(self.transport, LORA)
        config = json.loads(first.info.model_config_json)
        hidden = config.get("hidden_size") or config["n_embd"]
        gen = torch.Generator().manual_seed(seed)
        shapes = slot_shapes(list(first.info.middle_slots), LORA.rank)
        self.params = [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.01) for s in shapes]
        self.middle = RemoteMiddle(self.transport, lambda: first, self.params)
        self.h = torch.randn(batch, seq, hidden, generator=gen)
        self.mask = torch.ones(batch, seq, dtype=torch.long)
        self.g = torch.randn(batch, seq, hidden, generator=gen) * 1e-3

    def step(self, step: int, between=None) -> list[torch.Tensor]:
        """One training step; `between()` runs after the Forward. Returns what the cloud sent back."""
        out = self.middle.forward_rpc(self.h, self.mask, step, 1000 + step, train=True)
        if between is not None:
            between()
        grad_in, grads = self.middle.backward_rpc(step, self.g, self.h, self.mask, 1000 + step)
        with torch.no_grad():
            for p, g in zip(self.params, grads):
                p.add_(g, alpha=-1e-3)  # as an optimizer would: the LoRA changes and is sent again
        return [out, grad_in, *grads]

    def close(self) -> None:
        self.middle.close()
        self.transport.close()


def serve(args, mode: str):
    """A `cloud serve` in `mode` with its metrics port."""
    port = free_port()
    flags = ["--forward-state", mode, "--no-batching", "--metrics-port", str(port), "--threads", str(args.threads)]
    flags += ["--quota-sessions", "0"]  # all sessions are this bench's one identity
    folder = pathlib.Path(args.work) / mode
    folder.mkdir(parents=True, exist_ok=True)
    return start_server(args.model, folder, *flags, timeout=600), port


def memory_kib(pid: int) -> dict:
    """The process's peak and current resident set, KiB."""
    with open(f"/proc/{pid}/status") as f:
        fields = dict(line.split(":", 1) for line in f if line.startswith(("VmHWM", "VmRSS")))
    return {k: int(v.split()[0]) for k, v in fields.items()}


def per_step(server, port: int, args) -> tuple[dict, list]:
    """The mode's state per pending step (bytes) and cloud compute per step (s, median); what came back."""
    client = Replay(server, args.batch, args.seq, seed=0)
    states, computes, returned = [], [], []
    for step in range(args.steps):
        before = client.transport.meter.step_cloud_s
        returned.append(client.step(step, between=lambda: states.append(metric(port, "tandem_forward_state_bytes"))))
        computes.append(client.transport.meter.step_cloud_s - before)
    client.close()
    return {
        "state_bytes": statistics.median(states),
        "compute_s": statistics.median(computes[1:] or computes),
    }, returned


def sessions_rss(server, args) -> dict:
    """Peak RSS of the (recompute) server after one session's steps, then after --sessions sessions at once."""
    pid = server.proc.pid
    one = Replay(server, args.rss_batch, args.seq, seed=1)
    for step in range(args.steps):
        one.step(step)
    one.close()
    after_one = memory_kib(pid)
    clients = [Replay(server, args.rss_batch, args.seq, seed=10 + i) for i in range(args.sessions)]
    errors = []

    def run(client):
        try:
            for step in range(args.steps):
                client.step(step)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=run, args=(c,)) for c in clients]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - t0
    for client in clients:
        client.close()
    if errors:
        raise RuntimeError(errors[0])
    after_all = memory_kib(pid)
    return {
        "one_session_peak_mib": after_one["VmHWM"] / 1024,
        "all_sessions_peak_mib": after_all["VmHWM"] / 1024,
        "ratio": after_all["VmHWM"] / after_one["VmHWM"],
        "sessions": args.sessions,
        "wall_s": wall,
    }


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    results, returned = {}, {}
    for mode in ("keep", "recompute"):
        server, port = serve(args, mode)
        try:
            results[mode], returned[mode] = per_step(server, port, args)
        finally:
            server.stop()
    server, _ = serve(args, "recompute")  # a fresh one: its peak RSS so far is one session's, at --rss-batch
    try:
        results["rss"] = sessions_rss(server, args)
    finally:
        server.stop()
    keep, recompute = results["keep"], results["recompute"]
    results["state_ratio"] = recompute["state_bytes"] / keep["state_bytes"]
    results["compute_ratio"] = recompute["compute_s"] / keep["compute_s"]
    results["bit_exact"] = all(
        torch.equal(a, b) for mine, theirs in zip(returned["recompute"], returned["keep"]) for a, b in zip(mine, theirs)
    )
    results["shape"] = {"batch": args.batch, "seq": args.seq, "steps": args.steps, "rss_batch": args.rss_batch}
    print(f"step of {args.batch}x{args.seq} tokens, median of {args.steps}:")
    for mode in ("keep", "recompute"):
        r = results[mode]
        print(
            f"  {mode:9s} state per pending step {r['state_bytes'] / MIB:9.2f} MiB   cloud compute {r['compute_s']:.2f} s"
        )
    print(
        f"  recompute/keep: state {results['state_ratio']:.2%}, compute {results['compute_ratio']:.2f}x, "
        f"bit-exact {results['bit_exact']}"
    )
    rss = results["rss"]
    print(
        f"recompute server peak RSS: 1 session {rss['one_session_peak_mib']:.0f} MiB, {rss['sessions']} sessions "
        f"{rss['all_sessions_peak_mib']:.0f} MiB ({rss['ratio']:.2f}x; {args.rss_batch}x{args.seq} per step)"
    )
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()

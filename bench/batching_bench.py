"""Coordinated batching benchmark: aggregate training tokens/s of 1, 2, 4 and 8 concurrent clients, batched vs not.

Run: .venv/bin/python bench/batching_bench.py [--clients 1,2,4,8] [--batch 1 --seq 128] [--steps 4] [--end-to-end]

Two real `cloud serve` processes (mutual TLS, sealing) run side by side on the same model: one with
coordinated batching (the default) and one with --no-batching. For each client count, both get the
same load in turn, so compare the ratio column; absolute rates depend on this machine.

By default the clients are *replay clients*: each opens its own session with its own remote LoRA
and sends real-sized Forward and Backward requests (hidden states, output gradients, and a changed
LoRA every step, as a training client does) without computing its own stages. That measures what
batching changes, the cloud's throughput, without the clients' embeddings and LM head competing
for the server's cores: on a real deployment they run on the data owners' machines. --end-to-end
runs real split-tuning clients (threads of this process) instead; on a 2-core machine their own
compute then shares the cores with the server's.
Writes bench/out/batching_bench.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from conftest import start_server  # noqa: E402

from tandem.client.staged import RemoteMiddle, connect_split, open_session  # noqa: E402
from tandem.client.transport import Transport  # noqa: E402
from tandem.stages.lora import LoraConfig, slot_shapes  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
LORA = LoraConfig(rank=8, alpha=16)


def parse_args(argv=None) -> argparse.Namespace:
    """Parses the command line."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="HF causal-LM directory; default: the embedded SmolLM2-135M-Instruct")
    p.add_argument("--clients", default="1,2,4,8", help="concurrent client counts; default 1,2,4,8")
    p.add_argument("--batch", type=int, default=1, help="sequences per client step (a laptop's batch); default 1")
    p.add_argument("--seq", type=int, default=128, help="tokens per sequence; default 128")
    p.add_argument("--steps", type=int, default=4, help="timed steps per client (after one warm-up step); default 4")
    p.add_argument("--threads", type=int, default=2, help="torch threads of each server; default 2")
    p.add_argument("--end-to-end", action="store_true", help="real split-tuning clients instead of replay clients")
    p.add_argument("--work", default=os.path.join(HERE, "out", "batching_bench"), help="scratch directory")
    p.add_argument("--json", default=os.path.join(HERE, "out", "batching_bench.json"), help="where to write results")
    return p.parse_args(argv)


class ReplayClient:
    """A training client's traffic without its compute: real-sized requests on its own session."""

    def __init__(self, server, args, seed: int):
        self.t = Transport(server.tcfg())
        first = open_session(self.t, LORA)
        info = first.info
        self.hidden = json.loads(info.model_config_json).get("hidden_size") or json.loads(info.model_config_json)["n_embd"]
        gen = torch.Generator().manual_seed(seed)
        shapes = slot_shapes(list(info.middle_slots), LORA.rank)
        self.params = [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.01) for s in shapes]
        self.mid = RemoteMiddle(self.t, lambda: first, self.params)
        self.h = torch.randn(args.batch, args.seq, self.hidden, generator=gen)
        self.am = torch.ones(args.batch, args.seq, dtype=torch.long)
        self.g = torch.randn(args.batch, args.seq, self.hidden, generator=gen) * 1e-3
        self.tokens = args.batch * args.seq

    def step(self, step: int) -> None:
        self.mid.forward_rpc(self.h, self.am, step, 0, train=True)
        _, grads = self.mid.backward_rpc(step, self.g, self.h, self.am, 0)
        with torch.no_grad():
            for p, g in zip(self.params, grads):
                p.add_(g, alpha=-1e-3)  # an optimizer step: the LoRA changes and is resent, as in training

    def close(self) -> None:
        self.mid.close()
        self.t.close()


class RealClient:
    """A split-tuning client: its own stages, adapter and optimizer."""

    def __init__(self, server, args, seed: int):
        self.t = Transport(server.tcfg())
        self.sm = connect_split(self.t, LORA, seed=seed)
        gen = torch.Generator().manual_seed(seed)
        vocab = self.sm.config.vocab_size
        self.ids = torch.randint(0, vocab, (args.batch, args.seq), generator=gen)
        self.opt = torch.optim.AdamW(self.sm.adapter.parameters(), lr=1e-3)
        self.tokens = args.batch * args.seq

    def step(self, step: int) -> None:
        batch = {"input_ids": self.ids, "attention_mask": torch.ones_like(self.ids), "labels": self.ids}
        self.opt.zero_grad()
        loss, _ = self.sm.loss(batch, step, 0, train=True)
        loss.backward()
        self.opt.step()

    def close(self) -> None:
        self.sm.close()
        self.t.close()


def run(server, n: int, args) -> dict:
    """n clients at once, `args.steps` timed steps each; returns aggregate tokens/s."""
    kind = RealClient if args.end_to_end else ReplayClient
    clients = [kind(server, args, seed) for seed in range(n)]
    barrier = threading.Barrier(n)
    walls = [0.0] * n
    errors = []

    def go(i):
        try:
            c = clients[i]
            c.step(0)  # warm-up (also sends the LoRA the first time)
            barrier.wait()
            t0 = time.perf_counter()
            for s in range(1, args.steps + 1):
                c.step(s)
            walls[i] = time.perf_counter() - t0
        except Exception as e:  # noqa: BLE001 - reported after join
            errors.append(repr(e))
            barrier.abort()

    threads = [threading.Thread(target=go, args=(i,)) for i in range(n)]
    t0 = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for c in clients:
        c.close()
    if errors:
        raise RuntimeError(errors[0])
    tokens = sum(c.tokens for c in clients) * args.steps
    wall = max(walls)
    return {"clients": n, "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "step_s_per_client": sum(walls) / n / args.steps, "total_s": time.perf_counter() - t0}


def _batch_counters(port: int) -> tuple[float, float]:
    """(passes, requests) of the batched server's batcher, from its Prometheus metrics."""
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    vals = {ln.split()[0]: float(ln.split()[1]) for ln in text.splitlines() if ln.startswith("tandem_batched_")}
    return vals.get("tandem_batched_passes", 0.0), vals.get("tandem_batched_requests", 0.0)


def main(argv=None) -> int:
    """Runs the benchmark and prints the table."""
    args = parse_args(argv)
    import pathlib

    torch.set_num_threads(1)
    os.makedirs(args.work, exist_ok=True)
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        mport = sock.getsockname()[1]
    servers = {}
    for name, extra in (("unbatched", ("--no-batching",)), ("batched", ("--metrics-port", str(mport)))):
        work = pathlib.Path(args.work) / name
        work.mkdir(parents=True, exist_ok=True)
        servers[name] = start_server(args.model, work, *extra, "--threads", str(args.threads), timeout=300)
    rows = []
    try:
        for n in [int(x) for x in args.clients.split(",")]:
            row = {"clients": n}
            for name in ("unbatched", "batched"):
                before = _batch_counters(mport) if name == "batched" else None
                r = run(servers[name], n, args)
                if before is not None:
                    after = _batch_counters(mport)
                    passes = after[0] - before[0]
                    r["mean_requests_per_pass"] = (after[1] - before[1]) / passes if passes else None
                row[name] = r
                print(f"  {n} clients, {name}: {r['tokens_per_s']:.0f} tokens/s ({r['step_s_per_client']:.2f} s/step/client)", flush=True)
            row["ratio"] = row["batched"]["tokens_per_s"] / row["unbatched"]["tokens_per_s"]
            print(f"  {n} clients: {row['batched'].get('mean_requests_per_pass') or 0:.2f} requests per batched pass", flush=True)
            rows.append(row)
    finally:
        for s in servers.values():
            s.stop()
    res = {"settings": vars(args), "rows": rows,
           "what": "end-to-end split tuning (clients share this machine's cores)" if args.end_to_end
           else "cloud throughput: replay clients send real-sized requests without their own compute"}
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(res, f, indent=2)
    print(f"\n{res['what']}; {args.batch}x{args.seq} tokens per client step, {args.steps} steps")
    print(f"{'clients':>8}{'unbatched tok/s':>18}{'batched tok/s':>16}{'batched/unbatched':>20}{'requests/pass':>15}")
    for r in rows:
        print(f"{r['clients']:>8}{r['unbatched']['tokens_per_s']:>18.0f}{r['batched']['tokens_per_s']:>16.0f}"
              f"{r['ratio']:>20.2f}{r['batched'].get('mean_requests_per_pass') or 0:>15.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

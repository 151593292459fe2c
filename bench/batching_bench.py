"""Coordinated batching benchmark: aggregate training tokens/s of 1, 2, 4 and 8 concurrent clients, batched vs not.

Run: .venv/bin/python bench/batching_bench.py [--clients 1,2,4,8] [--batch 1 --seq 128] [--steps 8] [--end-to-end]

Two real `cloud serve` processes (mutual TLS, sealing) run side by side on the same model: one with
coordinated batching (the default) and one with --no-batching. For each client count, both get the
same load in turn, so compare the ratio column; absolute rates depend on this machine.

By default the clients are *replay clients*, one process each: each opens its own session with its
own remote LoRA and sends real-sized Forward and Backward requests (hidden states, output gradients,
and a changed LoRA every step, as a training client does) without computing its own stages. That measures what
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
import statistics
import sys
import threading
import time

import torch

from tandem.testing.bench_cli import bench_parser, offline_hub

offline_hub()

from tandem.client.assemble import connect_split  # noqa: E402
from tandem.client.remote import RemoteMiddle  # noqa: E402
from tandem.client.session import open_session  # noqa: E402
from tandem.client.trainer import ADAMW  # noqa: E402
from tandem.client.transport import Transport  # noqa: E402
from tandem.stages.lora import LoraConfig, slot_shapes  # noqa: E402
from tandem.testing.servers import start_server  # noqa: E402

LORA = LoraConfig(rank=8, alpha=16)


def parse_args(argv=None) -> argparse.Namespace:
    """Parses the command line."""
    p = bench_parser(__file__, __doc__, model=True, work="scratch directory", results=True)
    p.add_argument("--clients", default="1,2,4,8", help="concurrent client counts; default 1,2,4,8")
    p.add_argument("--batch", type=int, default=1, help="sequences per client step (a laptop's batch); default 1")
    p.add_argument("--seq", type=int, default=128, help="tokens per sequence; default 128")
    p.add_argument("--steps", type=int, default=8, help="timed steps per client (after the --warmup steps); default 8")
    p.add_argument(
        "--warmup",
        type=int,
        default=2,
        help="untimed steps per client before the timed ones; default 2 (new sessions that first met in "
        "different passes fall into step within one step, see the README)",
    )
    p.add_argument("--threads", type=int, default=2, help="torch threads of each server; default 2")
    p.add_argument("--end-to-end", action="store_true", help="real split-tuning clients instead of replay clients")
    p.add_argument(
        "--device",
        default="cpu",
        help="`cloud serve --device` of both servers, and where the compute-gain passes run (cpu, cuda, cuda:N); "
        "default cpu",
    )
    p.add_argument(
        "--dtype",
        default="float32",
        help="`cloud serve --dtype` of both servers, and of the compute-gain passes; default float32",
    )
    p.add_argument(
        "--cloud-optimizer",
        action="store_true",
        help="sessions with `client tune --cloud-optimizer`: the cloud updates the remote LoRA, so neither it nor "
        "its gradients travel each step (default: the client's own optimizer, the LoRA up and its "
        "gradients down every step)",
    )
    p.add_argument(
        "--reps",
        type=int,
        default=3,
        help="alternating repetitions per client count; the table shows medians; default 3",
    )
    p.add_argument(
        "--compute-reps",
        type=int,
        default=3,
        help="repetitions of the in-process compute-gain measurement (0 skips it); default 3",
    )
    return p.parse_args(argv)


class ReplayClient:
    """A training client's traffic without its compute: real-sized requests on its own session."""

    def __init__(self, tcfg, args, seed: int):
        self.t = Transport(tcfg)
        self.cloud = args.cloud_optimizer
        first = open_session(self.t, LORA, cloud_optimizer=ADAMW if self.cloud else None)
        info = first.info
        self.hidden = (
            json.loads(info.model_config_json).get("hidden_size") or json.loads(info.model_config_json)["n_embd"]
        )
        gen = torch.Generator().manual_seed(seed)
        shapes = slot_shapes(list(info.middle_slots), LORA.rank)
        self.params = [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.01) for s in shapes]
        self.mid = RemoteMiddle(self.t, lambda: first, self.params, cloud_optimizer=self.cloud)
        self.h = torch.randn(args.batch, args.seq, self.hidden, generator=gen)
        self.am = torch.ones(args.batch, args.seq, dtype=torch.long)
        self.g = torch.randn(args.batch, args.seq, self.hidden, generator=gen) * 1e-3
        self.tokens = args.batch * args.seq

    def step(self, step: int) -> None:
        self.mid.forward_rpc(self.h, self.am, step, 0, train=True)
        _, grads = self.mid.backward_rpc(step, self.g, self.h, self.am, 0)
        if self.cloud:
            return  # the cloud applied the update
        with torch.no_grad():
            for p, g in zip(self.params, grads):
                p.add_(g, alpha=-1e-3)  # an optimizer step: the LoRA changes and is resent, as in training

    def close(self) -> None:
        self.mid.close()
        self.t.close()


class RealClient:
    """A split-tuning client: its own stages, adapter and optimizer."""

    def __init__(self, tcfg, args, seed: int):
        self.t = Transport(tcfg)
        self.sm = connect_split(self.t, LORA, seed=seed, cloud_optimizer=ADAMW if args.cloud_optimizer else None)
        gen = torch.Generator().manual_seed(seed)
        vocab = self.sm.config.vocab_size
        self.ids = torch.randint(0, vocab, (args.batch, args.seq), generator=gen)
        remote = {id(p) for p in self.sm.middle.params} if args.cloud_optimizer else set()
        self.opt = torch.optim.AdamW([p for p in self.sm.adapter.parameters() if id(p) not in remote], lr=ADAMW["lr"])
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


def _client_loop(c, args, barrier) -> float:
    """`args.warmup` untimed steps (the first also sends the LoRA), then the timed steps; returns their wall time."""
    for s in range(args.warmup):
        c.step(s)
    barrier.wait()
    t0 = time.perf_counter()
    for s in range(args.warmup, args.warmup + args.steps):
        c.step(s)
    return time.perf_counter() - t0


def _replay_process(tcfg, args, seed: int, barrier, results) -> None:
    """A replay client in its own process, as a separate data owner would be (no GIL shared with the others)."""
    torch.set_num_threads(1)
    try:
        c = ReplayClient(tcfg, args, seed)
        wall = _client_loop(c, args, barrier)
        c.close()
        results.put((seed, wall, c.tokens, None))
    except Exception as e:  # noqa: BLE001 - reported by the parent
        barrier.abort()
        results.put((seed, 0.0, 0, repr(e)))


def run(server, n: int, args, counters=None) -> dict:
    """n clients at once, `args.steps` timed steps each; returns aggregate tokens/s.

    Replay clients run one process each; real clients (--end-to-end) are threads of this process.
    counters: for the batched server, a function reading its batcher's counters; they are read when the
    timed steps start (this process joins the clients' barrier) and when they end.
    """
    t0 = time.perf_counter()
    if args.end_to_end:
        clients = [RealClient(server.transport_cfg(), args, seed) for seed in range(n)]
        barrier = threading.Barrier(n + 1)
        walls, errors = [0.0] * n, []

        def go(i):
            try:
                walls[i] = _client_loop(clients[i], args, barrier)
            except Exception as e:  # noqa: BLE001 - reported after join
                errors.append(repr(e))
                barrier.abort()

        threads = [threading.Thread(target=go, args=(i,)) for i in range(n)]
        for th in threads:
            th.start()
        before = _start(barrier, counters)
        for th in threads:
            th.join()
        after = counters() if counters else None
        for c in clients:
            c.close()
        tokens = sum(c.tokens for c in clients) * args.steps
    else:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        barrier, results = ctx.Barrier(n + 1), ctx.Queue()
        procs = [
            ctx.Process(target=_replay_process, args=(server.transport_cfg(), args, seed, barrier, results))
            for seed in range(n)
        ]
        for pr in procs:
            pr.start()
        before = _start(barrier, counters)
        got = [results.get(timeout=1800) for _ in procs]
        after = counters() if counters else None
        for pr in procs:
            pr.join()
        walls = [w for _, w, _, _ in got]
        errors = [e for _, _, _, e in got if e]
        tokens = sum(k for _, _, k, _ in got) * args.steps
    if errors:
        raise RuntimeError(errors[0])
    wall = max(walls)
    out = {
        "clients": n,
        "tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "step_s_per_client": sum(walls) / n / args.steps,
        "total_s": time.perf_counter() - t0,
    }
    if before is not None and after is not None:
        passes = after[0] - before[0]
        out["mean_requests_per_pass"] = (after[1] - before[1]) / passes if passes else None
        out["worker_busy_share"] = (after[2] - before[2]) / wall
    return out


def _start(barrier, counters):
    """Releases the clients into their timed steps; returns the counters at that moment (or None)."""
    try:
        barrier.wait(timeout=1800)
    except threading.BrokenBarrierError:
        return None  # a client failed; its error is reported after the join
    return counters() if counters else None


def _batch_counters(port: int) -> tuple[float, float, float]:
    """(passes, requests, compute seconds) of the batched server's batcher, from its Prometheus metrics."""
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    vals = {ln.split()[0]: float(ln.split()[1]) for ln in text.splitlines() if ln.startswith("tandem_batched_")}
    return (
        vals.get("tandem_batched_passes", 0.0),
        vals.get("tandem_batched_requests", 0.0),
        vals.get("tandem_batched_compute_seconds", 0.0),
    )


def _forward_backward(mid, h: torch.Tensor, mask: torch.Tensor) -> None:
    """The middle's forward and its backward into the input (the frozen weights get no gradient)."""
    h = h.clone().requires_grad_(True)
    y = mid(h, mask)
    y.backward(torch.ones_like(y))


def compute_gain(args, counts: list[int]) -> list[dict]:
    """What batching gains in the compute alone: the frozen middle's forward+backward, in this process, on n
    sessions' inputs one after another vs concatenated into one pass (no RPC, no LoRA, no scheduling, no
    concurrency). Where it is near 1 the matrix products are already compute-bound and grouping rows saves
    little. The servers' ratio can differ either way: the batched server pays the clients' I/O between passes,
    and the unbatched one pays for its concurrent passes competing for the cores.
    """
    from tandem.stages.arch import parts_of
    from tandem.stages.loading import load_model
    from tandem.stages.modules import MiddleStage, StageLayout

    torch.set_num_threads(args.threads)
    lm = load_model(args.model, device=args.device, dtype=args.dtype)
    mid = MiddleStage(parts_of(lm.model), StageLayout.parse("2:2", lm.config).middle_blocks)
    hidden = lm.config.hidden_size
    param = next(lm.model.parameters())
    sync = torch.cuda.synchronize if param.device.type == "cuda" else (lambda: None)
    gen = torch.Generator().manual_seed(0)
    out = []
    for n in counts:
        hs = [torch.randn(args.batch, args.seq, hidden, generator=gen).to(param) for _ in range(n)]
        am = torch.ones(args.batch, args.seq, dtype=torch.long, device=param.device)
        runs = {"separate": [(h, am) for h in hs], "together": [(torch.cat(hs), am.repeat(n, 1))]}
        _forward_backward(mid, hs[0], am)  # warm-up
        times = {name: [] for name in runs}
        for _ in range(args.compute_reps):
            for name, inputs in runs.items():
                sync()
                t0 = time.perf_counter()
                for h, mask in inputs:
                    _forward_backward(mid, h, mask)
                sync()
                times[name].append(time.perf_counter() - t0)
        sep, tog = min(times["separate"]), min(times["together"])
        out.append({"clients": n, "separate_s": sep, "together_s": tog, "ratio": sep / tog})
        print(f"  compute gain, {n} sessions: separate {sep:.3f} s, one pass {tog:.3f} s, {sep / tog:.2f}x", flush=True)
    torch.set_num_threads(1)
    return out


def main(argv=None) -> int:
    """Runs the benchmark and prints the table."""
    args = parse_args(argv)
    import pathlib

    counts = [int(x) for x in args.clients.split(",")]
    ceil = compute_gain(args, counts) if args.compute_reps > 0 else []
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
        device = ("--device", args.device, "--dtype", args.dtype)
        servers[name] = start_server(args.model, work, *extra, *device, "--threads", str(args.threads), timeout=300)
    rows = []
    try:
        for n in counts:
            row = {"clients": n, "unbatched": {"reps": []}, "batched": {"reps": []}}
            for _ in range(args.reps):  # alternating, so that drift in the machine's load hits both alike
                for name in ("unbatched", "batched"):
                    r = run(servers[name], n, args, (lambda: _batch_counters(mport)) if name == "batched" else None)
                    row[name]["reps"].append(r)
                    busy = (
                        f", worker busy {r['worker_busy_share']:.0%}" if r.get("worker_busy_share") is not None else ""
                    )
                    print(
                        f"  {n} clients, {name}: {r['tokens_per_s']:.0f} tokens/s ({r['step_s_per_client']:.2f} s/step/client{busy})",
                        flush=True,
                    )
            for name in ("unbatched", "batched"):
                reps = row[name]["reps"]
                row[name]["tokens_per_s"] = statistics.median(r["tokens_per_s"] for r in reps)
                if name == "batched":
                    rpp = [r["mean_requests_per_pass"] for r in reps if r.get("mean_requests_per_pass")]
                    row[name]["mean_requests_per_pass"] = statistics.median(rpp) if rpp else None
            row["ratio"] = row["batched"]["tokens_per_s"] / row["unbatched"]["tokens_per_s"]
            row["ratio_per_rep"] = [
                b["tokens_per_s"] / u["tokens_per_s"] for u, b in zip(row["unbatched"]["reps"], row["batched"]["reps"])
            ]
            print(
                f"  {n} clients: {row['batched'].get('mean_requests_per_pass') or 0:.2f} requests per batched pass, "
                f"ratio of medians {row['ratio']:.2f}",
                flush=True,
            )
            rows.append(row)
    finally:
        for s in servers.values():
            s.stop()
    res = {
        "settings": vars(args),
        "rows": rows,
        "compute_gain": ceil,
        "what": "end-to-end split tuning (clients share this machine's cores)"
        if args.end_to_end
        else "cloud throughput: replay clients send real-sized requests without their own compute",
    }
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(res, f, indent=2)
    opt = "the cloud's optimizer (--cloud-optimizer)" if args.cloud_optimizer else "the client's own optimizer"
    print(
        f"\n{res['what']}; {args.batch}x{args.seq} tokens per client step, {args.steps} steps, median of {args.reps}; "
        f"remote LoRA updated by {opt}"
    )
    limit = {c["clients"]: c["ratio"] for c in ceil}
    print(
        f"{'clients':>8}{'unbatched tok/s':>18}{'batched tok/s':>16}{'batched/unbatched':>20}{'requests/pass':>15}"
        f"{'compute gain':>14}"
    )
    for r in rows:
        c = limit.get(r["clients"])
        print(
            f"{r['clients']:>8}{r['unbatched']['tokens_per_s']:>18.0f}{r['batched']['tokens_per_s']:>16.0f}"
            f"{r['ratio']:>20.2f}{r['batched'].get('mean_requests_per_pass') or 0:>15.2f}"
            f"{(f'{c:.2f}x' if c else '-'):>14}"
        )
    if ceil:
        print(
            "compute gain: the middle's forward+backward on all clients' rows in one pass vs one pass each, in this "
            "process, without RPC or concurrency"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

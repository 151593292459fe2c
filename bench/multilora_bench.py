"""Batched multi-LoRA kernel vs per-adapter loops at 1, 4, 16 and 64 adapters, forward and forward+backward."""

from __future__ import annotations

import json
import os
import time

import torch
import torch.nn.functional as F

from tandem.kernels.multilora import multilora_delta, multilora_loop, plan_segments, segment_ids
from tandem.testing.bench_cli import bench_parser, out_path


def loop_presorted(x, a, b, scaling, ids):
    """The strongest plain loop: sort rows by adapter once, split, one lora_delta per adapter, cat, unsort.

    Unlike `multilora_loop` its backward never builds a full-size gradient per adapter.
    """
    n = a.shape[0]
    order = torch.argsort(ids, stable=True)
    counts = torch.bincount(ids, minlength=n).tolist()
    parts = torch.split(x.index_select(0, order), counts)  # n x (n_k, in)
    ys = [F.linear(F.linear(p, a[k]), b[k]) * scaling for k, p in enumerate(parts) if counts[k]]
    return torch.cat(ys).index_select(0, torch.argsort(order))  # (N, out)


def row_gather(x, a, b, scaling, ids):
    """Candidate CPU strategy: gather A and B per row and batch matrix-vector products over rows."""
    v = torch.bmm(a.index_select(0, ids), x.unsqueeze(2))  # (N, r, 1)
    return torch.bmm(b.index_select(0, ids), v).squeeze(2) * scaling  # (N, out)


def timed(fn, clock):
    t = clock()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return clock() - t


def measure(cases, reps, clock):
    """Runs every case's forward and forward+backward `reps` times, interleaved; returns min seconds per case."""
    best = {name: [float("inf"), float("inf")] for name in cases}
    names = list(cases)
    for rep in range(reps):
        for name in names[rep % len(names) :] + names[: rep % len(names)]:  # rotate: no case always runs first
            fwd, fwdbwd = cases[name]
            with torch.no_grad():
                best[name][0] = min(best[name][0], timed(fwd, clock))
            best[name][1] = min(best[name][1], timed(fwdbwd, clock))
    return best


def make_cases(x, a, b, scaling, ids, variants):
    """{name: (forward thunk, forward+backward thunk)} for the kernel, the loops and optional variants."""
    plan = plan_segments(ids, a.shape[0])  # once per batch in real use: kept out of the timings
    fns = {
        "kernel": lambda: multilora_delta(x, a, b, scaling, plan),
        "loop": lambda: multilora_loop(x, a, b, scaling, ids),
        "loop_presorted": lambda: loop_presorted(x, a, b, scaling, ids),
    }
    if x.is_cuda:  # the vectorised torch path on the GPU, next to the Triton kernels
        fns["kernel_torch"] = lambda: multilora_delta(x, a, b, scaling, plan, impl="torch")
    if variants:
        for tile in (32, 128):
            p = plan_segments(ids, a.shape[0], tile=tile)
            fns[f"tiles_{tile}"] = lambda p=p: multilora_delta(x, a, b, scaling, p)
        if a.shape[0] <= 16:  # (N, r, in) per-row weights: too slow and large beyond that
            fns["row_gather"] = lambda: row_gather(x, a, b, scaling, ids)
    g = torch.randn(x.shape[0], b.shape[1], device=x.device)

    def both(f):
        return f, lambda: torch.autograd.grad(f(), (x, a, b), g)

    return {k: both(f) for k, f in fns.items()}, plan.tile


def main() -> None:
    p = bench_parser(__file__, __doc__)
    p.add_argument("--adapters", default="1,4,16,64", help="adapter counts, comma-separated")
    p.add_argument("--rows-per-adapter", type=int, default=128, help="tokens per adapter (one 128-token sequence each)")
    p.add_argument("--in-features", type=int, default=576, help="SmolLM2-135M hidden size")
    p.add_argument("--out-features", default="576,192", help="576 = q_proj, 192 = v_proj (3 KV heads x 64)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--reps", type=int, default=7, help="repetitions; the minimum is reported")
    p.add_argument("--threads", type=int, default=1, help="torch threads; with 1 the clock is this thread's CPU time")
    p.add_argument(
        "--shuffle", action="store_true", help="interleave the adapters' rows instead of contiguous segments"
    )
    p.add_argument("--skew", action="store_true", help="uneven segments: lengths drawn from 1..2x rows-per-adapter")
    p.add_argument(
        "--variants", action="store_true", help="also time the other CPU strategies (fixed tiles, per-row gather)"
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    clock = time.thread_time if (args.threads == 1 and args.device == "cpu") else time.perf_counter
    gen = torch.Generator().manual_seed(0)
    rows = []
    for out_f in [int(v) for v in args.out_features.split(",")]:
        for n in [int(v) for v in args.adapters.split(",")]:
            lens = [args.rows_per_adapter] * n
            if args.skew:
                lens = torch.randint(1, 2 * args.rows_per_adapter + 1, (n,), generator=gen).tolist()
            ids = segment_ids(lens)
            if args.shuffle:
                ids = ids[torch.randperm(ids.numel(), generator=gen)]
            dev = args.device
            x = torch.randn(ids.numel(), args.in_features, generator=gen).to(dev).requires_grad_()
            a = (torch.randn(n, args.rank, args.in_features, generator=gen) * 0.02).to(dev).requires_grad_()
            b = (torch.randn(n, out_f, args.rank, generator=gen) * 0.02).to(dev).requires_grad_()
            ids_dev = ids.to(dev)
            cases, tile = make_cases(x, a, b, 2.0, ids_dev, args.variants)
            best = measure(cases, args.reps, clock)
            plan_s = min(timed(lambda: plan_segments(ids_dev, n), clock) for _ in range(args.reps))  # noqa: B023 - used at once
            rows.append(
                {
                    "adapters": n,
                    "rows": ids.numel(),
                    "in": args.in_features,
                    "out": out_f,
                    "rank": args.rank,
                    "tile": tile,
                    "plan_ms": 1e3 * plan_s,
                    "ms": {k: [1e3 * v for v in t] for k, t in best.items()},
                }
            )
            print(f"  measured {n} adapters, out={out_f}", flush=True)

    others = [k for k in rows[0]["ms"] if k != "kernel"]
    print(
        f"\nmulti-LoRA delta on {args.device}, {args.threads} thread(s), r={args.rank}, in={args.in_features}, "
        f"{'skewed segments' if args.skew else f'{args.rows_per_adapter} rows per adapter'}, "
        f"{'shuffled rows' if args.shuffle else 'contiguous segments'}; "
        f"min of {args.reps} runs, {'CPU' if clock is time.thread_time else 'wall'} ms; "
        "(Nx) = the kernel's speed-up over that implementation"
    )
    for i, phase in enumerate(("forward", "forward+backward (grads for x, A, B)")):
        print(f"\n{phase}")
        head = f"{'adapters':>8} {'out':>4} {'rows':>5} {'kernel':>8} " + " ".join(
            f"{k:>{max(len(k), 8) + 8}}" for k in others
        )
        print(head)
        print("-" * len(head))
        for r in rows:
            kern = r["ms"]["kernel"][i]
            cells = " ".join(
                f"{r['ms'][k][i]:{max(len(k), 8) + 1}.2f} ({r['ms'][k][i] / kern:4.1f}x)"
                if k in r["ms"]
                else f"{'-':>{max(len(k), 8) + 8}}"
                for k in others
            )
            print(f"{r['adapters']:>8} {r['out']:>4} {r['rows']:>5} {kern:8.2f} {cells}")
    print(
        "\nplan_segments (once per batch, shared by every LoRA layer; not in the kernel's times above): "
        + ", ".join(f"{r['adapters']} adapters {r['plan_ms']:.2f} ms" for r in rows if r["out"] == rows[0]["out"])
    )
    mode = "".join(f"_{k}" for k in ("skew", "shuffle", "variants") if getattr(args, k))
    path = out_path(__file__, f"multilora_bench{mode}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"args": vars(args), "results": rows}, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

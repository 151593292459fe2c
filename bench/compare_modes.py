"""Cross-mode communication report: split vs offsite vs uploading the raw data, for one data set, model and link."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

from tandem.testing.bench_cli import bench_parser, offline_hub, out_path

offline_hub()


def parse_args(argv=None) -> argparse.Namespace:
    """Parses the command line."""
    p = bench_parser(__file__, __doc__, model=True)
    p.add_argument("--data", required=True, help="the data owner's directory of .txt/.jsonl files")
    p.add_argument(
        "--emulator",
        default=out_path(__file__, os.path.join("offsite_table", "pkg")),
        help="emulator package (its size is the offsite one-time download); default: offsite_table's",
    )
    p.add_argument("--client-blocks", default="2:2", help="split layout K:M; default 2:2")
    p.add_argument("--epochs", type=float, default=3.0, help="passes over the data; default 3")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per step; default 4")
    p.add_argument("--seq-len", type=int, default=64, help="tokens per sequence; default 64")
    p.add_argument("--lora-rank", type=int, default=8, help="LoRA rank (split mode's remote LoRA on q,v); default 8")
    p.add_argument(
        "--remote-lora",
        action="store_true",
        help="split mode also adapts the middle blocks (DLoRA); default off, as offsite",
    )
    p.add_argument(
        "--checkpoint-every",
        type=int,
        default=10,
        help="with --remote-lora: steps between checkpoints, where a cloud optimizer run fetches the remote "
        "LoRA and its AdamW moments (`client tune --checkpoint-every`); default 10",
    )
    p.add_argument(
        "--bandwidth-mbps", type=float, default=50.0, help="link bandwidth, megabits/s, each way; default 50"
    )
    p.add_argument("--rtt-ms", type=float, default=40.0, help="round-trip time, ms; default 40")
    p.add_argument(
        "--timings",
        default=out_path(__file__, "offsite_table.json"),
        help="measured per-step compute (offsite_table.json: tune_step_wall_s_median of offsite and full); default its output",
    )
    p.add_argument(
        "--cloud-speedup",
        type=float,
        default=1.0,
        help="how much faster the cloud computes than this machine; default 1",
    )
    p.add_argument(
        "--out", default=out_path(__file__, "compare_modes"), help="directory for compare.json and compare.png"
    )
    return p.parse_args(argv)


def main(argv=None) -> int:
    """Computes, prints and plots the comparison."""
    args = parse_args(argv)
    from tandem.client.data import pack, read_examples
    from tandem.emulator.package import load_package
    from tandem.stages.arch import parts_of
    from tandem.stages.loading import (
        client_state,
        default_model_dir,
        load_model,
        load_tokenizer,
        pack_state,
        tokenizer_files,
    )
    from tandem.stages.modules import StageLayout

    model_dir = args.model or default_model_dir()
    tok = load_tokenizer(model_dir)
    raw = sum(
        os.path.getsize(os.path.join(args.data, n)) for n in os.listdir(args.data) if n.endswith((".txt", ".jsonl"))
    )
    n_seq = len(pack(read_examples(args.data), tok, args.seq_len))
    steps = math.ceil(args.epochs * math.ceil(n_seq / args.batch_size))
    steps_per_epoch = math.ceil(n_seq / args.batch_size)
    loaded = load_model(args.model)
    parts = parts_of(loaded.model)
    layout = StageLayout.parse(args.client_blocks, loaded.config)
    hidden = int(loaded.config.hidden_size)
    stages = len(pack_state(client_state(parts, layout))) + sum(len(b) for b in tokenizer_files(loaded.path).values())
    pkg = load_package(args.emulator)
    pkg_bytes = pkg.manifest["bytes"]["total"]
    timings = json.load(open(args.timings))
    step = timings.get("tune_step_wall_s_median") or timings["step_wall_s_median"]  # the latter: older outputs
    t_off, t_full = step["offsite"], step["full"]
    adapter_bytes = 4 * timings["adapter_trainable_params"] + 4096  # float32 tensors + config and framing
    bt = args.batch_size * args.seq_len
    # Share of a step's compute on the split client: its blocks and the head, against all blocks and the head.
    per_block = sum(p.numel() for p in parts.blocks[0].parameters())
    head = parts.head.weight.numel()
    share = (len(layout.client_blocks) * per_block + head) / (layout.num_layers * per_block + head)
    lora = 0
    if args.remote_lora:  # q,v in every middle block: r*(in+out) each
        q = parts.blocks[layout.middle_blocks[0]]
        lora = sum(
            args.lora_rank * (m.in_features + m.out_features)
            for n, m in q.named_modules()
            if n.endswith(("q_proj", "v_proj"))
        ) * len(layout.middle_blocks)
    # Measured equal to this to 1e-4 by bench/split_vs_local.py: hidden + mask + grad up, hidden + grad down, LoRA both ways.
    split_step = 2 * (4 * bt * hidden) + bt + 4 * lora + 2 * (4 * bt * hidden) + 4 * lora
    bw = args.bandwidth_mbps * 1e6 / 8  # bytes/s
    rtt = args.rtt_ms / 1e3
    modes = {
        "split": {
            "one_time": stages,
            "per_epoch": split_step * steps_per_epoch,
            "round_trips": 2 * steps + 2,
            "compute_s": steps * t_full * (share + (1 - share) / args.cloud_speedup),
        },  # client part here, middle in the cloud
        **(
            {
                "split, cloud optim.": {  # --cloud-optimizer: the LoRA goes up once; it and both moments come down per checkpoint
                    "one_time": stages + 4 * lora,
                    "per_epoch": (split_step - 8 * lora) * steps_per_epoch
                    + 12 * lora * steps_per_epoch / args.checkpoint_every,
                    "round_trips": 2 * steps + 2 + math.ceil(steps / args.checkpoint_every),
                    "compute_s": steps * t_full * (share + (1 - share) / args.cloud_speedup),
                }
            }
            if lora
            else {}
        ),
        "offsite": {
            "one_time": pkg_bytes + adapter_bytes,
            "per_epoch": 0,
            "round_trips": 2,
            "compute_s": steps * t_off,
        },
        "upload raw data": {
            "one_time": raw + adapter_bytes,
            "per_epoch": 0,
            "round_trips": 2,
            "compute_s": steps * t_full / args.cloud_speedup,
        },
    }
    for m in modes.values():
        m["total"] = m["one_time"] + m["per_epoch"] * args.epochs
        m["transfer_s"] = m["total"] / bw + m["round_trips"] * rtt
        m["wall_s"] = m["transfer_s"] + m["compute_s"]
    res = {
        "settings": vars(args),
        "data": {"raw_bytes": raw, "sequences": n_seq, "steps": steps},
        "modes": modes,
        "privacy": {
            "split": "the cloud sees activations at the cut (invertible at shallow cuts)",
            "split, cloud optim.": "as split: the cloud saw the remote LoRA and its gradients every step anyway",
            "offsite": "nothing but the adapter leaves; the data owner gets a lossy emulator",
            "upload raw data": "the cloud reads the text",
        },
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "compare.json"), "w") as f:
        json.dump(res, f, indent=2)
    mb = lambda b: f"{b / 2**20:,.1f} MiB"  # noqa: E731
    print(
        f"{steps} steps ({args.epochs} epochs of {n_seq} x {args.seq_len} tokens), link {args.bandwidth_mbps} Mbit/s, RTT {args.rtt_ms} ms"
    )
    print(f"{'mode':<20}{'one-time':>14}{'per epoch':>14}{'total':>14}{'transfer':>12}{'compute':>12}{'wall':>12}")
    for k, m in modes.items():
        print(
            f"{k:<20}{mb(m['one_time']):>14}{mb(m['per_epoch']):>14}{mb(m['total']):>14}"
            f"{m['transfer_s']:>11.0f}s{m['compute_s']:>11.0f}s{m['wall_s']:>11.0f}s"
        )
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    names = list(modes)
    a.bar(names, [modes[n]["one_time"] / 2**20 for n in names], label="one-time")
    a.bar(
        names,
        [modes[n]["per_epoch"] * args.epochs / 2**20 for n in names],
        bottom=[modes[n]["one_time"] / 2**20 for n in names],
        label=f"training ({args.epochs:g} epochs)",
    )
    a.set(ylabel="MiB", title="bytes over the link")
    a.legend()
    b.bar(names, [modes[n]["transfer_s"] for n in names], label="transfer")
    b.bar(
        names, [modes[n]["compute_s"] for n in names], bottom=[modes[n]["transfer_s"] for n in names], label="compute"
    )
    b.set(ylabel="seconds", title=f"projected wall time ({args.bandwidth_mbps:g} Mbit/s, {args.rtt_ms:g} ms RTT)")
    b.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "compare.png"), dpi=100)
    print(f"wrote {args.out}/compare.json and compare.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())

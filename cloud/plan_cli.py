"""`cloud plan`: its flags, and the table (or JSON) of what a deployment needs."""

from __future__ import annotations

import argparse
import json
import sys

from . import flags


def run_plan(args: argparse.Namespace) -> int:
    """Prints the plan; 2 (one line on stderr) when the input cannot be planned."""
    from tandem.stages.errors import StageError
    from tandem.stages.lora_layers import parse_layers

    from .plan import PlanConfig, plan

    try:
        cfg = PlanConfig(
            model=args.model,
            client_blocks=args.client_blocks,
            batch_size=args.batch_size,
            seq_len=args.seq_len,
            dtype=args.dtype,
            sessions=args.sessions,
            codec=args.codec,
            lora_rank=args.lora_rank,
            lora_targets=tuple(t for t in args.lora_targets.split(",") if t),
            cloud_optimizer=args.cloud_optimizer,
            memory_cap_mb=args.memory_cap_mb,
            lora_layers=parse_layers(args.lora_layers) if args.lora_layers else (),
        )
        result = plan(cfg)
    except (StageError, ValueError, OSError) as e:
        print(f"cloud plan: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        render(result)
    return 0


def _size(nbytes: float) -> str:
    """Bytes in the largest binary unit that keeps the figure at 1 or more."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:,.2f} {unit}"
    return f"{int(nbytes)} B"


def render(result: dict) -> None:
    """The plan as a terminal table."""
    from rich.console import Console
    from rich.table import Table

    client, cloud, traffic = result["client"], result["cloud"], result["step_bytes"]
    state, fit, total = cloud["forward_state_bytes"], cloud["sessions_fit"], cloud["total_bytes"]
    table = Table(
        title=f"cloud plan: {result['model']} ({result['architecture']}, {result['blocks']} blocks, client "
        f"{result['client_blocks']}), {result['dtype']}, {result['batch_size']}x{result['seq_len']} tokens a step, "
        f"codec {result['codec']}, {result['sessions']} session(s)"
    )
    table.add_column("what")
    table.add_column("size", justify="right")
    table.add_column("note")
    table.add_row(
        "client download (once)",
        _size(client["download_bytes"]),
        f"stages {_size(client['stages_bytes'])} + tokenizer {_size(client['tokenizer_bytes'])}",
    )
    table.add_row("client stage weights (memory)", _size(client["weights_bytes"]), f"{client['params']:,} parameters")
    if result["lora"]["round_trips_per_step"] == 1:  # nothing below the top cut trains: no backward crosses
        up, down = "activations, mask (one round trip)", "activations (no gradient crosses)"
    else:
        up, down = "activations, gradient, remote LoRA, mask", "activations, gradient, LoRA gradients"
    table.add_row("bytes per step, client to cloud", _size(traffic["up"]), up)
    table.add_row("bytes per step, cloud to client", _size(traffic["down"]), down)
    table.add_row("cloud weights (memory)", _size(cloud["weights_bytes"]), f"{cloud['params']:,} parameters")
    table.add_row(
        "remote LoRA per session",
        _size(cloud["session_resident_bytes"]),
        f"{result['lora']['remote_params']:,} parameters"
        + (", with AdamW moments" if result["lora"]["cloud_optimizer"] else ""),
    )
    for mode in state:
        table.add_row(
            f"forward state per session ({mode})",
            _size(state[mode]),
            f"{fit[mode]:,} sessions fit under the cap; {result['sessions']} take {_size(total[mode])} with the weights"
            + (
                f"; each Backward reruns its step's forward ({_size(state['keep'])} while it runs)"
                if mode == "recompute"
                else ""
            ),
        )
    table.add_row(
        "memory cap (--memory-cap-mb)", _size(cloud["memory_cap_bytes"]), "forward state and remote LoRAs, all sessions"
    )
    Console().print(table)


def add_plan_parser(sub) -> None:
    """Adds `plan` to the `cloud` command line."""
    parser = sub.add_parser(
        "plan",
        help="size a deployment from the model's config alone (no weights loaded)",
        description="What serving a model split at K:M needs: the client's one-time download and memory, the bytes "
        "of one training step each way, the cloud's weight memory, the forward state each session keeps "
        "(keep and recompute modes, counted by the same estimator admission control uses) and how many "
        "sessions fit under --memory-cap-mb. The model is built on the meta device: nothing is loaded.",
    )
    parser.add_argument(
        "--model",
        default=None,
        help="Hugging Face causal-LM directory (config.json and tokenizer files are read); "
        "default: the embedded SmolLM2-135M-Instruct",
    )
    parser.add_argument(
        "--client-blocks",
        default="2:2",
        metavar="K:M",
        help="blocks the client runs below (K) and above (M) the cloud; default 2:2",
    )
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per training step; default 4")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per sequence; default 128")
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "bfloat16", "float16"),
        help="dtype the cloud serves in (and ships the client's stages in); default float32",
    )
    parser.add_argument(
        "--sessions", type=int, default=1, help="sessions the deployment should hold at once; default 1"
    )
    parser.add_argument(
        "--codec",
        default="float32",
        help="wire codec of activations and gradients (client tune --codec); default float32",
    )
    parser.add_argument(
        "--lora-rank", type=int, default=8, help="the sessions' LoRA rank (client tune --lora-rank); default 8"
    )
    parser.add_argument(
        "--lora-targets",
        default="",
        help="comma-separated layers the remote LoRA adapts; default: the architecture's (q_proj,v_proj / c_attn)",
    )
    parser.add_argument(
        "--lora-layers",
        default="",
        metavar="BLOCKS",
        help="the blocks that carry LoRA (client tune --lora-layers), e.g. 28-29; with none below the top cut a step "
        "is one round trip and no gradient crosses; default: every block",
    )
    parser.add_argument(
        "--cloud-optimizer",
        action="store_true",
        help="the sessions use client tune --cloud-optimizer (no LoRA on the wire per step; AdamW moments in the cloud)",
    )
    parser.add_argument(
        "--memory-cap-mb",
        type=float,
        default=flags.DEFAULT_MEMORY_CAP_MB,
        help=f"the server's cap on session memory (cloud serve --memory-cap-mb), MiB; default {flags.DEFAULT_MEMORY_CAP_MB:g}",
    )
    parser.add_argument("--json", action="store_true", help="print the plan as JSON instead of a table")
    parser.set_defaults(func=run_plan)
